"""Falcon under TP: per-rank head counts, the multi-query split of `query_key_value`, per-rank ALiBi.

`FalconAttention` fuses Q, K and V into one Linear `query_key_value` [rows, hidden] (hd = head_dim, H heads,
KV key/value heads). Its rows come in three layouts, and `_split_heads` views the output with `self.num_heads`:

| config                            | rows                                     | per rank (heads h in [r*H/tp, ...)) |
|-----------------------------------|------------------------------------------|-------------------------------------|
| new_decoder_architecture (40B)    | KV groups of [q x H/KV, k, v] x hd       | whole groups: colwise Shard(0)      |
| multi_query=False (classic, rw)   | H heads of [q, k, v] x hd                | whole heads: colwise Shard(0)       |
| multi_query=True (7B)             | [q x H, k, v] x hd: one K/V head         | its q rows + the K/V rows (all)     |

The first two are what a colwise `Shard(0)` gives when tp divides KV (resp. H): plans/falcon.json and
plans/falcon-mha.json. The multi-query rows are not one chunk (every rank needs the single K/V head), which no DTensor
placement expresses: plans/falcon-mq.json leaves `query_key_value` replicated and this adaptation keeps the rank's
rows after loading (`keep_rows`). The plans' `equals` constraints pick the one matching the config.

After the split each rank runs the module as a Falcon with H/tp heads (and KV/tp groups), so `num_heads` and
`num_kv_heads` become local. `dense` is rowwise: transformers adds its bias once, after the all-reduce.
ALiBi (falcon-rw): the model builds biases for all H heads from the global head count and, for SDPA, folds them into
the [batch, H, q, kv] mask; a forward pre-hook hands each attention its own heads' rows of both.
"""

from __future__ import annotations

from functools import partial

from tpcli.adapters.transformers_api import modeling_class
from tpcli.errors import PlanError
from tpcli.runtime.adaptations import adaptation, per_rank
from tpcli.runtime.adaptations.heads import head_rows, is_sharded, keep_rows, slice_heads


@adaptation("falcon")
def adapt_falcon(model, tp_size: int, rank: int) -> None:
    """Make every FalconAttention of the TP-loaded `model` compute this rank's heads only (in place)."""
    FalconAttention = modeling_class("falcon", "FalconAttention")

    config = model.config
    heads = config.num_attention_heads
    local = per_rank(heads, tp_size, "num_attention_heads")
    first = rank * local
    multi_query = config.multi_query and not config.new_decoder_architecture
    for module in model.modules():
        if not isinstance(module, FalconAttention):
            continue
        qkv = module.query_key_value
        if is_sharded(qkv.weight) == multi_query:
            raise PlanError(f"falcon (new_decoder_architecture={config.new_decoder_architecture}, multi_query="
                            f"{config.multi_query}): query_key_value must be {'replicated' if multi_query else 'colwise'}"
                            f" for this layout; use --plan {'falcon-mq' if multi_query else 'falcon or falcon-mha'}.")
        if config.new_decoder_architecture:
            module.num_kv_heads = per_rank(config.num_kv_heads, tp_size, "num_kv_heads")
        elif not multi_query:
            module.num_kv_heads = local
        else:  # [q x H, k, v]: this rank's q heads, then the K/V head every rank needs
            hd = module.head_dim
            keep_rows(qkv, head_rows(first, local, hd) + head_rows(0, 2, hd, offset=heads * hd))
        module.num_heads = local
        if config.alibi:
            module.register_forward_pre_hook(partial(_own_alibi_heads, heads=heads, first=first, count=local),
                                             with_kwargs=True)


def _own_alibi_heads(module, args, kwargs, *, heads: int, first: int, count: int):
    """forward pre-hook: this rank's rows of the ALiBi bias and of the ALiBi-carrying mask (both per head)."""
    hidden = args[0] if args else kwargs["hidden_states"]
    batch = hidden.shape[0]
    for key in ("alibi", "attention_mask"):
        if kwargs.get(key) is not None:
            kwargs[key] = slice_heads(kwargs[key], batch=batch, total_heads=heads, first=first, count=count)
    return args, kwargs
