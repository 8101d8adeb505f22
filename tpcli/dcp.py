"""transformers' pre-sharded layout (`save_pretrained(distributed_checkpoint=True)`), planned and read without
processes.

Writing: rank r's file `shard-{r+1:05d}-model-00001-of-00001.safetensors` holds, for every tensor sharded on the
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

from .errors import CheckpointError
from .layout import contiguous_chunk
from .plan import TensorInfo, tensor_bytes
from .storage import CODE_DTYPES, read_header

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


def plan_chunks(tensors: list[TensorInfo], tp: int) -> list[list[Chunk]]:
    """Per rank, the chunks its file holds, in DCP state-dict order."""
    import torch
    from torch.distributed.checkpoint._dedup_save_plans import dedup_save_plans
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex, TensorProperties
    from torch.distributed.checkpoint.planner import SavePlan, TensorWriteData, WriteItem, WriteItemType

    per_rank: list[list[WriteItem]] = [[] for _ in range(tp)]
    for t in tensors:
        dtype = getattr(torch, t.dtype)
        for r in range(tp):
            offsets, sizes = contiguous_chunk(t.shape, t.placement, tp, r)
            if t.placement.is_sharded and sizes[t.placement.dim] == 0:
                # an empty rank sits at the end of the dim, as DTensor puts it (`zero_global_offset`): at offset 0
                # it would share rank 0's MetadataIndex and `dedup_save_plans` could drop rank 0's real chunk
                offsets = list(offsets)
                offsets[t.placement.dim] = t.shape[t.placement.dim]
            per_rank[r].append(WriteItem(
                index=MetadataIndex(t.name, torch.Size(offsets)),
                type=WriteItemType.SHARD if t.placement.is_sharded else WriteItemType.TENSOR,
                tensor_data=TensorWriteData(
                    chunk=ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=torch.Size(sizes)),
                    properties=TensorProperties(dtype=dtype),
                    size=torch.Size(t.shape),
                ),
            ))
    plans = dedup_save_plans([SavePlan(items) for items in per_rank]) if tp > 1 else [SavePlan(per_rank[0])]
    by_name = {t.name: t for t in tensors}
    return [
        [Chunk(name=item.index.fqn, rank=r, file=shard_file_name(r), offsets=tuple(item.tensor_data.chunk.offsets),
               sizes=tuple(item.tensor_data.chunk.sizes), dtype=by_name[item.index.fqn].dtype)
         for item in plan.items]
        for r, plan in enumerate(plans)
    ]


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
        header, meta = read_header(path)
        try:
            info = json.loads(meta.get(SHARDING_KEY, "{}"))
        except ValueError:
            info = None
        if not isinstance(info, dict) or not all(isinstance(v, dict) for v in info.values()):
            raise CheckpointError(f"{path}: corrupt {SHARDING_KEY} metadata (not {{name: {{saved_offsets}}}}).")
        rank = int(SHARD_FILE_RE.match(path.name).group(1)) - 1
        for name, entry in header.items():
            dtype = CODE_DTYPES.get(entry["dtype"])
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
    """The chunks of `t` tile its global box exactly: no gap, no overlap."""

    def volume(sizes):
        v = 1
        for s in sizes:
            v *= s
        return v

    chunks = [c for c in t.chunks if volume(c.sizes)]
    for i, a in enumerate(chunks):
        for b in chunks[i + 1:]:
            if all(max(ao, bo) < min(ao + asz, bo + bsz)
                   for ao, asz, bo, bsz in zip(a.offsets, a.sizes, b.offsets, b.sizes, strict=True)):
                raise CheckpointError(f"{folder / b.file}: {t.name} chunk at {list(b.offsets)} overlaps the one in {a.file}.")
    if sum(volume(c.sizes) for c in chunks) != volume(t.shape):
        raise CheckpointError(f"{folder}: {t.name} is not fully covered by its chunks (a rank file is missing or truncated).")
