"""What a failed job reports: torchrun's failure lines and error files parsed, the root cause (the first rank to die,
with its signal), and the traceback without torchrun's and tpcli's own frames."""

from __future__ import annotations

import re
import signal
from pathlib import Path
from typing import TYPE_CHECKING

from tpcli.errors import CheckpointError
from tpcli.formats.jsonfile import read_json

if TYPE_CHECKING:
    from tpcli.commands.launch_spec import LaunchSpec

# frames of the launch machinery, hidden from the root-cause traceback
PLUMBING = ("torch/distributed/elastic/", "tpcli/runtime/bootstrap.py", "<frozen runpy>")


def shell_code(exitcode: int) -> int:
    """A process's exit status as a shell reports it: a signal N as 128 + N."""
    return 128 - exitcode if exitcode < 0 else exitcode


def _signal_name(exitcode: int | None) -> str | None:
    if exitcode is None or exitcode >= 0:
        return None
    try:
        return signal.Signals(-exitcode).name
    except ValueError:
        return f"signal {-exitcode}"


def rank_codes(spec: LaunchSpec, code: int, stopped, failures: list[dict]) -> list[dict]:
    """This node's ranks with their exit codes: torchrun lists every rank that did not exit 0; the others exited 0
    (unknown, None, when the job was stopped or torchrun failed before reporting)."""
    by_rank = {f["rank"]: f["exitcode"] for f in failures}
    known = not stopped and (code == 0 or bool(failures))
    out = []
    for local in range(spec.nproc):
        rank = spec.node_rank * spec.nproc + local
        raw = by_rank.get(rank, 0 if known else None)
        out.append({"rank": rank, "exit_code": None if raw is None else shell_code(raw), "signal": _signal_name(raw)})
    return out


def root_json(root: dict | None) -> dict | None:
    if root is None:
        return None
    return {"rank": root["rank"], "exit_code": None if root["exitcode"] is None else shell_code(root["exitcode"]),
            "signal": _signal_name(root["exitcode"]), "message": root["message"]}


AGENT_FIELD = re.compile(r"^\s+(rank|exitcode|error_file)\s*:\s?(.*)$")
FATAL_SIGNALS = {"SIGKILL", "SIGBUS", "SIGSEGV", "SIGILL", "SIGFPE"}
SIGNAL_LAG_S = 2.0  # see root_cause; torchrun escalates SIGTERM to SIGKILL only after 30 s, far beyond it
SIGNAL_HINTS = {"SIGKILL": "killed: out of memory (the kernel's OOM killer) or `kill -9`",
                "SIGBUS": "bus error: a memory-mapped file truncated or changed, or /dev/shm full",
                "SIGSEGV": "segmentation fault in native code", "SIGABRT": "aborted by native code"}


def parse_agent_failures(agent_lines: list[str]) -> list[dict]:
    """Every failure in torchrun's ChildFailedError report: {"rank", "local_rank", "exitcode", "pid", "error_file",
    "root"} (root: torchrun's own pick, its "Root Cause" entry), in the report's order.

    The report lists each failed rank as a block `[i]:` with `rank : R (local_rank: L)`, `exitcode : C (pid: P)`,
    `error_file: PATH` (or <N/A>) and a traceback; "Root Cause (first observed failure):" precedes torchrun's pick."""
    failures: list[dict] = []
    start = next((i for i in range(len(agent_lines) - 1, -1, -1) if agent_lines[i].startswith("Failures:")), None)
    if start is None:
        return failures
    in_root = False
    current: dict | None = None
    for line in agent_lines[start + 1:]:
        if line.startswith("Root Cause"):
            in_root = True
        elif re.match(r"^\[\d+\]:$", line):
            current = {"root": in_root}
            failures.append(current)
        elif line.startswith("=" * 10):
            break
        elif current is not None and (m := AGENT_FIELD.match(line)) and m.group(1) not in current:
            key, value = m.groups()
            if key == "rank":
                r = re.match(r"(\d+)(?: \(local_rank: (\d+)\))?", value)
                if r:
                    current["rank"], current["local_rank"] = int(r.group(1)), int(r.group(2) or r.group(1))
            elif key == "exitcode":
                r = re.match(r"(-?\d+)(?: \(pid: (\d+)\))?", value)
                if r:
                    current["exitcode"], current["pid"] = int(r.group(1)), int(r.group(2)) if r.group(2) else None
            else:
                current["error_file"] = None if value.strip() == "<N/A>" else value.strip()
    return [f for f in failures if "rank" in f and "exitcode" in f]


def collect_failures(agent_lines: list[str], log_dir: Path, spec: LaunchSpec) -> list[dict]:
    """torchrun's failures with the message and traceback from each one's error file (only files of this run's log
    folder); without torchrun's report, the error files of this run's folder alone."""
    failures = parse_agent_failures(agent_lines)
    files = {str(p.resolve()): p for p in log_dir.rglob("error.json")}
    if not failures:  # torchrun could not report (killed itself?): what the workers wrote
        for path in files.values():
            local = int(path.parent.name) if path.parent.name.isdigit() else 0
            failures.append({"rank": spec.node_rank * spec.nproc + local, "local_rank": local, "exitcode": None,
                             "pid": None, "error_file": str(path), "root": False})
    for f in failures:
        f.update(message=None, traceback="")
        path = files.get(str(Path(f.get("error_file") or "/nonexistent").resolve()))
        if path is not None:
            try:
                data = read_json(path)["message"]
            except (CheckpointError, KeyError, TypeError):  # unreadable, not JSON, absurdly nested: no message
                data = None
            if isinstance(data, dict):
                f["message"] = str(data.get("message", ""))
                f["traceback"] = str((data.get("extraInfo") or {}).get("py_callstack", ""))
            elif data:
                f["message"] = str(data)
        if not f["message"]:
            name = _signal_name(f["exitcode"])
            f["message"] = (f"signal {name} ({SIGNAL_HINTS[name]})" if name in SIGNAL_HINTS else f"signal {name}"
                            if name else f"exit code {f['exitcode']}")
    return failures


STOP_SIGNALS = {"SIGTERM", "SIGINT", "SIGHUP"}  # how torchrun (or a user) stops a worker: a consequence, not a cause


def root_cause(failures: list[dict], times: dict[int, int], agent_root: int | None = None,
               raised: set[int] = frozenset()) -> dict | None:
    """The failure that came first: the earliest of the ranks whose time of failure tpcli measured (`times`: pid ->
    ns, `DeathWatch.times`; `raised`: the pids whose time is when their Python code raised); without any, torchrun's
    own pick; else the first listed.

    A rank that ended without Python raising, killed by a fatal signal (`FATAL_SIGNALS`: what the kernel or
    `kill -9` does, never torchrun's SIGTERM) or exiting non-zero from native code (`os._exit`), counts as failed
    SIGNAL_LAG_S before its death was seen: its sockets close as soon as it stops running, so a peer waiting in a
    collective raises at once, while the kernel reports the death only once the process's memory is torn down
    (7 ms for a 300 MB worker here; longer for a big one).

    A rank stopped by SIGTERM/SIGINT/SIGHUP (`STOP_SIGNALS`) without raising is never the root cause while another
    failed by itself: torchrun stops the survivors of a failure with SIGTERM. A root that raised and was stopped
    only afterwards (in its exit handlers, while torchrun ended the job) is reported as its exception: exit code 1,
    as Python exits on an uncaught exception, with `stopped_by` naming the signal."""
    def stopped(f: dict) -> bool:
        return _signal_name(f["exitcode"]) in STOP_SIGNALS and f.get("pid") not in raised and not f.get("traceback")

    failures = [f for f in failures if not stopped(f)] or failures
    timed = [f for f in failures if f.get("pid") in times]
    if timed:
        def failed_at(f: dict) -> int:
            abrupt = f["pid"] not in raised and (
                _signal_name(f["exitcode"]) in FATAL_SIGNALS or (f["exitcode"] or 0) > 0)
            return times[f["pid"]] - int(SIGNAL_LAG_S * 1e9 if abrupt else 0)

        root = min(timed, key=lambda f: (failed_at(f), f["rank"]))
    else:
        picked = [f for f in failures if f.get("root")] or [f for f in failures if f["rank"] == agent_root]
        root = (picked or failures or [None])[0]
    if root is not None and root.get("traceback") and _signal_name(root["exitcode"]) in STOP_SIGNALS:
        return {**root, "exitcode": 1, "stopped_by": _signal_name(root["exitcode"])}
    return root


def failure_report(failures: list[dict], root: dict | None, agent_lines: list[str]) -> list[str]:
    """Which rank failed first, with what exit code or signal, its traceback; then the ranks that failed after it."""
    if root is None:
        return ["tpcli run: torchrun failed before any worker reported an error:"] + [
            "  " + ln for ln in agent_lines[-15:]]
    name = _signal_name(root["exitcode"])
    if root["traceback"] or not (name or root["exitcode"]):
        code = f", exit code {root['exitcode']}" if root["exitcode"] and not name else (f", {name}" if name else "")
        after = f" (then stopped by {root['stopped_by']} as the job ended)" if root.get("stopped_by") else ""
        first = root["message"]
        if root["traceback"]:  # a multi-line message: its first line here, the rest ends the traceback below
            first = (first.strip().splitlines() or [""])[0]
        lines = [f"tpcli run: rank {root['rank']} failed{code}: {first}{after}"]
        lines += ["  " + ln for ln in user_frames(root["traceback"])[-16:]]
    elif name:
        hint = SIGNAL_HINTS.get(name, "no Python traceback")
        lines = [f"tpcli run: rank {root['rank']} failed with signal {name} ({hint})"]
    else:
        lines = [f"tpcli run: rank {root['rank']} failed with exit code {root['exitcode']} (no Python traceback: "
                 "exited via sys.exit/os._exit)"]
    for f in failures:
        if f["rank"] != root["rank"]:
            first = f["message"].strip().splitlines()[-1] if f["message"].strip() else ""
            lines.append(f"tpcli run: then rank {f['rank']} failed too: {first[:160]}")
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


def agent_root_cause(agent_lines: list[str]) -> int | None:
    """The rank torchrun names as the root cause (its "Root Cause" block)."""
    picked = [f["rank"] for f in parse_agent_failures(agent_lines) if f["root"]]
    return picked[0] if picked else None
