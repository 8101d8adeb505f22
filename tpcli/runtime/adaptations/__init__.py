"""Worker-side adaptations: what a library plan needs beyond transformers' styles to compute the same numbers.

    ADAPTATIONS["opt_attention"](model, tp_size, rank)

An adaptation runs on the TP-loaded model (DTensor parameters already sharded by the plan) and fixes what the
modeling code derives from the *global* config at construction time, e.g. `self.num_heads` or `self.embed_dim`
used in a `reshape`: each rank only holds `num_heads / tp` heads, so those become per-rank values. Adaptations are
named in the plan file (`"adaptations": [...]`) and applied by `tpcli.load_model` (hence by `verify --numerics`
and `tpcli run`), after loading, on every rank.

One module per architecture family (`gpt2.py`, `opt.py`, ...) registers its functions with `@adaptation(name)`;
every module of this package is imported on first use, so adding a family is adding a file (and its name to
`tpcli.planning.plans_library.ADAPTATION_NAMES`, which plans are validated against).
"""

from __future__ import annotations

import functools
import importlib
import os
import pkgutil
from collections.abc import Callable
from pathlib import Path

from tpcli.adapters.transformers_api import device_mesh
from tpcli.formats.dcp import is_sharded_dir
from tpcli.planning import plans_library
from tpcli.planning.plans_library import ADAPTATION_NAMES
from tpcli.planning.style_classes import register as register_styles
from tpcli.runtime.folders import ShardedFolder

ADAPTATIONS: dict[str, Callable] = {}


def adaptation(name: str):
    """Register `fn(model, tp_size, rank)` under `name`."""

    def register(fn: Callable) -> Callable:
        if name not in ADAPTATION_NAMES:
            raise RuntimeError(f"adaptation {name!r} is not declared in tpcli.planning.plans_library.ADAPTATION_NAMES")
        if name in ADAPTATIONS:
            raise RuntimeError(f"adaptation {name!r} registered twice")
        ADAPTATIONS[name] = fn
        return fn

    return register


def per_rank(total: int, tp_size: int, what: str) -> int:
    """`total / tp_size`; the plan's constraints guarantee divisibility, this guards a plan without them."""
    if total % tp_size:
        raise ValueError(f"{what}={total} is not divisible by tp={tp_size}; the plan needs a divisible_by constraint")
    return total // tp_size


def divide_attributes(model, module_cls, tp_size: int, **config_names: str) -> None:
    """On every `module_cls` module, replace each named attribute by its per-rank value (`total / tp_size`).

    The modeling code reshapes with these (e.g. `view(bsz, -1, self.num_heads, self.head_dim)`); keyword values
    name the config field each attribute comes from, for the error message.
    """
    for module in model.modules():
        if isinstance(module, module_cls):
            for attr, what in config_names.items():
                setattr(module, attr, per_rank(getattr(module, attr), tp_size, what))

def apply_adaptations(model, names) -> None:
    """Run the named adaptations on a TP-loaded model (no-op outside a process group of size > 1)."""
    import torch.distributed as dist

    if not names or not dist.is_initialized() or dist.get_world_size() == 1:
        return
    mesh = device_mesh(model)
    if mesh is not None and mesh["tp"].size() != dist.get_world_size():  # they divide by the world size
        from tpcli.errors import ModelError

        raise ModelError(f"the plan's adaptations ({', '.join(names)}) assume plain TP (tp = world size "
                         f"{dist.get_world_size()}); this model is on a mesh with tp={mesh['tp'].size()}: run it "
                         "without --fsdp/--dp-replicate/--ep.")
    for name in names:
        ADAPTATIONS[name](model, dist.get_world_size(), dist.get_rank())


def with_library_plans(load_model):
    """Decorator of `tpcli.load_model`: picks the library plan (`tp_plan="auto"` for a model transformers leaves
    unsharded, a shipped name, a `LibraryPlan`, or rules equal to a shipped plan's) and applies its adaptations."""

    @functools.wraps(load_model)
    def wrapper(path=None, *, tp_plan="auto", **kwargs):
        if path is None and tp_plan == "auto" and os.environ.get("TPCLI_PLAN"):  # `tpcli run --model M --plan P`
            rules, lib = plans_library.load_spec(os.environ["TPCLI_PLAN"])
            tp_plan = lib or rules  # as `verify --numerics --plan` loads it
        folder = Path(path or os.environ.get("TPCLI_MODEL") or "")
        lib = None
        if str(folder) not in ("", "."):  # otherwise load_model raises its own error
            register_styles()  # tpcli's own style classes, before transformers validates the plan
            if folder.is_dir() and is_sharded_dir(folder):  # opened once (cheap checks); load_model routes on it
                path = ShardedFolder.open(folder, quick=True)
            tp_plan, lib = _library_plan(folder, tp_plan, path.manifest if isinstance(path, ShardedFolder) else None)
        elif isinstance(tp_plan, plans_library.LibraryPlan):
            tp_plan, lib = dict(tp_plan.tp_plan), tp_plan
        model = load_model(path, tp_plan=tp_plan, **kwargs)
        if lib is not None:
            apply_adaptations(model, lib.adaptations)
        return model

    return wrapper


def _library_plan(folder: Path, tp_plan, doc: dict | None):
    """(tp_plan to hand to load_model, LibraryPlan | None), picked by `plans_library.select` as plan resolution does.
    `doc`: the folder's tpcli.json (from the opened `ShardedFolder`), None for any other folder."""
    from transformers import AutoConfig

    from tpcli.formats import manifest
    from tpcli.planning.plan import check_config_files

    check_config_files(folder)
    config = AutoConfig.from_pretrained(str(folder))
    spec = tp_plan
    if tp_plan == "auto":  # a tpcli folder's manifest holds the rules it was sharded with (load_model takes them)
        spec = manifest.user_plan(doc) if doc is not None else None
    defaults = config.get_text_config().base_model_tp_plan or {}
    rules, lib = plans_library.select(config, spec, default_rules=defaults)
    if tp_plan == "auto" and (spec is not None or lib is None):
        return tp_plan, lib
    return (tp_plan if isinstance(tp_plan, dict) else rules), lib


def _import_families() -> None:
    for info in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{info.name}")


_import_families()
