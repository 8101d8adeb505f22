"""Per-rank memory under a TP plan, from the resolved plan and the config alone (no weights, no processes).

For a TP size t and rank r, in bytes (d = element size):

    weights    = sum over state-dict tensors of d * prod(local_shape(tensor, t, r))          (what `inspect` counts)
    kv_cache   = sum over cache layers of B * L * token_rows(r) * d_kv + B * states + scalars  (`CacheLayer`)
                 attention: token_rows = K rows + V rows, the rank's slice of k_proj/v_proj when their style hands
                   on a slice (`colwise`), every KV head when gathered (`colwise_gather_output`) or replicated
                 MLA: token_rows = kv_lora_rank + qk_rope_head_dim, whole on every rank
                 linear attention / SSM: fixed-size conv and recurrent states per sequence (`_STATE_FAMILIES`)
    grads      = sum over parameters of d * prod(local_shape), except an untied `embedding_rowwise` embedding,
                 whose gradient is the full (vocab, hidden) matrix on every rank (see `keeps_full_gradient`)
    optimizer  = 2 * sum over parameters of d * prod(local_shape)      (AdamW exp_avg + exp_avg_sq, 0-d steps apart)
    activations (ESTIMATE, --train) = B * L * (n_layers * (4h + 2q/t + 2kv/t + 4*I_eff/t) * d + V * (d + 8))

Facts behind the exact terms were measured on `from_pretrained(tp_plan="auto")` runs (tests/oracles/memory_oracle.py):

* The KV cache is transformers' default `DynamicCache(config=...)`: one layer per `get_layer_types_and_kwargs`
  entry. Sliding-window (and chunked) layers keep `keys[:, :, -(window-1):]`, a *view* of the prefill's
  `torch.cat`, so after a forward over L tokens they still hold the storage of all L tokens (`kv_cache_bytes`);
  their visible tensors are min(L, window-1) tokens (`kv_cache_visible_bytes`), and from the first decode step on
  they hold min(L, window-1) + 1 tokens.
* An untied vocab-parallel embedding (`embedding_rowwise`, Shard(0)) gets a Replicate gradient of the full
  (vocab, hidden) shape: DTensor's `embedding_dense_backward` has no Shard(0) strategy, so every rank computes
  and keeps the whole matrix. A tied one keeps its shard: the lm_head's Shard(0) gradient is accumulated first
  and the embedding's is added into it.

Everything here is closed-form per group of equal tensors (or equal layers), so a 70B config costs the same as
a tiny one; nothing imports torch at module level.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import asdict, dataclass

from tpcli.errors import ModelError, UsageError
from tpcli.formats.units import dtype_size
from tpcli.planning.layout import local_shape
from tpcli.planning.placements import HEAD_SPLITTING, REPLICATE, SPLIT_OUTPUT, VOCAB_PARALLEL_EMBEDDING, ParamPlacement
from tpcli.planning.plan import ResolvedPlan

DEFAULT_RESERVE = "2GiB"  # CUDA context (~0.5 GiB), cuBLAS/NCCL workspaces, caching-allocator slack
_KV_PROJ = re.compile(r"(?:^|\.)layers\.(\d+)\..*\b([kv]|qkv)_proj\.weight$")
_CACHED_TOKENS_LAYERS = {"full_attention", "sliding_attention", "chunked_attention"}
_WINDOW_LAYERS = {"sliding_attention", "chunked_attention"}


@dataclass(frozen=True)
class MemoryOptions:
    """What to count besides the weights: a forward over `batch` x `seq_len` tokens, and training state."""

    batch: int = 1
    seq_len: int | None = None
    kv_dtype: str | None = None  # torch dtype name; None: the model's dtype
    train: bool = False
    gradient_checkpointing: bool = False  # --gradient-checkpointing: the step figures (tpcli.planning.step)


@dataclass
class RankMemory:
    rank: int
    weight_bytes: int
    kv_cache_bytes: int
    kv_cache_visible_bytes: int
    grad_bytes: int
    optimizer_bytes: int
    activation_bytes_estimate: int
    kv_cache_fixed_bytes: int = 0  # the part of kv_cache_bytes that does not grow with the sequence (state layers)

    @property
    def total_bytes(self) -> int:
        return (self.weight_bytes + self.kv_cache_bytes + self.grad_bytes + self.optimizer_bytes
                + self.activation_bytes_estimate)

    def to_dict(self) -> dict:
        return {**asdict(self), "total_bytes": self.total_bytes}


def check_trainable(plan: ResolvedPlan) -> None:
    """`--train` needs a language-modelling head to compute a loss from."""
    model = plan.model
    if model is None or model.get_output_embeddings() is None:
        raise UsageError(f"--train: {plan.architecture} has no language-modelling head to compute a loss; "
                         "use a *ForCausalLM checkpoint (config.json 'architectures').")


@dataclass(frozen=True)
class _Group:
    """Tensors that cost the same on every rank: same shape, placement, dtype and role."""

    shape: tuple[int, ...]
    placement: ParamPlacement
    dtype: str
    is_param: bool
    full_gradient: bool

    def local_bytes(self, tp: int, rank: int) -> int:
        return dtype_size(self.dtype) * math.prod(local_shape(self.shape, self.placement, tp, rank))


def _tensor_groups(plan: ResolvedPlan) -> Counter:
    params = {name for name, _ in plan.model.named_parameters()} if plan.model is not None else set(plan.tensors)
    tied_targets = {t.tied_to for t in plan.tensors.values() if t.tied_to}
    groups: Counter = Counter()
    for t in plan.unique_tensors:
        is_param = t.name in params
        groups[_Group(t.shape, t.placement, t.dtype, is_param,
                      is_param and keeps_full_gradient(t.style, t.name in tied_targets))] += 1
    return groups


def keeps_full_gradient(style: str | None, tied: bool) -> bool:
    """Whether this parameter's gradient is the whole tensor on every rank (measured, see module docstring)."""
    return style == VOCAB_PARALLEL_EMBEDDING and not tied


@dataclass(frozen=True)
class CacheLayer:
    """One cache layer's cost, equal for every layer of a group: K/V rows per token, fixed-size states.

    `k` and `v` are (shape, placement) of the rows cached per token (sharded rows follow `local_shape`); `states`
    are the fixed-size states per sequence, (name, elements, dtype or None for the model dtype), replicated.
    """

    label: str  # "attention", "sliding attention", "MLA", "gated delta net", "mamba", ...
    layer_type: str  # transformers' cache layer type
    window: int | None
    k: tuple | None
    v: tuple | None
    states: tuple = ()
    scalar_bytes: int = 0  # per layer, whatever B and L: a window layer's 0-d int64 `_sliding_window_tensor`

    def token_rows(self, tp: int, rank: int) -> int:
        """Elements cached per token and sequence on `rank` (K + V, or MLA latent + rope key)."""
        return sum(_rows(x, tp, rank) for x in (self.k, self.v) if x is not None)

    def sharded(self, tp: int) -> bool:
        return tp > 1 and any(x is not None and x[1].is_sharded for x in (self.k, self.v))

    def state_bytes(self, model_dtype: str) -> int:
        """Bytes of the fixed-size states per sequence (they do not grow with the sequence)."""
        return sum(n * dtype_size(dt or model_dtype) for _, n, dt in self.states)


def _kv_layer_groups(plan: ResolvedPlan, layers: range | None = None) -> Counter:
    """CacheLayer -> number of cache layers, one per `get_layer_types_and_kwargs` entry (transformers' own list);
    with `layers`, only those decoder layers (a pipeline stage's: the other stages' cache layers stay empty).

    * attention (full, sliding, chunked): K and V rows are the layer's `k_proj` / `v_proj` output features where the
      plan leaves them: split by a style that hands on only this rank's slice (`colwise`: local KV heads x head_dim),
      whole on every rank when the output is gathered (`colwise_gather_output`: olmo2, olmo3, olmoe, flex_olmo, ...)
      or not sharded. A fused `qkv_proj` (Phi-3) whose output is gathered caches every KV head on every rank.
    * MLA (a config with `kv_lora_rank`): per token the compressed latent (kv_lora_rank) and the rope key
      (qk_rope_head_dim), one "head", whole on every rank while `kv_a_proj_with_mqa` is not split.
    * linear attention / SSM (`linear_attention`, `hybrid` layers of the families in `_STATE_FAMILIES`): fixed-size
      conv and recurrent states, whole on every rank while the mixer's projections are not split.
    Anything else raises ModelError naming the layer and its type.
    """
    from tpcli.adapters.transformers_api import get_layer_types_and_kwargs

    text = plan.config.get_text_config(decoder=True)
    layer_types, kwargs = get_layer_types_and_kwargs(text)
    heads = text.num_attention_heads
    kv_rows = (getattr(text, "num_key_value_heads", None) or heads) * (
        getattr(text, "head_dim", None) or text.hidden_size // heads)
    proj: dict[tuple[int, str], tuple] = {}
    by_layer: dict[int, list] = {}
    for t in plan.tensors.values():
        if t.name.startswith(("model.vision", "vision", "model.audio")):
            continue
        layer = re.search(r"(?:^|\.)layers\.(\d+)\.", t.name)
        if layer:
            by_layer.setdefault(int(layer.group(1)), []).append(t)
        m = _KV_PROJ.search(t.name)
        if not m:
            continue
        layer, which = int(m.group(1)), m.group(2)
        if which != "qkv":
            split = t.style in SPLIT_OUTPUT  # else gathered or replicated: every KV head on every rank
            proj.setdefault((layer, which), (t.shape, t.placement) if split else ((t.shape[0],), REPLICATE))
        elif t.style not in HEAD_SPLITTING:  # gathered or replicated: the full K and V slices on every rank
            proj.setdefault((layer, "k"), ((kv_rows,), REPLICATE))
            proj.setdefault((layer, "v"), ((kv_rows,), REPLICATE))
    mla = _mla_layer(plan, text, layer_types)
    family = _STATE_FAMILIES.get(text.model_type)
    groups: Counter = Counter()
    for i, (kind, kw) in enumerate(zip(layer_types, kwargs, strict=True)):
        if kind == "dummy" or (layers is not None and i not in layers):  # shared KV or no attention; another stage's
            continue
        window = kw.get("sliding_window")
        if kind in ("linear_attention", "hybrid") and family is not None:
            label, mixer, states = family
            split = [t.name for t in by_layer.get(i, []) if f".{mixer}." in t.name and t.style in SPLIT_OUTPUT]
            if split:
                raise ModelError(f"{plan.architecture}: the {kind} state of layer {i} is not modelled by tpcli when "
                                 f"the plan splits its projections ({split[0]}: {plan.tensors[split[0]].style}); "
                                 "run inspect without --seq-len.")
            k = v = None
            if kind == "hybrid":
                if (i, "k") not in proj or (i, "v") not in proj:
                    _unmodelled(plan, i, kind)
                k, v, label = proj[(i, "k")], proj[(i, "v")], f"attention + {label}"
            groups[CacheLayer(label, kind, None, k, v, states(text))] += 1
        elif kind == "full_attention" and mla is not None:
            groups[mla] += 1
        elif kind in _CACHED_TOKENS_LAYERS and (i, "k") in proj and (i, "v") in proj:
            label = "attention" if kind == "full_attention" else kind.replace("_", " ")
            scalar = 8 if kind in _WINDOW_LAYERS else 0  # DynamicSlidingWindowLayer's int64 window tensor
            groups[CacheLayer(label, kind, window, proj[(i, "k")], proj[(i, "v")], scalar_bytes=scalar)] += 1
        else:
            _unmodelled(plan, i, kind)
    return groups


def _unmodelled(plan: ResolvedPlan, layer: int, kind: str):
    raise ModelError(f"{plan.architecture}: the KV cache of layer {layer} ({kind}) is not modelled by tpcli (it models "
                     "k_proj/v_proj or a gathered qkv_proj, MLA, and the linear-attention/SSM states of "
                     f"{', '.join(sorted(_STATE_FAMILIES))}); run inspect without --seq-len.")


def _mla_layer(plan: ResolvedPlan, text, layer_types: list[str]) -> CacheLayer | None:
    """MLA (deepseek_v2/v3, longcat_flash, ...): the cache holds the latent and the rope key, (B, 1, L, r) each.

    Both come from `kv_a_proj_with_mqa` (split into kv_lora_rank + qk_rope_head_dim); its `mla_kv_a_proj` style
    keeps the whole projection on every rank, so TP does not shrink this cache. None for a config without MLA.
    """
    rank = getattr(text, "kv_lora_rank", None)
    if not rank:
        return None
    kv_a = [t for t in plan.tensors.values() if re.search(r"\bkv_a_proj_with_mqa\.weight$", t.name)]
    split = [t.name for t in kv_a if t.style in SPLIT_OUTPUT]
    if split or len(kv_a) != sum(kind == "full_attention" for kind in layer_types):
        detail = f"{split[0]} is split ({plan.tensors[split[0]].style})" if split else "its projections not found"
        raise ModelError(f"{plan.architecture}: the MLA cache is not modelled by tpcli here ({detail}); "
                         "run inspect without --seq-len.")
    return CacheLayer("MLA", "full_attention", None, ((rank,), REPLICATE), ((text.qk_rope_head_dim,), REPLICATE))


# Fixed-size states per sequence, read off transformers 5.23's modeling code and checked byte for byte against
# real runs (tests/test_memory.py): (name, elements, dtype; None = the model dtype). The recurrent/SSM states are
# float32 whatever the model dtype (the torch paths compute the scan in float32 and cache its final state).
def _gated_delta_states(c) -> tuple:
    """qwen3_next GatedDeltaNet: conv (2 Hk dk + Hv dv) x kernel, recurrent Hv x dk x dv (float32)."""
    conv = 2 * c.linear_num_key_heads * c.linear_key_head_dim + c.linear_num_value_heads * c.linear_value_head_dim
    return (("conv", conv * c.linear_conv_kernel_dim, None),
            ("recurrent", c.linear_num_value_heads * c.linear_key_head_dim * c.linear_value_head_dim, "float32"))


def _lightning_states(c) -> tuple:
    """MiniMax lightning attention: one K^T V state, heads x head_dim x head_dim (the model dtype)."""
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    return (("recurrent", c.num_attention_heads * head_dim * head_dim, None),)


def _mamba_states(c) -> tuple:
    """Jamba's mamba: conv I x kernel, ssm I x d_state (float32), I = mamba_expand x hidden."""
    inner = c.mamba_expand * c.hidden_size
    return (("conv", inner * c.mamba_d_conv, None), ("ssm", inner * c.mamba_d_state, "float32"))


def _mamba2_states(c) -> tuple:
    """Mamba2: conv (I + 2 G N) x kernel, ssm H x P x N (float32); I = mamba_d_ssm or mamba_expand x hidden."""
    inner = getattr(c, "mamba_d_ssm", None) or int(c.mamba_expand * c.hidden_size)
    conv = inner + 2 * c.mamba_n_groups * c.mamba_d_state
    return (("conv", conv * c.mamba_d_conv, None),
            ("ssm", c.mamba_n_heads * c.mamba_d_head * c.mamba_d_state, "float32"))


# model_type -> (label, the mixer module's attribute name in a layer, states(config)).
_STATE_FAMILIES = {
    "qwen3_next": ("gated delta net", "linear_attn", _gated_delta_states),
    "minimax": ("lightning attention", "self_attn", _lightning_states),
    "jamba": ("mamba", "mamba", _mamba_states),
    "granitemoehybrid": ("mamba2", "mamba", _mamba2_states),
    "falcon_h1": ("mamba2", "mamba", _mamba2_states),
}


def _rows(shape_placement: tuple, tp: int, rank: int) -> int:
    """Local output features of a k/v projection: local KV heads x head_dim."""
    shape, placement = shape_placement
    return local_shape(shape, placement, tp, rank)[0]


def _activation_estimate(plan: ResolvedPlan, tp: int, opts: MemoryOptions) -> int:
    """ESTIMATE of the activations kept for backward over B x L tokens (formula in the module docstring, README).

    Per layer and token: 4h (two norms' inputs and outputs, replicated), 2q/t (queries and attention output),
    2kv/t (keys and values), 4*I_eff/t (gate, up, act(gate), product; I_eff = top_k x expert width for MoE); then
    the vocabulary: logits gathered on every rank in the model dtype plus their fp32 copy and fp32 log-softmax in
    the loss. No recomputation, no sequence parallelism, SDPA/flash attention (no L x L scores).
    """
    text = plan.config.get_text_config(decoder=True)
    h = text.hidden_size
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or h // heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    top_k = getattr(text, "num_experts_per_tok", None)
    dense = getattr(text, "intermediate_size", None) or 4 * h
    width = (getattr(text, "moe_intermediate_size", None) or dense) if top_k else dense
    i_eff = (top_k or 1) * width
    per_token_layer = 4 * h + (2 * heads * head_dim + 2 * kv_heads * head_dim + 4 * i_eff) / tp
    d = dtype_size(plan.dtype)
    per_token = text.num_hidden_layers * per_token_layer * d + text.vocab_size * (d + 8)
    return int(opts.batch * (opts.seq_len or 0) * per_token)


def rank_memory(plan: ResolvedPlan, tp: int, opts: MemoryOptions, *, layers: range | None = None) -> list[RankMemory]:
    """Per rank of a TP size `tp`: weights, KV cache, gradients, AdamW state and the activation estimate; with
    `layers`, the KV cache of those decoder layers only (a pipeline stage's; the weights stay the whole model's)."""
    return _Counts(plan, opts, layers).ranks(tp)


class _Counts:
    """The plan reduced to groups of equal tensors and equal cache layers, built once for every TP size."""

    def __init__(self, plan: ResolvedPlan, opts: MemoryOptions, layers: range | None = None):
        self.plan, self.opts = plan, opts
        self.groups = _tensor_groups(plan)
        self.kv_groups = _kv_layer_groups(plan, layers) if opts.seq_len else Counter()
        self.kv_size = dtype_size(opts.kv_dtype or plan.dtype)

    def ranks(self, tp: int) -> list[RankMemory]:
        opts = self.opts
        activations = _activation_estimate(self.plan, tp, opts) if opts.train and opts.seq_len else 0
        out = []
        for r in range(tp):
            weights = grads = params = 0
            for g, n in self.groups.items():
                b = n * g.local_bytes(tp, r)
                weights += b
                if g.is_param:
                    params += b
                    grads += n * dtype_size(g.dtype) * math.prod(g.shape) if g.full_gradient else b
            held = visible = fixed = 0
            for layer, n in self.kv_groups.items():
                per_token = opts.batch * layer.token_rows(tp, r) * self.kv_size * n
                states = (opts.batch * layer.state_bytes(self.plan.dtype) + layer.scalar_bytes) * n
                held += per_token * opts.seq_len + states
                fixed += states
                tokens = min(opts.seq_len, layer.window - 1) if layer.layer_type in _WINDOW_LAYERS else opts.seq_len
                visible += per_token * tokens + states
            out.append(RankMemory(r, weights, held, visible, grads if opts.train else 0,
                                  2 * params if opts.train else 0, activations, fixed))
        return out


def cache_layers(plan: ResolvedPlan, tp_sizes: list[int], opts: MemoryOptions) -> list[dict]:
    """One entry per kind of cache layer: what it holds and its bytes on the largest rank of each TP size.

    {"label", "layer_type", "layers", "window", "token_elements" (per token and sequence, unsharded),
     "states" [{"name", "elements", "dtype"}] (per sequence), "sharded" (by TP at some size),
     "bytes_per_tp" {tp: bytes held on the largest rank, B x L tokens + fixed states}}; [] without --seq-len.
    """
    if not opts.seq_len:
        return []
    kv_size = dtype_size(opts.kv_dtype or plan.dtype)
    out = []
    for layer, n in _kv_layer_groups(plan).items():
        states = (opts.batch * layer.state_bytes(plan.dtype) + layer.scalar_bytes) * n
        per_tp = {str(tp): max(opts.batch * opts.seq_len * layer.token_rows(tp, r) * kv_size * n + states
                               for r in range(tp)) for tp in tp_sizes}
        out.append({"label": layer.label, "layer_type": layer.layer_type, "layers": n, "window": layer.window,
                    "token_elements": layer.token_rows(1, 0),
                    "states": [{"name": name, "elements": e, "dtype": dt or plan.dtype} for name, e, dt in layer.states],
                    "sharded": any(layer.sharded(tp) for tp in tp_sizes), "bytes_per_tp": per_tp})
    return out


def largest(ranks: list[RankMemory]) -> RankMemory:
    return max(ranks, key=lambda m: m.total_bytes)


def largest_per_tp(plan: ResolvedPlan, tp_sizes: list[int], opts: MemoryOptions) -> dict[int, RankMemory]:
    """For each TP size, its largest rank (the one that decides whether a GPU size fits)."""
    counts = _Counts(plan, opts)
    return {tp: largest(counts.ranks(tp)) for tp in tp_sizes}


def check_budget(gpu_mem: int, reserve: int) -> None:
    if gpu_mem <= reserve:
        raise UsageError(f"--gpu-mem ({_gib(gpu_mem)}) must be larger than --reserve ({_gib(reserve)}); "
                         "lower --reserve or give the GPU's real memory.")


def fit_table(plan: ResolvedPlan, per_tp: dict[int, RankMemory], opts: MemoryOptions, *, gpu_mem: int,
              reserve: int) -> dict:
    """Whether each TP size's largest rank fits `gpu_mem - reserve`, and the smallest TP size that fits.

    When none fits, `advice` says by how much the best size misses and what would make it fit. The total is
    static + C + B x S + B x L x g (weights, gradients and optimizer state; C per-layer scalars; S the fixed-size
    linear-attention / SSM states of one sequence; g per token and sequence), so the largest L at the given B and
    the largest B at the given L are exact.
    """
    check_budget(gpu_mem, reserve)
    budget = gpu_mem - reserve
    fitting = [tp for tp, m in per_tp.items() if m.total_bytes <= budget]
    doc = {
        "gpu_mem_bytes": gpu_mem,
        "reserve_bytes": reserve,
        "per_tp": {str(tp): m.total_bytes for tp, m in per_tp.items()},
        "smallest_fitting_tp": fitting[0] if fitting else None,
        "advice": None,
    }
    if not fitting and per_tp:
        best_tp, best = min(per_tp.items(), key=lambda kv: kv[1].total_bytes)
        doc["advice"] = _advice(plan, best_tp, best, opts, budget)
    return doc


def _advice(plan: ResolvedPlan, tp: int, m: RankMemory, opts: MemoryOptions, budget: int) -> dict:
    """What would make the best TP size fit: each change as {"option", "value", ...} (rendered by the CLI)."""
    static = m.weight_bytes + m.grad_bytes + m.optimizer_bytes
    changes: list[dict] = []
    out = {"best_tp": tp, "miss_bytes": m.total_bytes - budget, "static_bytes": static, "changes": changes}
    if static >= budget:
        changes.append({"option": None, "value": None,
                        "text": ("weights, gradients and AdamW state" if opts.train else "the weights")
                        + f" alone exceed the budget at tp={tp}: use GPUs with more memory, quantized weights, "
                        "or more GPUs than TP alone allows (pipeline parallelism, FSDP)"})
        return out
    # T(B, L) = static + C + B * S + B * L * g: C the per-layer scalars, S the fixed states per sequence, g what
    # every token of every sequence adds (KV rows, MLA latents, activations); solved in integers, so exact.
    per_sequence, constant = _state_terms(plan, opts)
    growing = m.kv_cache_bytes - m.kv_cache_fixed_bytes + m.activation_bytes_estimate  # = B * L * g
    if not opts.seq_len or not (growing or per_sequence):
        return out
    base = static + constant
    out["fixed_cache_bytes"] = m.kv_cache_fixed_bytes
    if growing:
        max_len = (budget - base - opts.batch * per_sequence) * opts.seq_len // growing
        if max_len >= 1:
            changes.append({"option": "--seq-len", "value": max_len,
                            "text": f"--seq-len {max_len} at --batch {opts.batch}"})
    max_batch = (budget - base) * opts.batch // (opts.batch * per_sequence + growing)
    if max_batch >= 1:
        changes.append({"option": "--batch", "value": max_batch,
                        "text": f"--batch {max_batch} at --seq-len {opts.seq_len}"})
    kv_size = dtype_size(opts.kv_dtype or plan.dtype)
    tokens = m.kv_cache_bytes - m.kv_cache_fixed_bytes  # --kv-dtype shrinks K/V and latents, not the states
    if tokens and kv_size > 1:
        fp8 = m.total_bytes - tokens + tokens // kv_size
        changes.append({"option": "--kv-dtype", "value": "fp8", "total_bytes": fp8, "fits": fp8 <= budget,
                        "text": "--kv-dtype fp8 (an fp8 KV cache)"})
    return out


def _state_terms(plan: ResolvedPlan, opts: MemoryOptions) -> tuple[int, int]:
    """(bytes per sequence, bytes per run) of the cache that do not grow with L: the same on every rank."""
    if not opts.seq_len:
        return 0, 0
    groups = _kv_layer_groups(plan)
    return (sum(n * layer.state_bytes(plan.dtype) for layer, n in groups.items()),
            sum(n * layer.scalar_bytes for layer, n in groups.items()))


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"
