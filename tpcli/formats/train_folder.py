"""A training framework's sharded model checkpoint, opened and checked once: the object `gather` and `verify` pass on.

Two layouts (`open_train_folder` picks by the files present):
- torch DCP (`.metadata` + `__R_I.distcp`), as `dcp.save` writes it for accelerate's FSDP2 SHARDED_STATE_DICT,
  Trainer's `pytorch_model_fsdp_0/` and torchtitan (`tpcli.formats.train_dcp`);
- per-rank `torch.save` files of DTensor state dicts, `model_world_size_W_rank_R.pt`, as verl writes them
  (`tpcli.formats.train_pt`).

Either way a tensor of global shape S is a list of `Piece`s, boxes `offsets + [0, sizes)` of S, and the pieces
must tile S exactly once (`check_tiling`). Entries that are not the model's (an optimizer saved alongside,
non-tensor values) are counted in `left_out` and never read.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from tpcli.errors import CheckpointError

MAX_PIECES = 1 << 16  # per tensor: 65,536 ranks' boxes
MAX_TOTAL_PIECES = 1 << 22
MAX_GRID_CELLS = 1 << 22  # cells of the coverage grid of one tensor (see check_tiling)


@dataclass(frozen=True)
class Piece:
    """One saved box of one tensor: global `offsets`, `sizes`; where its bytes are in `file`."""

    file: str
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    start: int = 0  # DCP: the byte range of the chunk's torch.save record
    length: int = 0
    key: str = ""  # torch.save files: the state-dict key


@dataclass
class SavedTensor:
    key: str  # the name in the checkpoint, top-level key removed ("model.x" of {"model": sd} is "x")
    dtype: str  # torch dtype name without "torch."
    shape: tuple[int, ...]
    pieces: list[Piece] = field(default_factory=list)

    @property
    def nbytes(self) -> int:
        from tpcli.formats.units import tensor_bytes

        return tensor_bytes(self.dtype, self.shape)


@dataclass
class TrainFolder:
    path: Path
    kind: str  # "dcp" | "torch-save"
    tensors: dict[str, SavedTensor]
    left_out: dict[str, int]  # top-level key (or "values" for non-tensor entries) -> entries not read
    files: dict[str, tuple[int, int]]  # file -> (size, mtime_ns) when opened
    world_size: int | None = None
    reader: object = None  # reads one piece: (TrainFolder, SavedTensor, Piece) -> tensor of piece.sizes

    def read_full(self, key: str):
        """The whole tensor `key`, assembled from its pieces (peak memory: the tensor plus one piece)."""
        import torch

        t = self.tensors[key]
        full = torch.empty(t.shape, dtype=getattr(torch, t.dtype))
        for p in t.pieces:
            if math.prod(p.sizes):
                full[tuple(slice(o, o + s) for o, s in zip(p.offsets, p.sizes, strict=True))].copy_(
                    self.reader(self, t, p))
        return full

    def check_records(self) -> None:
        """Every saved record's CRC-32 (`check_zip_crc`), reading each chunk once; for `verify` (gather checks each
        chunk as it reads it)."""
        check = getattr(self.reader, "check", None)
        if check is not None:
            for t in self.tensors.values():
                for p in t.pieces:
                    check(self, t, p)

    def check_unchanged(self) -> None:
        """Every file read has the size and mtime it had when the folder was opened (called before publishing)."""
        for name, (size, mtime) in self.files.items():
            st = os.stat(self.path / name)
            if (st.st_size, st.st_mtime_ns) != (size, mtime):
                raise CheckpointError(f"{self.path / name}: changed while being read; re-run once nothing writes it.")

    def close(self) -> None:
        closer = getattr(self.reader, "close", None)
        if closer is not None:
            closer()


def open_train_folder(folder: Path) -> TrainFolder | None:
    """The checked folder, or None when `folder` holds neither layout."""
    from tpcli.formats import train_dcp, train_pt

    if (folder / ".metadata").exists():
        return train_dcp.open_dcp(folder)
    if train_pt.rank_files(folder):
        return train_pt.open_pt(folder)
    return None


def is_train_folder(folder: Path) -> bool:
    from tpcli.formats import train_pt

    return folder.is_dir() and ((folder / ".metadata").exists() or bool(train_pt.rank_files(folder)))


def check_zip_crc(source, where: str) -> None:
    """`source` (a path or file object) is a torch.save zip whose records all match their CRC-32: a flipped bit in a
    tensor's bytes is caught before anything is written (torch.load does not check it). Only stored (uncompressed)
    records, as torch.save writes them, are accepted, so the check reads each byte once and inflates nothing."""
    import zipfile

    try:
        with zipfile.ZipFile(source) as z:
            packed = [i.filename for i in z.infolist() if i.compress_type != zipfile.ZIP_STORED]
            if packed:
                raise CheckpointError(f"{where}: record {packed[0][:100]} is compressed; torch.save writes stored "
                                      "records only, so this is not a torch.save file.")
            bad = z.testzip()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
        raise CheckpointError(f"{where}: not a torch.save record ({str(exc)[:200]}); the file is corrupt.") from None
    if bad is not None:
        raise CheckpointError(f"{where}: record {bad[:100]} fails its CRC-32 check; the file is corrupt.")


def check_tiling(where: Path, t: SavedTensor) -> None:
    """The pieces of `t` cover its box exactly once: no gap, no overlap, nothing outside.

    Sort and sweep instead of comparing pairs: the cut points of every dimension (piece starts and ends, sorted)
    split the box into a grid; a piece covers a block of grid cells; every cell must be covered once. A valid
    FSDP x TP layout has as many cells as pieces, so the sweep costs O(P log P + cells); a layout whose grid
    exceeds MAX_GRID_CELLS is refused as too fragmented rather than checked slowly."""
    if len(t.pieces) > MAX_PIECES:
        raise CheckpointError(f"{where}: {t.key} has {len(t.pieces):,} chunks (at most {MAX_PIECES:,}); refusing it.")
    ndim = len(t.shape)
    pieces = [p for p in t.pieces if math.prod(p.sizes)]
    for p in t.pieces:
        if len(p.offsets) != ndim or len(p.sizes) != ndim or any(
                o < 0 or s < 0 or o + s > d for o, s, d in zip(p.offsets, p.sizes, t.shape, strict=True)):
            raise CheckpointError(f"{where}: {t.key} has a chunk at {list(p.offsets)} of size {list(p.sizes)} outside "
                                  f"its shape {list(t.shape)}; the checkpoint is corrupt.")
    if not math.prod(t.shape):
        return
    if not pieces:
        raise CheckpointError(f"{where}: {t.key} has no chunk; a rank's file is missing.")
    cuts = [sorted({0, d, *(p.offsets[i] for p in pieces), *(p.offsets[i] + p.sizes[i] for p in pieces)})
            for i, d in enumerate(t.shape)]
    cells = math.prod(len(c) - 1 for c in cuts)
    if cells > MAX_GRID_CELLS:
        raise CheckpointError(f"{where}: {t.key}'s chunks are too fragmented to check ({cells:,} grid cells).")
    index = [{v: k for k, v in enumerate(c)} for c in cuts]
    strides = [math.prod(len(c) - 1 for c in cuts[i + 1:]) for i in range(ndim)]
    count = bytearray(cells)
    for p in pieces:
        ranges = [range(index[i][p.offsets[i]], index[i][p.offsets[i] + p.sizes[i]]) for i in range(ndim)]
        _mark(count, ranges, strides, 0, 0, where, t, p)
    if count.count(1) != cells:
        raise CheckpointError(f"{where}: {t.key} is not fully covered by its chunks (a chunk or rank file is missing).")


def _mark(count: bytearray, ranges, strides, dim: int, base: int, where: Path, t: SavedTensor, p: Piece) -> None:
    if dim == len(ranges):
        if count[base]:
            raise CheckpointError(f"{where}: {t.key} chunk at {list(p.offsets)} overlaps another chunk; the "
                                  "checkpoint is corrupt.")
        count[base] = 1
        return
    for k in ranges[dim]:
        _mark(count, ranges, strides, dim + 1, base + k * strides[dim], where, t, p)
