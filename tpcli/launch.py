"""Where processes are spawned: `tpcli run` = preflight + the real torchrun (`torch.distributed.run`).

tpcli adds what torchrun leaves to the user: it refuses to spawn when the GPUs are not there or the model's plan
cannot work at the world size, picks a free port (`--standalone`) on one node, prefixes every output line with
its rank (`--tee 3 --role rank`), runs each worker under torch elastic's `record` (tpcli.bootstrap) so a failure's
traceback reaches torchrun's error file, prints which rank failed and why, and exits with that rank's exit code.
Ctrl-C, SIGTERM or SIGHUP (and `--timeout`) stop torchrun, which stops its workers; any worker still alive after a
grace period is killed by pid. If tpcli itself dies (even by SIGKILL), the kernel kills torchrun
(PR_SET_PDEATHSIG), and each worker dies with torchrun the same way.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .errors import LaunchError, UsageError

GRACE_S = 10.0  # after Ctrl-C: how long torchrun gets to stop its workers before everything is killed
TIMEOUT_EXIT = 124  # `--timeout` expired, as timeout(1)
WORKER_LINE = re.compile(r"^\[(?:n\d+\.)?rank(\d+)\]:")
BOOTSTRAP = str(Path(__file__).resolve().with_name("bootstrap.py"))  # by path: a ./tpcli folder cannot shadow it
# frames of the launch machinery, hidden from the root-cause traceback
PLUMBING = ("torch/distributed/elastic/", "tpcli/bootstrap.py", "<frozen runpy>")


@dataclass
class LaunchSpec:
    script: str | None = None
    module: str | None = None
    args: list[str] = field(default_factory=list)
    gpus: int | None = None
    cpu: int | None = None
    model: str | None = None
    plan_file: str | None = None
    nnodes: int = 1
    node_rank: int = 0
    rdzv_endpoint: str | None = None
    rdzv_id: str = "tpcli"
    max_restarts: int = 0
    log_dir: str | None = None
    tee: str | None = None
    ranks_filter: str | None = None
    preflight: bool = True
    quiet: bool = False  # keep worker output out of the console (it still goes to the per-rank logs)
    timeout_s: float | None = None  # stop every worker after this many seconds (exit 124)
    raise_on_interrupt: bool = False  # a signal raises LaunchError(exit 128 + signal) instead of returning the code

    @property
    def nproc(self) -> int:
        return self.gpus if self.gpus else (self.cpu or 1)

    @property
    def world_size(self) -> int:
        return self.nproc * self.nnodes


def check_devices(spec: LaunchSpec) -> None:
    if spec.gpus:
        import torch

        visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if visible < spec.gpus:
            raise LaunchError(f"--gpus {spec.gpus}: only {visible} CUDA GPU(s) visible on this machine; "
                              f"use --cpu {spec.gpus} to run {spec.gpus} CPU workers (gloo) instead.")


def preflight_model(spec: LaunchSpec) -> list[str]:
    """Static checks of --model at tp = world size; returns notes to print, raises on errors."""
    from . import dcp
    from .inspection import load_resolved
    from .integrity import check_folder

    tp = spec.world_size
    local = Path(spec.model).expanduser()
    if dcp.is_sharded_dir(local):
        if spec.plan_file:
            raise UsageError(f"--plan {spec.plan_file} with the sharded folder {spec.model}: its plan is the one it "
                             f"was sharded with (tpcli.json); to change it, `tpcli shard` the original checkpoint "
                             "with --plan.")
        info = check_folder(local, quick=True, with_plan=True)
        _preflight_at_world_size(info["plan"], tp)
        checked = "file sizes and manifest OK" if info["manifest"] else "files OK (no tpcli.json: sizes not recorded)"
        notes = [f"preflight: {local} is a tp={info['tp_size']} sharded folder; {checked}; sha256 NOT checked "
                 f"(run `tpcli verify {local}` to check them)"]
        if info["tp_size"] != tp:
            notes.append(f"preflight: its tp={info['tp_size']} differs from the world size {tp}: tpcli.load_model "
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
    """sharding.preflight names `--tp`; `run` has no --tp, so name the world size the user asked for."""
    from .errors import PlanError
    from .sharding import preflight

    try:
        return preflight(plan, world_size)
    except PlanError as exc:
        raise PlanError(str(exc).replace(f"--tp {world_size} is invalid", f"world size {world_size} is invalid", 1)
                        + " The world size is --cpu/--gpus x --nnodes.") from None


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
    env = dict(os.environ)
    env["TPCLI_RUN_DIR"] = str(run_dir)
    env["PYTHONUNBUFFERED"] = "1"
    if spec.model:
        local = Path(spec.model).expanduser()
        env["TPCLI_MODEL"] = str(local.resolve()) if local.exists() else spec.model
    if spec.plan_file:  # tpcli.load_model() uses it as `tp_plan` (a shipped name, or the file by absolute path)
        plan = Path(spec.plan_file).expanduser()
        env["TPCLI_PLAN"] = str(plan.resolve()) if plan.exists() else spec.plan_file
    if not spec.gpus:
        env["CUDA_VISIBLE_DEVICES"] = ""  # CPU workers: transformers then picks gloo
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // spec.nproc)))
    return env


def _die_with_parent() -> None:
    """preexec_fn of torchrun (Linux): SIGKILL it when tpcli dies, whatever kills tpcli; its workers follow it the
    same way (tpcli.bootstrap). Popen runs on the main thread, whose exit is what PDEATHSIG watches."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def launch(spec: LaunchSpec, report: Callable[[str], None] = print) -> int:
    """Run the job; returns the exit code to use: 0, the root-cause rank's exit code, 128 + signal when stopped by a
    signal, 124 when `timeout_s` expired. Raises LaunchError before spawning when a check fails."""
    if spec.script and not Path(spec.script).is_file():
        raise UsageError(f"SCRIPT {spec.script}: no such file.")
    check_devices(spec)
    if spec.model and spec.preflight:
        for note in preflight_model(spec):
            report(note)
    run_dir = Path(tempfile.mkdtemp(prefix="tpcli-run-"))  # 0700, a fresh name: never an existing path
    log_dir = Path(spec.log_dir).resolve() if spec.log_dir else run_dir / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    cmd = build_command(spec, log_dir)
    proc = subprocess.Popen(cmd, env=worker_env(spec, run_dir), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True, text=True, bufsize=1, preexec_fn=_die_with_parent)
    agent_lines: list[str] = []
    last: dict[str, deque] = {}  # rank -> its last output lines, for the --timeout report
    running: list[int] = []  # ranks still alive when --timeout expired
    out, err = (None, None) if spec.quiet else (sys.stdout, sys.stderr)
    pumps = [threading.Thread(target=_pump, args=(proc.stdout, out, None, last), daemon=True),
             threading.Thread(target=_pump, args=(proc.stderr, err, agent_lines, last), daemon=True)]
    for t in pumps:
        t.start()
    stopped = _wait(proc, report, spec.timeout_s, lambda: running.extend(_running_ranks(run_dir)))
    for t in pumps:
        t.join(timeout=5)
    _kill_leftovers(run_dir)
    code = proc.returncode
    keep_logs = False
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
        root = _agent_root_cause(agent_lines)
        for line in failure_report(log_dir, agent_lines, spec, root):
            report(line)
        code = exit_code_of(root, code)
        keep_logs = True
    if keep_logs and spec.log_dir is None:
        for f in run_dir.glob("pid-*"):
            f.unlink()
        report(f"tpcli run: per-rank logs kept in {log_dir} (only you can read them; delete the folder when done)")
    else:
        shutil.rmtree(run_dir, ignore_errors=True)
    return code


def exit_code_of(root: dict | None, agent_code: int) -> int:
    """The root-cause rank's exit code (a signal N as 128 + N, as a shell reports it); torchrun's own otherwise."""
    how = (root or {}).get("exitcode", "")
    if how.lstrip("-").isdigit() and int(how) != 0:
        return 128 - int(how) if int(how) < 0 else int(how)
    return agent_code


def _running_ranks(run_dir: Path) -> list[int]:
    """Global ranks whose worker process is still alive (their pids are in run_dir/pid-RANK)."""
    alive = []
    for f in run_dir.glob("pid-*"):
        try:
            os.kill(int(f.read_text()), 0)
        except (ValueError, ProcessLookupError, PermissionError):
            continue
        alive.append(int(f.name.removeprefix("pid-")))
    return sorted(alive)


def timeout_report(spec: LaunchSpec, running: list[int], last: dict[str, deque]) -> list[str]:
    lines = [f"tpcli run: --timeout {spec.timeout_s:g}s expired; stopped all {spec.nproc} local workers; "
             f"still running then: {', '.join(f'rank {r}' for r in running) or 'none'}"]
    for r in running:
        local = str(r - spec.node_rank * spec.nproc)
        tail = list(last.get(local, []))
        lines.append(f"  rank {r} last output: " + ("(none)" if not tail else ""))
        lines += ["    " + ln for ln in tail]
    return lines


def _pump(stream, sink, agent_lines: list[str] | None, last: dict[str, deque]) -> None:
    """Forward worker lines ("[rank0]:...") as they come; keep torchrun's own failure dump out of the way.

    It always reads to the end: if the reader of our output goes away (`| head`), the rest is dropped, so torchrun
    never blocks on a full pipe."""
    in_dump = False
    for line in stream:
        prefix = WORKER_LINE.match(line)
        is_worker = prefix is not None
        if is_worker and line[prefix.end():].startswith(prefix.group(0)):
            line = line[prefix.end():]  # torch prefixes its own "[rankN]:" once a process group exists
        if is_worker:
            last.setdefault(prefix.group(1), deque(maxlen=3)).append(line.rstrip("\n"))
        if agent_lines is not None and not is_worker:
            agent_lines.append(line.rstrip("\n"))
            if line.startswith("Traceback (most recent call last)") or in_dump:
                in_dump = True  # torchrun's ChildFailedError trace; tpcli prints its own summary instead
                continue
        if sink is not None:
            try:
                sink.write(line)
                sink.flush()
            except (BrokenPipeError, ValueError):
                sink = None


def _wait(proc: subprocess.Popen, report: Callable[[str], None], timeout_s: float | None = None,
          on_timeout: Callable[[], object] = lambda: None):
    """Wait for torchrun; on SIGINT/SIGTERM/SIGHUP or when `timeout_s` expires stop it (and its workers).

    Returns None when torchrun ended by itself, the signal number when interrupted, "timeout" on timeout."""
    stopped: list = []

    def stop(why) -> None:
        if not stopped:
            stopped.append(why)
            report("tpcli run: stopping workers…")
            try:
                proc.send_signal(signal.SIGTERM)  # torchrun's agent then terminates every worker
            except ProcessLookupError:
                pass

    previous = {s: signal.signal(s, lambda signum, frame: stop(signum))
                for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        expires = time.monotonic() + timeout_s if timeout_s else None
        deadline = None
        while proc.poll() is None:
            if expires is not None and time.monotonic() > expires and not stopped:
                on_timeout()
                stop("timeout")
            if stopped and deadline is None:
                deadline = time.monotonic() + GRACE_S
            if deadline is not None and time.monotonic() > deadline:
                _killpg(proc.pid)
            time.sleep(0.05)
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
    return stopped[0] if stopped else None


def _killpg(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _kill_leftovers(run_dir: Path) -> None:
    """Workers run in their own sessions; make sure none outlives `tpcli run`."""
    for f in run_dir.glob("pid-*"):
        try:
            pid = int(f.read_text())
            os.kill(pid, 0)
        except (ValueError, ProcessLookupError, PermissionError):
            continue
        time.sleep(0.5)
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def failure_report(log_dir: Path, agent_lines: list[str], spec: LaunchSpec, root: dict | None = None) -> list[str]:
    """Which rank failed, with what exit code or signal, and the root-cause traceback from its error file."""
    failures: list[dict] = []
    for error_file in sorted(log_dir.rglob("error.json")):
        try:
            data = json.loads(error_file.read_text())["message"]
        except (ValueError, KeyError, TypeError):
            continue
        local_rank = int(error_file.parent.name) if error_file.parent.name.isdigit() else 0
        extra = data.get("extraInfo", {}) if isinstance(data, dict) else {}
        failures.append({
            "rank": spec.node_rank * spec.nproc + local_rank,
            "message": data.get("message", str(data)) if isinstance(data, dict) else str(data),
            "traceback": extra.get("py_callstack", ""),
            "timestamp": int(extra.get("timestamp", 0) or 0),
        })
    root = root or _agent_root_cause(agent_lines)
    lines = []
    if failures:
        first = min(failures, key=lambda f: f["timestamp"])
        code = f", exit code {root['exitcode']}" if root and root.get("rank") == first["rank"] else ""
        lines.append(f"tpcli run: rank {first['rank']} failed{code}: {first['message']}")
        lines += ["  " + ln for ln in user_frames(first["traceback"])[-16:]]
        others = sorted({f["rank"] for f in failures} - {first["rank"]})
        if others:
            lines.append(f"tpcli run: ranks {others} failed too")
    elif root:
        how = root["exitcode"]
        if how.lstrip("-").isdigit() and int(how) < 0:
            how = f"signal {signal.Signals(-int(how)).name}"
        else:
            how = f"exit code {how}"
        lines.append(f"tpcli run: rank {root['rank']} failed with {how} (no Python traceback: killed, or exited "
                     "via sys.exit/os._exit)")
    else:
        lines.append("tpcli run: torchrun failed before any worker reported an error:")
        lines += ["  " + ln for ln in agent_lines[-15:]]
    return lines


def user_frames(traceback: str) -> list[str]:
    """The traceback without the frames of torchrun, runpy and tpcli's bootstrap."""
    out, skipping = [], False
    for line in traceback.rstrip().splitlines():
        if line.lstrip().startswith("File "):
            skipping = any(p in line for p in PLUMBING)
        elif not line.startswith(" "):
            skipping = False
        if not skipping:
            out.append(line)
    return out


def _agent_root_cause(agent_lines: list[str]) -> dict | None:
    """Parse torchrun's 'Root Cause' block: rank and exitcode."""
    try:
        start = max(i for i, ln in enumerate(agent_lines) if ln.startswith("Root Cause"))
    except ValueError:
        return None
    out: dict = {}
    for ln in agent_lines[start:start + 12]:
        key, _, value = ln.strip().partition(":")
        key = key.strip()
        if key == "rank":
            out["rank"] = int(value.split()[0])
        elif key == "exitcode":
            out["exitcode"] = value.split()[0]
    return out or None
