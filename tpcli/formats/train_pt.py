"""Per-rank `torch.save` files of DTensor state dicts (`model_world_size_W_rank_R.pt`, as verl writes them) opened
as a `TrainFolder`.

Each file's zip records are first checked against their CRC-32 (`check_zip_crc`), then it is read with `torch.load(weights_only=True, mmap=True)` and `torch.serialization.safe_globals(ALLOWED)`:
tensors, DTensor and its spec, the device mesh and Shard/Replicate placements, nothing else; a pickle naming any
other global is refused before anything is built. mmap keeps the tensors' bytes on disk until a piece is copied;
the pages copied are then handed back to the kernel (`_drop_pages`), so memory holds one output tensor at a time.

A DTensor of global shape S on a mesh M (ranks `M.mesh`, this file's rank R at coordinate c) holds the box that
torch's placements give: for mesh dimension i with Shard(d), dimension d's current range [lo, hi) is cut as
torch.chunk cuts it (pieces of ceil(n / M_i)) and piece c_i is kept; Replicate(i) keeps the range, and only the
rank with c_i = 0 contributes it, so every element is read once. A plain tensor is taken from rank 0.
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import re
from pathlib import Path

from tpcli.errors import CheckpointError
from tpcli.formats.source import check_inside
from tpcli.formats.train_folder import MAX_TOTAL_PIECES, Piece, SavedTensor, TrainFolder, check_tiling, check_zip_crc

RANK_FILE = re.compile(r"^model_world_size_([0-9]{1,6})_rank_([0-9]{1,6})\.pt$")


# (module, name) of every class a rank file may build besides plain tensors (torch's own weights_only set): a
# DTensor, its spec, its mesh and Shard/Replicate placements. Names a torch release lacks are skipped.
ALLOWED = (("torch.distributed.tensor", "DTensor"), ("torch.distributed.tensor._dtensor_spec", "DTensorSpec"),
           ("torch.distributed.tensor._dtensor_spec", "TensorMeta"),
           ("torch.distributed.tensor._dtensor_spec", "ShardOrderEntry"),
           ("torch.distributed.device_mesh", "DeviceMesh"), ("torch.distributed._mesh_layout", "_MeshLayout"),
           ("torch.distributed._mesh_layout", "_FlatLayout"), ("torch.distributed.tensor.placement_types", "Shard"),
           ("torch.distributed.tensor.placement_types", "Replicate"))


def allowed_classes() -> list:
    import importlib

    out = []
    for module, name in ALLOWED:
        try:
            out.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):
            continue
    return out


def rank_files(folder: Path) -> list[Path]:
    try:
        return sorted(p for p in folder.iterdir() if RANK_FILE.match(p.name))
    except OSError:
        return []


def open_pt(folder: Path) -> TrainFolder:
    paths = rank_files(folder)
    sizes = {int(RANK_FILE.match(p.name).group(1)) for p in paths}
    if len(sizes) != 1:
        raise CheckpointError(f"{folder}: rank files of several world sizes ({sorted(sizes)}); keep one save.")
    world = sizes.pop()
    ranks = {int(RANK_FILE.match(p.name).group(2)): p for p in paths}
    missing = [r for r in range(world) if r not in ranks]
    if missing or len(ranks) != world:
        raise CheckpointError(f"{folder}: model_world_size_{world}_rank_{missing[0] if missing else world}.pt is "
                              f"missing ({len(ranks)} of {world} rank files); copy every rank's file.")
    reader = _RankFiles(folder)
    tensors: dict[str, SavedTensor] = {}
    left_out: dict[str, int] = {}
    files = {}
    total = 0
    for rank in range(world):
        path = check_inside(folder, ranks[rank], "rank files")
        st = path.stat()
        files[path.name] = (st.st_size, st.st_mtime_ns)
        check_zip_crc(path, str(path))
        sd = reader.load(path)
        for key, value in sd.items():
            box = _box(value, rank, world, path, key)
            if box is None:
                if rank == 0:
                    left_out["values"] = left_out.get("values", 0) + 1
                continue
            shape, dtype, offsets, sizes = box
            t = tensors.setdefault(key, SavedTensor(key=key, dtype=dtype, shape=shape))
            if (t.shape, t.dtype) != (shape, dtype):
                raise CheckpointError(f"{path}: {key} is {dtype} {list(shape)} here but {t.dtype} {list(t.shape)} "
                                      "in rank 0's file; the files are from different saves.")
            if offsets is not None:
                t.pieces.append(Piece(file=path.name, offsets=offsets, sizes=sizes, key=key))
                total += 1
        if total > MAX_TOTAL_PIECES:
            raise CheckpointError(f"{folder}: more than {MAX_TOTAL_PIECES:,} chunks; refusing it.")
    for t in tensors.values():
        check_tiling(folder, t)
    return TrainFolder(path=folder, kind="torch-save", tensors=tensors, left_out=left_out, files=files,
                       world_size=world, reader=reader)


def _box(value, rank: int, world: int, path: Path, key: str):
    """(global shape, dtype, offsets, sizes) of what this rank holds of `value`; offsets None when another rank
    provides the same elements (replicated); None for a non-tensor value."""
    import torch
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor.placement_types import Replicate, Shard

    if not isinstance(value, torch.Tensor):
        return None
    shape, dtype = tuple(value.shape), str(value.dtype).removeprefix("torch.")
    if not isinstance(value, DTensor):
        return shape, dtype, (tuple(0 for _ in shape) if rank == 0 else None), shape
    mesh = value.device_mesh.mesh
    if mesh.numel() != world or sorted(mesh.flatten().tolist()) != list(range(world)):
        raise CheckpointError(f"{path}: {key}'s device mesh holds ranks {mesh.flatten().tolist()[:8]}, not 0..{world - 1}.")
    coord = [int(c) for c in (mesh == rank).nonzero()[0].tolist()]
    lo, hi = [0] * len(shape), list(shape)
    for i, placement in enumerate(value.placements):
        if type(placement) is Replicate:
            if coord[i]:
                return shape, dtype, None, None
        elif type(placement) is Shard and 0 <= placement.dim < len(shape):
            d, n = placement.dim, hi[placement.dim] - lo[placement.dim]
            step = -(-n // mesh.shape[i])
            lo[d], hi[d] = min(lo[d] + coord[i] * step, hi[d]), min(lo[d] + (coord[i] + 1) * step, hi[d])
        else:
            raise CheckpointError(f"{path}: {key} has placement {placement} on mesh dimension {i}; tpcli reads Shard "
                                  "and Replicate only.")
    sizes = tuple(b - a for a, b in zip(lo, hi, strict=True))
    local = value.to_local()
    if tuple(local.shape) != sizes:
        raise CheckpointError(f"{path}: {key}'s local tensor is {list(local.shape)}, but its placements give "
                              f"{list(sizes)}; the file is corrupt.")
    return shape, dtype, tuple(lo), sizes


class _RankFiles:
    """The rank files' state dicts, memory-mapped; `reader(folder, t, piece)` returns a piece's local tensor."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.loaded: dict[str, dict] = {}

    def load(self, path: Path) -> dict:
        import pickle

        import torch

        log = logging.getLogger("torch.distributed.device_mesh")  # warns that no process group exists: expected
        level = log.level
        log.setLevel(logging.ERROR)
        try:
            with torch.serialization.safe_globals(allowed_classes()):
                sd = torch.load(path, weights_only=True, mmap=True, map_location="cpu")
        except (pickle.UnpicklingError, RuntimeError, ValueError, EOFError, OSError, AttributeError, TypeError) as exc:
            first = str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__
            raise CheckpointError(f"{path}: refused by torch.load(weights_only=True) with tpcli's allow-list of DTensor "
                                  f"classes ({first}); tpcli never unpickles anything else.") from None
        finally:
            log.setLevel(level)
        if not isinstance(sd, dict) or not all(isinstance(k, str) for k in sd):
            raise CheckpointError(f"{path}: holds a {type(sd).__name__}, not a state dict of named tensors.")
        self.loaded[path.name] = sd
        return sd

    def __call__(self, folder: TrainFolder, t: SavedTensor, p: Piece):
        value = self.loaded[p.file][p.key]
        local = value.to_local() if hasattr(value, "to_local") else value
        out = local.clone()
        _drop_pages(local)
        return out

    def close(self) -> None:
        self.loaded.clear()


def _drop_pages(t) -> None:
    """madvise(MADV_DONTNEED) the whole pages of `t`'s bytes: its clean, private file mapping is read again from
    disk if touched, and no longer counts toward this process's memory."""
    nbytes = t.numel() * t.element_size()
    if not nbytes or not hasattr(mmap, "MADV_DONTNEED"):
        return
    page = mmap.PAGESIZE
    start = -(-t.data_ptr() // page) * page
    end = (t.data_ptr() + nbytes) // page * page
    if end > start:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), mmap.MADV_DONTNEED)
