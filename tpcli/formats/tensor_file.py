"""safetensors files written by tpcli itself (every file is read by `tpcli.formats.rankfile`): `StreamWriter`,
which writes a file whose header is known up front (names, dtypes, shapes), then takes the tensors one at a time
in header order, so memory never holds more than one tensor and the sha256 of the file is computed while writing.
The layout is standard safetensors: 8-byte little-endian header length, JSON header padded with spaces to 8 bytes,
then the raw little-endian data of each tensor at its `data_offsets`.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import struct
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from tpcli.formats.units import SAFETENSORS_CODES, tensor_bytes

HASH_LAG = 64 * 2**20  # measured: hashing one buffer behind cost ~17% of shard time; 64 MB behind recovers it


def header_layout(entries, metadata) -> tuple[bytes, dict[str, int], int]:
    """(padded JSON header, bytes per tensor, data bytes) of a safetensors file holding `entries` in order."""
    header: dict = {}
    if metadata:
        header["__metadata__"] = metadata
    offset = 0
    sizes: dict[str, int] = {}
    for name, dtype, shape in entries:
        n = tensor_bytes(dtype, shape)
        header[name] = {"dtype": SAFETENSORS_CODES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
        sizes[name] = n
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    return raw + b" " * (-len(raw) % 8), sizes, offset


def file_size(entries: list[tuple[str, str, tuple[int, ...]]], metadata: dict[str, str] | None) -> int:
    """Bytes of the safetensors file StreamWriter(entries, metadata) writes: known before any data is read."""
    raw, _, data = header_layout(entries, metadata)
    return 8 + len(raw) + data


def open_for_writing(path: Path):
    """The one place output files are opened (a test injects a full disk here)."""
    return open(path, "wb")  # noqa: SIM115 - the caller closes it


def write_at(f, data, pos: int) -> None:
    """Write all of `data` at byte `pos` of the open file `f` (continuing after a short write). This and
    `copy_range` are where `tpcli.formats.bytecopy` writes (a test injects a full disk here)."""
    with memoryview(data) as mv, mv.cast("B") as view:  # released even when pwrite raises (a mapping can close)
        done = 0
        while done < len(view):
            done += os.pwrite(f.fileno(), view[done:], pos + done)


def copy_range(src_fd: int, f, n: int, src_pos: int, pos: int) -> None:
    """Copy n bytes from `src_fd` at `src_pos` to the open file `f` at `pos` inside the kernel (copy_file_range)."""
    done = 0
    while done < n:
        k = os.copy_file_range(src_fd, f.fileno(), n - done, src_pos + done, pos + done)
        if k == 0:
            raise OSError(errno.EIO, "source file ended early (changed while being read?)")
        done += k


class StreamWriter:
    """Write one safetensors file tensor by tensor, in the order of `entries`.

    entries: list of (name, dtype name, shape). `write(name, tensor)` must follow that order.
    The sha256 runs on a helper thread (hashlib releases the GIL), up to HASH_LAG bytes behind the writes, so
    hashing overlaps reading and writing instead of adding to them.
    """

    def __init__(self, path: Path, entries: list[tuple[str, str, tuple[int, ...]]], metadata: dict[str, str] | None,
                 *, sha256: bool = True):
        self.path = Path(path)
        self.order = [name for name, _, _ in entries]
        raw, self.sizes, data = header_layout(entries, metadata)
        self.total = 8 + len(raw) + data
        self._next = 0
        self._hash = hashlib.sha256() if sha256 else None
        self._hasher = ThreadPoolExecutor(max_workers=1)
        self._pending: deque[tuple[Future, int]] = deque()
        self._pending_bytes = 0
        self._file = open_for_writing(self.path)
        self._emit(struct.pack("<Q", len(raw)) + raw, keep=None)

    def _emit(self, data, keep) -> None:
        """Write `data`; hash it in the background (`keep` holds the tensor owning the buffer alive until then)."""
        try:
            self._file.write(data)
        except OSError as exc:  # name the file: `atomic_dir` turns a full disk into one line
            raise OSError(exc.errno, exc.strerror, str(self.path)) from None
        if self._hash is None:
            return
        # let hashing lag behind the writes by up to HASH_LAG bytes: the buffers it holds bound the extra memory
        while self._pending and self._pending_bytes + len(data) > HASH_LAG:
            done, n = self._pending.popleft()
            done.result()
            self._pending_bytes -= n
        self._pending.append((self._hasher.submit(self._update, data, keep), len(data)))
        self._pending_bytes += len(data)

    def _update(self, data, keep) -> None:
        self._hash.update(data)

    def write(self, name: str, tensor) -> None:
        expected = self.order[self._next]
        if name != expected:
            raise AssertionError(f"{self.path.name}: expected {expected}, got {name}")
        import torch

        t = tensor.detach().contiguous()
        if t.numel():
            data = t.view(-1).view(torch.uint8).numpy().data if t.dtype != torch.bool else t.numpy().tobytes()
            if len(data) != self.sizes[name]:
                raise AssertionError(f"{name}: {len(data)} bytes, header says {self.sizes[name]}")
            self._emit(data, keep=t)
        self._next += 1

    def close(self) -> str | None:
        """Finish the file and return its sha256 (None when made with sha256=False)."""
        if self._next != len(self.order):
            raise AssertionError(f"{self.path.name}: {len(self.order) - self._next} tensors never written")
        try:
            self._file.close()  # flushes the buffered tail: a full disk can surface here
        except OSError as exc:
            raise OSError(exc.errno, exc.strerror, str(self.path)) from None
        self._hasher.shutdown(wait=True)
        return self._hash.hexdigest() if self._hash is not None else None

    def abort(self) -> None:
        with contextlib.suppress(OSError):  # the disk may be full: the folder is removed anyway
            self._file.close()
        self._hasher.shutdown(wait=True, cancel_futures=True)
