"""safetensors files, read and written by tpcli itself: a checked header reader, `TensorFile` (a tensor's bytes by
name), and `StreamWriter`, which writes a file whose header is known up front (names, dtypes, shapes), then takes the
tensors one at a time in header order, so memory never holds more than one tensor and the sha256 of the file is
computed while writing. The layout is standard safetensors: 8-byte little-endian header length, JSON header padded
with spaces to 8 bytes, then the raw little-endian data of each tensor at its `data_offsets`.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import stat
import struct
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from tpcli.errors import CheckpointError
from tpcli.formats.units import SAFETENSORS_BITS, SAFETENSORS_CODES, SAFETENSORS_DTYPES, tensor_bytes

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


MAX_HEADER = 100_000_000  # safetensors' own limit on the JSON header


def require_regular_file(path: Path, what: str = "weights") -> os.stat_result:
    """stat `path` (following symlinks) and refuse anything but a regular file: opening a FIFO would block forever."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing.") from None
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot be read ({exc.strerror}).") from None
    if not stat.S_ISREG(st.st_mode):
        raise CheckpointError(f"{path}: is {file_kind(st.st_mode)}, not a regular file; {what} must be regular files.")
    return st


def file_kind(mode: int) -> str:
    """What a path that is not a regular file is, for one-line errors: 'a directory', 'a FIFO', 'a socket' or
    'a device' (opening a FIFO blocks until a writer appears; reading a folder or socket raises)."""
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "a special file"


def read_header(path: Path) -> tuple[dict, dict[str, str]]:
    """(tensor entries, __metadata__) of a safetensors file; raises CheckpointError naming the file and tensor.

    Enforces the rules of the safetensors library (so nothing it would refuse gets read or resharded): header length
    <= 100 MB and inside the file; a JSON object; `__metadata__` maps strings to strings; every tensor has a known
    dtype, a list of non-negative integer dims and `data_offsets` [begin, end] with end - begin = prod(shape) x dtype
    size; sorted by begin, the tensors tile the data section exactly (no overlap, no gap, nothing after the last).
    The library itself then opens the file as a final check (it maps the file; no data is read).
    """
    path = Path(path)
    size = require_regular_file(path).st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: truncated ({size} bytes, no safetensors header).")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER:
            raise CheckpointError(f"{path}: corrupt safetensors header length {n} (the limit is {MAX_HEADER}).")
        if 8 + n > size:
            raise CheckpointError(f"{path}: truncated or corrupt: header length {n} runs past the end of the file "
                                  f"({size} bytes).")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise CheckpointError(f"{path}: corrupt safetensors header (not JSON).") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object).")
    meta = header.pop("__metadata__", None)
    if meta is None:
        meta = {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        bad = next((k for k, v in meta.items() if not isinstance(v, str)), None) if isinstance(meta, dict) else None
        raise CheckpointError(f"{path}: __metadata__ must map strings to strings" +
                              (f" ({bad!r} is {type(meta[bad]).__name__})." if bad is not None else "."))
    spans = []
    for name, entry in header.items():
        spans.append((*_tensor_span(path, name, entry), name))
    spans.sort()
    end, prev = 0, None
    for begin, stop, name in spans:
        if begin < end:
            raise CheckpointError(f"{path}: tensor {name}: data_offsets [{begin}, {stop}] overlap tensor {prev}.")
        if begin > end:
            raise CheckpointError(f"{path}: tensor {name}: data_offsets start at {begin}, leaving a gap after "
                                  f"{prev or 'the header'} (which ends at {end}).")
        end, prev = stop, name
    if 8 + n + end > size:
        raise CheckpointError(f"{path}: truncated ({size} bytes, the header needs {8 + n + end}; tensor {prev} "
                              "runs past the end).")
    if 8 + n + end < size:
        raise CheckpointError(f"{path}: {size - 8 - n - end} bytes after the last tensor; the header does not "
                              "describe the whole file.")
    _library_check(path)
    return header, meta


def _tensor_span(path: Path, name: str, entry) -> tuple[int, int]:
    """(begin, end) of one header entry, after checking its dtype, shape and byte count."""
    if not isinstance(entry, dict):
        raise CheckpointError(f"{path}: tensor {name}: header entry is not an object.")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in SAFETENSORS_BITS:
        raise CheckpointError(f"{path}: tensor {name}: unknown dtype {dtype!r}.")
    if not isinstance(shape, list) or not _counts(shape):
        raise CheckpointError(f"{path}: tensor {name}: shape {shape!r} is not a list of non-negative integers.")
    if not isinstance(offsets, list) or len(offsets) != 2 or not _counts(offsets):
        raise CheckpointError(f"{path}: tensor {name}: data_offsets {offsets!r} is missing or not [begin, end].")
    begin, stop = offsets
    if stop < begin:
        raise CheckpointError(f"{path}: tensor {name}: data_offsets [{begin}, {stop}] are reversed.")
    bits = SAFETENSORS_BITS[dtype]
    for d in shape:
        bits *= d
    if bits % 8 or bits // 8 != stop - begin:
        raise CheckpointError(f"{path}: tensor {name}: shape {shape} of {dtype} needs {bits // 8}{'.' + str(bits % 8 * 125) if bits % 8 else ''} bytes but "
                              f"data_offsets span {stop - begin}.")
    return begin, stop


def _counts(values: list) -> bool:
    """Every value a non-negative JSON integer (`type is int` also rules out bools)."""
    return all(type(v) is int and v >= 0 for v in values)


def _library_check(path: Path) -> None:
    """Let the safetensors library parse the header too: whatever it refuses, tpcli refuses."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="np"):
            pass
    except Exception as exc:  # SafetensorError and friends: the library's own verdict
        raise CheckpointError(f"{path}: rejected by the safetensors library ({exc}).") from None


class TensorFile:
    """Reads whole tensors of a safetensors file with plain reads into fresh buffers.

    safetensors' `safe_open` maps the file: every page a streaming pass touches then stays in the process's RSS
    until the file is closed, so a one-pass reader would grow to the size of the model. Reading with `readinto`
    keeps memory at the tensors actually held.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self.header, self.metadata = read_header(self.path)
        with open(self.path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
        self.data_start = 8 + n
        self._file = open(self.path, "rb")  # noqa: SIM115 - closed in close()

    def keys(self) -> list[str]:
        return list(self.header)

    def offset(self, name: str) -> int:
        """Absolute byte offset of tensor `name`'s data in the file."""
        return self.data_start + self.header[name]["data_offsets"][0]

    def read_into(self, name: str, out) -> None:
        """Read tensor `name` straight into `out`: a contiguous CPU tensor (same dtype and number of elements).

        Only host memory can be a `readinto` target; a device tensor (CUDA, meta) is filled through a host staging
        buffer by the caller (`fast_load.SliceReader`), so asking for one here is a bug, reported as such.
        """
        import torch

        if out.device.type != "cpu" or not out.is_contiguous():
            raise ValueError(f"TensorFile.read_into({name!r}): needs a contiguous CPU tensor, got one on "
                             f"{out.device}; read into host memory and copy it to the device.")
        start, stop = self.header[name]["data_offsets"]
        if stop == start:
            return
        self._file.seek(self.offset(name))
        if self._file.readinto(out.view(-1).view(torch.uint8).numpy()) != stop - start:
            raise CheckpointError(f"{self.path}: truncated while reading {name}.")

    def read_range_into(self, name: str, start: int, out) -> None:
        """Read bytes [start, start + len(out)) of tensor `name`'s data into `out`, a contiguous CPU uint8 tensor
        (a piece of a tensor staged for a device, `fast_load.SliceReader`)."""
        import torch

        begin, stop = self.header[name]["data_offsets"]
        n = out.numel()
        if out.device.type != "cpu" or out.dtype != torch.uint8 or not out.is_contiguous() or not 0 <= start <= \
                start + n <= stop - begin:
            raise ValueError(f"TensorFile.read_range_into({name!r}, {start}): needs a contiguous CPU uint8 tensor "
                             f"inside the tensor's {stop - begin} bytes, got {n} bytes on {out.device}.")
        if n and os.preadv(self._file.fileno(), [out.numpy()], self.data_start + begin + start) != n:
            raise CheckpointError(f"{self.path}: truncated while reading {name}.")

    def get_tensor(self, name: str):
        import torch

        entry = self.header[name]
        start, stop = entry["data_offsets"]
        dtype = getattr(torch, SAFETENSORS_DTYPES[entry["dtype"]])
        if stop == start:
            return torch.empty(entry["shape"], dtype=dtype)
        buf = torch.empty(stop - start, dtype=torch.uint8)  # not zero-filled, unlike bytearray
        self._file.seek(self.data_start + start)
        if self._file.readinto(buf.numpy()) != stop - start:
            raise CheckpointError(f"{self.path}: truncated while reading {name}.")
        return buf.view(dtype).reshape(entry["shape"])

    def close(self) -> None:
        self._file.close()
