"""Moving tensor bytes from file to file without interpreting them: the fast path of `shard` and `gather`.

When a run-time tensor is a checkpoint tensor exactly as stored (transformers' converters at most rename it, and no
`--dtype` cast), every chunk `shard` writes is a box of it, and every tensor `gather` writes is the union of its
chunks' boxes. A box of a row-major array is a sequence of equal byte runs (`rankfile.box_run_starts`):

    shape (R, C), box rows [0, R) x columns [c0, c0 + n), itemsize b:
        R runs of n*b bytes, starting at (r*C + c0)*b for r in 0..R-1
    box rows [r0, r0 + m) x all columns: one run of m*C*b bytes at r0*C*b

Each output file is its header followed by one unit per tensor: the `Box`es (source file, where the whole array and
the dense box lie, shape, box) that tile the tensor's bytes. `write_files` writes every output file on its own
thread, tensor by tensor, in file order:

* boxes of long runs (dim-0 chunks, replicated tensors: most of the bytes) are copied by the kernel with
  `copy_file_range`, as `cp` does (page cache to page cache, nothing in user space);
* a box of short runs (a column split: one run per row) is cut out of a read-only mapping of its source by numpy
  into a reused buffer, which is written with `pwrite`;
* the sha256 of the file is fed in file order, from the mapped source bytes or the buffer.

Every source file is one `tpcli.formats.rankfile.RankFile`, opened (header checked) once per `write_files` and shared
by the threads (`pread`, `copy_file_range` on its descriptor, mappings of its byte ranges). Mappings are opened per
tensor and closed after it, so the process holds about one tensor's pages per thread.
hashlib, numpy's copy, pwrite and copy_file_range release the GIL: at tp=2 the two rank files use both cores. The
general path (`tpcli.planning.readers` + `tensor_file.StreamWriter`) stays for conversions (fused MoE experts), casts and
quantized checkpoints; tests check that both write byte-identical files.
"""

from __future__ import annotations

import errno
import hashlib
import math
import os
import struct
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from tpcli.formats.rankfile import RangeMap, RankFile, box_run_starts

LONG = 1 << 20  # a box whose runs are at least this long is copied by the kernel, run by run
SMALL = 64 * 1024  # bytes below this are hashed in batches (one hashlib call, and one GIL release, per MiB)


@dataclass(frozen=True)
class Box:
    """Copy the box [offsets, offsets + sizes) of a row-major array of `shape` (`itemsize` bytes per element).

    box_in="src": the source holds the whole array at byte `src_start` and the output gets the box as a dense array
    at `dest_start` (shard: one rank's chunk of a checkpoint tensor). box_in="dest": the source holds the dense box
    and the output the whole array (gather: one chunk placed into the full tensor).
    """

    src: Path
    src_start: int
    dest_start: int
    shape: tuple[int, ...]
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    itemsize: int
    box_in: str

    @property
    def nbytes(self) -> int:
        return math.prod(self.sizes) * self.itemsize

    def runs(self) -> list[tuple[int, int, int]]:
        """(source offset, output offset, length) of each run, absolute, in the box's row-major order."""
        starts, n = box_run_starts(self.shape, self.offsets, self.sizes, self.itemsize)
        if self.box_in == "src":
            return [(self.src_start + s, self.dest_start + i * n, n) for i, s in enumerate(starts)]
        return [(self.src_start + i * n, self.dest_start + s, n) for i, s in enumerate(starts)]

    def long(self) -> bool:
        starts, n = box_run_starts(self.shape, self.offsets, self.sizes, self.itemsize)
        return len(starts) <= 1 or n >= LONG


@dataclass
class OutputFile:
    """One output file: `head` (8-byte length + JSON header) at offset 0, then `units` (one per tensor, in file
    order; each the boxes, from one or more source files, that tile the tensor's bytes) covering the rest exactly."""

    path: Path
    head: bytes
    size: int
    units: list[list[Box]] = field(default_factory=list)


def lay_out(path: Path, entries: list[tuple[str, str, tuple[int, ...]]],
            metadata: dict[str, str] | None) -> tuple[OutputFile, dict[str, int]]:
    """An `OutputFile` with the header `StreamWriter` would write for `entries` (and no units yet), and each
    tensor's absolute byte offset in the file."""
    from tpcli.formats.tensor_file import header_layout

    raw, sizes, _ = header_layout(entries, metadata)
    head = struct.pack("<Q", len(raw)) + raw
    starts, pos = {}, len(head)
    for name, _, _ in entries:
        starts[name] = pos
        pos += sizes[name]
    return OutputFile(Path(path), head, pos), starts


def write_files(files: list[OutputFile], *, sha256: bool, advance=None, workers: int | None = None) -> list[str | None]:
    """Write every output file (one thread each, at most `workers` at a time); returns their sha256 (or None).

    `advance(nbytes)` is called from the worker threads after each tensor (a progress bar's advance is locked).
    """
    from tpcli.formats.tensor_file import open_for_writing

    workers = workers or min(len(files), os.cpu_count() or 1) or 1
    stop = threading.Event()
    sources: dict[Path, RankFile] = {}  # every source file, opened once and shared by the threads

    def one(out: OutputFile) -> str | None:
        fed = _Feeder(hashlib.sha256() if sha256 else None)
        scratch = bytearray()  # reused for every column-split tensor of this file
        f = open_for_writing(out.path)
        try:
            _write(f, out.path, out.head, 0)
            fed.feed(out.head)
            pos = len(out.head)
            for unit in out.units:
                if stop.is_set():
                    return None
                pos = _copy_unit(f, out.path, unit, pos, fed, scratch, sources)
                if advance is not None:
                    advance(sum(b.nbytes for b in unit))
            if pos != out.size:
                raise AssertionError(f"{out.path.name}: wrote {pos} bytes, the header says {out.size}")
        finally:
            f.close()
        return fed.hexdigest()

    try:
        for path in dict.fromkeys(b.src for out in files for unit in out.units for b in unit if b.nbytes):
            sources[path] = RankFile(path)
        with ThreadPoolExecutor(max_workers=workers) as pool:
            futures = [pool.submit(one, out) for out in files]
            try:
                return [fut.result() for fut in futures]
            except BaseException:
                stop.set()  # the others stop at their next tensor
                raise
    finally:
        for source in sources.values():
            source.close()


def _copy_unit(f, dest: Path, unit: list[Box], pos: int, fed: _Feeder, scratch: bytearray,
               sources: dict[Path, RankFile]) -> int:
    """Write one tensor (its boxes tile [pos, pos + nbytes) of the output) and hash it; returns pos + nbytes."""
    nbytes = sum(b.nbytes for b in unit)
    boxes = [b for b in unit if b.nbytes]
    if not boxes:
        return pos
    with _Sources(boxes, sources) as src:
        if all(b.long() for b in boxes):
            runs = sorted(((d, s, n, b.src) for b in boxes for s, d, n in b.runs()))
            for d, s, n, path in runs:
                if d != pos:
                    raise AssertionError(f"{dest.name}: a run starts at byte {d}, expected {pos}")
                _copy(src, path, s, f, dest, d, n)
                fed.feed(src.view(path, s, n))
                pos += n
            return pos
        if len(scratch) < nbytes:
            scratch.extend(bytes(nbytes - len(scratch)))
        buf = memoryview(scratch)[:nbytes]
        try:
            for b in boxes:
                _numpy_copy(b, src, buf, pos)
            _write(f, dest, buf, pos)
            fed.feed(buf)
            fed.flush()  # the batch buffer must not hold a view of scratch
        finally:
            buf.release()
        return pos + nbytes


def _numpy_copy(b: Box, src: _Sources, buf: memoryview, pos: int) -> None:
    """Copy box `b` between its source mapping and `buf` (the output bytes from `pos` on), strided, by numpy."""
    import numpy as np

    nb = b.itemsize
    whole = (*b.shape[:-1], b.shape[-1] * nb)  # uint8 views: the last dim in bytes
    dense = (*b.sizes[:-1], b.sizes[-1] * nb)
    index = (*(slice(o, o + s) for o, s in zip(b.offsets[:-1], b.sizes[:-1], strict=True)),
             slice(b.offsets[-1] * nb, (b.offsets[-1] + b.sizes[-1]) * nb))
    if b.box_in == "src":
        source = np.frombuffer(src.view(b.src, b.src_start, math.prod(b.shape) * nb), np.uint8).reshape(whole)
        target = np.frombuffer(buf, np.uint8, math.prod(dense), b.dest_start - pos).reshape(dense)
        np.copyto(target, source[index])
    else:
        source = np.frombuffer(src.view(b.src, b.src_start, b.nbytes), np.uint8).reshape(dense)
        target = np.frombuffer(buf, np.uint8, math.prod(whole), b.dest_start - pos).reshape(whole)
        np.copyto(target[index], source)


class _Sources:
    """Read-only mappings (`RankFile.map_range`) of the source byte ranges of one tensor's boxes, one per source
    file, closed together."""

    def __init__(self, boxes: list[Box], files: dict[Path, RankFile]):
        self.boxes = boxes
        self.files = files
        self.maps: dict[Path, RangeMap] = {}

    def __enter__(self):
        spans: dict[Path, list[int]] = {}
        for b in self.boxes:
            lo, hi = b.src_start, b.src_start + (math.prod(b.shape) * b.itemsize if b.box_in == "src" else b.nbytes)
            span = spans.setdefault(b.src, [lo, hi])
            span[0], span[1] = min(span[0], lo), max(span[1], hi)
        try:
            for path, (lo, hi) in spans.items():
                self.maps[path] = self.files[path].map_range(lo, hi)
        except BaseException:
            self.__exit__()
            raise
        return self

    def view(self, path: Path, offset: int, n: int) -> memoryview:
        return self.maps[path].view(offset, n)

    def fd(self, path: Path) -> int:
        return self.files[path].fileno()

    def changed(self, path: Path, needed: int):
        return self.files[path].changed(needed)

    def __exit__(self, *exc) -> None:
        for m in self.maps.values():
            m.close()
        self.maps.clear()


def _copy(src: _Sources, path: Path, offset: int, f, dest: Path, pos: int, n: int) -> None:
    """n bytes from `path` at `offset` to the output at `pos`: by the kernel where it can, else from the mapping."""
    from tpcli.formats.tensor_file import copy_range

    try:
        copy_range(src.fd(path), f, n, offset, pos)
    except OSError as exc:
        if exc.errno == errno.EIO and os.fstat(src.fd(path)).st_size < offset + n:
            raise src.changed(path, offset + n) from None
        if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL):
            raise OSError(exc.errno, exc.strerror, str(dest)) from None
        _write(f, dest, src.view(path, offset, n), pos)  # no in-kernel copy between these two files


def _write(f, dest: Path, data, pos: int) -> None:
    """Write `data` at `pos`; an OSError names the output file."""
    from tpcli.formats.tensor_file import write_at

    try:
        write_at(f, data, pos)
    except OSError as exc:  # name the file: `atomic_dir` turns a full disk into one line
        raise OSError(exc.errno, exc.strerror, str(dest)) from None


class _Feeder:
    """Feeds a sha256 in output order; short pieces are batched into one update per MiB."""

    def __init__(self, h):
        self.h = h
        self.buf = bytearray()

    def feed(self, b) -> None:
        if self.h is None:
            return
        if len(b) >= SMALL:
            self.flush()
            self.h.update(b)
        else:
            self.buf += b
            if len(self.buf) >= 16 * SMALL:
                self.flush()

    def flush(self) -> None:
        if self.h is not None and self.buf:
            self.h.update(self.buf)
            self.buf.clear()

    def hexdigest(self) -> str | None:
        self.flush()
        return self.h.hexdigest() if self.h is not None else None
