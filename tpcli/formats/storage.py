"""Where bytes hit disk: streaming safetensors writing, hashing, and atomic output folders.

`StreamWriter` writes a safetensors file whose header is known up front (names, dtypes, shapes), then takes the
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
import shutil
import socket
import stat
import struct
import tempfile
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from tpcli.errors import CheckpointError, OutputError
from tpcli.formats.units import SAFETENSORS_BITS, SAFETENSORS_CODES, SAFETENSORS_DTYPES, decimal_bytes, tensor_bytes

HASH_CHUNK = 16 * 2**20
HASH_LAG = 64 * 2**20  # measured: hashing one buffer behind cost ~17% of shard time; 64 MB behind recovers it


def _layout(entries, metadata) -> tuple[bytes, dict[str, int], int]:
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
    raw, _, data = _layout(entries, metadata)
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
        raw, self.sizes, data = _layout(entries, metadata)
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


def reuse_freed_memory() -> None:
    """Let the next tensor buffer reuse the memory of the last one instead of faulting in fresh pages.

    glibc serves an allocation above its mmap threshold with a fresh `mmap` and unmaps it on free, and trims the
    heap top above its trim threshold: a streaming pass then page-faults (and the kernel zero-fills) every byte it
    reads or slices, once more. Keeping allocations up to 32 MiB (glibc's maximum threshold on 64-bit: every
    per-layer tensor of a 2048-wide Llama) in the heap and up to 128 MiB of free heap un-trimmed makes the buffers
    of one step reuse those of the last. Measured on the 1.4 GB bench checkpoint: shard system time 2.5 -> 1.6 s,
    gather 3.7 -> 2.0 s, page faults roughly halved, peak RSS unchanged (0.60 GB). Process-wide and harmless
    elsewhere; a no-op where libc has no `mallopt` (not glibc).
    """
    import ctypes

    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return
    mallopt(M_MMAP_THRESHOLD, 32 * 2**20)
    mallopt(M_TRIM_THRESHOLD, 128 * 2**20)


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)


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
        kind = "a directory" if stat.S_ISDIR(st.st_mode) else "a FIFO" if stat.S_ISFIFO(st.st_mode) else "a special file"
        raise CheckpointError(f"{path}: is {kind}, not a regular file; {what} must be regular files.")
    return st


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
        buffer by the caller (`loading._SliceReader`), so asking for one here is a bug, reported as such.
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


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def sha256_files(paths: list[Path]) -> list[str]:
    """sha256 of several files, two at a time (hashlib releases the GIL)."""
    with ThreadPoolExecutor(max_workers=min(2, max(1, len(paths)))) as pool:
        return list(pool.map(sha256_file, paths))


OUTPUT_MARKER = ".tpcli-output"  # written into every folder tpcli publishes: what --force may replace
TEMP_MARKER = ".tpcli-tmp.json"  # written into every temporary folder: who made it, so a stale one can be removed


def prepare_output(out: str | Path, *, force: bool, inputs: list[Path] = ()) -> Path:
    """Check OUT before any work: refuse a path that is, holds or lies inside an input; a file; a mount point; a
    non-empty folder without --force; and, even with --force, a non-empty folder that is not a tpcli output."""
    path = Path(out).expanduser().resolve()
    for src in inputs:
        src = Path(src).expanduser().resolve()
        relation = ("is the input folder" if path == src else "contains the input folder" if path in src.parents
                    else "lies inside the input folder" if src in path.parents else None)
        if relation:
            raise OutputError(f"--out {out}: {relation} {src}; write somewhere else.")
    if path.exists():
        if not path.is_dir():
            raise OutputError(f"--out {out}: exists and is not a directory; pick another path.")
        if os.path.ismount(path):
            raise OutputError(f"--out {out}: is a mount point; tpcli builds the output beside it and renames it into "
                              f"place, which cannot cross filesystems: pass a folder inside it (e.g. {path / 'model'}).")
        if any(path.iterdir()):
            if not force:
                raise OutputError(f"--out {out}: directory is not empty; pass --force to replace it or pick another path.")
            if not is_tpcli_output(path):
                raise OutputError(f"--out {out}: not empty and not a tpcli output (no {OUTPUT_MARKER} or tpcli.json); "
                                  "--force only replaces tpcli's own outputs: empty it yourself or pick another path.")
    if not path.parent.exists():
        raise OutputError(f"--out {out}: parent directory {path.parent} does not exist.")
    return path


def is_tpcli_output(path: Path) -> bool:
    """A folder tpcli wrote: it holds the output marker, or (shard outputs of older versions) a tpcli manifest."""
    if (path / OUTPUT_MARKER).is_file():
        return True
    try:
        return json.loads((path / "tpcli.json").read_text()).get("format") == "tpcli.sharded"
    except (OSError, ValueError, AttributeError):
        return False


def check_free_space(out: Path, needed: int) -> None:
    """Refuse before writing when the filesystem of `out` has fewer than `needed` bytes free."""
    free = shutil.disk_usage(out.parent).free
    if needed > free:
        raise OutputError(f"--out {out}: needs {decimal_bytes(needed)}, {decimal_bytes(free)} free on {_mount_point(out.parent)}; "
                          "free some space or pick another filesystem.")


def _mount_point(path: Path) -> Path:
    path = path.resolve()
    while not os.path.ismount(path) and path != path.parent:
        path = path.parent
    return path


def _process_start(pid: int) -> str | None:
    """The kernel's start time of `pid` (field 22 of /proc/PID/stat), to tell a reused pid from the original."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(pid: int, started: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    now = _process_start(pid)
    return started is None or now is None or now == started


def remove_stale_temps(parent: Path) -> list[str]:
    """Remove the temporary folders in `parent` that an interrupted tpcli left: only folders holding tpcli's temp
    marker, written on this host by a process that is gone. Returns their paths; nothing else is touched."""
    removed = []
    host = socket.gethostname()
    for p in sorted(parent.glob(".*.tpcli-tmp-*")):
        marker = p / TEMP_MARKER
        if p.is_symlink() or not p.is_dir() or marker.is_symlink() or not marker.is_file():
            continue
        try:
            info = json.loads(marker.read_text())
        except (OSError, ValueError):
            continue
        if not isinstance(info, dict) or info.get("tool") != "tpcli" or info.get("host") != host:
            continue
        pid = info.get("pid")
        if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0 or _alive(pid, info.get("pid_start")):
            continue
        shutil.rmtree(p, ignore_errors=True)
        removed.append(str(p))
    return removed


MARKER_SIZE = 512  # bytes: a hostname is at most 64


def _marker_text(info: dict) -> str:
    """`info` as one JSON line padded with spaces to MARKER_SIZE, so both markers have the same size."""
    return json.dumps(info).ljust(MARKER_SIZE - 1) + "\n"


def _temp_folder(out: Path, command: str) -> Path:
    """A fresh hidden sibling of `out` holding TEMP_MARKER (host, pid, start time): remove_stale_temps removes it
    once this process is gone, whatever killed it."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tpcli-tmp-", dir=out.parent))
    (tmp / TEMP_MARKER).write_text(_marker_text({
        "tool": "tpcli", "command": command, "host": socket.gethostname(), "pid": os.getpid(),
        "pid_start": _process_start(os.getpid()), "started": time.time()}))
    return tmp


@contextlib.contextmanager
def atomic_dir(out: Path, *, command: str = "tpcli", force: bool = False):
    """Yield a temporary sibling folder; on success it replaces `out`, on any error (or Ctrl-C) it is removed.

    The temporary folder holds TEMP_MARKER (host, pid, start time) while it is written, so a later run can prove a
    leftover one is stale; the published folder holds OUTPUT_MARKER, so a later --force knows it may replace it.
    The one becomes the other in place: the temp marker is overwritten with the output marker's text (both padded
    to MARKER_SIZE, so no block is freed and the published marker holds no host or pid) and renamed. Unlinking it
    instead stalled 0.2-2 s on ext4 (measured with strace after writing 4.7 GB: the unlink waited for the journal
    to commit the fresh data; the overwrite and the rename do not).
    A full disk, or a final rename that fails, becomes one OutputError line; nothing is left behind either way.
    `out` is checked again just before it is replaced (`check_replaceable`): whatever appeared there meanwhile is
    only replaced if `prepare_output` would have allowed it (empty, or a tpcli output under `force`).
    """
    tmp = _temp_folder(out, command)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700; the result should look like any other folder
        yield tmp
        with open(tmp / TEMP_MARKER, "r+") as f:  # same size, overwritten in place: no block is freed
            f.write(_marker_text({"tool": "tpcli", "command": command}))
            f.truncate()
        os.replace(tmp / TEMP_MARKER, tmp / OUTPUT_MARKER)
        check_replaceable(out, force=force)
        _publish(tmp, out, command, force)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            what = f" while writing {Path(exc.filename).name}" if exc.filename else ""
            raise OutputError(f"--out {out}: no space left on the device{what}; nothing was kept: free some space "
                              "and re-run.") from None
        raise


def check_replaceable(out: Path, *, force: bool) -> None:
    """Raise OutputError unless `out` may be replaced now: absent, an empty folder, or (with `force`) a tpcli
    output. `prepare_output` checked this before any work; this re-check, just before the rename, catches a folder
    someone created or filled while tpcli was writing (a race `prepare_output` cannot see). A folder that was
    there at the start under --force passes only if it still is a tpcli output. `_publish` checks once more what
    it actually moved aside, where nobody else can change it, and puts it back if it fails."""
    why = _not_replaceable(out, force=force)
    if why:
        raise OutputError(f"--out {out}: changed while tpcli was writing: it {why}; nothing was replaced and the new "
                          "output was discarded: move it away (or pick another --out) and re-run.")


def _not_replaceable(path: Path, *, force: bool) -> str | None:
    """Why `path` may not be replaced (see `check_replaceable`), or None."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    if not stat.S_ISDIR(st.st_mode):
        return "is now a symlink" if stat.S_ISLNK(st.st_mode) else "is now a file"
    try:
        names = sorted(os.listdir(path))[:3]
    except OSError as exc:
        names = [f"unreadable: {exc.strerror}"]
    if not names or (force and is_tpcli_output(path)):
        return None
    return f"now holds {', '.join(names)}" + ("" if force else " (and --force was not given)")


def _publish(tmp: Path, out: Path, command: str, force: bool = False) -> None:
    """Move the finished `tmp` to `out`; on failure put the previous output back.

    A previous output (--force) is first moved into a marked temporary folder, `out` -> `.OUT.tpcli-tmp-X/old`,
    then deleted: if this process dies before the deletion ends, the next run's remove_stale_temps finds it as it
    finds any interrupted write, instead of a hidden copy of the old output lingering forever.
    """
    holder = None
    try:
        if out.exists() or out.is_symlink():
            holder = _temp_folder(out, command)
            os.replace(out, holder / "old")
            why = _not_replaceable(holder / "old", force=force)  # what was moved can no longer change under us
            if why:
                os.replace(holder / "old", out)  # put it back untouched
                shutil.rmtree(holder, ignore_errors=True)
                raise OutputError(f"--out {out}: changed while tpcli was writing: it {why}; nothing was replaced "
                                  "and the new output was discarded: move it away (or pick another --out) and re-run.")
        os.replace(tmp, out)  # onto a missing or empty folder; a folder filled meanwhile fails (ENOTEMPTY)
    except OSError as exc:
        kept = ""
        if holder is not None:
            if not out.exists() and (holder / "old").exists():
                with contextlib.suppress(OSError):
                    os.replace(holder / "old", out)
            if (holder / "old").exists():  # could not be put back: unmark it so no later run deletes it
                (holder / TEMP_MARKER).unlink(missing_ok=True)
                kept = f"; the previous output is in {holder / 'old'}"
            else:
                shutil.rmtree(holder, ignore_errors=True)
        raise OutputError(f"--out {out}: could not move the finished output into place ({exc.strerror}); nothing "
                          f"was written{kept}.") from None
    if holder is not None:
        shutil.rmtree(holder, ignore_errors=True)


def copy_aux(src_folder: Path, dst: Path, files: list[Path]) -> list[str]:
    copied = []
    for f in files:
        shutil.copy2(f, dst / f.name)
        copied.append(f.name)
    return copied
