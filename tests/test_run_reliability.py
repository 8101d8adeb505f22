"""`tpcli run` under stress (issue 23 items 4, 6, 7, 8; usage errors; `run --json`): real torchrun workers on CPU."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import base_env, run_main

from tpcli.commands.shard import shard_checkpoint

TPCLI = [sys.executable, "-m", "tpcli"]


def tpcli_run(*args, timeout=240, env=None):
    return subprocess.run([*TPCLI, "run", *map(str, args)], env=env or base_env(), capture_output=True, text=True,
                          timeout=timeout)


OVERWRITE_WORKER = """
import json, os, sys, torch, torch.distributed as dist, tpcli
m = tpcli.load_model()
ids = torch.tensor([[1, 17, 256, 3, 999, 42, 7, 512]])

def logits():
    with torch.no_grad():
        return m(ids).logits

first = logits()
files = sorted(p for p in os.listdir(os.environ["TPCLI_MODEL"]) if p.endswith(".safetensors"))
dist.barrier()
if dist.get_rank() == 0:  # every rank file changed in place, as `cp other/* here/` does: same inode, new bytes
    for name in files:
        path = os.path.join(os.environ["TPCLI_MODEL"], name)
        data = bytearray(open(path, "rb").read())
        start = 8 + int.from_bytes(data[:8], "little")
        data[start:] = bytes(b ^ 0x5A for b in data[start:])
        with open(path, "r+b") as f:
            f.write(data)
dist.barrier()
overwritten = logits()
dist.barrier()
if dist.get_rank() == 0:
    for name in files:
        os.truncate(os.path.join(os.environ["TPCLI_MODEL"], name), 0)
dist.barrier()
truncated = logits()
print("RESULT " + json.dumps({"overwritten": torch.equal(first, overwritten),
                              "truncated": torch.equal(first, truncated)}), flush=True)
"""


@pytest.mark.dist
def test_rank_files_changed_under_a_running_job_do_not_change_its_numbers(model_dirs, tmp_path):
    """Issue 23 item 4: the loaded model's numbers never depend on the files after load_model returned (they did
    when parameters were views of a private mapping of the rank files: new logits after `cp`, SIGBUS after
    `truncate`)."""
    folder = tmp_path / "s"
    shard_checkpoint(str(model_dirs("qwen3")), tp=2, out=str(folder))
    script = tmp_path / "w.py"
    script.write_text(OVERWRITE_WORKER)
    proc = tpcli_run("--cpu", 2, "--model", folder, script)
    results = [json.loads(line.split("RESULT ", 1)[1]) for line in proc.stdout.splitlines() if "RESULT " in line]
    assert proc.returncode == 0 and len(results) == 2, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert all(r == {"overwritten": True, "truncated": True} for r in results), results


# --- the failure report (issue 23 item 6): parser on recorded torchrun output, then end to end ---------------------

DATA = Path(__file__).parent / "data" / "torchrun"  # real torchrun (torch 2.13) stderr, tpcli's torchrun command line
# and bootstrap, SIGNAL_WORKER below (no sleep after all_reduce): rank N killed itself while the other waited in all_reduce


def _recorded(name: str) -> list[str]:
    return (DATA / f"{name}.stderr").read_text().splitlines()


@pytest.mark.parametrize("name,dead,sig,other", [("rank0-sigkill", 0, -9, 1), ("rank1-sigkill", 1, -9, 0),
                                                 ("rank0-sigbus", 0, -7, 1)])
def test_parser_names_the_signalled_rank_over_the_consequence(name, dead, sig, other, tmp_path):
    """torchrun lists both ranks; the one killed by the signal failed first even when the other's exception was
    stamped a few ms before the kernel reported the death (what the old report got wrong: it took error files over
    torchrun's list and named the rank that died of "Connection closed by peer")."""
    from tpcli.commands.failure_report import collect_failures, failure_report, parse_agent_failures, root_cause
    from tpcli.commands.run import LaunchSpec

    lines = _recorded(name)
    parsed = {f["rank"]: f for f in parse_agent_failures(lines)}
    assert sorted(parsed) == [0, 1] and parsed[dead]["exitcode"] == sig and parsed[other]["exitcode"] == -15
    assert parsed[dead]["root"] and not parsed[other]["root"] and parsed[dead]["error_file"] is None
    assert parsed[other]["error_file"].endswith(f"attempt_0/{other}/error.json")
    failures = collect_failures(lines, tmp_path, LaunchSpec(script="x.py", cpu=2))
    by_rank = {f["rank"]: f for f in failures}
    death = 1_000_000_000_000
    times = {by_rank[dead]["pid"]: death, by_rank[other]["pid"]: death - 7_000_000}  # measured: 7 ms
    raised = {by_rank[other]["pid"]}  # its Python code raised (bootstrap's stamp)
    root = root_cause(failures, times, raised=raised)
    assert root["rank"] == dead
    signame = {-9: "SIGKILL", -7: "SIGBUS"}[sig]
    report = failure_report(failures, root, lines)
    assert report[0].startswith(f"tpcli run: rank {dead} failed with signal {signame} (")
    assert f"rank {other} failed too" in report[1]
    # without tpcli's timings: torchrun's own pick; an exception stamped 3 s earlier is the root cause
    assert root_cause(failures, {})["rank"] == dead
    assert root_cause(failures, {**times, by_rank[other]["pid"]: death - 3_000_000_000}, raised=raised)["rank"] == other


def test_a_native_exit_counts_before_the_exception_it_caused():
    """os._exit(3) on rank 0 (no Python exception, no stamp) seen dead 7 ms after rank 1 raised "Connection closed
    by peer": rank 0 is the root cause; had rank 0 raised (stamped) after rank 1, rank 1 would be."""
    from tpcli.commands.failure_report import root_cause

    failures = [{"rank": 0, "pid": 10, "exitcode": 3}, {"rank": 1, "pid": 11, "exitcode": 1}]
    times = {10: 1_000_007_000_000, 11: 1_000_000_000_000}
    assert root_cause(failures, times, raised={11})["rank"] == 0
    assert root_cause(failures, times, raised={10, 11})["rank"] == 1


def test_parser_ignores_a_report_without_failures():
    from tpcli.commands.failure_report import parse_agent_failures

    assert parse_agent_failures(["W1205 something", "Traceback (most recent call last):", "  x"]) == []


SIGNAL_WORKER = """
import os, signal, time, torch, torch.distributed as dist
from datetime import timedelta
dist.init_process_group("gloo", timeout=timedelta(seconds=60))
if dist.get_rank() == {dead}:
    time.sleep(1)
    os.kill(os.getpid(), signal.{sig})
t = torch.ones(1)
dist.all_reduce(t)
time.sleep(30)
"""


@pytest.mark.dist
@pytest.mark.parametrize("dead,sig", [(0, "SIGKILL"), (1, "SIGBUS")])
def test_first_rank_to_die_of_a_signal_is_named(tmp_path, dead, sig):
    """Issue 23 item 6, end to end: was "rank 1 failed: RuntimeError: Connection closed by peer", exit 137."""
    script = tmp_path / "die.py"
    script.write_text(SIGNAL_WORKER.replace("{dead}", str(dead)).replace("{sig}", sig))
    proc = tpcli_run("--cpu", 2, "--log-dir", tmp_path / "logs", script)
    summary = [ln for ln in proc.stderr.splitlines() if ln.startswith("tpcli run: rank")]
    assert summary and summary[0].startswith(f"tpcli run: rank {dead} failed with signal {sig}"), proc.stderr[-3000:]
    assert proc.returncode == 128 + getattr(signal, sig)


# --- a reused --log-dir (issue 23 item 7) -------------------------------------------------------------------------

@pytest.mark.dist
def test_reused_log_dir_reports_this_runs_error(tmp_path):
    """A previous run's error file in --log-dir was reported instead of the new failure ("OLD failure")."""
    logs = tmp_path / "logs"
    old = logs / "tpcli_old" / "attempt_0" / "0"
    old.mkdir(parents=True)
    (old / "error.json").write_text(json.dumps({"message": {"message": "RuntimeError: OLD failure from yesterday",
                                                            "extraInfo": {"py_callstack": "", "timestamp": "1"}}}))
    script = tmp_path / "fail.py"
    script.write_text("raise RuntimeError('NEW failure')\n")
    for _ in range(2):  # twice into the same folder: each run reports its own
        proc = tpcli_run("--cpu", 1, "--log-dir", logs, script)
        assert proc.returncode == 1 and "OLD failure" not in proc.stderr, proc.stderr[-2000:]
        assert "tpcli run: rank 0 failed, exit code 1: RuntimeError: NEW failure" in proc.stderr
    runs = sorted(p for p in logs.iterdir() if p.name.startswith("run-"))
    assert len(runs) == 2 and all(f"per-rank logs in {r}" in proc.stderr or r != runs[-1] for r in runs)


# --- nothing outlives `tpcli run` (issue 23 item 8) -----------------------------------------------------------------

GRANDCHILD_WORKER = """
import os, subprocess, sys, time
child = subprocess.Popen(["sleep", "777"], start_new_session=True)  # its own session: not in any process group of ours
print("ready", os.getpid(), child.pid, flush=True)
time.sleep(300)
"""


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie is dead
    except OSError:
        return False


def _tree(root: int) -> set[int]:
    """Every process below `root` (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/stat") as f:
                children.setdefault(int(f.read().rsplit(")", 1)[1].split()[1]), []).append(int(entry))
        except OSError:
            continue
    out, todo = set(), [root]
    while todo:
        for child in children.get(todo.pop(), []):
            out.add(child)
            todo.append(child)
    return out


@pytest.mark.dist
@pytest.mark.parametrize("how", ["SIGKILL", "SIGTERM", "exit"])
def test_no_descendant_outlives_tpcli_run(tmp_path, how):
    """`kill -KILL <tpcli>` left each worker's `sleep 777` alive under PID 1 and /tmp/tpcli-run-* behind."""
    script = tmp_path / "w.py"
    script.write_text(GRANDCHILD_WORKER if how != "exit" else GRANDCHILD_WORKER.replace("time.sleep(300)", ""))
    env = {**base_env(), "TMPDIR": str(tmp_path)}  # where tpcli's run folder goes
    proc = subprocess.Popen([*TPCLI, "run", "--cpu", "2", str(script)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    pids: set[int] = set()
    deadline = time.monotonic() + 120
    while len(pids) < 4 and time.monotonic() < deadline:
        line = proc.stdout.readline()
        if "ready" in line:
            pids.update(int(x) for x in line.split()[-2:])
    everything = pids | _tree(proc.pid)  # supervisor, torchrun, workers, sleeps
    assert len(pids) == 4 and pids <= everything, (pids, everything)
    if how != "exit":
        proc.send_signal(getattr(signal, how))
    proc.wait(timeout=60)
    deadline = time.monotonic() + 30
    while any(_alive(p) for p in everything) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [p for p in everything if _alive(p)]
    deadline = time.monotonic() + 10
    while list(tmp_path.glob("tpcli-run-*")) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not list(tmp_path.glob("tpcli-run-*"))


# --- usage errors before anything starts -------------------------------------------------------------------------

@pytest.mark.parametrize("args,flag", [(["--tee", "abc"], "--tee abc"), (["--ranks-filter", "x"], "--ranks-filter x"),
                                       (["--ranks-filter", "2"], "--ranks-filter 2"),
                                       (["--max-restarts", "-1"], "--max-restarts -1"),
                                       (["--log-dir", "/etc/passwd"], "--log-dir /etc/passwd"),
                                       (["--log-dir", "/etc/passwd/sub"], "--log-dir /etc/passwd/sub")])
def test_bad_run_flags_are_usage_errors_before_anything_starts(tmp_path, monkeypatch, capsys, args, flag):
    """Was torchrun's traceback (exit 1) with the log folder kept, or a FileExistsError leaving /tmp/tpcli-run-*.
    In-process (the real entry point, its error rendering included): the run folder would be made here, under the
    test's own temporary folder, and a spawned worker would write the marker."""
    import tempfile

    marker = tmp_path / "spawned"
    script = tmp_path / "s.py"
    script.write_text(f"open({str(marker)!r}, 'w').write('x')\n")
    (tmp_path / "tmp").mkdir()
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))  # gettempdir() caches TMPDIR's first value
    code, out, err = run_main(monkeypatch, capsys, "run", "--cpu", 2, *args, script)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and flag in lines[0] and not out, err
    assert not marker.exists() and not list((tmp_path / "tmp").iterdir())


# --- run --json (issue 27 item 3) ---------------------------------------------------------------------------------

@pytest.mark.dist
def test_run_json_ends_with_one_object_and_workers_print_to_stderr(tmp_path):
    script = tmp_path / "w.py"
    script.write_text("import os, sys\nprint('hello from', os.environ['RANK'], flush=True)\n"
                      "sys.exit(3 if os.environ['RANK'] == '1' else 0)\n")
    proc = tpcli_run("--cpu", 2, "--json", script)
    doc = json.loads(proc.stdout)  # stdout holds the JSON object only
    assert proc.returncode == 3 and doc["exit_code"] == 3 and doc["ok"] is False
    assert doc["root_cause"]["rank"] == 1 and doc["root_cause"]["exit_code"] == 3
    assert {r["rank"]: r["exit_code"] for r in doc["ranks"]}[1] == 3
    assert doc["log_dir"] and os.path.isdir(doc["log_dir"]) and doc["duration_s"] > 0
    assert "[rank0]:hello from 0" in proc.stderr
    script.write_text("print('fine', flush=True)\n")
    proc = tpcli_run("--cpu", 2, "--json", script)
    doc = json.loads(proc.stdout)
    assert proc.returncode == 0 and doc["ok"] and doc["root_cause"] is None and doc["log_dir"] is None
    assert [(r["rank"], r["exit_code"], r["signal"]) for r in doc["ranks"]] == [(0, 0, None), (1, 0, None)]
