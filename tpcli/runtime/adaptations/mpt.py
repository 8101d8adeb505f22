"""MPT (`modeling_mpt.MptAttention`).

`Wqkv(x).chunk(3, dim=2)` gives q, k, v; with style `qkv_colwise` each rank's output is `[q_r | k_r | v_r]`, so
the chunks are this rank's heads, reshaped with `self.n_heads` (global) -> n_heads / tp. The ALiBi bias is built
once in `MptModel` for all heads, `(n_heads, 1, max_seq_len)`, and added to scores `(b, heads, q, k)`: a
pre-hook hands each attention module rows [rank * n_heads / tp, (rank + 1) * n_heads / tp) of it (the slopes of
its own heads). `softmax_scale` was computed from the global sizes at init and is per head: unchanged.
"""

from __future__ import annotations

from tpcli.adapters.transformers_api import modeling_class
from tpcli.runtime.adaptations import adaptation, per_rank


@adaptation("mpt_attention")
def mpt_attention(model, tp_size: int, rank: int) -> None:
    MptAttention = modeling_class("mpt", "MptAttention")

    for module in model.modules():
        if isinstance(module, MptAttention):
            local = per_rank(module.n_heads, tp_size, "n_heads")
            module.n_heads = local
            module.hidden_size = per_rank(module.hidden_size, tp_size, "d_model")
            module.register_forward_pre_hook(_slice_alibi(rank * local, (rank + 1) * local), with_kwargs=True)


def _slice_alibi(start: int, stop: int):
    def hook(module, args, kwargs):
        if kwargs.get("position_bias") is not None:
            kwargs["position_bias"] = kwargs["position_bias"][start:stop]
        return args, kwargs

    return hook
