"""The fast loader's reader as it was before the deferred, per-file `preadv` reads (branch `layers`, 0790a57):
one `readinto` per tensor, in the order `_load_tpcli_shards` asks. Frozen here as the oracle the new reader is
compared with (tests/test_reader_equal.py); nothing in tpcli imports it."""

from __future__ import annotations

from pathlib import Path

from tpcli.runtime.loading import _Staging


class LegacySliceReader:
    """Fills local tensors from the rank files, reading only the byte ranges they need.

    At tp == world size a rank's Shard(d) slice is exactly one chunk of one file, contiguous on disk whatever d
    is, and a replicated tensor is one whole entry: both are read with one `readinto`. Only `_StridedShard` slices
    (packed gate/up) span several chunks; they are sliced out of the files with safetensors' `get_slice`.

    Where the bytes land depends on the target, never on the path that read them:
    * host-direct: a CPU target of the stored dtype is read straight into its own storage (no copy); never a view
      of a mapping of the file (the file may change under a running job);
    * staged: any other target (a CUDA parameter, a `meta` one, another dtype) is filled by reading the bytes into
      a host staging buffer and copying that to the target with `_to_target` (`copy_` casts when the dtypes
      differ). Device memory is never touched from the host: no `.numpy()`, no `readinto` into a device tensor.
    `stage=True` forces staging for CPU targets too (tests compare it with the direct path byte for byte).
    """

    def __init__(self, folder: Path, *, stage: bool = False):
        self.folder = folder
        self.files: dict[str, object] = {}
        self.slicers: dict[str, object] = {}
        self.bytes_read = 0  # bytes of the files this rank's tensors come from
        self.force_stage = stage
        self.staging = _Staging()

    def _file(self, file: str):
        from tpcli.formats.tensor_file import TensorFile

        if file not in self.files:
            self.files[file] = TensorFile(self.folder / file)
        return self.files[file]

    def _slicer(self, file: str):
        from safetensors import safe_open

        if file not in self.slicers:
            self.slicers[file] = safe_open(str(self.folder / file), framework="pt")
        return self.slicers[file]

    @staticmethod
    def _local_shape(entry: dict, dim: int | None, runs) -> list[int]:
        shape = list(entry["shape"])
        if runs is not None:
            shape[dim] = sum(b - a for a, b in runs)
        return shape

    def read_tensor(self, name: str, entry: dict, dim: int | None, runs):
        """This rank's slice as a new CPU tensor in the stored dtype."""
        import torch

        out = torch.empty(self._local_shape(entry, dim, runs), dtype=getattr(torch, entry["dtype"]))
        self._read_host(out, name, entry, dim, runs)
        return out

    def read_into(self, out, name: str, entry: dict, dim: int | None, runs) -> None:
        """Fill `out` (any device, any dtype, this rank's local shape) with this rank's slice of `name`."""
        import torch

        stored = getattr(torch, entry["dtype"])
        direct = out.device.type == "cpu" and out.dtype == stored and out.is_contiguous() and not self.force_stage
        if direct:
            self._read_host(out, name, entry, dim, runs)
            return
        host, event = self.staging.buffer(self._local_shape(entry, dim, runs), stored, out.device)
        self._read_host(host, name, entry, dim, runs)
        self._to_target(out, host)
        self.staging.copied(event, out.device)

    @staticmethod
    def _whole_chunk(entry: dict, dim: int | None, runs):
        """The stored chunk that is exactly this rank's slice (a replicated tensor's one copy), or None."""
        chunks = entry["chunks"]
        if runs is None:
            return chunks[0]
        if len(runs) == 1:
            return next((c for c in chunks if (c["offsets"][dim], c["offsets"][dim] + c["sizes"][dim]) == runs[0]),
                        None)
        return None

    def _to_target(self, out, host) -> None:
        """The one step that touches the target: a device-side copy (a no-op on meta; async from pinned memory)."""
        out.copy_(host, non_blocking=host.is_pinned())

    def finish(self) -> None:
        """Wait for the last copies to the device, then drop the staging buffers and close the files."""
        self.staging.wait_all()
        for f in self.files.values():
            f.close()
        self.files.clear()
        self.slicers.clear()

    def _read_host(self, out, name: str, entry: dict, dim: int | None, runs) -> None:
        """Read this rank's slice into the contiguous CPU tensor `out` of the stored dtype."""
        import torch

        chunks = entry["chunks"]
        whole = self._whole_chunk(entry, dim, runs)  # replicated: its one copy, stored in one file
        if whole is not None and list(out.shape) == whole["sizes"]:
            self._file(whole["file"]).read_into(name, out)
            self.bytes_read += out.numel() * out.element_size()
            return
        parts = []
        for start, stop in runs or [(0, entry["shape"][0])]:
            for c in chunks:  # the contiguous chunks on disk that overlap [start, stop)
                d = dim if dim is not None else 0
                lo, hi = c["offsets"][d], c["offsets"][d] + c["sizes"][d]
                a, b = max(start, lo), min(stop, hi)
                if a < b:
                    index = [slice(None)] * len(entry["shape"])
                    index[d] = slice(a - lo, b - lo)
                    part = self._slicer(c["file"]).get_slice(name)[tuple(index)]
                    self.bytes_read += part.numel() * part.element_size()
                    parts.append(part)
        if len(parts) == 1:
            out.copy_(parts[0])
        else:
            torch.cat(parts, dim=dim or 0, out=out)
