"""GPT-J (`modeling_gptj.GPTJAttention`).

`_split_heads(x, self.num_attention_heads, self.head_dim)` views q/k/v with the global head count and
`_merge_heads` rebuilds `num_heads * head_dim`: both become per-rank with `num_attention_heads / tp`.
Rotary embeddings act within each head (`rotary_dim` of `head_dim`), so they need nothing.
"""

from __future__ import annotations

from . import adaptation, per_rank


@adaptation("gptj_attention")
def gptj_attention(model, tp_size: int, rank: int) -> None:
    from transformers.models.gptj.modeling_gptj import GPTJAttention

    for module in model.modules():
        if isinstance(module, GPTJAttention):
            module.num_attention_heads = per_rank(module.num_attention_heads, tp_size, "n_head")
            module.embed_dim = per_rank(module.embed_dim, tp_size, "n_embd")
