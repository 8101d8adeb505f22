"""Slicing maths: which global indices of a tensor each rank holds, computed by DTensor's own placement code.

For a placement `p` over `W` ranks, `p._split_tensor(arange(N), W)` returns exactly the indices DTensor puts on
each rank, so tpcli never re-derives `torch.chunk` rounding (chunk = ceil(N/W); trailing ranks may be short or
empty) nor the `_StridedShard` interleave (rank r holds chunk r of each of the `sf` groups).

A rank's slice of dimension `dim` is a list of half-open runs `[(start, stop), ...]`; one run for `Shard`,
up to `sf` runs for `_StridedShard`. Every other dimension is whole.
"""

from __future__ import annotations

from functools import lru_cache

from tpcli.adapters.torch_api import split_tensor
from tpcli.formats import dcp
from tpcli.planning.placements import ParamPlacement

Runs = tuple[tuple[int, int], ...]


@lru_cache(maxsize=4096)
def rank_runs(size: int, placement: ParamPlacement, world: int) -> tuple[Runs, ...]:
    """Per rank, the runs of `dim` that rank holds (replicated: the whole range on every rank)."""
    if not placement.is_sharded or world == 1:
        return tuple(((0, size),) if size else () for _ in range(world))
    import torch

    along_0 = ParamPlacement(placement.kind, 0, placement.split_factor).to_torch()  # an index vector is 1-D
    pieces = split_tensor(along_0, torch.arange(size), world)
    return tuple(index_runs(piece) for piece in pieces)


def index_runs(index) -> Runs:
    """The half-open runs of consecutive values in a 1-D integer tensor, in order: [3, 4, 5, 9, 10] ->
    ((3, 6), (9, 11)). A run breaks where index[i + 1] != index[i] + 1 (vectorised: a vocabulary-sized index is one
    comparison, not a Python loop)."""
    import torch

    if index.numel() == 0:
        return ()
    breaks = torch.nonzero(index[1:] != index[:-1] + 1).flatten()
    starts = torch.cat([index[:1], index[breaks + 1]]).tolist()
    stops = torch.cat([index[breaks] + 1, index[-1:] + 1]).tolist()
    return tuple(zip(starts, stops, strict=True))


def local_shape(shape: tuple[int, ...], placement: ParamPlacement, world: int, rank: int) -> tuple[int, ...]:
    """Shape of rank `rank`'s local tensor."""
    if not placement.is_sharded:
        return tuple(shape)
    runs = rank_runs(shape[placement.dim], placement, world)[rank]
    out = list(shape)
    out[placement.dim] = sum(b - a for a, b in runs)
    return tuple(out)


def contiguous_chunk(shape: tuple[int, ...], placement: ParamPlacement, world: int, rank: int):
    """(offsets, sizes) of rank's chunk in a DCP file, where `_StridedShard` is saved as plain `Shard`."""
    p = placement.as_contiguous()
    offsets = [0] * len(shape)
    sizes = list(shape)
    if p.is_sharded:
        runs = rank_runs(shape[p.dim], p, world)[rank]
        start, stop = runs[0] if runs else (0, 0)
        offsets[p.dim], sizes[p.dim] = start, stop - start
    return offsets, sizes


def plan_chunks(tensors: list, tp: int, stages=None) -> list[list[dcp.Chunk]]:
    """Per rank, the chunks its file holds in transformers' pre-sharded layout (`tpcli.formats.dcp`), in DCP
    state-dict order: the write items `dcp.save` builds, deduplicated by torch's own planner.

    With `stages` (a `tpcli.planning.pipeline.Stages` of P stages) there are P x tp ranks, numbered as transformers'
    mesh (pp, tp) numbers them: rank = p x tp + t. Rank (p, t) writes, for every tensor stage p holds
    (`stages_of`), the t-th TP chunk of it (at tp = 1 the whole tensor): exactly what rank t of a plain TP load
    holds, kept only by the stage that owns the tensor. A tensor several stages hold (a tied embedding: the first
    and the last) is written by the first of them (the last stage has the tied lm_head under its own name), and a
    chunk several TP ranks of a stage hold (a replicated tensor) once, by the rank torch's planner picks."""
    import torch
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex, TensorProperties
    from torch.distributed.checkpoint.planner import SavePlan, TensorWriteData, WriteItem, WriteItemType

    from tpcli.adapters.torch_api import dedup_save_plans

    ranks = stages.pp * tp if stages is not None else tp
    per_rank: list[list[WriteItem]] = [[] for _ in range(ranks)]
    for t in tensors:
        dtype = getattr(torch, t.dtype)
        held = sorted(stages.stages_of(t.name))[:1] if stages is not None else [0]
        for r in (p * tp + rank for p in held for rank in range(tp)):
            offsets, sizes = contiguous_chunk(t.shape, t.placement, tp, r % tp)
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
    plans = dedup_save_plans([SavePlan(items) for items in per_rank]) if ranks > 1 else [SavePlan(per_rank[0])]
    by_name = {t.name: t for t in tensors}
    return [
        [dcp.Chunk(name=item.index.fqn, rank=r, file=dcp.shard_file_name(r), offsets=tuple(item.tensor_data.chunk.offsets),
               sizes=tuple(item.tensor_data.chunk.sizes), dtype=by_name[item.index.fqn].dtype)
         for item in plan.items]
        for r, plan in enumerate(plans)
    ]
