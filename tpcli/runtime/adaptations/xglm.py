"""XGLM (`modeling_xglm.XGLMAttention`): q is viewed with the global `num_heads` and the output reshaped to the
global `embed_dim`; both become per-rank (head_dim unchanged)."""

from __future__ import annotations

from tpcli.adapters.transformers_api import modeling_class
from tpcli.runtime.adaptations import adaptation, divide_attributes


@adaptation("xglm_attention")
def xglm_attention(model, tp_size: int, rank: int) -> None:
    XGLMAttention = modeling_class("xglm", "XGLMAttention")

    divide_attributes(model, XGLMAttention, tp_size, num_heads="attention_heads", embed_dim="d_model")
