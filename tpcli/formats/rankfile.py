"""The one reader of safetensors files (rank files, checkpoint weights): `RankFile` opens a file once, checks its
header once, and serves every reader of tensor bytes in tpcli from that one check.

The layout is standard safetensors: an 8-byte little-endian header length n, n bytes of JSON header, then the raw
little-endian data of each tensor at its `data_offsets` (relative to the data start 8 + n):

    [ n (u64 LE) | {"name": {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}} | data ... ]
    tensor `name`'s bytes = file[8 + n + begin : 8 + n + end],  end - begin = prod(shape) x dtype size

What reads through it: `verify` and `dcp.scan` (headers, names, chunks), `gather` and `shard` (the byte copy's
sources: `map_range` and `fileno` for copy_file_range; the stream path: `read_into`), a reshard
(`planning.readers.ShardedReader`), `load_model`'s fast path (`runtime.fast_load.SliceReader`: `read_box_into`,
`read_run_to` direct or staged to any device) and `manifest_gather` (`offset`).

Reads use `pread` on the one descriptor, never the file position, so threads may share a `RankFile`; a tensor is
read into memory the caller owns, never left as a view of a mapping (a file rewritten under a running job changes
nothing already read). A mapping (`map_range`) is for the byte copy only, and closed after each tensor.
"""

from __future__ import annotations

import contextlib
import json
import math
import mmap
import os
import re
import stat
import struct
from dataclasses import dataclass
from pathlib import Path

from tpcli.errors import CheckpointError
from tpcli.formats.units import SAFETENSORS_BITS, SAFETENSORS_DTYPES

MAX_HEADER = 100_000_000  # safetensors' own limit on the JSON header
READ_PIECE = 2**30  # bytes per pread at most (Linux moves at most 2 GiB - 4 KiB per call)
# A state-dict name: module and parameter names (identifiers, ModuleList indices) joined by '.'. Printable ASCII
# only, no empty part: transformers' classes name nothing else, and its `dot_natural_key` crashes on '²' (isdigit).
STATE_NAME_RE = re.compile(r"[!-\-/-~]{1,256}(\.[!-\-/-~]{1,256}){0,63}")


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


def inside_roots(folder: Path) -> list[Path]:
    """Where the files of `folder` may resolve to: the folder, and for a hub snapshot
    (`.../models--org--name/snapshots/REV`) also that repo's `blobs` folder, where the cache's links point."""
    allowed = [folder.resolve()]
    if folder.parent.name == "snapshots":
        allowed.append(folder.parent.parent.resolve() / "blobs")
    return allowed


def check_inside(folder: Path, path: Path, what: str) -> Path:
    """`path` (a file of `folder`) must be a regular file that resolves inside `folder` (`inside_roots`)."""
    require_regular_file(path, what)
    _refuse_outside(folder, path, path.resolve(), what)
    return path


def _refuse_outside(folder: Path, path: Path, real: Path, what: str) -> None:
    if not any(real == a or a in real.parents for a in inside_roots(folder)):
        raise CheckpointError(f"{path}: resolves to {real}, outside {folder}; {what} must live inside the model folder.")


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


@dataclass(frozen=True)
class Entry:
    """One tensor of a checked header: safetensors dtype code, shape, and its data's absolute byte span
    [begin, end) in the file."""

    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


class RankFile:
    """A safetensors file opened once, its header checked once (`check_header`); every read is bounded by it.

    `header` is the checked JSON header without `__metadata__` ({name: {"dtype", "shape", "data_offsets"}}, in file
    order), `metadata` the `__metadata__` strings, `data_start` = 8 + header length, `size` the file's size when
    opened. With `folder`, the file must be a regular file inside it (`check_inside`), proven again on the open
    descriptor (`/proc/self/fd`), so a link re-pointed between the check and the open is refused.
    `state_names=True` (rank files) also requires every tensor name to be a state-dict name (`STATE_NAME_RE`). Close it (or use it as a context manager) when done.
    """

    def __init__(self, path: Path, what: str = "weights", *, folder: Path | None = None, state_names: bool = False):
        self.path = Path(path)
        if folder is None:
            require_regular_file(self.path, what)  # before open(): opening a FIFO would block
        else:
            check_inside(folder, self.path, what)
        try:
            self._fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise CheckpointError(f"{self.path}: cannot be read ({exc.strerror}).") from None
        try:
            if folder is not None:  # the file opened, not the path checked: a link swapped in between is refused
                _refuse_outside(folder, self.path, _opened_path(self._fd, self.path), what)
            self.size = os.fstat(self._fd).st_size
            self.header, self.metadata, self.data_start = check_header(self.path, self._fd, self.size, state_names)
        except BaseException:
            os.close(self._fd)
            raise

    def __enter__(self) -> RankFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def fileno(self) -> int:
        """The descriptor (for copy_file_range / sendfile; read with pread only, never move its position)."""
        return self._fd

    def keys(self) -> list[str]:
        return list(self.header)

    def __contains__(self, name: str) -> bool:
        return name in self.header

    def entry(self, name: str) -> Entry:
        e = self.header[name]
        begin, end = e["data_offsets"]
        return Entry(e["dtype"], tuple(e["shape"]), self.data_start + begin, self.data_start + end)

    def offset(self, name: str) -> int:
        """Absolute byte offset of tensor `name`'s data in the file."""
        return self.data_start + self.header[name]["data_offsets"][0]

    def spans(self) -> dict[str, tuple[int, int]]:
        """{tensor: (first byte, end byte)} of its data, absolute, in file order."""
        return {name: (self.data_start + e["data_offsets"][0], self.data_start + e["data_offsets"][1])
                for name, e in self.header.items()}

    def _pread_into(self, view: memoryview, pos: int, name: str) -> None:
        """Fill `view` (bytes) from byte `pos` on, READ_PIECE bytes per call at most."""
        done = 0
        while done < len(view):
            k = os.preadv(self._fd, [view[done:done + READ_PIECE]], pos + done)
            if k == 0:
                raise CheckpointError(f"{self.path}: truncated while reading {name}.")
            done += k

    def read_bytes(self, name: str, start: int, n: int) -> bytes:
        """Bytes [start, start + n) of tensor `name`'s data (no torch: `dcp.same_chunk_bytes` compares with it)."""
        begin, stop = self.header[name]["data_offsets"]
        if not 0 <= start <= start + n <= stop - begin:
            raise ValueError(f"RankFile.read_bytes({name!r}, {start}, {n}): outside the tensor's {stop - begin} bytes.")
        out = bytearray(n)
        if n:
            self._pread_into(memoryview(out), self.data_start + begin + start, name)
        return bytes(out)

    def read_range_into(self, name: str, start: int, out) -> None:
        """Read bytes [start, start + len(out)) of tensor `name`'s data into `out`, a contiguous CPU uint8 tensor."""
        import torch

        begin, stop = self.header[name]["data_offsets"]
        n = out.numel()
        if out.device.type != "cpu" or out.dtype != torch.uint8 or not out.is_contiguous() or not 0 <= start <= \
                start + n <= stop - begin:
            raise ValueError(f"RankFile.read_range_into({name!r}, {start}): needs a contiguous CPU uint8 tensor "
                             f"inside the tensor's {stop - begin} bytes, got {n} bytes on {out.device}.")
        if n:
            self._pread_into(memoryview(out.numpy()).cast("B"), self.data_start + begin + start, name)

    def read_into(self, name: str, out) -> None:
        """Read tensor `name` straight into `out`: a contiguous CPU tensor (same number of bytes; any dtype).

        Only host memory can be a read target; a device tensor (CUDA, meta) is filled through host staging buffers
        (`read_run_to` with a `Staging`), so asking for one here is a bug, reported as such."""
        import torch

        begin, stop = self.header[name]["data_offsets"]
        if out.device.type != "cpu" or not out.is_contiguous() or out.numel() * out.element_size() != stop - begin:
            raise ValueError(f"RankFile.read_into({name!r}): needs a contiguous CPU tensor of {stop - begin} bytes, "
                             f"got one on {out.device}; read into host memory and copy it to the device.")
        if stop > begin:
            self.read_range_into(name, 0, out.reshape(-1).view(torch.uint8))

    def get_tensor(self, name: str):
        """Tensor `name` as a new CPU tensor of its stored dtype (a fresh buffer, not a mapping)."""
        import torch

        entry = self.header[name]
        dtype = getattr(torch, SAFETENSORS_DTYPES[entry["dtype"]])
        out = torch.empty(entry["shape"], dtype=dtype)
        self.read_into(name, out)
        return out

    def read_box_into(self, name: str, lo: list[int], hi: list[int], out) -> int:
        """Read the sub-box [lo, hi) of tensor `name` (row-major, its stored shape) into `out`, a contiguous CPU
        tensor of the box's shape and the stored dtype: one pread per run of bytes (`box_byte_runs`). Returns the
        bytes read. The box must lie inside the tensor's shape (else ValueError: a bug, not a file problem)."""
        import torch

        shape = self.header[name]["shape"]
        if len(lo) != len(shape) or not all(0 <= a <= b <= s for a, b, s in zip(lo, hi, shape, strict=True)):
            raise ValueError(f"RankFile.read_box_into({name!r}): box {lo}..{hi} is not inside its shape {shape}.")
        data = out.view(-1).view(torch.uint8)
        pos = 0
        for start, n in box_byte_runs(shape, lo, hi, out.element_size()):
            self.read_range_into(name, start, data[pos:pos + n])
            pos += n
        return pos

    def read_run_to(self, name: str, start: int, out, staging=None, to_target=None) -> None:
        """Fill `out` (contiguous, any device, any dtype) with the `out.numel()` elements of `name`'s stored dtype
        that begin at byte `start` of its data. Direct (one pread into `out` itself) when `staging` is None: `out`
        must then be a CPU tensor of the stored dtype. Staged otherwise (`Staging.copy_into`): piece by piece through
        its host buffers, cast on copy (`to_target` is the step that touches the target)."""
        import torch

        stored = getattr(torch, SAFETENSORS_DTYPES[self.header[name]["dtype"]])
        if staging is None:
            if out.dtype != stored:
                raise ValueError(f"RankFile.read_run_to({name!r}): a direct read needs {stored}, got {out.dtype}.")
            self.read_range_into(name, start, out.view(-1).view(torch.uint8))
            return
        staging.copy_into(out, stored, lambda buf, a: self.read_range_into(name, start + a * stored.itemsize, buf),
                          to_target)

    def map_range(self, lo: int, hi: int) -> RangeMap:
        """A read-only mapping of bytes [lo, hi) of the file (the byte copy reads through it, one tensor at a
        time). A file now shorter than `hi` (truncated or rewritten since it was opened) is a CheckpointError."""
        if os.fstat(self._fd).st_size < hi:  # mmap would say "mmap length is greater than file size"
            raise self.changed(hi)
        base = lo - lo % mmap.ALLOCATIONGRANULARITY
        return RangeMap(mmap.mmap(self._fd, hi - base, offset=base, access=mmap.ACCESS_READ), base)

    def changed(self, needed: int) -> CheckpointError:
        """The error for a file that became shorter than the `needed` bytes a plan reads (truncated, rewritten)."""
        try:
            size = f"{os.stat(self.path).st_size:,} bytes"
        except OSError as exc:
            size = f"unreadable ({exc.strerror})"
        return CheckpointError(f"{self.path}: is now {size}, shorter than the {needed:,} bytes planned; it changed "
                               "while being read (truncated or rewritten?): re-run once it is complete. Nothing was "
                               "written.")


def _opened_path(fd: int, path: Path) -> Path:
    """The real path of the file open as `fd` (Linux: the /proc/self/fd link); `path` resolved where /proc is
    missing."""
    try:
        return Path(os.readlink(f"/proc/self/fd/{fd}"))
    except OSError:
        return path.resolve()


class RangeMap:
    """A read-only mapping of a byte range of a file; `view(offset, n)` gives memoryviews by absolute offset, all
    released by `close`."""

    def __init__(self, m: mmap.mmap, base: int):
        self.m, self.base = m, base
        self.views: list[memoryview] = []

    def view(self, offset: int, n: int) -> memoryview:
        v = memoryview(self.m)[offset - self.base: offset - self.base + n]
        self.views.append(v)
        return v

    def close(self) -> None:
        for v in self.views:
            v.release()
        self.views.clear()
        with contextlib.suppress(BufferError):  # a view still held by an exception's traceback: GC unmaps it
            self.m.close()


def read_header(path: Path) -> tuple[dict, dict[str, str]]:
    """(tensor entries, __metadata__) of a safetensors file, checked (`check_header`); the file is closed again."""
    with RankFile(path) as f:
        return f.header, f.metadata


def data_spans(path: Path) -> dict[str, tuple[int, int]]:
    """{tensor: (first byte, end byte)} of its data, absolute, in the safetensors file `path` (header checked)."""
    with RankFile(path) as f:
        return f.spans()


def check_header(path: Path, fd: int, size: int, state_names: bool = False) -> tuple[dict, dict[str, str], int]:
    """(tensor entries, __metadata__, data start) of the open safetensors file `fd` of `size` bytes; raises
    CheckpointError naming the file and tensor.

    Enforces the rules of the safetensors library (so nothing it would refuse gets read or resharded): header length
    <= 100 MB and inside the file; a JSON object; `__metadata__` maps strings to strings; every tensor has a known
    dtype, a list of non-negative integer dims and `data_offsets` [begin, end] with end - begin = prod(shape) x dtype
    size; sorted by begin, the tensors tile the data section exactly (no overlap, no gap, nothing after the last).
    The library itself then opens the file as a final check (it maps the file; no data is read). With
    `state_names`, every name must be a state-dict name: dot-separated printable ASCII words (`STATE_NAME_RE`).
    """
    head = os.pread(fd, 8, 0)
    if len(head) < 8:
        raise CheckpointError(f"{path}: truncated ({size} bytes, no safetensors header).")
    (n,) = struct.unpack("<Q", head)
    if n > MAX_HEADER:
        raise CheckpointError(f"{path}: corrupt safetensors header length {n} (the limit is {MAX_HEADER}).")
    if 8 + n > size:
        raise CheckpointError(f"{path}: truncated or corrupt: header length {n} runs past the end of the file "
                              f"({size} bytes).")
    raw = bytearray(n)
    got = os.preadv(fd, [raw], 8) if n else 0
    while got < n:  # a short read: keep reading (a file that shrank under us ends the loop)
        k = os.preadv(fd, [memoryview(raw)[got:]], 8 + got)
        if k == 0:
            raise CheckpointError(f"{path}: truncated while reading its header.")
        got += k
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
    spans = sorted((*_tensor_span(path, name, entry), name) for name, entry in header.items())
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
    bad = next((name for name in header if not STATE_NAME_RE.fullmatch(name)), None) if state_names else None
    if bad is not None:
        raise CheckpointError(f"{path}: tensor name {bad[:80]!r} is not a name a model's state dict has "
                              "(dot-separated printable ASCII words); the file is corrupt or was crafted.")
    return header, meta, 8 + n


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
        raise CheckpointError(f"{path}: tensor {name}: shape {shape} of {dtype} needs {bits // 8}"
                              f"{'.' + str(bits % 8 * 125) if bits % 8 else ''} bytes but data_offsets span "
                              f"{stop - begin}.")
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


def box_run_starts(shape: tuple[int, ...], offsets: tuple[int, ...], sizes: tuple[int, ...],
                   itemsize: int) -> tuple[list[int], int]:
    """Byte offsets, from the start of a row-major array of `shape`, of the runs that make up the box
    [offsets, offsets + sizes), in row-major order of the box, and the length of each run.

    k = the innermost dim where the box is narrower than the array; dims after k are whole, so each run covers
    sizes[k] * prod(shape[k+1:]) elements, and there are prod(sizes[:k]) runs. An empty box has no runs; a whole
    array (or a 0-d one) is one run.

        shape [4, 6], offsets [1, 2], sizes [2, 3], itemsize 1  ->  [8, 14], 3
    """
    if any(s <= 0 for s in sizes):
        return [], 0
    k = max((d for d in range(len(shape)) if sizes[d] != shape[d]), default=-1)
    if k < 0:
        return [0], math.prod(shape) * itemsize
    strides = [math.prod(shape[d + 1:]) * itemsize for d in range(len(shape))]
    starts = [offsets[k] * strides[k]]
    for d in range(k - 1, -1, -1):  # grow the run starts outward, one dim at a time (row-major order)
        starts = [(offsets[d] + i) * strides[d] + s for i in range(sizes[d]) for s in starts]
    return starts, sizes[k] * strides[k]


def box_byte_runs(sizes: list[int], lo: list[int], hi: list[int], itemsize: int) -> list[tuple[int, int]]:
    """The runs of bytes (offset in the array's data, length), in row-major order, that hold the sub-box [lo, hi)
    of a contiguous array of shape `sizes` (`box_run_starts` with offsets lo and sizes hi - lo). A row block (every
    FSDP slice along dim 0) is a single run; an empty box has none.

        sizes [4, 6], lo [1, 2], hi [3, 5], itemsize 1  ->  [(8, 3), (14, 3)]"""
    starts, n = box_run_starts(tuple(sizes), tuple(lo), tuple(b - a for a, b in zip(lo, hi, strict=True)), itemsize)
    return [(s, n) for s in starts]
