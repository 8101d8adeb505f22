"""torch DCP checkpoints (`.metadata` + `__R_I.distcp`) opened as a `TrainFolder`.

`.metadata` (read only through `tpcli.formats.dcp_metadata`) maps each flattened key to its global size, dtype and
chunks (offsets, sizes), and each chunk (`MetadataIndex(fqn, offset)`) to `_StorageInfo(relative_path, offset,
length)`: a `torch.save` record of the chunk's tensor inside that file. Before any chunk is read: every path is a
plain file name inside the folder, every byte range lies inside its file, chunk counts are bounded, and the chunks
of every tensor tile it exactly once. A chunk is read as its byte range, its zip records' CRC-32 checked (DCP
keeps no hashes of its own), and loaded through `torch.load(weights_only=True)`.

Top-level keys: `dcp.save({"model": sd, "optimizer": ...})` (accelerate, Trainer, torchtitan) records each key's
path in `planner_data` (`("model", "lm_head.weight")`); the model's entries are those under "model" and every other
top-level key is left out and counted. A bare `dcp.save(sd)` has one-element paths: every tensor is the model's;
torchtitan's `dcp.save({**model_sd, "optimizer": ...})` mixes both: the one-element paths are the model's.
"""

from __future__ import annotations

import io
import math
from pathlib import Path

from tpcli.errors import CheckpointError
from tpcli.formats.source import check_inside, is_plain_name
from tpcli.formats.train_folder import MAX_TOTAL_PIECES, Piece, SavedTensor, TrainFolder, check_tiling, check_zip_crc

MODEL_KEYS = ("model", "module", "model_state_dict", "state_dict")  # the top-level key a trainer saves weights under


def open_dcp(folder: Path) -> TrainFolder:
    import torch
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata, TensorStorageMetadata

    from tpcli.formats.dcp_metadata import read_dcp_metadata

    meta_path = folder / ".metadata"
    meta = read_dcp_metadata(meta_path)
    entries, storage = meta.state_dict_metadata, meta.storage_data
    if not isinstance(entries, dict) or not isinstance(storage, dict):
        raise CheckpointError(f"{meta_path}: not DCP metadata (no state_dict_metadata/storage_data dicts).")
    paths = _paths(meta.planner_data, entries)
    top = {p[0] for p in paths.values() if len(p) > 1}
    model_top = next((k for k in MODEL_KEYS if k in top), None)
    where_of: dict[tuple[str, tuple[int, ...]], object] = {}
    for index, info in storage.items():
        where_of[(getattr(index, "fqn", None), tuple(getattr(index, "offset", None) or ()))] = info
    files: dict[str, tuple[int, int]] = {}
    tensors: dict[str, SavedTensor] = {}
    left_out: dict[str, int] = {}
    total = 0
    for fqn, entry in entries.items():
        path = paths.get(fqn, (fqn,))
        if (path[0] != model_top) if model_top is not None else len(path) > 1:  # another top-level key's entry
            left_out[str(path[0])] = left_out.get(str(path[0]), 0) + 1
            continue
        if isinstance(entry, BytesStorageMetadata):
            left_out["values"] = left_out.get("values", 0) + 1
            continue
        if not isinstance(entry, TensorStorageMetadata):
            raise CheckpointError(f"{meta_path}: entry {str(fqn)[:200]} is a {type(entry).__name__}, not a tensor.")
        key = ".".join(map(str, path[1:])) if model_top is not None else str(fqn)
        dtype = getattr(entry.properties, "dtype", None)
        if not isinstance(dtype, torch.dtype):
            raise CheckpointError(f"{meta_path}: {key} has no dtype; the metadata is corrupt.")
        shape = _ints(entry.size, meta_path, key)
        t = SavedTensor(key=key, dtype=str(dtype).removeprefix("torch."), shape=shape)
        total += len(entry.chunks)
        if total > MAX_TOTAL_PIECES:
            raise CheckpointError(f"{meta_path}: more than {MAX_TOTAL_PIECES:,} chunks; refusing it.")
        for chunk in entry.chunks:
            offsets, sizes = _ints(chunk.offsets, meta_path, key), _ints(chunk.sizes, meta_path, key)
            info = where_of.get((fqn, offsets))
            if info is None:
                raise CheckpointError(f"{meta_path}: {key}'s chunk at {list(offsets)} has no storage entry; the "
                                      "checkpoint is incomplete.")
            t.pieces.append(_piece(folder, info, offsets, sizes, files, key))
        check_tiling(folder, t)
        tensors[key] = t
    ranks = {p.file for t in tensors.values() for p in t.pieces}
    return TrainFolder(path=folder, kind="dcp", tensors=tensors, left_out=left_out, files=files,
                       world_size=len(ranks) or None, reader=_ChunkReader())


def _paths(planner_data, entries) -> dict:
    """{flattened key: its path in the saved dict} from planner_data when it is well formed, else one-element paths."""
    if not isinstance(planner_data, dict):
        return {}
    out = {}
    for fqn in entries:
        p = planner_data.get(fqn)
        if not (isinstance(p, tuple) and p and all(isinstance(x, str | int) for x in p)):
            return {}
        out[fqn] = p
    return out


def _ints(values, where: Path, key: str) -> tuple[int, ...]:
    try:
        out = tuple(values)
    except TypeError:
        out = None
    if out is None or not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 1 << 62 for v in out):
        raise CheckpointError(f"{where}: {key} has a size or offset that is not a list of non-negative integers.")
    return out


def _piece(folder: Path, info, offsets, sizes, files: dict, key: str) -> Piece:
    name, start, length = (getattr(info, a, None) for a in ("relative_path", "offset", "length"))
    if not is_plain_name(name):
        raise CheckpointError(f"{folder / '.metadata'}: {key} is stored in {str(name)[:200]!r}, not a file name inside "
                              f"{folder}; refusing the checkpoint.")
    if getattr(info, "transform_descriptors", None):
        raise CheckpointError(f"{folder / name}: {key} is stored with transforms {list(info.transform_descriptors)} "
                              "(compression or encryption), which tpcli does not read.")
    if name not in files:
        path = folder / name
        if not path.exists():
            raise CheckpointError(f"{path}: missing (named by .metadata); copy every rank's file.")
        check_inside(folder, path, "DCP files")
        st = path.stat()
        files[name] = (st.st_size, st.st_mtime_ns)
    if not (isinstance(start, int) and isinstance(length, int) and start >= 0 and length > 0
            and start + length <= files[name][0]):
        raise CheckpointError(f"{folder / name}: {key}'s chunk at {list(offsets)} lies at bytes {start}+{length}, "
                              f"outside the file ({files[name][0]:,} bytes); the file is truncated or corrupt.")
    if length > 64 + 2 * (math.prod(sizes) * 16 + (1 << 16)):  # a torch.save record: the tensor's bytes + a header
        raise CheckpointError(f"{folder / name}: {key}'s chunk record is {length:,} bytes, far more than its tensor.")
    return Piece(file=name, offsets=offsets, sizes=sizes, start=start, length=length)


class _ChunkReader:
    """Reads a chunk's byte range and loads it with torch.load(weights_only=True): tensors only, no code runs."""

    def __init__(self):
        self._open: dict[Path, object] = {}

    def check(self, folder: TrainFolder, t: SavedTensor, p: Piece) -> bytes:
        """The chunk's record, its CRC-32s checked."""
        path = folder.path / p.file
        f = self._open.get(path) or self._open.setdefault(path, open(path, "rb"))  # noqa: SIM115
        f.seek(p.start)
        data = f.read(p.length)
        check_zip_crc(io.BytesIO(data), f"{path}: {t.key}'s chunk at {list(p.offsets)}")
        return data

    def __call__(self, folder: TrainFolder, t: SavedTensor, p: Piece):
        import torch

        data = self.check(folder, t, p)
        where = f"{folder.path / p.file}: {t.key}'s chunk at {list(p.offsets)}"
        try:
            x = torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
        except Exception as exc:  # noqa: BLE001  (any refusal of the safe loader is a corrupt chunk)
            raise CheckpointError(f"{where}: not a torch.save tensor ({str(exc).splitlines()[0][:200]}).") from None
        if type(x) is not torch.Tensor or tuple(x.shape) != p.sizes or str(x.dtype) != f"torch.{t.dtype}":
            raise CheckpointError(f"{where}: holds {type(x).__name__} {list(getattr(x, 'shape', []))}, not "
                                  f"{t.dtype} {list(p.sizes)} as .metadata says; the checkpoint is corrupt.")
        return x

    def close(self) -> None:
        for f in self._open.values():
            f.close()
        self._open.clear()
