"""Per-rank memory under a TP plan, from the resolved plan and the config alone (no weights, no processes).

For a TP size t and rank r, in bytes (d = element size):

    weights    = sum over state-dict tensors of d * prod(local_shape(tensor, t, r))          (what `inspect` counts)
    kv_cache   = sum over attention layers of B * L * (k_rows(r) + v_rows(r)) * d_kv
                 k_rows(r) = the rank's local output features of that layer's k_proj (local KV heads x head_dim)
    grads      = sum over parameters of d * prod(local_shape), except an untied `embedding_rowwise` embedding,
                 whose gradient is the full (vocab, hidden) matrix on every rank (see `_full_gradient`)
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

from .errors import ModelError, UsageError
from .layout import local_shape
from .plan import ResolvedPlan, dtype_size
from .styles import HEAD_SPLITTING, REPLICATE, ParamPlacement

DEFAULT_RESERVE = "2GiB"  # CUDA context (~0.5 GiB), cuBLAS/NCCL workspaces, caching-allocator slack
_DTYPES = {"bf16": "bfloat16", "bfloat16": "bfloat16", "fp16": "float16", "float16": "float16", "half": "float16",
           "fp32": "float32", "float32": "float32", "float": "float32", "fp8": "float8_e4m3fn",
           "float8_e4m3fn": "float8_e4m3fn", "float8_e5m2": "float8_e5m2", "int8": "int8"}
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


@dataclass
class RankMemory:
    rank: int
    weight_bytes: int
    kv_cache_bytes: int
    kv_cache_visible_bytes: int
    grad_bytes: int
    optimizer_bytes: int
    activation_bytes_estimate: int

    @property
    def total_bytes(self) -> int:
        return (self.weight_bytes + self.kv_cache_bytes + self.grad_bytes + self.optimizer_bytes
                + self.activation_bytes_estimate)

    def to_dict(self) -> dict:
        return {**asdict(self), "total_bytes": self.total_bytes}


def parse_size(text: str, flag: str, *, zero: bool = False) -> int:
    """'24GiB', '24G', '80GB', '512MiB' -> bytes (GB = 10^9, G = GiB = 2^30): `tpcli.sizes.parse_size`, the one
    parser of every size flag."""
    from .sizes import parse_size as parse

    return parse(text, flag, zero=zero)


def parse_dtype(text: str, flag: str) -> str:
    try:
        return _DTYPES[text.lower()]
    except KeyError:
        raise UsageError(f"{flag} {text!r}: expected one of bf16, fp16, fp32, fp8, int8.") from None


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
                      is_param and _full_gradient(t.style, t.name in tied_targets))] += 1
    return groups


def _full_gradient(style: str | None, tied: bool) -> bool:
    """Whether this parameter's gradient is the whole tensor on every rank (measured, see module docstring)."""
    return style == "embedding_rowwise" and not tied


def _kv_layer_groups(plan: ResolvedPlan) -> Counter:
    """(layer type, window, K rows (shape, placement), V rows (shape, placement)) -> number of cache layers.

    K rows are the layer's `k_proj` output features as the plan places them (local KV heads x head_dim on each
    rank). A fused `qkv_proj` (Phi-3) whose output is gathered caches every KV head on every rank.
    """
    from transformers.cache_utils import get_layer_types_and_kwargs

    text = plan.config.get_text_config(decoder=True)
    layer_types, kwargs = get_layer_types_and_kwargs(text)
    heads = text.num_attention_heads
    kv_rows = (getattr(text, "num_key_value_heads", None) or heads) * (
        getattr(text, "head_dim", None) or text.hidden_size // heads)
    proj: dict[tuple[int, str], tuple] = {}
    for t in plan.tensors.values():
        m = _KV_PROJ.search(t.name)
        if not m or t.name.startswith(("model.vision", "vision", "model.audio")):
            continue
        layer, which = int(m.group(1)), m.group(2)
        if which != "qkv":
            proj.setdefault((layer, which), (t.shape, t.placement))
        elif t.style not in HEAD_SPLITTING:  # gathered or replicated: the full K and V slices on every rank
            proj.setdefault((layer, "k"), ((kv_rows,), REPLICATE))
            proj.setdefault((layer, "v"), ((kv_rows,), REPLICATE))
    groups: Counter = Counter()
    for i, (kind, kw) in enumerate(zip(layer_types, kwargs, strict=True)):
        if kind == "dummy":  # KV shared with another layer, or a layer without attention
            continue
        if kind not in _CACHED_TOKENS_LAYERS or (i, "k") not in proj or (i, "v") not in proj:
            raise ModelError(f"{plan.architecture}: the KV cache of layer {i} ({kind}) is not modelled by tpcli "
                             "(only k_proj/v_proj or a gathered qkv_proj); run inspect without --seq-len.")
        groups[(kind, kw.get("sliding_window"), proj[(i, "k")], proj[(i, "v")])] += 1
    return groups


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


def rank_memory(plan: ResolvedPlan, tp: int, opts: MemoryOptions) -> list[RankMemory]:
    """Per rank of a TP size `tp`: weights, KV cache, gradients, AdamW state and the activation estimate."""
    return _Counts(plan, opts).ranks(tp)


class _Counts:
    """The plan reduced to groups of equal tensors and equal cache layers, built once for every TP size."""

    def __init__(self, plan: ResolvedPlan, opts: MemoryOptions):
        self.plan, self.opts = plan, opts
        self.groups = _tensor_groups(plan)
        self.kv_groups = _kv_layer_groups(plan) if opts.seq_len else Counter()
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
            held = visible = 0
            for (kind, window, k, v), n in self.kv_groups.items():
                per_token = opts.batch * (_rows(k, tp, r) + _rows(v, tp, r)) * self.kv_size * n
                held += per_token * opts.seq_len
                visible += per_token * (min(opts.seq_len, window - 1) if kind in _WINDOW_LAYERS else opts.seq_len)
            out.append(RankMemory(r, weights, held, visible, grads if opts.train else 0,
                                  2 * params if opts.train else 0, activations))
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

    When none fits, `advice` says by how much the best size misses and what would make it fit: everything but
    weights, gradients and optimizer state grows linearly in B x L, so the largest L (or B) that fits is exact.
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
    dynamic = m.kv_cache_bytes + m.activation_bytes_estimate
    if not dynamic or not opts.seq_len:
        return out
    free = budget - static
    per_seq_token = dynamic / (opts.batch * opts.seq_len)  # KV and activations are linear in B x L
    max_len = int(free // (opts.batch * per_seq_token))
    if max_len >= 1:
        changes.append({"option": "--seq-len", "value": max_len, "text": f"--seq-len {max_len} at --batch {opts.batch}"})
    max_batch = int(free // (opts.seq_len * per_seq_token))
    if max_batch >= 1:
        changes.append({"option": "--batch", "value": max_batch,
                        "text": f"--batch {max_batch} at --seq-len {opts.seq_len}"})
    kv_size = dtype_size(opts.kv_dtype or plan.dtype)
    if m.kv_cache_bytes and kv_size > 1:
        fp8 = m.total_bytes - m.kv_cache_bytes + m.kv_cache_bytes // kv_size
        changes.append({"option": "--kv-dtype", "value": "fp8", "total_bytes": fp8, "fits": fp8 <= budget,
                        "text": "--kv-dtype fp8 (an fp8 KV cache)"})
    return out


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"
