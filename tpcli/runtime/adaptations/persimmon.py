"""Persimmon (`modeling_persimmon.PersimmonAttention`).

`query_key_value` packs per head, `[num_heads][q, k, v][head_dim]` along its output dim, so a plain column-wise
split hands each rank whole heads with their q, k and v; `_split_heads` views it with the global `num_heads`,
which becomes num_heads / tp. q/k LayerNorms act on head_dim and are shared by all heads (replicated).
"""

from __future__ import annotations

from tpcli.adapters.transformers_api import modeling_class
from tpcli.runtime.adaptations import adaptation, divide_attributes


@adaptation("persimmon_attention")
def persimmon_attention(model, tp_size: int, rank: int) -> None:
    PersimmonAttention = modeling_class("persimmon", "PersimmonAttention")

    divide_attributes(model, PersimmonAttention, tp_size, num_heads="num_attention_heads", hidden_size="hidden_size")
