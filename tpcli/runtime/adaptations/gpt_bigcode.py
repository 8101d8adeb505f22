"""GPTBigCode (StarCoder, SantaCoder) under TP: the multi-query split of `c_attn` and per-rank head counts.

`GPTBigCodeAttention.c_attn` fuses Q, K and V into one Linear (E = hidden size, hd = head_dim, H heads):

| config               | rows of c_attn                         | per rank (heads h in [r*H/tp, ...))             |
|----------------------|----------------------------------------|-------------------------------------------------|
| multi_query=True     | [q x H, k, v] x hd: ONE K/V head       | its q rows + the K/V rows (every rank needs them) |
| multi_query=False    | H heads of [q, k, v] x hd              | whole heads: colwise Shard(0) (gpt_bigcode-mha) |

The multi-query rows are not one chunk, which no DTensor placement expresses, so plans/gpt_bigcode.json leaves
`c_attn` replicated (it is [E + 2*hd, E]: half the attention weights, ~10% of a layer with a 4E MLP) and this
adaptation keeps the rank's rows after loading. Then the forward's global numbers become local:
`embed_dim` (the q width in `split((embed_dim, kv_dim, kv_dim))`) -> E/tp, `num_heads` -> H/tp, and
`num_key_value_groups` (how often the K/V head is repeated for eager/SDPA) -> H/tp; with multi_query=False,
`kv_heads` and `kv_dim` too (each rank has H/tp K/V heads, one per query head).
`attn.c_proj` and `mlp.c_proj` are rowwise; transformers adds their bias once, after the all-reduce.
"""

from __future__ import annotations

from tpcli.adapters.transformers_api import modeling_class
from tpcli.errors import PlanError
from tpcli.runtime.adaptations import adaptation, per_rank
from tpcli.runtime.adaptations.heads import head_rows, is_sharded, keep_rows


@adaptation("gpt_bigcode")
def adapt_gpt_bigcode(model, tp_size: int, rank: int) -> None:
    """Make every GPTBigCodeAttention of the TP-loaded `model` compute this rank's heads only (in place)."""
    GPTBigCodeAttention = modeling_class("gpt_bigcode", "GPTBigCodeAttention")

    config = model.config
    if config.add_cross_attention:
        raise PlanError("gpt_bigcode with add_cross_attention=true: its cross-attention projections are not split by "
                        "any tpcli plan; only decoder-only GPTBigCode models are supported.")
    heads = config.n_head
    local = per_rank(heads, tp_size, "n_head")
    for module in model.modules():
        if not isinstance(module, GPTBigCodeAttention):
            continue
        if is_sharded(module.c_attn.weight) == module.multi_query:
            raise PlanError(f"gpt_bigcode multi_query={module.multi_query}: c_attn must be "
                            f"{'replicated' if module.multi_query else 'colwise'} for this layout; use --plan "
                            f"{'gpt_bigcode' if module.multi_query else 'gpt_bigcode-mha'}.")
        hd = module.head_dim
        if module.multi_query:  # [q x H, k, v] x hd rows: this rank's q heads, then the K/V head every rank needs
            keep_rows(module.c_attn, head_rows(rank * local, local, hd) + head_rows(0, 2, hd, offset=heads * hd))
        else:  # colwise gave this rank its heads' [q, k, v] rows
            module.kv_heads = local
            module.kv_dim = local * hd
        module.num_heads = local
        module.embed_dim = local * hd  # the q width in split((embed_dim, kv_dim, kv_dim))
        module.num_key_value_groups = local // module.kv_heads  # how often each K/V head is repeated
