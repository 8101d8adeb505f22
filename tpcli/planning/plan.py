"""Plan resolution, done by transformers itself on a meta-device model.

`resolve_plan` builds the model skeleton from its config on the `meta` device (no weight memory), lets
transformers merge its plans (`init_parallel_plans`: config `base_model_tp_plan`, head `_tp_plan` such as
`lm_head`, the automatic `embed_tokens` rule) and a user dict on top (`_resolve_parallel_plans`, exactly what
`from_pretrained(tp_plan=...)` runs), then records per state-dict tensor its run-time name, shape, dtype, the rule
and style that matched it and its DTensor placement (`tpcli.planning.placements`).

For a pre-quantized checkpoint transformers' quantizer is applied to the meta model first, as `from_pretrained`
does (`tpcli.planning.quant`): by default in the stored representation (FP8 weights and their scales, the plan after the
quantizer's `update_parallel_plan`), with `dequantize=True` in the one a load without an FP8 GPU produces.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from tpcli.adapters.transformers_api import auto_model_class, from_config
from tpcli.errors import ModelError, PlanError
from tpcli.formats.jsonfile import read_json
from tpcli.formats.units import tensor_bytes
from tpcli.planning import plans_library
from tpcli.planning.placements import ParamPlacement, param_placement


@dataclass
class TensorInfo:
    """One state-dict entry of the run-time model."""

    name: str
    shape: tuple[int, ...]
    dtype: str  # torch dtype name without the "torch." prefix
    style: str | None
    rule: str | None
    placement: ParamPlacement
    tied_to: str | None = None  # first name of the parameter this one is tied to

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return tensor_bytes(self.dtype, self.shape)


@dataclass
class ResolvedPlan:
    """The effective plan for one model: rules as transformers holds them, and per tensor what they imply."""

    architecture: str
    model_type: str
    dtype: str
    rules: dict[str, str]  # wildcard rule -> style, after merging the user plan
    plan_source: str
    tensors: dict[str, TensorInfo]  # state-dict order
    module_rules: dict[str, str] = field(default_factory=dict)  # expanded module name -> hook style
    user_rules: dict[str, str] = field(default_factory=dict)  # the user plan, as given
    config: object = None
    model: object = None  # the meta model, for callers that need transformers objects
    quantization: object = None  # tpcli.planning.quant.Quantization of a pre-quantized checkpoint
    dequantized: bool = False  # built in the dequantized representation (plain weights)
    library: object = None  # the tpcli.planning.plans_library.LibraryPlan in use (picked automatically, by name or file)

    @property
    def unique_tensors(self) -> list[TensorInfo]:
        return [t for t in self.tensors.values() if t.tied_to is None]

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.unique_tensors)

    @property
    def parameter_count(self) -> int:
        return sum(t.numel for t in self.unique_tensors)


def load_plan_file(path: str | Path) -> dict[str, str]:
    """`--plan`: a shipped plan's short name, a library document, a JSON `{pattern: style}`, or
    `{"tp_plan": {pattern: style}}` (all documented in docs/formats.md and plans/README.md). Returns the rules."""

    return plans_library.load_spec(path)[0]


def _capped(message: str, limit: int = 400) -> str:
    """transformers lists every offending key in one line (a 50k-rule plan: 1.3 MB): keep the first `limit`
    characters and say how much was cut."""
    if len(message) <= limit:
        return message
    return f"{message[:limit].rstrip()}... ({len(message) - limit:,} more characters cut; fix the first ones and re-run)"


def load_config(path: Path, *, trust_remote_code: bool = False):
    """transformers' config of the local model folder `path`. Its config.json (and generation_config.json) are read
    by the bounded reader first (`formats.jsonfile`): a file nested 100,000 deep is one error naming it, not
    transformers' RecursionError."""
    from transformers import AutoConfig

    check_config_files(path)
    try:
        return AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    except ValueError as exc:
        msg = str(exc).splitlines()[0]
        raise ModelError(f"{path / 'config.json'}: {msg}") from None
    except OSError as exc:
        raise ModelError(f"{path / 'config.json'}: cannot be read ({str(exc).splitlines()[0]}).") from None


def check_config_files(folder: Path) -> None:
    """Read `folder`'s config.json and generation_config.json (where present) with the bounded JSON reader, so that
    transformers, which parses them with the unbounded one, only ever sees files that parse."""
    from tpcli.formats.source import check_inside

    folder = Path(folder)
    for name, what in (("config.json", "the model's config"), ("generation_config.json", "the generation config")):
        if (folder / name).exists() or (folder / name).is_symlink():
            check_inside(folder, folder / name, "config files")  # a link out of the folder is refused
            read_json(folder / name, what=what, fix="restore it from the original model")


def model_class(config):
    import transformers

    for arch in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, arch, None)
        if cls is not None:
            return cls
    from transformers import AutoModel, AutoModelForCausalLM

    for auto in (AutoModelForCausalLM, AutoModel):
        cls = auto_model_class(auto, config)
        if cls is not None:
            return cls
    raise ModelError(f"model_type {config.model_type!r} has no transformers model class; is transformers too old?")


def build_meta_model(config, *, dtype=None):
    """The model skeleton on the meta device, in the checkpoint's dtype (config.dtype) unless `dtype` is given."""
    import torch

    cls = model_class(config)
    dtype = dtype or getattr(config, "dtype", None) or torch.float32
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return from_config(cls, config, dtype=dtype)


def resolve_plan(config, *, user_plan: dict[str, str] | None = None, plan_file: str | None = None,
                 dequantize: bool = False, dtype: str | None = None) -> ResolvedPlan:
    """Resolve the effective TP plan exactly as `from_pretrained(tp_plan=user_plan or "auto")` does.

    A quantized checkpoint's model gets its quantizer (`tpcli.planning.quant`); `dequantize=True` builds the representation
    a load without an FP8 GPU produces, in `dtype` (the parameters' dtype, which is what dequantization casts to)."""
    from transformers import DistributedConfig

    from tpcli.adapters.transformers_api import replace_layer_number_by_wildcard, resolve_parallel_plans
    from tpcli.planning.quant import apply_quantizer, quantization_of
    from tpcli.planning.style_classes import register as register_styles

    quantization = quantization_of(config)
    model = build_meta_model(config, dtype=dtype)
    if quantization is not None:
        apply_quantizer(model, config, dequantize=dequantize, dtype=model.dtype)
    default_rules = dict(model.tp_plan or {})
    _, library = plans_library.select(config, plan_file or user_plan, default_rules=default_rules)
    if library is not None and user_plan is None:
        user_plan = dict(library.tp_plan)
    if not default_rules and not user_plan:
        refused = plans_library.REFUSED.get(config.model_type)
        why = f"; tpcli refuses it: {refused}" if refused else (
            "; write one and pass it with --plan FILE (see docs/formats.md, 'Plan files')")
        raise PlanError(f"{type(model).__name__} ({config.model_type}) has no TP plan in transformers and plans/ has "
                        f"none for it{why}.")
    register_styles()  # transformers validates style names against its registry, tpcli's own styles included
    # tp_size only has to be > 1 for transformers to keep the plan; the expansion does not depend on it.
    dc = DistributedConfig(tp_size=2, tp_plan=dict(user_plan) if user_plan else "auto")
    # transformers warns about default rules that match nothing; tpcli reports those itself (tpcli.planning.checks),
    # so resolve_parallel_plans silences them.
    try:
        expanded, _, _ = resolve_parallel_plans(model, dc)
    except ValueError as exc:
        where = f"--plan {plan_file}" if plan_file else "the model's plan"
        raise PlanError(f"{where}: {_capped(str(exc).splitlines()[0])}") from None
    rules = dict(model.tp_plan)

    params_by_id: dict[int, str] = {}
    tied: dict[str, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        first = params_by_id.setdefault(id(p), name)
        if first != name:
            tied[name] = first

    tensors: dict[str, TensorInfo] = {}
    for name, t in model.state_dict(keep_vars=True).items():
        style = expanded.get(name)
        rule = None
        if style is not None:
            generic = replace_layer_number_by_wildcard(name)
            rule = generic if generic in rules else generic.rsplit(".", 1)[0]
        tensors[name] = TensorInfo(
            name=name,
            shape=tuple(t.shape),
            dtype=str(t.dtype).removeprefix("torch."),
            style=style,
            rule=rule,
            placement=param_placement(style, name, t.dim()),
            tied_to=tied.get(name),
        )
    module_rules = {k: v for k, v in expanded.items() if k not in tensors}
    source = "transformers default" + (f" + {plan_file}" if plan_file else " + user plan" if user_plan else "")
    if user_plan and not default_rules:
        source = plan_file or "user plan"
    if library is not None:
        source = library.source
    return ResolvedPlan(
        architecture=type(model).__name__,
        model_type=config.model_type,
        dtype=str(getattr(config, "dtype", None) or "float32").removeprefix("torch."),
        rules=rules,
        plan_source=source,
        tensors=tensors,
        module_rules=module_rules,
        user_rules=dict(user_plan or {}),
        config=config,
        model=model,
        quantization=quantization,
        dequantized=quantization is not None and dequantize,
        library=library,
    )


def rule_matches(plan: ResolvedPlan) -> dict[str, list[str]]:
    """Rule -> concrete module/parameter names it applies to (empty list: matches nothing)."""
    from tpcli.adapters.transformers_api import replace_layer_number_by_wildcard

    out: dict[str, list[str]] = {rule: [] for rule in plan.rules}
    for name in list(plan.module_rules) + [t.name for t in plan.tensors.values() if t.rule]:
        generic = replace_layer_number_by_wildcard(name)
        for candidate in (generic, generic.rsplit(".", 1)[0]):
            if candidate in out:
                out[candidate].append(name)
                break
    return out
