"""transformers' pre-sharded layout (`save_pretrained(distributed_checkpoint=True)`), planned and read without
processes.

Writing (planned by `tpcli.planning.layout.plan_chunks`): rank r's file `shard-{r+1:05d}-model-00001-of-00001.safetensors` holds, for every tensor sharded on the
mesh, its contiguous chunk (`_StridedShard` is saved as plain `Shard`, as transformers redistributes it first), and
for every replicated tensor, one copy on the rank torch's DCP planner picks (`dedup_save_plans`, fed the same
per-rank write items in state-dict order that `dcp.save` builds). `DCP_SHARDING_INFO` in the file metadata gives
each chunk's `saved_offsets`.

Reading: `scan` collects every chunk of every tensor in a folder of such files, infers global shapes the way
`HuggingFaceStorageReader` does (max of offset + size), and checks that the chunks tile each tensor exactly once.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from tpcli.errors import CheckpointError
from tpcli.formats.rankfile import RankFile
from tpcli.formats.units import SAFETENSORS_DTYPES, tensor_bytes

SHARD_FILE_RE = re.compile(r"^shard-([0-9]{5})-model-([0-9]{5})-of-([0-9]{5})\.safetensors$")
SHARDING_KEY = "DCP_SHARDING_INFO"
FILE_METADATA = {"DCP_VERSION": "1.0", "format": "pt"}


def shard_file_name(rank: int) -> str:
    return f"shard-{rank + 1:05d}-model-00001-of-00001.safetensors"


@dataclass
class Chunk:
    name: str
    rank: int
    file: str
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    dtype: str


def sharding_metadata(chunks: list[Chunk]) -> dict[str, str]:
    return {SHARDING_KEY: json.dumps({c.name: {"saved_offsets": list(c.offsets)} for c in chunks}), **FILE_METADATA}


@dataclass
class ShardedTensor:
    name: str
    dtype: str
    shape: tuple[int, ...]
    chunks: list[Chunk] = field(default_factory=list)

    @property
    def nbytes(self) -> int:
        return tensor_bytes(self.dtype, self.shape)


def is_sharded_dir(path: Path) -> bool:
    return path.is_dir() and any(SHARD_FILE_RE.match(p.name) for p in path.iterdir())


def shard_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if SHARD_FILE_RE.match(p.name))


def scan(folder: Path, *, expected_files: list[str] | None = None) -> dict[str, ShardedTensor]:
    """Every tensor of a DCP-style sharded folder with its chunks; raises on gaps, overlaps or bad files."""
    files = shard_files(folder)
    if not files:
        raise CheckpointError(f"{folder}: no shard-*-model-*.safetensors files; is this a sharded folder?")
    if expected_files is not None:
        missing = sorted(set(expected_files) - {p.name for p in files})
        if missing:
            raise CheckpointError(f"{folder / missing[0]}: missing (listed in the manifest).")
    tensors: dict[str, ShardedTensor] = {}
    for path in files:
        # a link out of the folder is refused, as a checkpoint's weights are; names: dot-separated printable ASCII
        with RankFile(path, "rank files", folder=folder, state_names=True) as f:
            header, meta = f.header, f.metadata
        try:
            info = json.loads(meta.get(SHARDING_KEY, "{}"))
        except (ValueError, RecursionError):  # absurdly nested: refused below like any other non-object
            info = None
        if not isinstance(info, dict) or not all(isinstance(v, dict) for v in info.values()):
            raise CheckpointError(f"{path}: corrupt {SHARDING_KEY} metadata (not {{name: {{saved_offsets}}}}).")
        rank = int(SHARD_FILE_RE.match(path.name).group(1)) - 1
        for name, entry in header.items():
            dtype = SAFETENSORS_DTYPES.get(entry["dtype"])
            if dtype is None:
                raise CheckpointError(f"{path}: tensor {name} has unsupported dtype {entry['dtype']}.")
            sizes = tuple(entry["shape"])
            offsets = info.get(name, {}).get("saved_offsets", [0] * len(sizes))
            if not isinstance(offsets, list) or not all(isinstance(o, int) and not isinstance(o, bool) and o >= 0
                                                        for o in offsets):
                raise CheckpointError(f"{path}: {name} has saved_offsets {offsets!r}, not a list of non-negative "
                                      f"integers ({SHARDING_KEY} metadata is corrupt).")
            offsets = tuple(offsets)
            if len(offsets) != len(sizes):
                raise CheckpointError(f"{path}: {name} has {len(offsets)} offsets for a {len(sizes)}-D tensor.")
            t = tensors.setdefault(name, ShardedTensor(name=name, dtype=dtype, shape=()))
            if t.dtype != dtype:
                raise CheckpointError(f"{path}: {name} is {dtype} here but {t.dtype} in another file.")
            t.chunks.append(Chunk(name, rank, path.name, offsets, sizes, dtype))
    for t in tensors.values():
        t.shape = _global_shape(t)
        check_coverage(t, folder)
    return tensors


def _global_shape(t: ShardedTensor) -> tuple[int, ...]:
    ndim = len(t.chunks[0].sizes)
    return tuple(max(c.offsets[d] + c.sizes[d] for c in t.chunks) for d in range(ndim))


def check_coverage(t: ShardedTensor, folder: Path) -> None:
    """The chunks of `t` tile its global box exactly: no gap, no overlap, none outside (`coverage.find_bad_tiling`:
    a sweep over the grid the chunks' edges cut, not a test of every pair)."""
    from tpcli.formats.coverage import MAX_CUT_DIMS, cell_limit, find_bad_tiling

    bad = find_bad_tiling(tuple(t.shape), [(tuple(c.offsets), tuple(c.sizes)) for c in t.chunks])
    if bad is None:
        return
    a = t.chunks[bad.i] if bad.i >= 0 else None
    if bad.kind == "overlap":
        b = t.chunks[bad.j]
        raise CheckpointError(f"{folder / b.file}: {t.name} chunk at {list(b.offsets)} overlaps the one in {a.file}.")
    if bad.kind == "gap":
        raise CheckpointError(f"{folder}: {t.name} is not fully covered by its chunks (a rank file is missing or "
                              "truncated).")
    if bad.kind == "fragmented":
        raise CheckpointError(f"{folder}: {t.name}'s {len(t.chunks)} chunks cut it into {bad.cells:,} pieces, more "
                              f"than tpcli checks for them ({cell_limit(len(t.chunks)):,}); no mesh saves that: the "
                              "metadata is crafted or corrupt.")
    if bad.kind == "dims":
        raise CheckpointError(f"{folder}: {t.name}'s chunks cut it along {bad.dims} dims, more than tpcli checks "
                              f"({MAX_CUT_DIMS}); no mesh saves that: the metadata is crafted or corrupt.")
    where = folder / a.file if a is not None else folder
    what = f"chunk at {list(a.offsets)} of size {list(a.sizes)}" if a is not None else "shape"
    raise CheckpointError(f"{where}: {t.name} {what} does not fit its shape {list(t.shape)} (the metadata is "
                          "corrupt).")


COMPARE_BLOCK = 4 * 2**20  # bytes read at a time from each file by `same_chunk_bytes`


def same_chunk_bytes(folder: Path, a: ShardedTensor, b: ShardedTensor) -> bool | None:
    """Whether `a` and `b` hold the same bytes, compared chunk by chunk (offsets and sizes matched), COMPARE_BLOCK
    bytes at a time, without torch; None when they are not cut into the same chunks (the caller assembles them).
    Both come from `scan` (headers checked: every chunk's data range lies inside its file)."""
    boxes_a = {(c.offsets, c.sizes): c for c in a.chunks}
    boxes_b = {(c.offsets, c.sizes): c for c in b.chunks}
    if a.dtype != b.dtype or boxes_a.keys() != boxes_b.keys():
        return None
    files: dict[str, RankFile] = {}

    def rank_file(c: Chunk) -> RankFile:
        if c.file not in files:
            files[c.file] = RankFile(folder / c.file)
        return files[c.file]

    try:
        for box, ca in boxes_a.items():
            cb = boxes_b[box]
            fa, fb = rank_file(ca), rank_file(cb)
            size = fa.entry(ca.name).nbytes
            if fb.entry(cb.name).nbytes != size:
                return False
            for pos in range(0, size, COMPARE_BLOCK):
                n = min(COMPARE_BLOCK, size - pos)
                if fa.read_bytes(ca.name, pos, n) != fb.read_bytes(cb.name, pos, n):
                    return False
        return True
    finally:
        for f in files.values():
            f.close()
