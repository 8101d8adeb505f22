"""Where bytes hit disk: streaming safetensors writing, hashing, and atomic output folders.

`StreamWriter` writes a safetensors file whose header is known up front (names, dtypes, shapes), then takes the
tensors one at a time in header order, so memory never holds more than one tensor and the sha256 of the file is
computed while writing. The layout is standard safetensors: 8-byte little-endian header length, JSON header padded
with spaces to 8 bytes, then the raw little-endian data of each tensor at its `data_offsets`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import struct
import tempfile
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from .errors import CheckpointError, OutputError
from .plan import tensor_bytes

# safetensors dtype codes
DTYPE_CODES = {
    "float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16", "int64": "I64", "int32": "I32",
    "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL", "float8_e4m3fn": "F8_E4M3", "float8_e5m2": "F8_E5M2",
}
CODE_DTYPES = {v: k for k, v in DTYPE_CODES.items()}
HASH_CHUNK = 16 * 2**20
HASH_LAG = 64 * 2**20  # measured: hashing one buffer behind cost ~17% of shard time; 64 MB behind recovers it


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
        header: dict = {}
        if metadata:
            header["__metadata__"] = metadata
        offset = 0
        self.sizes: dict[str, int] = {}
        for name, dtype, shape in entries:
            n = tensor_bytes(dtype, shape)
            header[name] = {"dtype": DTYPE_CODES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
            self.sizes[name] = n
            offset += n
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self.total = 8 + len(raw) + offset
        self._next = 0
        self._hash = hashlib.sha256() if sha256 else None
        self._hasher = ThreadPoolExecutor(max_workers=1)
        self._pending: deque[tuple[Future, int]] = deque()
        self._pending_bytes = 0
        self._file = open(self.path, "wb")  # noqa: SIM115 - closed in close()
        self._emit(struct.pack("<Q", len(raw)) + raw, keep=None)

    def _emit(self, data, keep) -> None:
        """Write `data`; hash it in the background (`keep` holds the tensor owning the buffer alive until then)."""
        self._file.write(data)
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
        self._file.close()
        self._hasher.shutdown(wait=True)
        return self._hash.hexdigest() if self._hash is not None else None

    def abort(self) -> None:
        self._file.close()
        self._hasher.shutdown(wait=True, cancel_futures=True)


def read_header(path: Path) -> tuple[dict, dict[str, str]]:
    """(tensor entries, __metadata__) of a safetensors file; raises CheckpointError naming the file."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path}: truncated (no safetensors header).")
            (n,) = struct.unpack("<Q", head)
            if n > 100 * 2**20:
                raise CheckpointError(f"{path}: corrupt safetensors header length {n}.")
            raw = f.read(n)
            header = json.loads(raw)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing.") from None
    except (ValueError, UnicodeDecodeError):
        raise CheckpointError(f"{path}: corrupt safetensors header (not JSON).") from None
    meta = header.pop("__metadata__", None) or {}
    end = max((v["data_offsets"][1] for v in header.values()), default=0)
    if os.path.getsize(path) < 8 + n + end:
        raise CheckpointError(f"{path}: truncated ({os.path.getsize(path)} bytes, header needs {8 + n + end}).")
    return header, meta


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
        self._file.seek(self.data_start + start)
        if self._file.readinto(out.view(-1).view(torch.uint8).numpy()) != stop - start:
            raise CheckpointError(f"{self.path}: truncated while reading {name}.")

    def get_tensor(self, name: str):
        import torch

        entry = self.header[name]
        start, stop = entry["data_offsets"]
        dtype = getattr(torch, CODE_DTYPES[entry["dtype"]])
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


def prepare_output(out: str | Path, *, force: bool) -> Path:
    """Check OUT before any work: refuse a non-empty folder without --force, or a file."""
    path = Path(out).expanduser().resolve()
    if path.exists():
        if not path.is_dir():
            raise OutputError(f"--out {out}: exists and is not a directory; pick another path.")
        if any(path.iterdir()) and not force:
            raise OutputError(f"--out {out}: directory is not empty; pass --force to replace it or pick another path.")
    if not path.parent.exists():
        raise OutputError(f"--out {out}: parent directory {path.parent} does not exist.")
    return path


@contextlib.contextmanager
def atomic_dir(out: Path):
    """Yield a temporary sibling folder; on success it replaces `out`, on any error (or Ctrl-C) it is removed."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tpcli-tmp-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700; the result should look like any other folder
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.tpcli-old-{os.getpid()}"
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def copy_aux(src_folder: Path, dst: Path, files: list[Path]) -> list[str]:
    copied = []
    for f in files:
        shutil.copy2(f, dst / f.name)
        copied.append(f.name)
    return copied
