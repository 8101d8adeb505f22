"""GPT-2 (`modeling_gpt2.GPT2Attention`).

`c_attn(x).split(self.split_size, dim=2)` cuts q|k|v with the global `split_size = embed_dim`; each rank's
`c_attn` output is `[q_r | k_r | v_r]` (style `conv1d_qkv_colwise`), 3 x embed_dim / tp wide, so `split_size`
becomes embed_dim / tp. The head reshapes use `-1` heads and `head_dim`, which are unchanged.
"""

from __future__ import annotations

from tpcli.adapters.transformers_api import modeling_class
from tpcli.runtime.adaptations import adaptation, divide_attributes


@adaptation("gpt2_attention")
def gpt2_attention(model, tp_size: int, rank: int) -> None:
    GPT2Attention = modeling_class("gpt2", "GPT2Attention")

    divide_attributes(model, GPT2Attention, tp_size, num_heads="n_head", embed_dim="n_embd")
    for module in model.modules():
        if isinstance(module, GPT2Attention):
            module.split_size = module.embed_dim
