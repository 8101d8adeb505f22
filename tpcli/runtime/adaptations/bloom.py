"""BLOOM under TP: per-rank head counts and per-rank ALiBi slopes.

`BloomAttention.query_key_value` is [H * 3 * hd, hidden] with the rows of head h = [q_h, k_h, v_h] contiguous
(`_reshape` views the output as [batch, seq, H, 3, hd]). A colwise `Shard(0)` at tp dividing H therefore gives rank r
whole heads [r*H/tp, (r+1)*H/tp) with their matching q, k and v: plans/bloom.json shards it as it is.

What the forward still does with global numbers, and the fix applied on each rank after loading:
* `self.num_heads` (H) in `_reshape`, the [batch*H, ...] reshapes and `_merge_heads` -> H/tp.
* ALiBi: `BloomModel.forward` builds the bias [batch*H, 1, kv] from slopes m_h computed from the global H (the
  non-power-of-two branch makes m_h depend on H), once per forward. A forward pre-hook on each attention keeps the
  rank's rows [batch, r*H/tp : (r+1)*H/tp]: bit-identical to the single-process values.
* `dense` and `dense_4h_to_h` are rowwise; transformers adds their bias once, after the all-reduce.
* `pretraining_tp > 1` with `slow_but_exact` slices `dense.weight` by the global hidden size: refused.
"""

from __future__ import annotations

from functools import partial

from tpcli.adapters.transformers_api import modeling_class
from tpcli.errors import PlanError
from tpcli.runtime.adaptations import adaptation, per_rank
from tpcli.runtime.adaptations.heads import is_sharded, slice_heads


@adaptation("bloom")
def adapt_bloom(model, tp_size: int, rank: int) -> None:
    """Make every BloomAttention of the TP-loaded `model` compute this rank's heads only (in place)."""
    BloomAttention = modeling_class("bloom", "BloomAttention")

    config = model.config
    if config.pretraining_tp > 1 and config.slow_but_exact:
        raise PlanError(f"bloom with slow_but_exact=True and pretraining_tp={config.pretraining_tp} slices the "
                        "row-wise weights by the global hidden size in its forward; set slow_but_exact=false in "
                        "config.json (the default) to run it under TP.")
    heads = config.n_head
    local = per_rank(heads, tp_size, "n_head")
    for module in model.modules():
        if not isinstance(module, BloomAttention):
            continue
        if not is_sharded(module.query_key_value.weight):
            raise PlanError("bloom: query_key_value must be colwise (plans/bloom.json) for per-rank heads.")
        module.num_heads = local
        module.register_forward_pre_hook(partial(_own_alibi_heads, heads=heads, first=rank * local, count=local),
                                         with_kwargs=True)


def _own_alibi_heads(module, args, kwargs, *, heads: int, first: int, count: int):
    """forward pre-hook: this rank's rows of the ALiBi bias [batch * H, 1, kv]."""
    batch = (args[0] if args else kwargs["hidden_states"]).shape[0]
    kwargs["alibi"] = slice_heads(kwargs["alibi"], batch=batch, total_heads=heads, first=first, count=count)
    return args, kwargs
