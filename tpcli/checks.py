"""Static checks of a resolved plan at a TP size: no weights, no processes.

One implementation serves `inspect` (valid TP sizes), `verify`, and the preflight of `shard` and `run`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from .layout import rank_runs
from .plan import ResolvedPlan, dtype_size, rule_matches
from .quant import block_misalignments, scale_pairs
from .styles import HEAD_SPLITTING, HOOK_ONLY, is_known_style

ERROR, WARNING, INFO = "error", "warning", "info"
ATTENTION_LEAVES = ("q_proj", "k_proj", "v_proj", "qkv_proj", "query_key_value", "Wqkv", "c_attn")
KV_LEAVES = ("k_proj", "v_proj", "qkv_proj", "query_key_value", "Wqkv", "c_attn")
LARGE_REPLICATED_FRACTION = 0.01  # warn about replicated tensors above 1% of the model
GROUPED_MM_ALIGN = 16  # bytes: grouped_mm wants every stride but the last a multiple of 16 bytes


@dataclass
class Finding:
    severity: str
    code: str
    message: str
    target: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def _module_leaf(name: str) -> str:
    parts = name.split(".")
    return parts[-2] if parts[-1] in ("weight", "bias") and len(parts) > 1 else parts[-1]


def check_plan(plan: ResolvedPlan, tp: int) -> list[Finding]:
    """All findings for `plan` at TP size `tp`, errors first."""
    findings: list[Finding] = []
    add = findings.append
    text = plan.config.get_text_config() if hasattr(plan.config, "get_text_config") else plan.config

    for rule, style in plan.rules.items():
        if not is_known_style(style):
            add(Finding(ERROR, "unknown-style", f"rule {rule!r} uses style {style!r}, which transformers does not know", rule))

    for rule, names in rule_matches(plan).items():
        if names:
            continue
        if rule in plan.user_rules:  # transformers raises for these, tpcli says so before loading
            add(Finding(ERROR, "unused-rule", f"plan rule {rule!r} matches no module or parameter of {plan.architecture}", rule))
        else:  # a default rule for layers this config does not build (transformers skips it with a warning)
            add(Finding(WARNING, "unused-rule", f"default rule {rule!r} matches nothing in this config and is skipped", rule))

    for t in plan.tensors.values():
        own = _wild(t.name)
        parent = own.rsplit(".", 1)[0]
        if own in plan.rules and parent in plan.rules:
            a, b = plan.rules[own], plan.rules[parent]
            if _shards_params(a) and _shards_params(b):
                add(Finding(ERROR, "double-rule",
                            f"{t.name} is matched by two sharding rules ({own!r}: {a}, {parent!r}: {b}); keep one",
                            t.name))

    if tp > 1:
        findings.extend(_head_findings(plan, text, tp))
        findings.extend(_shape_findings(plan, tp))
        findings.extend(block_findings(plan, tp))
    findings.extend(_replication_findings(plan))
    order = {ERROR: 0, WARNING: 1, INFO: 2}
    seen, unique = set(), []
    for f in findings:
        key = (f.code, f.message)
        if key not in seen:
            seen.add(key)
            unique.append(f)
    return sorted(unique, key=lambda f: order[f.severity])


def _wild(name: str) -> str:
    from transformers.distributed.parallel_utils import replace_layer_number_by_wildcard

    return replace_layer_number_by_wildcard(name)


def _shards_params(style: str) -> bool:
    return style not in HOOK_ONLY


def _head_findings(plan: ResolvedPlan, text, tp: int) -> list[Finding]:
    out: list[Finding] = []
    sharded = [t for t in plan.tensors.values() if t.style in HEAD_SPLITTING and t.placement.is_sharded]
    q_sharded = any(_module_leaf(t.name) in ATTENTION_LEAVES for t in sharded)
    kv_sharded = any(_module_leaf(t.name) in KV_LEAVES for t in sharded)
    heads = getattr(text, "num_attention_heads", None)
    kv = getattr(text, "num_key_value_heads", None) or heads
    if q_sharded and isinstance(heads, int) and heads % tp:
        out.append(Finding(ERROR, "heads", f"num_attention_heads={heads} not divisible by {tp}", "num_attention_heads"))
    if kv_sharded and isinstance(kv, int) and kv % tp:
        out.append(Finding(ERROR, "kv-heads",
                           f"num_key_value_heads={kv} not divisible by {tp} (transformers loads it, then the forward "
                           "crashes; no KV-head replication, transformers #48307)", "num_key_value_heads"))
    return out


def _shape_findings(plan: ResolvedPlan, tp: int) -> list[Finding]:
    out: list[Finding] = []
    uneven: list[str] = []
    scales = set(scale_pairs(plan.tensors).values())
    for t in plan.unique_tensors:
        p = t.placement
        if not p.is_sharded or t.name in scales:  # block scales are checked with their weight (block_findings)
            continue
        size = t.shape[p.dim]
        if p.kind == "strided":
            if size % p.split_factor:
                out.append(Finding(ERROR, "packed-odd",
                                   f"{t.name}: packed dim {p.dim} has size {size}, not divisible into {p.split_factor} halves",
                                   t.name))
                continue
            half = size // p.split_factor
            if half % tp:
                out.append(Finding(ERROR, "packed-uneven",
                                   f"{t.name}: each packed half has {half} rows, not divisible by {tp}", t.name))
                continue
        if size < tp:
            out.append(Finding(ERROR, "empty-shard",
                               f"{t.name}: dim {p.dim} has size {size} < tp={tp}, some ranks would hold empty shards",
                               t.name))
            continue
        runs = rank_runs(size, p, tp)
        widths = [sum(b - a for a, b in r) for r in runs]
        if 0 in widths:
            out.append(Finding(ERROR, "empty-shard",
                               f"{t.name}: dim {p.dim} of size {size} leaves rank {widths.index(0)} empty at tp={tp}",
                               t.name))
        elif len(set(widths)) > 1:
            uneven.append(f"{t.name} ({size} -> {'/'.join(map(str, widths))})")
        if t.style and t.style.startswith(("packed", "rowwise")) and len(t.shape) == 3:
            elt = dtype_size(t.dtype)
            # local expert tensor [E, a, b]: the stride of dim 1 is b elements
            for w in set(widths):
                last = w if p.dim == 2 else t.shape[2]
                if (last * elt) % GROUPED_MM_ALIGN:
                    out.append(Finding(WARNING, "grouped-mm-stride",
                                       f"{t.name}: local width {last} x {elt} B is not a multiple of 16 bytes; the "
                                       "grouped_mm experts kernel can fail, load with experts_implementation=\"eager\"",
                                       t.name))
                    break
    if uneven:
        more = f" (+{len(uneven) - 3} more)" if len(uneven) > 3 else ""
        out.append(Finding(WARNING, "uneven", "uneven splits: " + ", ".join(uneven[:3]) + more))
    return out


def block_findings(plan: ResolvedPlan, tp: int) -> list[Finding]:
    """Quantized checkpoints: every rank's slice of a block-scaled weight must be whole blocks, so that rank r's
    scales are exactly the blocks of rank r's weight slice (one error per weight group, first rank at fault)."""
    out: list[Finding] = []
    q = plan.quantization
    if q is None or not q.block_size or tp < 2:
        return out
    seen: set[str] = set()
    for weight, scale in scale_pairs(plan.tensors).items():
        w, s = plan.tensors[weight], plan.tensors[scale]
        p = w.placement
        if not p.is_sharded or _wild(weight) in seen:
            continue
        block = q.block_size[0] if p.dim == len(w.shape) - 2 else q.block_size[1]
        why = block_misalignments(w.shape, s.shape, p.dim, block, rank_runs(w.shape[p.dim], p, tp),
                                  rank_runs(s.shape[p.dim], s.placement, tp))
        if why:
            seen.add(_wild(weight))
            out.append(Finding(ERROR, "quant-block",
                               f"{weight}: at tp={tp} {why} of the {q.method} scales; each rank's slice must be a "
                               f"whole number of {q.block_size[0]}x{q.block_size[1]} blocks", weight))
    return out


def _replication_findings(plan: ResolvedPlan) -> list[Finding]:
    out: list[Finding] = []
    total = plan.total_bytes or 1
    for t in plan.unique_tensors:
        if not t.placement.is_sharded and t.nbytes >= LARGE_REPLICATED_FRACTION * total and t.numel > 1_000_000:
            out.append(Finding(WARNING, "large-replicated",
                               f"{t.name} ({_mib(t.nbytes)}) stays replicated on every rank", t.name))
    for t in plan.tensors.values():
        if t.tied_to:
            other = plan.tensors.get(t.tied_to)
            if other and other.placement != t.placement:
                out.append(Finding(ERROR, "tied-mismatch",
                                   f"{t.name} is tied to {t.tied_to} but they get different placements "
                                   f"({t.placement.describe()} vs {other.placement.describe()})", t.name))
            else:
                out.append(Finding(INFO, "tied", f"{t.name} is tied to {t.tied_to} (stored once per file pair)", t.name))
    return out


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def errors(findings: list[Finding]) -> list[Finding]:
    return [f for f in findings if f.severity == ERROR]


def valid_tp_sizes(plan: ResolvedPlan, max_tp: int = 64) -> tuple[list[int], dict[int, str]]:
    """TP sizes 1..max_tp that pass every error check, and for the others the first reason."""
    valid, invalid = [], {}
    for tp in range(1, max_tp + 1):
        errs = [f for f in _head_findings(plan, plan.config.get_text_config(), tp) + _shape_findings(plan, tp)
                + block_findings(plan, tp) if f.severity == ERROR] if tp > 1 else []
        if errs:
            invalid[tp] = errs[0].message
        else:
            valid.append(tp)
    return valid, invalid
