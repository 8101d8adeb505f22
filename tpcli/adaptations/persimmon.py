"""Persimmon (`modeling_persimmon.PersimmonAttention`).

`query_key_value` packs per head, `[num_heads][q, k, v][head_dim]` along its output dim, so a plain column-wise
split hands each rank whole heads with their q, k and v; `_split_heads` views it with the global `num_heads`,
which becomes num_heads / tp. q/k LayerNorms act on head_dim and are shared by all heads (replicated).
"""

from __future__ import annotations

from . import adaptation, per_rank


@adaptation("persimmon_attention")
def persimmon_attention(model, tp_size: int, rank: int) -> None:
    from transformers.models.persimmon.modeling_persimmon import PersimmonAttention

    for module in model.modules():
        if isinstance(module, PersimmonAttention):
            module.num_heads = per_rank(module.num_heads, tp_size, "num_attention_heads")
            module.hidden_size = per_rank(module.hidden_size, tp_size, "hidden_size")
