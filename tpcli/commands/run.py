"""Where processes are spawned: `tpcli run` = preflight + the real torchrun (`torch.distributed.run`).

tpcli adds what torchrun leaves to the user: it refuses to spawn when the GPUs are not there or the model's plan
cannot work at the world size, picks a free port (`--standalone`) on one node, prefixes every output line with
its rank (`--tee 3 --role rank`), runs each worker under torch elastic's `record` (tpcli.runtime.bootstrap) so a failure's
traceback reaches torchrun's error file, prints which rank failed and why, and exits with that rank's exit code.
Ctrl-C, SIGTERM or SIGHUP (and `--timeout`) stop torchrun, which stops its workers; any worker still alive after a
grace period is killed by pid. torchrun runs under tpcli/runtime/supervise.py, a child subreaper: every process of the job,
however deep, stays its descendant and is killed with it, and if tpcli itself dies (even by SIGKILL) the kernel
tells the supervisor (PR_SET_PDEATHSIG), which kills the whole job and removes tpcli's temporary folder.

The failure report (tpcli.commands.failure_report) names the rank that failed first: tpcli times each worker's death (pidfd, to the millisecond)
and the moment its Python code raised (tpcli.runtime.bootstrap); torchrun orders failures by whole seconds and prefers error
files, which a rank killed by a signal never writes, so it can blame a rank that died because of another.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tpcli.commands.failure_report import (
    agent_root_cause,
    collect_failures,
    failure_report,
    rank_codes,
    root_cause,
    root_json,
    shell_code,
)
from tpcli.commands.job_watch import (
    GRACE_S,
    DeathWatch,
    kill_leftovers,
    pump_output,
    running_ranks,
    timeout_report,
    wait_job,
)
from tpcli.commands.launch_spec import LaunchSpec
from tpcli.commands.run_checks import validate
from tpcli.errors import LaunchError, UsageError

TIMEOUT_EXIT = 124  # `--timeout` expired, as timeout(1)
_RUNTIME = Path(__file__).resolve().parents[1] / "runtime"
BOOTSTRAP = str(_RUNTIME / "bootstrap.py")  # by path: a ./tpcli folder cannot shadow it
SUPERVISOR = str(_RUNTIME / "supervise.py")
COMPLETIONS = {"fsdp": "training: shards params, grads, optimizer", "dp_replicate": "inference replicas"}


def resolve_mesh(spec: LaunchSpec):
    """The job's mesh (`tpcli.planning.mesh.Mesh`), checked against the world W = workers per node x nodes.

    No mesh flag: plain TP, tp = W. Without --tp, tp takes what --fsdp x --dp-replicate leave (W / (F x R)).
    tp x fsdp x dp_replicate must be W: a mesh that covers a part of it is a usage error naming the two ways to
    complete it (more FSDP ranks, or replicas). The sizes' rules (ep a multiple of tp dividing fsdp x tp) are
    transformers' own DistributedConfig (`tpcli.planning.mesh.distributed_config`). A TP group must stay inside a
    node: T <= workers per node and T divides it (TP all-reduces activations in every layer; it needs the
    intra-node links)."""
    from tpcli.planning.mesh import Mesh, distributed_config

    world, launcher = spec.world_size, _launcher_flags(spec)
    if not spec.mesh_given:
        return Mesh(tp=world)
    for flag, value in (("--tp", spec.tp), ("--fsdp", spec.fsdp), ("--dp-replicate", spec.dp_replicate),
                        ("--ep", spec.ep), ("--pp", spec.pp)):
        if value is not None and value < 1:
            raise UsageError(f"{flag} {value}: must be a positive integer.")
    fsdp, replicate, ep, pp = spec.fsdp or 1, spec.dp_replicate or 1, spec.ep or 1, spec.pp or 1
    tp = spec.tp
    if tp is None:
        if world % (fsdp * replicate * pp):
            others = " x ".join(f"{f} {v}" for f, v in (("--fsdp", fsdp), ("--dp-replicate", replicate), ("--pp", pp))
                                if f != "--pp" or pp > 1)
            raise UsageError(f"{others} = {fsdp * replicate * pp} does not divide the "
                             f"{world} ranks of {launcher}; give sizes whose product is {world}.")
        tp = world // (fsdp * replicate * pp)
    mesh = Mesh(tp=tp, fsdp=fsdp, dp_replicate=replicate, ep=ep, pp=pp)
    if mesh.world != world:
        given = " x ".join(f"{flag} {v}" for flag, v in (("--tp", tp), ("--fsdp", spec.fsdp),
                                                          ("--dp-replicate", spec.dp_replicate), ("--pp", spec.pp))
                         if v is not None)
        if world % mesh.world:
            raise UsageError(f"{given} = {mesh.world} ranks, but {launcher} starts {world}: tp x fsdp x "
                             f"dp-replicate{' x pp' if pp > 1 else ''} must equal the world size {world}.")
        k = world // mesh.world
        if pp > 1:  # transformers 5.23 combines PP with neither FSDP nor replicas
            raise UsageError(f"{given} = {mesh.world} of the {world} ranks of {launcher}: add --pp {pp * k} (more "
                             "stages); transformers 5.23 combines pipeline parallelism with neither --fsdp nor "
                             "--dp-replicate.")
        raise UsageError(f"{given} = {mesh.world} of the {world} ranks of {launcher}: add "
                         f"--fsdp {fsdp * k} ({COMPLETIONS['fsdp']}) or --dp-replicate {replicate * k} "
                         f"({COMPLETIONS['dp_replicate']}).")
    per_node = spec.nproc
    if spec.nnodes > 1 and (mesh.tp > per_node or per_node % mesh.tp):
        raise UsageError(f"--tp {mesh.tp} with {per_node} workers per node: a TP group would span nodes. TP "
                         "all-reduces activations in every layer and needs the intra-node links (NVLink); use a "
                         f"--tp that divides {per_node} and --fsdp/--dp-replicate across the nodes.")
    distributed_config(mesh)  # transformers' size rules, named by flag
    return mesh


def _launcher_flags(spec: LaunchSpec) -> str:
    flag = f"--gpus {spec.gpus}" if spec.gpus else f"--cpu {spec.nproc}"
    return flag + (f" x --nnodes {spec.nnodes}" if spec.nnodes > 1 else "")


def describe_mesh(mesh) -> str:
    """'tp=2 x fsdp=2 x dp_replicate=1 (4 ranks), ep=1'; 'pp=2 x tp=1 x ...' on a pipeline mesh"""
    return (("" if mesh.pp == 1 else f"pp={mesh.pp} x ") + f"tp={mesh.tp} x fsdp={mesh.fsdp} x "
            f"dp_replicate={mesh.dp_replicate} ({mesh.world} ranks), ep={mesh.ep}")


def check_devices(spec: LaunchSpec) -> None:
    if spec.gpus:
        import torch

        visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if visible < spec.gpus:
            raise LaunchError(f"--gpus {spec.gpus}: only {visible} CUDA GPU(s) visible on this machine; "
                              f"use --cpu {spec.gpus} to run {spec.gpus} CPU workers (gloo) instead.")


def preflight_mesh(spec: LaunchSpec, mesh) -> list[str]:
    """Static checks of --model on a mesh, as `tpcli inspect/verify --tp --fsdp --dp-replicate --ep` plan it:
    transformers' plan resolution for the mesh and the experts over --ep (`MeshPlan`), then tpcli's per-TP checks at
    T, less those about experts that the EP plan takes (`mesh_findings`)."""
    from tpcli.commands.inspect import load_resolved
    from tpcli.errors import PlanError
    from tpcli.formats import dcp
    from tpcli.planning.checks import check_plan, errors
    from tpcli.planning.mesh import MeshPlan, mesh_findings

    local = Path(spec.model).expanduser()
    if dcp.is_sharded_dir(local):
        from tpcli.formats import manifest
        from tpcli.runtime.loading import mesh_fast_path_refusal

        doc = manifest.read(local)
        why = "no tpcli.json: not a tpcli folder" if doc is None else mesh_fast_path_refusal(doc, mesh)
        if why is None:
            made = (f"pp={doc['pp_size']} x " if doc.get("pp_size", 1) > 1 else "") + f"tp={doc['tp_size']}"
            return [f"preflight: {spec.model} is a tpcli {made} sharded folder: on the mesh "
                    f"{describe_mesh(mesh)} it is not checked here; tpcli.load_model reads it through the per-rank "
                    "fast path (each rank only its own share of the rank files)"]
        return [f"preflight: {spec.model} is a sharded folder: on the mesh {describe_mesh(mesh)} it is not checked "
                f"here and tpcli.load_model loads it through transformers (DCP), not the per-rank fast path ({why})"]
    _, plan = load_resolved(spec.model, plan_file=spec.plan_file)
    MeshPlan(plan, mesh)
    findings = mesh_findings(plan, mesh, check_plan(plan, mesh.tp))
    errs = errors(findings)
    if errs:
        more = f" (+{len(errs) - 1} more; see `tpcli verify`)" if len(errs) > 1 else ""
        raise PlanError(f"mesh {describe_mesh(mesh)} is invalid for {plan.architecture}: {errs[0].message}{more}.")
    warnings = [f for f in findings if f.severity == "warning"]
    notes = [f"preflight: {plan.architecture} plan OK on the mesh {describe_mesh(mesh)}"
             + (f" ({len(warnings)} warnings, see `tpcli verify`)" if warnings else "")]
    tied = sorted(f"{t.name} = {t.tied_to}" for t in plan.tensors.values() if t.tied_to)
    if mesh.pp > 1 and mesh.tp > 1:
        from tpcli.planning.mesh import TP_PP_CRASH

        notes.append(f"preflight: note: {TP_PP_CRASH}")
    if tied and mesh.dp_size > 1:
        notes.append(f"preflight: warning: tied weights ({tied[0]}) under FSDP: with transformers 5.23 the forward "
                     "after an optimizer step no longer matches one process (measured: qwen3, tp=2 x fsdp=2 and "
                     "fsdp=2, loss off by ~1e-3 after one SGD step while every parameter matches); loading and "
                     "inference are exact")
    return notes


def preflight_model(spec: LaunchSpec) -> list[str]:
    """Static checks of --model at tp = world size; returns notes to print, raises on errors."""
    from tpcli.commands.inspect import load_resolved
    from tpcli.formats import dcp
    from tpcli.formats import state_manifest as sm
    from tpcli.planning import saved_mesh
    from tpcli.planning.mesh import Mesh
    from tpcli.runtime.folders import ShardedFolder

    tp = spec.world_size
    local = Path(spec.model).expanduser()
    if dcp.is_sharded_dir(local):
        if spec.plan_file:
            raise UsageError(f"--plan {spec.plan_file} with the sharded folder {spec.model}: its plan is the one it "
                             f"was sharded with (tpcli.json); to change it, `tpcli shard` the original checkpoint "
                             "with --plan.")
        info = ShardedFolder.open(local, quick=True, with_plan=True)  # a training state: sizes checked as its own
        _preflight_at_world_size(info.plan, tp)
        if info.state is not None:  # a training state (tpcli.save_state): any mesh loads it, resharded by DCP
            doc = info.state.doc
            return [f"preflight: {local} is a training state (step {doc['step']}, saved on "
                    f"{sm.mesh_text(doc['mesh'])}); file sizes OK; sha256 NOT checked here (tpcli.load_state checks "
                    f"them; so does `tpcli verify {local}`)"]
        checked = "file sizes and manifest OK" if info.manifest else "files OK (no tpcli.json: sizes not recorded)"
        saved = saved_mesh.saved_by(info)  # a transformers save on a mesh: its mesh, never "tp=<files>"
        what = f"a {saved['description']} sharded folder" if saved["mesh"] else f"a sharded folder {saved['description']}"
        notes = [f"preflight: {local} is {what}; {checked}; sha256 NOT checked "
                 f"(run `tpcli verify {local}` to check them)"]
        if saved["mesh"] != Mesh(tp=tp).to_dict():
            notes.append(f"preflight: it was not saved at tp={tp} (the world size): tpcli.load_model "
                         "falls back to transformers, which reshards it on load through DCP (a collective load plan, "
                         f"every rank opening every file); `tpcli shard {local} --tp {tp} --out DIR` makes a matching "
                         "copy once")
        return notes
    _, plan = load_resolved(spec.model, plan_file=spec.plan_file)
    findings = _preflight_at_world_size(plan, tp)
    n = sum(f.severity == "warning" for f in findings)
    return [f"preflight: {plan.architecture} plan OK at tp={tp}" + (f" ({n} warning{'' if n == 1 else 's'}, see "
                                                                      "`tpcli verify`)" if n else "")]


def _preflight_at_world_size(plan, world_size: int) -> list:
    """`run` has no --tp: name the world size the user asked for, and where it comes from."""
    from tpcli.planning.checks import require_valid

    return require_valid(plan, world_size, what=f"world size {world_size}",
                         hint=" The world size is --cpu/--gpus x --nnodes.")


def build_command(spec: LaunchSpec, log_dir: Path) -> list[str]:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={spec.nproc}",
           f"--max-restarts={spec.max_restarts}", f"--log-dir={log_dir}", f"--tee={spec.tee or '3'}"]
    if spec.nnodes > 1:
        host, _, port = spec.rdzv_endpoint.rpartition(":")
        if not host or not port.isdigit():
            raise UsageError(f"--rdzv-endpoint {spec.rdzv_endpoint}: expected HOST:PORT.")
        cmd += [f"--nnodes={spec.nnodes}", f"--node-rank={spec.node_rank}", f"--master-addr={host}",
                f"--master-port={port}", f"--rdzv-id={spec.rdzv_id}", f"--role=n{spec.node_rank}.rank"]
    else:
        cmd += ["--standalone", "--role=rank"]
    if spec.ranks_filter:
        cmd.append(f"--local-ranks-filter={spec.ranks_filter}")
    cmd.append(BOOTSTRAP)
    cmd += ["module", spec.module] if spec.module else ["script", spec.script]
    return cmd + list(spec.args)


def worker_env(spec: LaunchSpec, run_dir: Path) -> dict[str, str]:
    return {**os.environ, **tpcli_env(spec, run_dir)}


def tpcli_env(spec: LaunchSpec, run_dir: Path) -> dict[str, str]:
    """The variables tpcli sets for the workers, on top of its own environment."""
    env: dict[str, str] = {}
    env["TPCLI_RUN_DIR"] = str(run_dir)
    env["PYTHONUNBUFFERED"] = "1"
    if spec.model:
        local = Path(spec.model).expanduser()
        env["TPCLI_MODEL"] = str(local.resolve()) if local.exists() else spec.model
    if spec.plan_file:  # tpcli.load_model() uses it as `tp_plan` (a shipped name, or the file by absolute path)
        plan = Path(spec.plan_file).expanduser()
        env["TPCLI_PLAN"] = str(plan.resolve()) if plan.exists() else spec.plan_file
    if spec.mesh_given:  # tpcli.load_model / tpcli.mesh_info read it (tpcli.runtime.meshinfo)
        from tpcli.runtime.meshinfo import ENV, format_mesh

        env[ENV] = format_mesh(resolve_mesh(spec))
    if not spec.gpus:
        env["CUDA_VISIBLE_DEVICES"] = ""  # CPU workers: transformers then picks gloo
        if "OMP_NUM_THREADS" not in os.environ:
            env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // spec.nproc))
    return env


def _run_log_dir(spec: LaunchSpec, run_dir: Path) -> Path:
    """Where torchrun writes this run's logs and error files: a fresh folder, so that a reused --log-dir never
    reports a previous run's error (`--log-dir D` gives D/run-YYYYmmdd-HHMMSS-XXXX, one per run)."""
    if spec.log_dir is None:
        log_dir = run_dir / "logs"
        log_dir.mkdir()
        return log_dir
    base = Path(spec.log_dir).expanduser().resolve()
    try:
        base.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=time.strftime("run-%Y%m%d-%H%M%S-"), dir=base))
    except OSError as exc:
        raise UsageError(f"--log-dir {spec.log_dir}: {exc.strerror}; give a folder you can write.") from None


DRY_RUN_LOG_DIR = "<log-dir>"  # a fresh folder per run, made when the job starts


def dry_run_lines(spec: LaunchSpec) -> list[str]:
    """`tpcli run --dry-run`: the torchrun command (under tpcli's supervisor) and the variables tpcli sets for the
    workers, one per line, shell-quoted; nothing is started or created."""
    import shlex

    env = tpcli_env(spec, Path("<run-dir>"))
    cmd = build_command(spec, Path(spec.log_dir or DRY_RUN_LOG_DIR))
    mesh = resolve_mesh(spec)
    lines = [f"mesh: {describe_mesh(mesh)}" + ("" if spec.mesh_given else " (no mesh flag: plain TP over the world)"),
             f"world: {spec.world_size} = {spec.nproc} {'GPU' if spec.gpus else 'CPU'} workers per node x "
             f"{spec.nnodes} node(s), this node's rank {spec.node_rank}",
             "command: " + shlex.join(cmd), "environment (set by tpcli, on top of the current one):"]
    lines += [f"  {k}={shlex.quote(v)}" for k, v in sorted(env.items())]
    return lines


@dataclass
class RunResult:
    """What `tpcli run --json` prints: per-rank exit codes and signals, the root cause, the log folder kept."""

    exit_code: int
    duration_s: float
    ranks: list[dict]  # this node's ranks: {"rank", "exit_code", "signal"}; exit_code None when not known
    root_cause: dict | None = None  # {"rank", "exit_code", "signal", "message"}
    log_dir: str | None = None  # kept per-rank logs (None when removed)
    stopped_by: str | None = None  # "SIGINT", "SIGTERM", "SIGHUP" or "timeout"

    def to_json(self) -> dict:
        return {"exit_code": self.exit_code, "ok": self.exit_code == 0, "stopped_by": self.stopped_by,
                "root_cause": self.root_cause, "ranks": self.ranks, "log_dir": self.log_dir,
                "duration_s": round(self.duration_s, 3)}


def launch(spec: LaunchSpec, report: Callable[[str], None] = print) -> int:
    """Run the job; returns the exit code to use: 0, the root-cause rank's exit code, 128 + signal when stopped by a
    signal, 124 when `timeout_s` expired. Raises LaunchError before spawning when a check fails."""
    return run_job(spec, report).exit_code


def run_job(spec: LaunchSpec, report: Callable[[str], None] = print) -> RunResult:
    """`launch`, returning the whole outcome (`RunResult`)."""
    started = time.monotonic()
    validate(spec)  # sizes, flags, SCRIPT or -m MODULE: before anything is allocated or spawned
    mesh = resolve_mesh(spec)
    if spec.mesh_given:
        report(f"tpcli run: mesh {describe_mesh(mesh)} over {_launcher_flags(spec)}")
    if not spec.dry_run:
        check_devices(spec)
    if spec.model and spec.preflight:
        plain = mesh.tp == spec.world_size and mesh.ep == 1  # `--tp W` alone is today's plain TP
        for note in (preflight_model(spec) if plain else preflight_mesh(spec, mesh)):
            report(note)
    if spec.dry_run:
        for line in dry_run_lines(spec):  # with --json, stdout carries only the JSON object
            print(line, file=sys.stderr if spec.worker_stdout_to_stderr else sys.stdout, flush=True)
        return RunResult(exit_code=0, duration_s=time.monotonic() - started, ranks=[])
    run_dir = Path(tempfile.mkdtemp(prefix="tpcli-run-"))  # 0700, a fresh name: never an existing path
    try:
        log_dir = _run_log_dir(spec, run_dir)
    except BaseException:
        shutil.rmtree(run_dir, ignore_errors=True)
        raise
    cmd = [sys.executable, "-I", SUPERVISOR, str(os.getpid()), str(run_dir), str(GRACE_S), "--",
           *build_command(spec, log_dir)]
    deaths = DeathWatch(run_dir)
    deaths.start()
    proc = subprocess.Popen(cmd, env=worker_env(spec, run_dir), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True, text=True, bufsize=1)
    agent_lines: list[str] = []
    last: dict[str, deque] = {}  # rank -> its last output lines, for the --timeout report
    running: list[int] = []  # ranks still alive when --timeout expired
    out, err = (None, None) if spec.quiet else (sys.stdout, sys.stderr)
    if spec.worker_stdout_to_stderr:
        out = err
    pumps = [threading.Thread(target=pump_output, args=(proc.stdout, out, None, last), daemon=True),
             threading.Thread(target=pump_output, args=(proc.stderr, err, agent_lines, last), daemon=True)]
    for t in pumps:
        t.start()
    stopped = wait_job(proc, report, spec.timeout_s, lambda: running.extend(running_ranks(run_dir)))
    for t in pumps:
        t.join(timeout=5)
    kill_leftovers(run_dir)
    deaths.finish()
    code = proc.returncode
    keep_logs = False
    failures: list[dict] = []
    root = None
    if stopped == "timeout":
        code = TIMEOUT_EXIT
        for line in timeout_report(spec, running, last):
            report(line)
        keep_logs = True
    elif stopped:
        message = f"interrupted ({signal.Signals(stopped).name}); all {spec.nproc} local workers stopped"
        if spec.raise_on_interrupt:
            shutil.rmtree(run_dir, ignore_errors=True)
            raise LaunchError(message, exit_code=128 + stopped)
        report(f"tpcli run: {message}")
        code = 128 + stopped
    elif code != 0:
        failures = collect_failures(agent_lines, log_dir, spec)
        times, raised = deaths.times(run_dir)
        root = root_cause(failures, times, agent_root_cause(agent_lines), raised)
        for line in failure_report(failures, root, agent_lines):
            report(line)
        code = shell_code(root["exitcode"]) if root and root["exitcode"] else code
        keep_logs = True
    kept = None
    if spec.log_dir is not None:
        kept = str(log_dir)
        shutil.rmtree(run_dir, ignore_errors=True)
        if keep_logs:
            report(f"tpcli run: per-rank logs in {log_dir}")
    elif keep_logs:
        for f in run_dir.iterdir():
            if f.name.startswith(("pid-", "failed-")):
                f.unlink()
        kept = str(log_dir)
        report(f"tpcli run: per-rank logs kept in {log_dir} (only you can read them; delete the folder when done)")
    else:
        shutil.rmtree(run_dir, ignore_errors=True)
    return RunResult(exit_code=code, duration_s=time.monotonic() - started, ranks=rank_codes(spec, code, stopped,
                     failures), root_cause=root_json(root), log_dir=kept,
                     stopped_by=stopped if stopped == "timeout" else (signal.Signals(stopped).name if stopped else None))
