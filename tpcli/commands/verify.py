"""`tpcli verify`: static checks of a plan at a TP size, a numeric check on real workers, or the integrity of a
sharded folder. Returns one JSON-ready dict with `ok`; the CLI exits 1 when it is False.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from tpcli.commands import no_status
from tpcli.errors import CheckpointError, LaunchError, UsageError
from tpcli.formats import dcp
from tpcli.formats.jsonfile import read_json
from tpcli.formats.state_manifest import is_state_dir
from tpcli.planning.checks import Finding, check_plan

DEFAULT_TOLERANCE = {"float32": 1e-5, "float64": 1e-5, "bfloat16": 5e-2, "float16": 5e-2}


def verify(target: str, *, tp: int | None = None, plan_file: str | None = None, revision: str | None = None,
           numerics: bool = False, tolerance: float | None = None, gpus: bool = False, quick: bool = False,
           mesh=None, status=None, config: str | None = None) -> dict:
    """`status(text)` is told each slow step (the CLI shows it on a terminal). `config`: the model of a training
    checkpoint (torch DCP, verl's rank files), checked by `tpcli.commands.gather_train.verify_train`."""
    from tpcli.formats.train_folder import is_train_folder

    say = status or no_status
    local = Path(target).expanduser()
    if local.is_dir() and not dcp.is_sharded_dir(local) and is_train_folder(local):
        if mesh is not None or numerics or tp is not None:
            raise UsageError("--tp/--numerics/--fsdp/--dp-replicate/--ep check a model's plan; a training checkpoint "
                             "is checked as files against --config: run `tpcli verify DIR [--config MODEL]` alone.")
        from tpcli.commands.gather_train import verify_train

        say("checking the checkpoint's chunks against the config")
        return verify_train(target, config=config, quick=quick)
    if config is not None:
        raise UsageError("--config goes with a training checkpoint (DCP or model_world_size_W_rank_R.pt); "
                         f"{target} is not one.")
    if is_state_dir(local):  # a training state (tpcli.save_state): model, optimizer, manifest
        if mesh is not None or numerics:
            raise UsageError("--numerics/--fsdp/--dp-replicate/--ep/--pp check a model's plan; a training-state folder is "
                             "checked as files: run `tpcli verify STATE` alone.")
        from tpcli.commands.state_check import verify_state

        return verify_state(local, quick=quick)
    if dcp.is_sharded_dir(local):
        if mesh is not None:
            raise UsageError("--fsdp/--dp-replicate/--ep/--pp check a model's plan on a mesh; pass the original model "
                             "folder.")
        if numerics:
            raise UsageError("--numerics checks a model against its TP load; pass the original model folder.")
        return verify_sharded(local, tp=tp, quick=quick)
    if tp is None:
        raise UsageError("--tp N is required to verify a model (or pass a sharded folder to check its files).")
    from tpcli.commands.inspect import load_resolved

    say("building the model (no weights) and resolving its TP plan")
    src, plan = load_resolved(target, plan_file=plan_file, revision=revision)
    mesh_doc = None
    if mesh is not None:
        from tpcli.planning.mesh import MeshPlan

        MeshPlan(plan, mesh)  # transformers' plan resolution for the mesh, and the experts over --ep
        mesh_doc = {**mesh.to_dict(), "efsdp": mesh.efsdp}
    findings = check_plan(plan, tp)
    if mesh is not None:
        from tpcli.planning.mesh import mesh_findings

        findings = mesh_findings(plan, mesh, findings)
    result = {
        "mode": "numerics" if numerics else "static",
        "target": target,
        "architecture": plan.architecture,
        "tp": tp,
        "plan_source": plan.plan_source,
        "findings": [f.to_dict() for f in findings],
        "ok": not any(f.severity == "error" for f in findings),
    }
    if mesh_doc is not None:
        result["mesh"] = mesh_doc
    if numerics and result["ok"]:
        say(f"starting {tp} {'GPU' if gpus else 'CPU'} workers: TP load, single-process reference, compare")
        result["numerics"] = run_numerics(src.path, tp=tp, plan_file=plan_file, gpus=gpus, tolerance=tolerance,
                                          default_dtype=plan.dtype, mesh=mesh)
        result["ok"] = result["numerics"]["ok"]
    elif numerics:
        result["numerics"] = {"skipped": "static errors: the workers would crash or compute garbage"}
    return result


def check_gpus(world: int) -> None:
    """`verify --numerics --gpus` starts one worker per GPU; without enough GPUs the fix is to drop --gpus (CPU
    workers, gloo), not `run`'s --cpu, which verify does not have."""
    import torch

    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if visible < world:
        raise LaunchError(f"--gpus: verify --numerics starts {world} workers, one per GPU, but only {visible} CUDA "
                          f"GPU(s) are visible on this machine; drop --gpus to run the {world} workers on the CPU "
                          "(gloo).")


def run_numerics(path: Path, *, tp: int, plan_file: str | None, gpus: bool, tolerance: float | None,
                 default_dtype: str, mesh=None) -> dict:
    """The numerics workers (`tpcli.runtime.numerics`), started as `tpcli run` starts them: tp workers, or on a
    mesh its world of workers with TPCLI_MESH (each rank runs the same batch; rank 0 compares)."""
    from tpcli.commands.launch_spec import LaunchSpec
    from tpcli.commands.run import launch

    world = mesh.world if mesh is not None else tp
    if gpus:
        check_gpus(world)
    with tempfile.TemporaryDirectory(prefix="tpcli-verify-") as tmp:
        out = Path(tmp) / "numerics.json"
        if plan_file and Path(plan_file).exists():
            plan_file = str(Path(plan_file).resolve())  # the workers may run elsewhere; a shipped NAME stays a name
        args = [str(path), str(out)] + (["--plan", plan_file] if plan_file else [])
        world = mesh.world if mesh is not None else tp
        sizes = {"tp": mesh.tp, "fsdp": mesh.fsdp, "dp_replicate": mesh.dp_replicate, "ep": mesh.ep,
                 "pp": mesh.pp if mesh.pp > 1 else None} if mesh else {}
        spec = LaunchSpec(module="tpcli.runtime.numerics", args=args, gpus=world if gpus else None,
                          cpu=None if gpus else world, preflight=False, quiet=True, raise_on_interrupt=True,
                          **sizes)  # Ctrl-C: "interrupted", exit 130
        lines: list[str] = []
        code = launch(spec, report=lines.append)
        if code != 0 or not out.exists():
            return {"ok": False, "error": "the TP workers failed: " + " | ".join(lines[:3])}
        data = read_json(out, what="the numerics workers' result")
    tol = tolerance if tolerance is not None else DEFAULT_TOLERANCE.get(data["dtype"], 1e-5)
    data["tolerance"] = tol
    data["mesh"] = mesh.to_dict() if mesh is not None else None
    data["first_bad"] = next((layer["name"] for layer in data["layers"] if layer["max_abs"] > tol), None)
    data["ok"] = data["logits"]["max_abs"] <= tol and data["first_bad"] is None and data["tokens_equal"]
    return data


def verify_sharded(folder: Path, *, tp: int | None, quick: bool) -> dict:
    """Integrity of a sharded folder. config.json's agreement with the shards is always checked against
    transformers' model for it: planned now ("path": "transformers"), or, where the manifest vouches for that very
    config.json (`tpcli.formats.manifest_gather`), against `folders.model_record` ("path": "manifest"), which a
    later verify or gather of the same folder takes from tpcli's cache, importing neither torch nor transformers.
    The folder is opened once (`tpcli.runtime.folders.ShardedFolder`); tpcli.json is read once."""
    from tpcli.formats import manifest_gather
    from tpcli.planning import saved_mesh
    from tpcli.runtime.folders import ShardedFolder, model_record

    findings: list[Finding] = []
    info = saved = None
    path = "transformers"
    try:
        info = ShardedFolder.open(folder, quick=quick)  # paths, sizes, hashes, headers, coverage: read once
        vouched = manifest_gather.why_not_vouched(folder, info.manifest) is None
        path = "manifest" if vouched else "transformers"
        # config.json per transformers: its cached record where the manifest vouches for it, else planned now
        info = info.with_record(model_record(folder, info.manifest)) if vouched else info.with_plan()
        saved = saved_mesh.saved_by(info)  # recorded, or inferred from the chunk layout
    except CheckpointError as exc:
        info = saved = None
        findings.append(Finding("error", "integrity", str(exc)))
    if info is not None:
        if info.manifest is None:
            findings.append(Finding("info", "no-manifest", "no tpcli.json (a transformers DCP save): hashes not "
                                    "checked, coverage and config checked"))
        if tp is not None and saved_mesh.other_tp(saved, tp):
            findings.append(Finding("warning", "tp-mismatch", f"folder is {saved['description']}, --tp is {tp}: "
                                    "transformers would reshard it on load"))
    return {
        "mode": "integrity",
        "target": str(folder),
        "tp": saved_mesh.tp_size(saved) if saved else None,  # None also when the layout does not determine it
        "saved_by": saved,
        "tensors": len(info.tensors) if info else None,
        # None: the check stopped at its first error, before it could say whether every hash was checked
        "hashes_checked": bool(info.manifest and not quick) if info else None,
        "path": path,  # "manifest": checked against transformers' cached record; "transformers": by its model now
        "findings": [f.to_dict() for f in findings],
        "ok": not any(f.severity == "error" for f in findings),
    }
