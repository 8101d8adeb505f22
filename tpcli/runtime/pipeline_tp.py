"""TP inside pipeline stages: transformers 5.23's tp x pp load, with its TP plan limited to what each stage keeps.

`maybe_distribute_model` expands the TP plan over the whole model, then `apply_pipeline_parallelism` replaces the
modules a stage does not own by `PipelineIdentityLayer`, then `apply_tensor_parallelism(model, tp_mesh, tp_plan)`
looks up every planned name: a parameter of a replaced layer is gone (KeyError, e.g. 'model.embed_tokens.weight'),
a replaced module has no `out_features` (ValueError). Dropping from the plan the names the stage no longer has,
before it is applied, is the whole fix: each stage then TP-shards the layers it owns exactly as at plain TP
(measured: tiny llama and qwen3 at tp=2 x pp=2, logits within 3e-7 of one process, greedy tokens equal).

`stage_tp_plan()` installs that filter for the duration of one `from_pretrained` (tpcli.load_model on a tp x pp
mesh) or one `maybe_distribute_model` (the fast path of a `shard --pp P --tp T` folder). A script calling
transformers' `from_pretrained` itself on such a mesh still crashes.
"""

from __future__ import annotations

import contextlib


def kept_names(model) -> set[str]:
    """Modules and parameters a stage still has: none under a `PipelineIdentityLayer`."""
    from tpcli.adapters.transformers_api import PipelineIdentityLayer

    replaced = [f"{n}." for n, m in model.named_modules() if isinstance(m, PipelineIdentityLayer)]
    modules = {n for n, m in model.named_modules() if not isinstance(m, PipelineIdentityLayer)}
    return {n for n in modules | {p for p, _ in model.named_parameters()}
            if not any(n.startswith(r) for r in replaced)}


@contextlib.contextmanager
def stage_tp_plan():
    """While active, transformers applies its TP plan only to the names a pipeline stage kept (see module doc;
    the patch of transformers' `apply_tensor_parallelism` is `tpcli.adapters.transformers_api`'s)."""
    from tpcli.adapters.transformers_api import filtered_tensor_parallelism

    def kept_only(model, tp_plan: dict) -> dict:
        kept = kept_names(model)
        return {name: style for name, style in tp_plan.items() if name in kept}

    with filtered_tensor_parallelism(kept_only):
        yield
