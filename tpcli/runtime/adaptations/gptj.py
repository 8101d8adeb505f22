"""GPT-J (`modeling_gptj.GPTJAttention`).

`_split_heads(x, self.num_attention_heads, self.head_dim)` views q/k/v with the global head count and
`_merge_heads` rebuilds `num_heads * head_dim`: both become per-rank with `num_attention_heads / tp`.
Rotary embeddings act within each head (`rotary_dim` of `head_dim`), so they need nothing.
"""

from __future__ import annotations

from tpcli.adapters.transformers_api import modeling_class
from tpcli.runtime.adaptations import adaptation, divide_attributes


@adaptation("gptj_attention")
def gptj_attention(model, tp_size: int, rank: int) -> None:
    GPTJAttention = modeling_class("gptj", "GPTJAttention")

    divide_attributes(model, GPTJAttention, tp_size, num_attention_heads="n_head", embed_dim="n_embd")
