"""GPT-Neo (`modeling_gpt_neo.GPTNeoSelfAttention`): `_split_heads`/`_merge_heads` use the global `num_heads`;
it becomes num_heads / tp (head_dim unchanged; the local-attention window is per position, not per head)."""

from __future__ import annotations

from tpcli.adapters.transformers_api import modeling_class
from tpcli.runtime.adaptations import adaptation, divide_attributes


@adaptation("gpt_neo_attention")
def gpt_neo_attention(model, tp_size: int, rank: int) -> None:
    GPTNeoSelfAttention = modeling_class("gpt_neo", "GPTNeoSelfAttention")

    divide_attributes(model, GPTNeoSelfAttention, tp_size, num_heads="num_heads", embed_dim="hidden_size")
