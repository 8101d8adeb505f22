"""XGLM (`modeling_xglm.XGLMAttention`): q is viewed with the global `num_heads` and the output reshaped to the
global `embed_dim`; both become per-rank (head_dim unchanged)."""

from __future__ import annotations

from . import adaptation, per_rank


@adaptation("xglm_attention")
def xglm_attention(model, tp_size: int, rank: int) -> None:
    from transformers.models.xglm.modeling_xglm import XGLMAttention

    for module in model.modules():
        if isinstance(module, XGLMAttention):
            module.num_heads = per_rank(module.num_heads, tp_size, "attention_heads")
            module.embed_dim = per_rank(module.embed_dim, tp_size, "d_model")
