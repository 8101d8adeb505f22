"""Do a tensor's chunks tile it exactly once? A check whose cost grows with the chunks, not with their pairs.

A tensor of global shape S (d dims) is saved as chunks, boxes [o, o + s) with o + s <= S. They tile S when every
element lies in exactly one box. Checking each pair of boxes for overlap is O(n^2): 8,000 one-element chunks took
70 s. Instead, per dim, sort the distinct box edges (0, S_d, every o_d and o_d + s_d): they cut S into a grid of
cells, and every box is a whole block of cells. A d-dimensional difference array (+1/-1 at the 2^d corners of each
box, in cell coordinates) summed along each axis gives, per cell, how many boxes cover it: the chunks tile S iff
every count is 1. Cost: O(n 2^d log n + cells), where d counts only the dims some box cuts (a dim every box
spans whole is left out: a crafted 30-D tensor of ones would otherwise ask for 2^30 corners and counts), and more
than MAX_CUT_DIMS cut dims is refused as fragmented. For chunks saved by a mesh the grid is the mesh's product of cuts
(cells = n); a crafted set whose edges cut S into more cells than `cell_limit(n)` (16 per chunk, at least 4,096, at
most MAX_CELLS) is refused as too fragmented, so the work stays proportional to the chunks over all tensors.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

MAX_CELLS = 1 << 22  # 16 MiB of int32 counts; a mesh of 4M ranks would be needed to reach it honestly
CELLS_PER_CHUNK = 16  # a mesh's chunks form a product grid: one cell each
MIN_CELL_LIMIT = 4096
MAX_DIM = 1 << 62  # sizes beyond int64 range cannot be a tensor's
MAX_CUT_DIMS = 8  # dims the chunks cut (a mesh cuts one per sharded mesh dim): the sweep visits 2^d box corners


@dataclass(frozen=True)
class Tiling:
    """Why boxes do not tile a shape: kind is "rank" (box i has another number of dims), "negative" (a negative
    offset or size), "outside" (box i reaches past the shape), "overlap" (boxes i and j share an element), "gap"
    (an element at `at` is in no box), "fragmented" (`cells` grid cells: more than `cell_limit`) or "dims" (the boxes
cut `dims` dims of the shape: more than MAX_CUT_DIMS)."""

    kind: str
    i: int = -1
    j: int = -1
    at: tuple[int, ...] = ()
    cells: int = 0
    dims: int = 0


def _volume(sizes) -> int:
    v = 1
    for s in sizes:
        v *= s
    return v


def cell_limit(chunks: int) -> int:
    """The most grid cells checked for `chunks` non-empty chunks."""
    return min(MAX_CELLS, max(CELLS_PER_CHUNK * chunks, MIN_CELL_LIMIT))


def find_bad_tiling(shape: tuple[int, ...], boxes: list[tuple[tuple[int, ...], tuple[int, ...]]]) -> Tiling | None:
    """None when the non-empty `boxes` ((offsets, sizes) each) tile `shape` exactly once; the first reason
    otherwise. Empty boxes (a zero size) cover nothing and are only checked for their number of dims."""
    import numpy as np

    ndim = len(shape)
    if any(not 0 <= s <= MAX_DIM for s in shape):
        return Tiling("outside", -1)
    live = []
    for i, (offsets, sizes) in enumerate(boxes):
        if len(offsets) != ndim or len(sizes) != ndim:
            return Tiling("rank", i)
        if any(o < 0 for o in offsets) or any(s < 0 for s in sizes):
            return Tiling("negative", i)
        if _volume(sizes):
            if any(o + s > dim for o, s, dim in zip(offsets, sizes, shape, strict=True)):
                return Tiling("outside", i)
            live.append(i)
    if ndim == 0:  # a scalar: exactly one chunk holds it
        return None if len(live) == 1 else Tiling("overlap", live[0], live[1]) if live else Tiling("gap")
    if not _volume(shape):
        return None
    if not live:
        return Tiling("gap", at=(0,) * ndim)
    start = np.array([boxes[i][0] for i in live], dtype=np.int64).reshape(len(live), ndim)  # <= MAX_DIM: checked
    end = start + np.array([boxes[i][1] for i in live], dtype=np.int64).reshape(len(live), ndim)
    cuts = [np.unique(np.concatenate(([0, shape[d]], start[:, d], end[:, d]))) for d in range(ndim)]
    cells = _volume(len(c) - 1 for c in cuts)
    if cells > cell_limit(len(live)):
        return Tiling("fragmented", cells=cells)
    cut = [d for d in range(ndim) if len(cuts[d]) > 2]  # a dim every box spans whole adds nothing to the count
    if len(cut) > MAX_CUT_DIMS:
        return Tiling("dims", dims=len(cut))
    if not cut:  # every box is the whole tensor
        return None if len(live) == 1 else Tiling("overlap", live[0], live[1])
    bad = _sweep([cuts[d] for d in cut], start[:, cut], end[:, cut])
    if bad is None:
        return None
    if bad.kind == "overlap":
        return Tiling("overlap", live[bad.i], live[bad.j])
    at = [0] * ndim
    for d, x in zip(cut, bad.at, strict=True):
        at[d] = x
    return Tiling("gap", at=tuple(at))


def _sweep(cuts, start, end) -> Tiling | None:
    """The difference-array count over the grid `cuts` of the boxes [start, end) (n x d arrays, every dim cut):
    Tiling("overlap", i, j) with indices into the rows, Tiling("gap", at=...) in element coordinates, or None."""
    import numpy as np

    ndim = len(cuts)
    lo = np.stack([np.searchsorted(cuts[d], start[:, d]) for d in range(ndim)], axis=1)  # in cell coordinates
    hi = np.stack([np.searchsorted(cuts[d], end[:, d]) for d in range(ndim)], axis=1)
    count = np.zeros([len(c) for c in cuts], dtype=np.int32)  # one extra cell per dim for the far corners
    for corner in itertools.product((0, 1), repeat=ndim):
        idx = np.where(np.array(corner, dtype=bool), hi, lo)
        np.add.at(count, tuple(idx.T), -1 if sum(corner) % 2 else 1)
    for d in range(ndim):
        count = np.cumsum(count, axis=d, dtype=np.int32)
    count = count[tuple(slice(0, -1) for _ in range(ndim))]
    over = np.argwhere(count > 1)
    if len(over):
        holders = np.nonzero(np.all((lo <= over[0]) & (over[0] < hi), axis=1))[0]
        return Tiling("overlap", int(holders[0]), int(holders[1]))
    gap = np.argwhere(count == 0)
    if len(gap):
        return Tiling("gap", at=tuple(int(cuts[d][c]) for d, c in enumerate(gap[0])))
    return None
