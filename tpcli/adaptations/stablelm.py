"""StableLM (`modeling_stablelm.StableLmAttention`).

q/k/v are viewed as `(bsz, q_len, self.num_heads | self.num_key_value_heads, head_dim)` with global counts:
both become per-rank. `num_key_value_groups` (their ratio) and the partial rotary `rotary_ndims` are unchanged.
"""

from __future__ import annotations

from . import adaptation, per_rank


@adaptation("stablelm_attention")
def stablelm_attention(model, tp_size: int, rank: int) -> None:
    from transformers.models.stablelm.modeling_stablelm import StableLmAttention

    for module in model.modules():
        if isinstance(module, StableLmAttention):
            module.num_heads = per_rank(module.num_heads, tp_size, "num_attention_heads")
            module.num_key_value_heads = per_rank(module.num_key_value_heads, tp_size, "num_key_value_heads")
            module.hidden_size = per_rank(module.hidden_size, tp_size, "hidden_size")
