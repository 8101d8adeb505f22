"""Host staging for device-bound reads: nothing reads from a file into device memory directly; bytes go through two
pinned host buffers of STAGING_CHUNK bytes, copied over piece by piece (`Staging.copy_into`), and the pinned memory
is given back when the load is done (`Staging.release`). `tpcli.formats.rankfile.RankFile.read_run_to` stages a run
of a rank file's bytes this way; `tpcli.runtime.fast_load` stages slices it put together on the host."""

from __future__ import annotations

STAGING_CHUNK = 16 * 2**20  # bytes per staging buffer: a larger tensor goes to the device in pieces of this size


def staging_spans(numel: int, itemsize: int, chunk_bytes: int = STAGING_CHUNK) -> list[tuple[int, int]]:
    """The element ranges [a, b) a tensor of `numel` elements of `itemsize` bytes is staged in: consecutive,
    covering [0, numel) once, each at most `chunk_bytes` bytes (at least one element), all equal but the last.

        step = max(1, chunk_bytes // itemsize)
        spans = [(a, min(a + step, numel)) for a in range(0, numel, step)]    # ceil(numel / step) pieces
    """
    step = max(1, chunk_bytes // itemsize)
    return [(a, min(a + step, numel)) for a in range(0, numel, step)]


class Staging:
    """Two alternating host buffers of `chunk_bytes` between the files and a device: read piece i+1 while piece i is
    copied.

    For an accelerator target the buffers are pinned, so `copy_(non_blocking=True)` runs as a DMA on the current
    stream while the host reads the next piece into the other buffer. An event recorded after each copy is
    waited on before its buffer is refilled, so a buffer is never overwritten while the device still reads from it.
    CPU and `meta` targets copy synchronously: no pinning, no events. Pinned memory held: 2 x chunk_bytes per
    process whatever the model (the host caching allocator rounds a block up to a power of two: 16 MiB is one),
    given back to the system by `release` (`torch.accelerator.empty_host_cache`), not kept for the process.
    """

    def __init__(self, chunk_bytes: int = STAGING_CHUNK):
        self.chunk_bytes = chunk_bytes
        self.buffers: list = [None, None]
        self.events: list = [None, None]
        self.turn = 0
        self.pinned = False  # some buffer was pinned: the host cache has memory to give back

    def buffer(self, nbytes: int, device):
        """The first `nbytes` (<= chunk_bytes) of the next staging buffer, as uint8, safe to overwrite; its slot."""
        import torch

        if nbytes > self.chunk_bytes:
            raise AssertionError(f"staging {nbytes} bytes in buffers of {self.chunk_bytes}")
        slot, self.turn = self.turn, 1 - self.turn
        if self.events[slot] is not None:
            self.events[slot].synchronize()  # the device has finished reading this buffer
            self.events[slot] = None
        pin = device.type not in ("cpu", "meta")
        buf = self.buffers[slot]
        if buf is None or buf.is_pinned() != pin:
            buf = self.buffers[slot] = torch.empty(self.chunk_bytes, dtype=torch.uint8, pin_memory=pin)
            self.pinned |= pin
        return buf[:nbytes], slot

    def copied(self, slot: int, device) -> None:
        """Mark the end of the copy out of `slot` (on the device's current stream)."""
        import torch

        if device.type not in ("cpu", "meta"):
            event = torch.Event(device=device)
            event.record(torch.accelerator.current_stream(device))  # the stream `copy_` was queued on
            self.events[slot] = event

    def copy_into(self, out, stored, fill, to_target=None) -> None:
        """Copy into `out` (contiguous, any device, any dtype) piece by piece (`staging_spans`): `fill(buf, a)`
        puts the bytes of elements a.. in the `stored` dtype into the uint8 buffer `buf`; `to_target(part, host)`
        (default `part.copy_(host)`, async from pinned memory) is the one step that touches the target, once per
        piece: the whole `out` when there is one piece, else the piece's elements of `out` flattened."""
        spans = staging_spans(out.numel(), stored.itemsize, self.chunk_bytes)
        flat = out.view(-1)
        for a, b in spans:
            buf, slot = self.buffer((b - a) * stored.itemsize, out.device)
            fill(buf, a)
            host_part = buf.view(stored)
            part, host = (out, host_part.view(out.shape)) if len(spans) == 1 else (flat[a:b], host_part)
            if to_target is None:
                part.copy_(host, non_blocking=host.is_pinned())
            else:
                to_target(part, host)
            self.copied(slot, out.device)

    def release(self) -> None:
        """Wait for the copies still in flight, drop the buffers and give the pinned memory back to the system."""
        for slot, event in enumerate(self.events):
            if event is not None:
                event.synchronize()
                self.events[slot] = None
        self.buffers = [None, None]
        if self.pinned:  # the caching host allocator would otherwise keep the blocks for the life of the process
            import torch

            torch.accelerator.empty_host_cache()
            self.pinned = False
