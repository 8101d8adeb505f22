"""GPT-Neo (`modeling_gpt_neo.GPTNeoSelfAttention`): `_split_heads`/`_merge_heads` use the global `num_heads`;
it becomes num_heads / tp (head_dim unchanged; the local-attention window is per position, not per head)."""

from __future__ import annotations

from . import adaptation, per_rank


@adaptation("gpt_neo_attention")
def gpt_neo_attention(model, tp_size: int, rank: int) -> None:
    from transformers.models.gpt_neo.modeling_gpt_neo import GPTNeoSelfAttention

    for module in model.modules():
        if isinstance(module, GPTNeoSelfAttention):
            module.num_heads = per_rank(module.num_heads, tp_size, "num_heads")
            module.embed_dim = per_rank(module.embed_dim, tp_size, "hidden_size")
