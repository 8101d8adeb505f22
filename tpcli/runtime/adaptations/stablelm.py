"""StableLM (`modeling_stablelm.StableLmAttention`).

q/k/v are viewed as `(bsz, q_len, self.num_heads | self.num_key_value_heads, head_dim)` with global counts:
both become per-rank. `num_key_value_groups` (their ratio) and the partial rotary `rotary_ndims` are unchanged.
"""

from __future__ import annotations

from tpcli.adapters.transformers_api import modeling_class
from tpcli.runtime.adaptations import adaptation, divide_attributes


@adaptation("stablelm_attention")
def stablelm_attention(model, tp_size: int, rank: int) -> None:
    StableLmAttention = modeling_class("stablelm", "StableLmAttention")

    divide_attributes(model, StableLmAttention, tp_size, num_heads="num_attention_heads",
                      num_key_value_heads="num_key_value_heads", hidden_size="hidden_size")
