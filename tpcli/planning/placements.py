"""The style -> placement table: the only place in tpcli where a TP style string is interpreted.

It mirrors the `shard_param` of each style class in `transformers/distributed/tensor_parallel.py` (5.23):

| style                                        | weight (ndim k)           | bias / 1-D                 |
|----------------------------------------------|---------------------------|----------------------------|
| colwise, colwise_gather_output, colwise_rep  | Shard(k-2)                | Shard(-1)                  |
| rowwise, rowwise_split_input, rowwise_rep    | Shard(-1)                 | Replicate (named `bias`)   |
| embedding_rowwise / embedding_colwise        | Shard(0) / Shard(1)       | same                       |
| packed_colwise                               | _StridedShard(k-2, sf=2)  | Shard(-1)                  |
| packed_rowwise                               | _StridedShard(-1, sf=2)   | Replicate                  |
| everything else (module hooks, `replicate`)  | Replicate                 | Replicate                  |

Styles tpcli adds (registered in transformers by `tpcli.planning.style_classes`, used by plans/ files):

| style                | weight (ndim k)            | bias / 1-D                 | for                               |
|----------------------|----------------------------|----------------------------|-----------------------------------|
| conv1d_colwise       | Shard(k-1)                 | Shard(0)                   | Conv1D `[in, out]` (GPT-2 MLP)    |
| conv1d_qkv_colwise   | _StridedShard(k-1, sf=3)   | _StridedShard(0, sf=3)     | Conv1D packing q|k|v (`c_attn`)   |
| conv1d_rowwise       | Shard(k-2)                 | Replicate                  | Conv1D `[in, out]` output proj    |
| qkv_colwise          | _StridedShard(k-2, sf=3)   | _StridedShard(0, sf=3)     | nn.Linear packing [q; k; v]       |
| moe_tp_experts_biased| (module hook) Replicate    | Replicate                  | experts with `down_proj_bias`     |

tests/test_shard.py (its oracle, tests/oracles/tp_oracle.py, under torchrun) checks this table against the DTensors of transformers' own TP load.
Placements are returned as torch objects so that all slicing maths is DTensor's own (see `tpcli.planning.layout`).
"""

from __future__ import annotations

from dataclasses import dataclass

COLWISE = {"colwise", "colwise_gather_output", "colwise_rep"}
ROWWISE = {"rowwise", "rowwise_split_input", "rowwise_rep"}
EMBEDDING = {"embedding_rowwise": 0, "embedding_colwise": 1}
PACKED = {"packed_colwise", "packed_rowwise"}
# Styles that only hook a module's forward (or keep a full copy): their parameters stay whole on every rank.
HOOK_ONLY = {
    "sequence_parallel",
    "replicated_with_grad_allreduce",
    "mla_kv_a_proj",
    "all_reduce",
    "moe_tp_experts",
    "moe_identity_expert",
    "local_params",
    "replicate",
    "moe_tp_experts_biased",  # tpcli's: moe_tp_experts whose experts add an output bias (added once, by rank 0)
}
# tpcli's own styles: style -> (placement kind, weight dim counted from the end, split factor, bias sharded too)
TPCLI_STYLES = {"conv1d_colwise": ("shard", 1, 1, True), "conv1d_qkv_colwise": ("strided", 1, 3, True),
                "conv1d_rowwise": ("shard", 2, 1, False), "qkv_colwise": ("strided", 2, 3, True)}
KNOWN_STYLES = COLWISE | ROWWISE | set(EMBEDDING) | PACKED | HOOK_ONLY | set(TPCLI_STYLES)
# Styles whose projections carry attention heads: sharding them splits heads between ranks.
HEAD_SPLITTING = COLWISE - {"colwise_gather_output", "colwise_rep"} | {"conv1d_qkv_colwise", "qkv_colwise"}
SPLIT_FACTOR = 2
# `replicate` in a user plan switches a default rule off (transformers' own meaning)
OFF = "replicate"
# A vocab-parallel embedding: DTensor's embedding backward has no Shard(0) strategy, so an untied one keeps its whole
# gradient on every rank (measured; tpcli.planning.memory)
VOCAB_PARALLEL_EMBEDDING = "embedding_rowwise"
# How a style leaves the activations between two projections (transformers' local forward, `use_local_output`):
# these hand the next layer only this rank's slice of their output features ...
SPLIT_OUTPUT = {"colwise", "packed_colwise", "conv1d_colwise", "conv1d_qkv_colwise", "qkv_colwise"}
# ... and these take such a slice as input (their weight holds only those input features) and all-reduce.
SPLIT_INPUT = {"rowwise", "packed_rowwise", "conv1d_rowwise"}


@dataclass(frozen=True)
class ParamPlacement:
    """How one parameter is laid out over a 1-D TP mesh.

    `kind` is "replicate", "shard" (contiguous `torch.chunk` slices of `dim`) or "strided" (`_StridedShard`:
    `dim` is cut into `split_factor` groups and each group is chunked, rank r holding the r-th chunk of each).
    `dim` is normalised to be non-negative.
    """

    kind: str
    dim: int | None = None
    split_factor: int = 1

    @property
    def is_sharded(self) -> bool:
        return self.kind != "replicate"

    def to_torch(self):
        """The DTensor placement object (imports torch)."""
        from torch.distributed.tensor import Replicate, Shard

        from tpcli.adapters.torch_api import StridedShard

        if self.kind == "replicate":
            return Replicate()
        if self.kind == "shard":
            return Shard(self.dim)
        return StridedShard(self.dim, split_factor=self.split_factor)

    def as_contiguous(self) -> ParamPlacement:
        """What transformers' DCP save writes: `_StridedShard` is redistributed to a plain `Shard` first."""
        return ParamPlacement("shard", self.dim) if self.kind == "strided" else self

    def describe(self) -> str:
        if self.kind == "replicate":
            return "Replicate"
        if self.kind == "shard":
            return f"Shard({self.dim})"
        return f"_StridedShard({self.dim}, sf={self.split_factor})"


REPLICATE = ParamPlacement("replicate")


def is_known_style(style: str) -> bool:
    return style in KNOWN_STYLES


def unknown_style_hint(style: object) -> str:
    """For an error about an unknown style: the closest known style (difflib) and the list of styles, e.g.
    " (did you mean 'colwise'?); known styles: all_reduce, colwise, ..."."""
    import difflib

    close = difflib.get_close_matches(str(style), sorted(KNOWN_STYLES), n=1, cutoff=0.6)
    maybe = f" (did you mean {close[0]!r}?)" if close else ""
    return f"{maybe}; known styles: {', '.join(sorted(KNOWN_STYLES))}"


def param_placement(style: str | None, param_name: str, ndim: int) -> ParamPlacement:
    """The placement transformers gives parameter `param_name` (its last name component decides `bias`)."""
    if style is None or style in HOOK_ONLY or ndim == 0:
        return REPLICATE
    leaf = param_name.rsplit(".", 1)[-1]

    def norm(dim: int) -> int:
        return dim % ndim

    if style in COLWISE:
        return ParamPlacement("shard", norm(ndim - 2 if ndim > 1 else -1))
    if style in ROWWISE:
        return REPLICATE if leaf == "bias" else ParamPlacement("shard", norm(-1))
    if style in EMBEDDING:
        return ParamPlacement("shard", norm(EMBEDDING[style]))
    if style == "packed_colwise":
        if ndim == 1:
            return ParamPlacement("shard", 0)
        return ParamPlacement("strided", norm(ndim - 2), SPLIT_FACTOR)
    if style == "packed_rowwise":
        return REPLICATE if ndim == 1 else ParamPlacement("strided", norm(-1), SPLIT_FACTOR)
    if style in TPCLI_STYLES:
        kind, from_end, split, bias_sharded = TPCLI_STYLES[style]
        if ndim == 1:  # the bias follows the output features; a row-wise layer adds it once, whole
            return ParamPlacement(kind, 0, split) if bias_sharded else REPLICATE
        return ParamPlacement(kind, norm(ndim - from_end), split)
    raise ValueError(f"unknown TP style {style!r}")
