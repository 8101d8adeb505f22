"""Static checks of a resolved plan at a TP size: no weights, no processes.

One implementation serves `inspect` (valid TP sizes), `verify`, and the preflight of `shard` and `run`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from functools import lru_cache

from tpcli.adapters.transformers_api import experts_implementation
from tpcli.errors import PlanError
from tpcli.formats.units import dtype_size
from tpcli.planning.layout import rank_runs
from tpcli.planning.placements import (
    HEAD_SPLITTING,
    HOOK_ONLY,
    SPLIT_INPUT,
    SPLIT_OUTPUT,
    is_known_style,
    unknown_style_hint,
)
from tpcli.planning.plan import ResolvedPlan, rule_matches
from tpcli.planning.quant import block_misalignments, scale_pairs

ERROR, WARNING, INFO = "error", "warning", "info"
# Projections whose output columns are attention heads (MLA: q_b_proj, kv_b_proj; q_proj when q_lora_rank is None)
ATTENTION_LEAVES = ("q_proj", "k_proj", "v_proj", "qkv_proj", "query_key_value", "Wqkv", "c_attn", "q_b_proj",
                    "kv_b_proj")
KV_LEAVES = ("k_proj", "v_proj", "qkv_proj", "query_key_value", "Wqkv", "c_attn")
LOW_SHARDED_FRACTION = 0.5  # warn when a plan shards less than half of the parameter bytes
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
            add(Finding(ERROR, "unknown-style", f"rule {rule!r} uses style {style!r}, which transformers does not know"
                               f"{unknown_style_hint(style)}", rule))

    unused_defaults = []
    for rule, names in rule_matches(plan).items():
        if names:
            continue
        if rule in plan.user_rules:  # transformers raises for these, tpcli says so before loading
            add(Finding(ERROR, "unused-rule", f"plan rule {rule!r} matches no module or parameter of {plan.architecture}", rule))
        else:  # a default rule for layers this config does not build (transformers skips it with a warning)
            unused_defaults.append(rule)
    findings.extend(_unused_default_findings(plan, unused_defaults))

    for t in plan.tensors.values():
        own = wildcard_name(t.name)
        parent = own.rsplit(".", 1)[0]
        if own in plan.rules and parent in plan.rules:
            a, b = plan.rules[own], plan.rules[parent]
            if _shards_params(a) and _shards_params(b):
                add(Finding(ERROR, "double-rule",
                            f"{t.name} is matched by two sharding rules ({own!r}: {a}, {parent!r}: {b}); keep one",
                            t.name))

    findings.extend(constraint_findings(plan, tp))  # a plans/ entry's declared limits: the most specific reason
    findings.extend(_forward_findings(plan, text, tp))
    findings.extend(_replication_findings(plan))
    findings.extend(low_sharding_findings(plan))
    order = {ERROR: 0, WARNING: 1, INFO: 2}
    seen, unique = set(), []
    for f in findings:
        key = (f.code, f.message)
        if key not in seen:
            seen.add(key)
            unique.append(f)
    return sorted(unique, key=lambda f: order[f.severity])


@lru_cache(maxsize=1 << 16)
def wildcard_name(name: str) -> str:
    """transformers' own `model.layers.3.mlp` -> `model.layers.*.mlp` (cached: the checks ask for each name once per
    TP size, and valid_tp_sizes tries every size up to the world)."""
    from tpcli.adapters.transformers_api import replace_layer_number_by_wildcard

    return replace_layer_number_by_wildcard(name)


def _shards_params(style: str) -> bool:
    return style not in HOOK_ONLY


def _unused_default_findings(plan: ResolvedPlan, unused: list[str]) -> list[Finding]:
    """One warning for all default rules that match nothing.

    transformers ships some rules in two spellings (Llama 4: `language_model.layers.*.X` and
    `language_model.model.layers.*.X`, `lm_head` and `language_model.lm_head`); only one can match a given model.
    A rule that is another rule with fewer prefix segments (`_is_other_spelling`) is such a spelling: it is counted,
    not listed. The rest are listed in full, in one finding.
    """
    if not unused:
        return []
    spellings = [r for r in unused if any(_is_other_spelling(r, o, plan.rules) for o in plan.rules)]
    listed = [r for r in unused if r not in spellings]
    if not listed:
        return []
    more = f"; {len(spellings)} more are other spellings of rules in the plan" if spellings else ""
    return [Finding(WARNING, "unused-rule",
                    f"{len(listed)} default rule{'s' if len(listed) > 1 else ''} match nothing in this config and "
                    f"{'are' if len(listed) > 1 else 'is'} skipped: {', '.join(listed)}{more}", listed[0])]


def _is_other_spelling(rule: str, other: str, rules: dict[str, str]) -> bool:
    """`rule` is `other` with fewer prefix segments: same style, same tail from the layer list on (or same last
    segment when there is no `*`), and `rule`'s prefix a proper subsequence of `other`'s."""
    if rule == other or rules[rule] != rules[other]:
        return False
    (head_a, tail_a), (head_b, tail_b) = _split_head(rule), _split_head(other)
    if tail_a != tail_b or len(head_a) >= len(head_b):
        return False
    it = iter(head_b)
    return all(part in it for part in head_a)


def _split_head(rule: str) -> tuple[list[str], list[str]]:
    parts = rule.split(".")
    cut = parts.index("*") - 1 if "*" in parts else len(parts) - 1
    return parts[:max(cut, 0)], parts[max(cut, 0):]


def _forward_findings(plan: ResolvedPlan, text, tp: int) -> list[Finding]:
    """Everything that makes transformers' TP forward (or a cached decode step) crash or compute wrong numbers at
    `tp`. `valid_tp_sizes` uses this same function, so inspect's valid sizes and verify always agree."""
    if tp == 1:
        return _attention_config_findings(text)
    return (_attention_config_findings(text) + _head_findings(plan, text, tp) + _shape_findings(plan, tp)
            + block_findings(plan, tp) + pairing_findings(plan))


def pairing_findings(plan: ResolvedPlan) -> list[Finding]:
    """A split output needs a split-input consumer, and the other way round, among the layers of one block.

    A `colwise` projection hands on only its rank's slice of the output features, which a `rowwise` sibling takes
    (its weight holds just those input features) and all-reduces: `mlp.gate_proj`/`up_proj` -> `mlp.down_proj`,
    `q/k/v_proj` -> `o_proj`. With the producer and no consumer in a block (`down_proj: colwise`), or a consumer fed
    whole activations (`gate_proj`, `up_proj: replicate`), transformers' forward multiplies mismatched shapes. Blocks
    are the parents of the planned layers (`model.layers.0.mlp`); only blocks that a user rule touches are judged:
    transformers' default plans and tpcli's library plans (whose adaptations may split a replicated layer after
    loading, as the multi-query plans do) are checked against the real forward by their tests.
    """
    blocks: dict[str, dict[str, tuple[str, str]]] = {}  # parent -> {layer: (style, rule)}
    for rule, names in rule_matches(plan).items():
        for name in names:
            layer = name.rsplit(".", 1)[0] if name in plan.tensors and wildcard_name(name) != rule else name
            parent = layer.rsplit(".", 1)[0] if "." in layer else ""
            blocks.setdefault(wildcard_name(parent), {})[wildcard_name(layer)] = (plan.rules[rule], rule)
    verified = plan.library.tp_plan if plan.library is not None else {}  # with its adaptations (multi-query qkv)
    judged = {r for r, style in plan.user_rules.items() if verified.get(r) != style}
    out: list[Finding] = []
    for parent, layers in blocks.items():
        if not judged & {rule for _, rule in layers.values()}:
            continue
        split_out = sorted(n for n, (style, _) in layers.items() if style in SPLIT_OUTPUT)
        split_in = sorted(n for n, (style, _) in layers.items() if style in SPLIT_INPUT)
        others = sorted(f"{n.rsplit('.', 1)[-1]}: {style}" for n, (style, _) in layers.items()
                        if style not in SPLIT_OUTPUT | SPLIT_INPUT)
        named = ", ".join(f"{n.rsplit('.', 1)[-1]}: {layers[n][0]}" for n in split_out + split_in)
        fix = f" (the block's other planned layers: {', '.join(others)})" if others else ""
        if split_out and not split_in and not parent:  # a head: nothing after it in the model
            out.append(Finding(ERROR, "pairing",
                               f"{named} leaves the model's output split across ranks (each rank returns its slice "
                               "of the last dimension, e.g. of the vocabulary); use colwise_gather_output",
                               split_out[0]))
        elif split_out and not split_in:
            out.append(Finding(ERROR, "pairing",
                               f"{parent}: {named} hand{'s' * (len(split_out) == 1)} on split outputs but no layer of the block takes a split "
                               f"input (rowwise){fix}: the forward multiplies mismatched shapes; make the block's "
                               "output projection rowwise", split_out[0]))
        elif split_in and not split_out:
            out.append(Finding(ERROR, "pairing",
                               f"{parent}: {named} take{'s' * (len(split_in) == 1)} a split input but no layer of the block splits its output "
                               f"(colwise){fix}: it would get whole activations; make the block's input projections "
                               "colwise", split_in[0]))
    return out


def _attention_config_findings(text) -> list[Finding]:
    """Head counts the attention cannot run with at any TP size (transformers' configs do not reject them).

    Grouped-query attention repeats each KV head `groups = num_attention_heads // num_key_value_heads` times
    (`repeat_kv`), so heads % kv must be 0. MLA (deepseek_v2/v3 style, `kv_lora_rank` set) expands its latent into
    keys and values for all `num_attention_heads` heads already, yet still groups them by the same integer ratio:
    with groups > 1 the prompt (with a mask) or the 1-token decode step (`pack_gqa`) crashes, e.g. "The size of
    tensor a (4) must match the size of tensor b (8)". So MLA needs heads // kv == 1.
    """
    heads = getattr(text, "num_attention_heads", None)
    kv = getattr(text, "num_key_value_heads", None) or heads
    if not (isinstance(heads, int) and isinstance(kv, int)) or kv <= 0:
        return []
    if getattr(text, "kv_lora_rank", None):
        if heads // kv != 1:
            return [Finding(ERROR, "mla-kv-heads",
                            f"num_key_value_heads={kv} with num_attention_heads={heads}: MLA expands keys and values "
                            f"to all {heads} heads, then transformers groups them {heads // kv}-fold and the forward "
                            "crashes; set num_key_value_heads to num_attention_heads", "num_key_value_heads")]
    elif heads % kv:
        return [Finding(ERROR, "gqa-groups",
                        f"num_attention_heads={heads} not divisible by num_key_value_heads={kv}: the attention "
                        "forward crashes at any TP size", "num_key_value_heads")]
    return []


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


def _rank_list(ranks: list[int]) -> str:
    """Ascending ranks with consecutive ones as ranges: [1, 2, 3, 7] -> "1-3, 7" (a message stays short at tp=1024)."""
    runs: list[list[int]] = []
    for r in ranks:
        if runs and runs[-1][1] == r - 1:
            runs[-1][1] = r
        else:
            runs.append([r, r])
    return ", ".join(f"{a}" if a == b else f"{a}-{b}" for a, b in runs)


def _widths(widths: list[int]) -> str:
    """Rows per rank, "501/500"; above 8 ranks per run of equal widths: "251 (ranks 0-2)/248 (rank 3)"."""
    if len(widths) <= 8:
        return "/".join(map(str, widths))
    runs: list[list[int]] = []  # [width, first, last]
    for r, w in enumerate(widths):
        if runs and runs[-1][0] == w:
            runs[-1][2] = r
        else:
            runs.append([w, r, r])
    return "/".join(f"{w} (rank {a})" if a == b else f"{w} (ranks {a}-{b})" for w, a, b in runs)


def _shape_findings(plan: ResolvedPlan, tp: int) -> list[Finding]:
    out: list[Finding] = []
    uneven: list[str] = []
    scales = set(scale_pairs(plan.tensors).values())
    experts_impl = _experts_implementation(plan)
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
        runs = rank_runs(size, p, tp)
        widths = [sum(b - a for a, b in r) for r in runs]
        if 0 in widths:
            empty = [r for r, w in enumerate(widths) if w == 0]
            if p.kind == "strided":  # a rank without its gate/up halves: transformers' forward hangs or crashes
                out.append(Finding(ERROR, "empty-shard",
                                   f"{t.name}: packed dim {p.dim} of size {size} leaves rank{'s' * (len(empty) > 1)} "
                                   f"{_rank_list(empty)} without rows at tp={tp}", t.name))
                continue
            # plain Shard: DTensor and the forward cope with empty local tensors (tests/test_verify_sweep.py)
            out.append(Finding(WARNING, "empty-shard",
                               f"{t.name}: dim {p.dim} of size {size} leaves rank{'s' * (len(empty) > 1)} "
                               f"{_rank_list(empty)} empty at tp={tp} (it runs; those ranks idle there)",
                               t.name))
        elif len(set(widths)) > 1:
            uneven.append(f"{t.name} ({size} -> {_widths(widths)})")
        if len(t.shape) == 3 and experts_impl == "grouped_mm":
            out.extend(_grouped_mm_findings(t, runs))
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
        if not p.is_sharded or wildcard_name(weight) in seen:
            continue
        block = q.block_size[0] if p.dim == len(w.shape) - 2 else q.block_size[1]
        why = block_misalignments(w.shape, s.shape, p.dim, block, rank_runs(w.shape[p.dim], p, tp),
                                  rank_runs(s.shape[p.dim], s.placement, tp))
        if why:
            seen.add(wildcard_name(weight))
            out.append(Finding(ERROR, "quant-block",
                               f"{weight}: at tp={tp} {why} of the {q.method} scales; each rank's slice must be a "
                               f"whole number of {q.block_size[0]}x{q.block_size[1]} blocks", weight))
    return out


def _grouped_mm_findings(t, runs) -> list[Finding]:
    """torch's grouped_mm (transformers' default experts kernel) checks that the leading stride of each operand is a
    multiple of 16 bytes. Per rank the operands are the local expert weights [E, a, b] (read transposed or not) and
    the activations, whose widths are the hidden size and the local intermediate size: every local non-expert
    width, and for a packed gate_up each half's run, must be a 16-byte multiple."""
    elt = dtype_size(t.dtype)
    p = t.placement
    for rank_runs_ in runs:
        widths = {t.shape[d] for d in (1, 2) if d != p.dim} | {b - a for a, b in rank_runs_}
        bad = sorted(w for w in widths if (w * elt) % GROUPED_MM_ALIGN)
        if bad:
            return [Finding(ERROR, "grouped-mm-stride",
                            f"{t.name}: local width {bad[0]} x {elt} B is not a multiple of 16 bytes; transformers' "
                            "default grouped_mm experts kernel fails (\"strides should be multiple of 16 bytes\"); "
                            "load with experts_implementation=\"eager\" or pick another --tp", t.name)]
    return []


def _experts_implementation(plan: ResolvedPlan) -> str | None:
    """What transformers picked for the experts on the meta model: "grouped_mm" unless the config says otherwise."""
    config = plan.model.config if plan.model is not None else plan.config
    return experts_implementation(config.get_text_config())


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
                out.append(Finding(INFO, "tied", f"{t.name} is tied to {t.tied_to}: one tensor in memory on each rank; "
                                   "each rank file stores both names, as transformers' distributed save does", t.name))
    return out


def constraint_findings(plan: ResolvedPlan, tp: int) -> list[Finding]:
    """The library plan's `divisible_by: tp` constraints (plans/README.md) that `tp` breaks."""
    if plan.library is None or tp == 1:
        return []
    from tpcli.planning.plans_library import constraint_errors

    return [Finding(ERROR, "constraint", msg, attr) for attr, msg in constraint_errors(plan.library, plan.config, tp)]


def low_sharding_findings(plan: ResolvedPlan, top: int = 3) -> list[Finding]:
    """A warning when the plan shards less than half of the parameter bytes: every rank then holds most of the
    model. Names the largest replicated groups (layer numbers wildcarded) and a better shipped plan if any."""
    unique = plan.unique_tensors
    total = plan.total_bytes or 1
    sharded = sum(t.nbytes for t in unique if t.placement.is_sharded)
    if sharded >= LOW_SHARDED_FRACTION * total:
        return []
    groups: dict[str, int] = {}
    for t in unique:
        if not t.placement.is_sharded:
            key = wildcard_name(t.name)
            groups[key] = groups.get(key, 0) + t.nbytes
    largest = sorted(groups.items(), key=lambda kv: -kv[1])[:top]
    named = ", ".join(f"{k} ({_mib(v)}, {100 * v / total:.0f}%)" for k, v in largest)
    from tpcli.planning.plans_library import REFUSED, better_plan

    better = better_plan(plan.config, plan.rules) if plan.library is None else None
    hint = f"; plans/ has a plan that shards more: --plan {better.name} ({better.source})" if better else ""
    if plan.model_type in REFUSED:
        hint = f"; plans/ has no plan for {plan.model_type}: {REFUSED[plan.model_type]}"
    return [Finding(WARNING, "low-sharding", f"the plan shards only {100 * sharded / total:.0f}% of the parameter "
                    f"bytes; each rank holds the rest whole. Largest replicated: {named}{hint}")]


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def errors(findings: list[Finding]) -> list[Finding]:
    return [f for f in findings if f.severity == ERROR]


def valid_tp_sizes(plan: ResolvedPlan, max_tp: int = 64) -> tuple[list[int], dict[int, str]]:
    """TP sizes 1..max_tp that pass every error check, and for the others the first reason."""
    valid, invalid = [], {}
    for tp in range(1, max_tp + 1):
        errs = errors(constraint_findings(plan, tp) + _forward_findings(plan, plan.config.get_text_config(), tp))
        if errs:
            invalid[tp] = errs[0].message
        else:
            valid.append(tp)
    return valid, invalid


def require_valid(plan: ResolvedPlan, tp: int, *, what: str | None = None, hint: str = "") -> list[Finding]:
    """The findings at `tp`, or a PlanError naming the first error, how many more there are and the valid sizes.

    `what` names the size as the user gave it (`--tp 4` by default; `run` says `world size 4`), `hint` is appended."""
    findings = check_plan(plan, tp)
    errs = errors(findings)
    if errs:
        more = f" (+{len(errs) - 1} more; see `tpcli verify`)" if len(errs) > 1 else ""
        valid = ", ".join(map(str, valid_tp_sizes(plan)[0])) or "none up to 64"
        raise PlanError(f"{what or f'--tp {tp}'} is invalid for {plan.architecture}: {errs[0].message}{more}; "
                        f"valid TP sizes: {valid}.{hint}")
    return findings
