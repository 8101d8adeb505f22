"""Private library internals only behind tpcli/adapters: one module per library, so an upgrade breaks in one place.

`private_uses(root)` reads every tpcli module outside tpcli/adapters with `ast` and reports each
* import of a torch / transformers / huggingface_hub / safetensors / accelerate module or name with a `_` segment
  (`torch.distributed.tensor._utils`, `from transformers.distributed.checkpoint import _redistribute_state_dict`);
* import from a transformers submodule (`transformers.core_model_loading`): only names the package exports are
  public; `import transformers` and `from transformers import AutoConfig` are fine;
* read, write or getattr of a private attribute (`model._tp_plan`, `getattr(m, "_device_mesh")`) that tpcli does
  not define itself (a `def`/`class` name, a module global, or a `self.`/`cls.` attribute of a tpcli class);
* module-level import of an adapter's lazy name (`from tpcli.adapters.torch_api import StridedShard` at the top of a
  module imports torch with it; inside a function it is lazy).
An import-linter contract cannot say this: grimp records an external import as its top-level package only.
"""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

from tpcli import versions
from tpcli.adapters import torch_api, transformers_api

ROOT = Path(__file__).parents[1] / "tpcli"
LIBRARIES = ("torch", "transformers", "huggingface_hub", "safetensors", "accelerate")
LAZY = {"tpcli.adapters.torch_api": set(torch_api.INTERNALS),
        "tpcli.adapters.transformers_api": set(transformers_api.INTERNALS)}
# standard-library names, outside this rule: os._exit is documented; pickle._Unpickler is the pure-Python
# unpickler formats/dcp_metadata.py guards opcode by opcode (its allow-list of torch classes is data, kept there)
STDLIB = {("os", "_exit"), ("pickle", "_Unpickler")}
# other libraries' internals, outside this rule (listed so a new one shows): fit_width folds the cells of rich's
# table columns (`rich.table.Column._cells`, rich has no public setter for them)
OTHER_LIBRARIES = {("tpcli/fit_width.py", "_cells")}


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def _attributes_of_tpcli_classes(trees: dict[Path, ast.Module]) -> set[str]:
    """Attribute names tpcli's own classes define: methods, class-body names, self./cls. attributes. (Module-level
    names are not counted: a tpcli function may share a name with a library's private attribute.)"""
    out: set[str] = set()
    for tree in trees.values():
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store) \
                    and isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"):
                out.add(node.attr)
            elif isinstance(node, ast.ClassDef):
                for stmt in node.body:
                    targets = stmt.targets if isinstance(stmt, ast.Assign) else \
                        [stmt.target] if isinstance(stmt, ast.AnnAssign) else [stmt]
                    out |= {t.id if isinstance(t, ast.Name) else getattr(t, "name", "") for t in targets}
    return out


def _tpcli_names(tree: ast.Module) -> set[str]:
    """Names a module binds to tpcli's own modules or objects (`from tpcli.formats import manifest`)."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "tpcli" or \
                isinstance(node, ast.ImportFrom) and node.level > 0:
            out |= {a.asname or a.name for a in node.names}
        elif isinstance(node, ast.Import):
            out |= {a.asname or a.name.split(".")[0] for a in node.names if a.name.split(".")[0] == "tpcli"}
    return out


def _import_findings(node, top_level: bool) -> list[str]:
    out = []
    if isinstance(node, ast.Import):
        for alias in node.names:
            parts = alias.name.split(".")
            if parts[0] in LIBRARIES and (any(map(_private, parts)) or parts[0] == "transformers" and len(parts) > 1):
                out.append(f"import {alias.name}")
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
        parts = node.module.split(".")
        names = [a.name for a in node.names]
        if parts[0] in LIBRARIES:
            if any(map(_private, parts)) or any(map(_private, names)) or parts[0] == "transformers" and len(parts) > 1:
                out.append(f"from {node.module} import {', '.join(names)}")
        elif top_level and node.module in LAZY and LAZY[node.module] & set(names):
            out.append(f"module-level from {node.module} import {', '.join(sorted(LAZY[node.module] & set(names)))}")
    return out


def private_uses(root: Path, skip: str = "adapters") -> list[str]:
    """'path:line: what' for each private library internal used outside `root/skip` (see module doc)."""
    trees = {p: ast.parse(p.read_text(), str(p)) for p in sorted(root.rglob("*.py"))
             if skip not in p.relative_to(root).parts}
    defined = _attributes_of_tpcli_classes(trees)
    found = []
    for path, tree in trees.items():
        where = path.relative_to(root.parent)
        top = {id(n) for n in tree.body}
        own = _tpcli_names(tree)
        for node in ast.walk(tree):
            what = _import_findings(node, id(node) in top)
            if isinstance(node, ast.Attribute) and _private(node.attr) and node.attr not in defined:
                owner = ast.unparse(node.value)
                if (owner, node.attr) not in STDLIB and owner.split(".")[0] not in own \
                        and (where.as_posix(), node.attr) not in OTHER_LIBRARIES:
                    what.append(f"{owner}.{node.attr}")
            elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) \
                    and node.func.id in ("getattr", "hasattr", "setattr", "delattr") and len(node.args) > 1 \
                    and isinstance(node.args[1], ast.Constant) and isinstance(node.args[1].value, str) \
                    and _private(node.args[1].value) and node.args[1].value not in defined:
                what.append(f"{node.func.id}(..., {node.args[1].value!r})")
            elif isinstance(node, ast.Call) and ast.unparse(node.func) in ("importlib.import_module", "__import__") \
                    and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
                parts = node.args[0].value.split(".")
                if parts[0] in LIBRARIES and (any(map(_private, parts)) or parts[0] == "transformers"):
                    what.append(f"import_module({node.args[0].value!r})")
            found += [f"{where}:{node.lineno}: {w}" for w in what]
    return found


def test_no_private_library_internal_outside_the_adapters():
    assert private_uses(ROOT) == []


PLANTED = '''
import transformers
from transformers import AutoConfig
from tpcli.adapters.torch_api import local_tensor
from tpcli.adapters.torch_api import StridedShard
from torch.distributed.tensor._utils import _compute_local_shape_and_global_offset
import torch.distributed.checkpoint._traverse


class Mine:
    def __init__(self):
        self._cache = {}

    def f(self, model, dc):
        from tpcli.adapters.transformers_api import WeightRenaming
        from transformers.core_model_loading import rename_source_key
        from transformers.distributed.checkpoint import _redistribute_state_dict
        plans = model._resolve_parallel_plans(dc)
        model._weight_conversions = None
        mesh = getattr(model, "_device_mesh", None)
        importlib.import_module("transformers.distributed.mixin").apply_tensor_parallelism = None
        return self._cache, Mine._cache, transformers.AutoModel, os._exit
'''


def test_the_checker_finds_each_kind_of_planted_use(tmp_path):
    (tmp_path / "tpcli").mkdir()
    (tmp_path / "tpcli" / "planted.py").write_text(PLANTED)
    (tmp_path / "tpcli" / "adapters").mkdir()
    (tmp_path / "tpcli" / "adapters" / "ok.py").write_text("from torch.distributed.tensor._utils import _x\n")
    found = sorted(f.split(": ", 1)[1] for f in private_uses(tmp_path / "tpcli"))
    assert found == sorted([
        "module-level from tpcli.adapters.torch_api import StridedShard",
        "from torch.distributed.tensor._utils import _compute_local_shape_and_global_offset",
        "import torch.distributed.checkpoint._traverse",
        "from transformers.core_model_loading import rename_source_key",
        "from transformers.distributed.checkpoint import _redistribute_state_dict",
        "model._resolve_parallel_plans",
        "model._weight_conversions",
        "getattr(..., '_device_mesh')",
        "import_module('transformers.distributed.mixin')",
    ])


@pytest.mark.parametrize("adapter", [torch_api, transformers_api], ids=lambda m: m.__name__.rsplit(".", 1)[1])
def test_every_wrapped_internal_exists_in_the_installed_release(adapter):
    """What the adapter wraps is there: the first thing to break on an upgrade (`make test-newest` runs this)."""
    for name in adapter.INTERNALS:
        assert getattr(adapter, name) is not None, name
    for owner, attribute in adapter.PRIVATE_ATTRIBUTES:
        module, _, cls = owner.rpartition(".")
        try:
            obj = importlib.import_module(owner)
        except ImportError:
            obj = getattr(importlib.import_module(module), cls)
        assert hasattr(obj, attribute), f"{owner}.{attribute}"
    with pytest.raises(AttributeError, match="has no attribute 'nothing'"):
        adapter.nothing  # noqa: B018


def test_versions_names_one_adapter_per_library_of_the_window():
    assert set(versions.ADAPTERS) == set(versions.TESTED)
    assert {importlib.import_module(m) for m in versions.ADAPTERS.values()} == {torch_api, transformers_api}


@pytest.mark.e2e
def test_importing_the_adapters_imports_no_library():
    code = ("import sys, tpcli.adapters.torch_api, tpcli.adapters.transformers_api; "
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_a_moved_internal_is_an_import_error_naming_the_library_module(monkeypatch):
    """What `versions.moved_internal` turns into one line: the library's module, not the adapter's."""
    import transformers.distributed.parallel_utils as pu

    monkeypatch.delattr(pu, "replace_layer_number_by_wildcard")  # as if a release had moved it
    with pytest.raises(ImportError, match="from 'transformers.distributed.parallel_utils'") as caught:
        from tpcli.adapters.transformers_api import replace_layer_number_by_wildcard  # noqa: F401
    assert caught.value.name == "transformers.distributed.parallel_utils"
