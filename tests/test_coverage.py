"""`tpcli.formats.coverage.find_bad_tiling` against the brute-force answer: count, per element, the boxes that
hold it (the tensor itself, materialised), on random small cases; and its cost on many chunks."""

from __future__ import annotations

import random
import time

import numpy as np
import pytest

from tpcli.formats.coverage import MAX_CELLS, MAX_CUT_DIMS, cell_limit, find_bad_tiling


def brute_force(shape, boxes) -> str:
    """"ok", "overlap" or "gap" from a materialised count per element."""
    count = np.zeros(shape, dtype=np.int64)
    for offsets, sizes in boxes:
        count[tuple(slice(o, o + s) for o, s in zip(offsets, sizes, strict=True))] += 1
    if (count > 1).any():
        return "overlap"
    return "gap" if (count == 0).any() else "ok"


def split(rng, offsets, sizes, depth=0):
    """A random exact tiling of the box: cut one dim at a random point, recurse."""
    cuttable = [d for d, s in enumerate(sizes) if s > 1]
    if not cuttable or depth > 4 or rng.random() < 0.2:
        return [(tuple(offsets), tuple(sizes))]
    d = rng.choice(cuttable)
    at = rng.randint(1, sizes[d] - 1)
    left = list(sizes)
    left[d] = at
    right_off = list(offsets)
    right_off[d] += at
    right = list(sizes)
    right[d] -= at
    return split(rng, offsets, left, depth + 1) + split(rng, right_off, right, depth + 1)


def random_case(rng):
    ndim = rng.randint(1, 3)
    shape = tuple(rng.randint(1, 6) for _ in range(ndim))
    boxes = split(rng, [0] * ndim, list(shape))
    move = rng.random()
    if move < 0.25 and len(boxes) > 1:
        boxes.pop(rng.randrange(len(boxes)))  # a gap
    elif move < 0.5:
        boxes.append(boxes[rng.randrange(len(boxes))])  # a duplicate
    elif move < 0.75:  # a box moved or resized, kept inside the shape
        k = rng.randrange(len(boxes))
        offsets = [rng.randint(0, s - 1) for s in shape]
        boxes[k] = (tuple(offsets), tuple(rng.randint(1, s - o) for o, s in zip(offsets, shape, strict=True)))
    rng.shuffle(boxes)
    return shape, boxes


def test_sweep_agrees_with_brute_force_on_random_small_cases():
    rng = random.Random(34)
    seen = {"ok": 0, "overlap": 0, "gap": 0}
    for _ in range(3000):
        shape, boxes = random_case(rng)
        want = brute_force(shape, boxes)
        bad = find_bad_tiling(shape, boxes)
        got = "ok" if bad is None else bad.kind
        assert got == want, (shape, boxes, bad)
        seen[want] += 1
        if got == "overlap":  # the two boxes it names do share an element
            (ao, asz), (bo, bsz) = boxes[bad.i], boxes[bad.j]
            assert bad.i != bad.j
            assert all(max(a, b) < min(a + x, b + y) for a, x, b, y in zip(ao, asz, bo, bsz, strict=True))
    assert min(seen.values()) > 300, seen


def test_malformed_boxes_and_scalars():
    assert find_bad_tiling((4,), [((0,), (2,)), ((2,), (3,))]).kind == "outside"
    assert find_bad_tiling((4,), [((0,), (4,)), ((-1,), (1,))]).kind == "negative"
    assert find_bad_tiling((4, 2), [((0,), (4,))]).kind == "rank"
    assert find_bad_tiling((4,), [((0,), (4,)), ((9,), (0,))]) is None  # an empty chunk covers nothing
    assert find_bad_tiling((), [((), ())]) is None
    assert find_bad_tiling((), [((), ()), ((), ())]).kind == "overlap"
    assert find_bad_tiling((), []).kind == "gap"
    assert find_bad_tiling((0, 3), []) is None


def test_many_chunks_cost_a_sweep_not_their_pairs():
    """16,000 one-element chunks: the pairwise test took ~250 s; the sweep well under a second (10 s allowed)."""
    n = 16_000
    order = list(range(n))
    random.Random(0).shuffle(order)
    boxes = [((i,), (1,)) for i in order]
    started = time.perf_counter()
    assert find_bad_tiling((n,), boxes) is None
    assert find_bad_tiling((n,), [*boxes, ((n // 2,), (1,))]).kind == "overlap"
    assert time.perf_counter() - started < 10


@pytest.mark.parametrize("n", [100, 3000])
def test_a_staggered_grid_is_refused_as_fragmented(n):
    """Boxes whose edges cut a 2-D tensor into ~n^2 cells: refused without allocating them (n=3000 would take 9M
    cells; n=100, 10,000 cells for 100 chunks: the limit grows with the chunks, so the work over many such tensors
    stays proportional to their chunks)."""
    boxes = [((i, i), (1, n - i)) for i in range(n)]
    bad = find_bad_tiling((n, n), boxes)
    assert bad.kind == "fragmented" and bad.cells > cell_limit(n)
    assert cell_limit(n) <= MAX_CELLS


def test_a_mesh_grid_is_within_the_limit():
    """tp=4 on dim 0 x fsdp=8 on dim 1, uneven: 32 chunks, 32 cells."""
    rows, cols = [0, 250, 500, 750, 1001], [0, 9, 17, 25, 33, 41, 49, 57, 64]
    boxes = [((r0, c0), (r1 - r0, c1 - c0)) for r0, r1 in zip(rows, rows[1:], strict=False)
             for c0, c1 in zip(cols, cols[1:], strict=False)]
    assert find_bad_tiling((1001, 64), boxes) is None


def test_dims_every_box_spans_cost_nothing():
    """A crafted 40-D tensor of ones (a safetensors header or DCP metadata may say so): the sweep asked for 2^40
    corners and counts (20 dims took 12 s, 24 dims minutes); dims no box cuts are now left out of the sweep."""
    started = time.perf_counter()
    assert find_bad_tiling((1,) * 40, [((0,) * 40, (1,) * 40)]) is None
    assert find_bad_tiling((1,) * 40, [((0,) * 40, (1,) * 40)] * 2).kind == "overlap"
    shape = (1,) * 39 + (4,)
    assert find_bad_tiling(shape, [((0,) * 40, (1,) * 39 + (2,))]).at == (0,) * 39 + (2,)
    assert find_bad_tiling(shape, [((0,) * 40, (1,) * 39 + (2,)), ((0,) * 39 + (2,), (1,) * 39 + (2,))]) is None
    assert time.perf_counter() - started < 2


def test_boxes_cutting_many_dims_are_refused():
    """2^12 one-element boxes of a (2,)*12 tensor: 4,096 cells, within the cell limit, but 2^12 corners per box."""
    d = MAX_CUT_DIMS + 4
    boxes = [(tuple(int(b) for b in format(k, f"0{d}b")), (1,) * d) for k in range(2 ** d)]
    started = time.perf_counter()
    bad = find_bad_tiling((2,) * d, boxes)
    assert bad.kind == "dims" and bad.dims == d
    assert time.perf_counter() - started < 2
    small = MAX_CUT_DIMS  # up to the limit the sweep still runs (256 corners)
    boxes = [(tuple(int(b) for b in format(k, f"0{small}b")), (1,) * small) for k in range(2 ** small)]
    assert find_bad_tiling((2,) * small, boxes) is None
