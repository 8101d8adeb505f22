"""OPT (`modeling_opt.OPTAttention`).

q/k/v are viewed as `(bsz, -1, self.num_heads, self.head_dim)` with the global `num_heads`: on a rank holding
num_heads / tp heads that view folds the sequence into the head count (runs, wrong numbers: the naive plan's
~6e-2 logit error). `num_heads` and `embed_dim` become per-rank values; `head_dim` and `scaling` are unchanged.
"""

from __future__ import annotations

from tpcli.adapters.transformers_api import modeling_class
from tpcli.runtime.adaptations import adaptation, divide_attributes


@adaptation("opt_attention")
def opt_attention(model, tp_size: int, rank: int) -> None:
    OPTAttention = modeling_class("opt", "OPTAttention")

    divide_attributes(model, OPTAttention, tp_size, num_heads="num_attention_heads", embed_dim="hidden_size")
