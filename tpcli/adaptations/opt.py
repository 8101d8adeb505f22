"""OPT (`modeling_opt.OPTAttention`).

q/k/v are viewed as `(bsz, -1, self.num_heads, self.head_dim)` with the global `num_heads`: on a rank holding
num_heads / tp heads that view folds the sequence into the head count (runs, wrong numbers: the naive plan's
~6e-2 logit error). `num_heads` and `embed_dim` become per-rank values; `head_dim` and `scaling` are unchanged.
"""

from __future__ import annotations

from . import adaptation, per_rank


@adaptation("opt_attention")
def opt_attention(model, tp_size: int, rank: int) -> None:
    from transformers.models.opt.modeling_opt import OPTAttention

    for module in model.modules():
        if isinstance(module, OPTAttention):
            module.num_heads = per_rank(module.num_heads, tp_size, "num_attention_heads")
            module.embed_dim = per_rank(module.embed_dim, tp_size, "hidden_size")
