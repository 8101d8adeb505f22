"""Slicing maths against DTensor/torch.chunk, in one process."""

import pytest
import torch

from tpcli.planning.layout import contiguous_chunk, index_runs, local_shape, rank_runs
from tpcli.planning.placements import ParamPlacement, param_placement


def take(tensor, dim, runs):
    """The runs of `dim`, concatenated: what a rank holds."""
    parts = [tensor.narrow(dim, a, b - a) for a, b in runs]
    return torch.cat(parts, dim=dim) if parts else tensor.narrow(dim, 0, 0)


@pytest.mark.parametrize("tp", [1, 2, 3, 4])
@pytest.mark.parametrize("size", [8, 10, 1001, 96])
def test_shard_runs_reassemble_and_match_torch_chunk(tp, size):
    p = ParamPlacement("shard", 0)
    x = torch.randn(size, 3)
    pieces = [take(x, 0, runs) for runs in rank_runs(size, p, tp)]
    assert torch.equal(torch.cat(pieces), x)
    expected = list(torch.chunk(x, tp)) + [x[:0]] * (tp - len(torch.chunk(x, tp)))
    for got, want in zip(pieces, expected, strict=True):
        assert torch.equal(got, want)


def test_uneven_vocab_at_tp3_is_334_334_333():
    p = param_placement("embedding_rowwise", "model.embed_tokens.weight", 2)
    assert [local_shape((1001, 64), p, 3, r) for r in range(3)] == [(334, 64), (334, 64), (333, 64)]


@pytest.mark.parametrize("tp", [1, 2, 3, 4])
def test_strided_shard_holds_its_chunk_of_each_half(tp):
    # packed [gate; up] along dim 1 of a 3-D expert tensor: rank r holds cat(gate_r, up_r)
    gate, up = torch.randn(4, 12, 5), torch.randn(4, 12, 5)
    fused = torch.cat([gate, up], dim=1)
    p = param_placement("packed_colwise", "experts.gate_up_proj", 3)
    assert p == ParamPlacement("strided", 1, 2)
    for r, runs in enumerate(rank_runs(24, p, tp)):
        want = torch.cat([torch.chunk(gate, tp, 1)[r], torch.chunk(up, tp, 1)[r]], dim=1)
        assert torch.equal(take(fused, 1, runs), want)


def test_strided_is_saved_as_contiguous_chunks():
    p = ParamPlacement("strided", 0, 2)
    assert contiguous_chunk((8, 4), p, 2, 1) == ([4, 0], [4, 4])


@pytest.mark.parametrize(
    "style,name,ndim,expected",
    [
        ("colwise", "q_proj.weight", 2, ParamPlacement("shard", 0)),
        ("colwise", "q_proj.bias", 1, ParamPlacement("shard", 0)),
        ("rowwise", "o_proj.weight", 2, ParamPlacement("shard", 1)),
        ("rowwise", "o_proj.bias", 1, ParamPlacement("replicate")),
        ("rowwise", "experts.down_proj", 3, ParamPlacement("shard", 2)),
        ("embedding_colwise", "embed.weight", 2, ParamPlacement("shard", 1)),
        ("packed_rowwise", "x.weight", 2, ParamPlacement("strided", 1, 2)),
        ("replicated_with_grad_allreduce", "q_norm.weight", 1, ParamPlacement("replicate")),
        (None, "norm.weight", 1, ParamPlacement("replicate")),
    ],
)
def test_style_table(style, name, ndim, expected):
    assert param_placement(style, name, ndim) == expected


def test_index_runs_are_the_runs_of_consecutive_values():
    """The vectorised run finder against the plain loop, on sorted index sets (DTensor's pieces), shuffled ones and
    repeats; a run that wrongly merged or split fails the comparison."""
    import random

    def loop(indices):
        runs: list[tuple[int, int]] = []
        for i in indices:
            if runs and runs[-1][1] == i:
                runs[-1] = (runs[-1][0], i + 1)
            else:
                runs.append((i, i + 1))
        return tuple(runs)

    assert index_runs(torch.tensor([3, 4, 5, 9, 10])) == ((3, 6), (9, 11))
    assert index_runs(torch.tensor([], dtype=torch.long)) == ()
    rng = random.Random(0)
    for _ in range(500):
        n = rng.randint(1, 40)
        idx = sorted(rng.sample(range(80), n)) if rng.random() < 0.7 else [rng.randint(0, 10) for _ in range(n)]
        assert index_runs(torch.tensor(idx)) == loop(idx), idx
