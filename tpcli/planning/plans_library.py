"""The plans/ library: verified TP plans for architectures transformers leaves unsharded (schema in plans/README.md).

    plan = find("gpt2")                     # --plan NAME
    plan = auto_pick(config)                # no flag: the shipped plan for config.model_type, or None
    rules, lib = load_spec("my.json")       # --plan FILE: a library document or a bare {pattern: style}

A library plan is data (`tp_plan`, `constraints`, `adaptations`); the worker-side adaptations it names live in
`tpcli.runtime.adaptations`, the extra styles it may use in `tpcli.planning.placements` (placements) and `tpcli.planning.style_classes`
(transformers style classes). The files ship inside the package (`tpcli/plans/`); the repository's top-level
`plans/` is a link to that folder.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

from tpcli.errors import PlanError
from tpcli.planning.placements import OFF, is_known_style, unknown_style_hint

PLANS_DIR = Path(__file__).parents[1] / "plans"  # data shipped in the package (tpcli/plans/)
FIELDS = {
    "name": str,
    "model_types": list,
    "description": str,
    "tp_plan": dict,
    "constraints": list,
    "verified_with": dict,
    "adaptations": list,
    "loadable_by_transformers": bool,
}
CONSTRAINT_KEYS = {"config", "divisible_by", "equals", "why"}
# The worker-side adaptations a plan may name. They are implemented in `tpcli.runtime.adaptations` (one module per
# family), which refuses to register a name missing here: planning validates plans without importing the runtime.
ADAPTATION_NAMES = frozenset({
    "bloom", "falcon", "gpt2_attention", "gpt_bigcode", "gpt_neo_attention", "gptj_attention", "mpt_attention",
    "opt_attention", "persimmon_attention", "stablelm_attention", "xglm_attention",
})


# Architectures looked at and found not to be exact with any plan tpcli can express: the reason, for the error.
REFUSED = {
    "dbrx": "its fused Wqkv packs q | k | v of different widths (grouped KV heads), which no DTensor placement "
            "splits into whole heads per rank",
    "codegen": "qkv_proj packs 4 hard-coded model-parallel blocks (mp_num=4 in the forward) that a TP split "
               "re-groups; no plan yet",
}


@dataclass(frozen=True)
class LibraryPlan:
    """One validated plan document."""

    name: str
    path: Path
    model_types: tuple[str, ...]
    description: str
    tp_plan: dict[str, str] = field(hash=False)
    constraints: tuple[dict, ...] = field(hash=False)
    verified_with: dict[str, str] = field(hash=False)
    adaptations: tuple[str, ...] = ()
    loadable_by_transformers: bool = True
    shipped: bool = False

    @property
    def source(self) -> str:
        """How tables, --json and manifests name it: `tpcli plans/gpt2.json` for a shipped plan, else its path."""
        return f"tpcli plans/{self.path.name}" if self.shipped else str(self.path)


def is_library_document(data) -> bool:
    """A plan file in the library schema (as opposed to a bare `{pattern: style}` or `{"tp_plan": {...}}`)."""
    return isinstance(data, dict) and "model_types" in data


def parse(data, path: Path, *, shipped: bool = False) -> LibraryPlan:
    """Validate one library document; a PlanError names the file and the field at fault."""
    def bad(field_name: str, why: str) -> PlanError:
        return PlanError(f"{path}: field {field_name!r} {why} (schema: plans/README.md).")

    if not isinstance(data, dict):
        raise PlanError(f"{path}: expected a JSON object (schema: plans/README.md).")
    for key, kind in FIELDS.items():
        if key not in data:
            raise bad(key, "is missing")
        if not isinstance(data[key], kind):
            raise bad(key, f"must be a JSON {'object' if kind is dict else kind.__name__}")
    if unknown := sorted(set(data) - set(FIELDS)):
        raise bad(unknown[0], "is not part of the schema")
    if not data["name"] or (shipped and data["name"] != path.stem):
        raise bad("name", f"must be the file name without .json ({path.stem!r})")
    if not data["model_types"] or not all(isinstance(t, str) and t for t in data["model_types"]):
        raise bad("model_types", "must be a non-empty list of model_type strings")
    if "\n" in data["description"] or not data["description"].strip():
        raise bad("description", "must be one non-empty line")
    if not data["tp_plan"]:
        raise bad("tp_plan", "is empty")
    for pattern, style in data["tp_plan"].items():
        if not isinstance(style, str) or not is_known_style(style):
            raise bad("tp_plan", f"rule {pattern!r} has unknown style {style!r}{unknown_style_hint(style)}")
    for i, c in enumerate(data["constraints"]):
        where = f"constraints[{i}]"
        if not isinstance(c, dict) or not isinstance(c.get("config"), str):
            raise bad(where, 'must be an object with a "config" attribute name')
        if unknown := sorted(set(c) - CONSTRAINT_KEYS):
            raise bad(where, f"has unknown key {unknown[0]!r} (known: {', '.join(sorted(CONSTRAINT_KEYS))})")
        if ("divisible_by" in c) == ("equals" in c):
            raise bad(where, 'needs exactly one of "divisible_by": "tp" or "equals": VALUE')
        if "divisible_by" in c and c["divisible_by"] != "tp":
            raise bad(where, 'supports only "divisible_by": "tp"')
    for key in ("transformers", "torch"):
        if not isinstance(data["verified_with"].get(key), str):
            raise bad("verified_with", f"needs a {key!r} version string")
    for name in data["adaptations"]:
        if name not in ADAPTATION_NAMES:
            raise bad("adaptations", f"names {name!r}, which tpcli does not have (known: {', '.join(sorted(ADAPTATION_NAMES))})")
    return LibraryPlan(
        name=data["name"], path=path, model_types=tuple(data["model_types"]), description=data["description"],
        tp_plan=dict(data["tp_plan"]), constraints=tuple(data["constraints"]), verified_with=dict(data["verified_with"]),
        adaptations=tuple(data["adaptations"]), loadable_by_transformers=data["loadable_by_transformers"],
        shipped=shipped,
    )


def require_plan_file(path: str | os.PathLike, flag: str) -> None:
    """A plan path naming a folder, FIFO, socket or device (which would block or raise when read): one UsageError
    line, before anything opens it. A path that does not exist passes: it may be a shipped plan's name, and the
    loader says "no such file" otherwise."""
    import stat

    from tpcli.errors import UsageError
    from tpcli.formats.rankfile import file_kind

    try:
        st = os.stat(path)
    except (OSError, ValueError):
        return
    if not stat.S_ISREG(st.st_mode):
        raise UsageError(f"{flag}{path}: is {file_kind(st.st_mode)}, not a plan file; pass a JSON plan file or a "
                         "shipped plan's name.")


def _read_json(path: Path, flag: str):
    """The JSON document in the regular file `path` (see `require_plan_file`); unreadable, unparseable or absurdly
    nested JSON is a PlanError, each one line."""
    require_plan_file(path, flag)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise PlanError(f"{flag}{path}: no such file.") from None
    except OSError as exc:
        raise PlanError(f"{flag}{path}: cannot be read ({exc.strerror}).") from None
    except RecursionError:
        raise PlanError(f"{flag}{path}: JSON nested too deeply to be a plan; expected {{pattern: style}}.") from None
    except ValueError as exc:
        raise PlanError(f"{flag}{path}: not valid JSON ({exc}).") from None


@cache
def shipped() -> dict[str, LibraryPlan]:
    """Every plan in tpcli/plans/, by name (a broken shipped file is an error, not a silent skip)."""
    plans = {}
    for path in sorted(PLANS_DIR.glob("*.json")):
        plans[path.stem] = parse(_read_json(path, ""), path, shipped=True)
    return plans


def find(name: str) -> LibraryPlan:
    plans = shipped()
    if name not in plans:
        raise PlanError(f"--plan {name}: no such file and no shipped plan of that name; shipped plans: "
                        f"{', '.join(plans) or 'none'} (or pass a JSON file path).")
    return plans[name]


def looks_like_file(spec: str) -> bool:
    return spec.endswith(".json") or "/" in spec or Path(spec).exists()


def load_spec(spec: str | Path) -> tuple[dict[str, str], LibraryPlan | None]:
    """`--plan` as given: a shipped name, a library document, or a bare plan file -> (rules, LibraryPlan | None)."""
    spec = str(spec)
    if not looks_like_file(spec):
        lib = find(spec)
        return dict(lib.tp_plan), lib
    path = Path(spec)
    data = _read_json(path, "--plan ")
    if is_library_document(data):
        lib = parse(data, path, shipped=path.resolve().parent == PLANS_DIR.resolve())
        return dict(lib.tp_plan), lib
    if isinstance(data, dict) and isinstance(data.get("tp_plan"), dict):
        data = data["tp_plan"]
    if not isinstance(data, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in data.items()):
        raise PlanError(f"--plan {path}: expected a JSON object mapping module patterns to style names.")
    for key, style in data.items():
        if not is_known_style(style):
            raise PlanError(f"--plan {path}: rule {key!r} has unknown style {style!r}{unknown_style_hint(style)}.")
    return data, None


def covers_decoder(rules: dict[str, str]) -> bool:
    """Whether transformers' own plan shards the decoder layers (a rule under a `*` module list)."""
    return any("*" in rule and style != OFF for rule, style in rules.items())


def _text_config(config):
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def config_mismatch(lib: LibraryPlan, config) -> str | None:
    """Why `lib` cannot serve this model regardless of tp (model_type, `equals` constraints), or None."""
    text = _text_config(config)
    model_type = getattr(config, "model_type", None)
    if model_type not in lib.model_types and getattr(text, "model_type", None) not in lib.model_types:
        return (f"plan {lib.source} is for model_type {', '.join(lib.model_types)}, not {model_type!r}; "
                f"pick another with --plan (shipped: {', '.join(shipped())})")
    for c in lib.constraints:
        if "equals" in c:
            value = getattr(text, c["config"], None)
            if value != c["equals"]:
                why = f" ({c['why']})" if c.get("why") else ""
                return (f"plan {lib.source} constraint: config {c['config']}={value!r} must be {c['equals']!r}{why}")
    return None


def constraint_errors(lib: LibraryPlan, config, tp: int) -> list[tuple[str, str]]:
    """(config attribute, message) for each `divisible_by: tp` constraint that `tp` breaks."""
    text = _text_config(config)
    out = []
    for c in lib.constraints:
        if c.get("divisible_by") == "tp":
            value = getattr(text, c["config"], None)
            if isinstance(value, int) and value % tp:
                why = f" ({c['why']})" if c.get("why") else ""
                out.append((c["config"], f"plan {lib.source} constraint: config {c['config']}={value} is not "
                                         f"divisible by tp={tp}{why}"))
    return out


def auto_pick(config) -> LibraryPlan | None:
    """The first shipped plan (by name) for this model_type whose `equals` constraints the config meets."""
    for lib in shipped().values():
        if config_mismatch(lib, config) is None:
            return lib
    return None


def recognise(config, rules: dict[str, str] | None) -> LibraryPlan | None:
    """The shipped plan whose rules are exactly `rules` (a manifest's or a dict passed to load_model): its
    adaptations are needed whatever route the rules came by."""
    if not rules:
        return None
    return next((lib for lib in shipped().values() if lib.tp_plan == rules and config_mismatch(lib, config) is None),
                None)


def check_fits(lib: LibraryPlan, config) -> None:
    if (why := config_mismatch(lib, config)) is not None:
        raise PlanError(why + ".")


def better_plan(config, current_rules: dict[str, str]) -> LibraryPlan | None:
    """A shipped plan for this model that is not the one in use (for verify's low-sharding warning)."""
    lib = auto_pick(config)
    return lib if lib is not None and lib.tp_plan != current_rules else None


def select(config, spec=None, *, default_rules: dict[str, str]) -> tuple[dict[str, str] | None, LibraryPlan | None]:
    """The plans/ entry in use and the rules to load with: the one place plan resolution and loading pick a plan.

    spec None (automatic)        -> (None, None) when `default_rules` (transformers' own) shard the decoder layers,
                                    else the shipped plan for `config.model_type`: (its rules, it), or (None, None)
    LibraryPlan, shipped name,   -> (its rules, it), refused for another model type;
      or a plan file (--plan)       a bare `{pattern: style}` file: (its rules, None)
    rules dict (a user plan,     -> (the rules, the shipped plan whose rules are equal, or None): a manifest's rules
      a manifest's)                 bring the adaptations of the plan they came from
    """
    if spec is None:
        lib = None if covers_decoder(default_rules) else auto_pick(config)
        return (dict(lib.tp_plan), lib) if lib is not None else (None, None)
    if isinstance(spec, dict):
        return spec, recognise(config, spec)
    if isinstance(spec, LibraryPlan):
        rules, lib = dict(spec.tp_plan), spec
    else:
        rules, lib = load_spec(spec)
    if lib is not None:
        check_fits(lib, config)
    return rules, lib
