"""`tpcli run` against hostile numbers, pid files and module names (issue 34 items 6, 8, 9, 12): bounded work before
anything starts, each error named by its true source; the true root cause of a BaseException; no unrelated process
killed; `-m` checked before spawning."""

import json
import os
import subprocess
import sys
import time
import tracemalloc

import pytest
from conftest import base_env, run_main

from tpcli.commands import slurm
from tpcli.errors import UsageError

TPCLI = [sys.executable, "-m", "tpcli"]


def tpcli_run(*args, timeout=240, env=None, cwd=None):
    return subprocess.run([*TPCLI, "run", *map(str, args)], env=env or base_env(), capture_output=True, text=True,
                          timeout=timeout, cwd=cwd)


@pytest.fixture
def script(tmp_path):
    path = tmp_path / "s.py"
    path.write_text("")
    return path


def _one_usage_line(code, err, source):
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and source in lines[0], err
    return lines[0]


# --- item 6: sizes and ranks from flags ---------------------------------------------------------------------------

@pytest.mark.parametrize("args,source", [
    (["--cpu", 1, "--nnodes", 4000000, "--rdzv-endpoint", "h:1"], "--nnodes 4000000"),
    (["--cpu", 1, "--nnodes", "1" * 23, "--rdzv-endpoint", "h:1"], "--nnodes <a 23-digit number>"),
    (["--cpu", 100000], "--cpu 100000"),
    (["--gpus", 5000], "--gpus 5000"),
    (["--cpu", 1024, "--nnodes", 2000, "--rdzv-endpoint", "h:1"], "--cpu 1024 x --nnodes 2000"),
    (["--cpu", 1, "--node-rank", -1], "--node-rank -1"),
    (["--cpu", 1, "--node-rank", 1], "--node-rank 1"),
    (["--cpu", 1, "--nnodes", 2, "--node-rank", 2, "--rdzv-endpoint", "h:1"], "--node-rank 2"),
    (["--cpu", 1, "--nnodes", 2, "--rdzv-endpoint", "h:999999"], "--rdzv-endpoint h:999999"),
    (["--cpu", 1, "--nnodes", 2, "--rdzv-endpoint", "h:0"], "--rdzv-endpoint h:0"),
    (["--cpu", 2, "--ranks-filter", "²"], "--ranks-filter ²"),
])
def test_launch_sizes_and_ranks_are_checked_first(monkeypatch, capsys, script, args, source):
    """Were accepted: 40 s and 0.9 GB (--nnodes 4000000 --dry-run), an OverflowError traceback (23 digits), a
    rendezvous waiting for ever (--node-rank -1 or >= nnodes), a port torchrun cannot use; a ValueError traceback
    (--ranks-filter ², which str.isdigit accepts)."""
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    started = time.monotonic()
    code, _, err = run_main(monkeypatch, capsys, "run", *args, "--dry-run", script)
    _one_usage_line(code, err, source)
    assert time.monotonic() - started < 5


# --- item 6: SLURM's environment ----------------------------------------------------------------------------------

SLURM_ENV = {"SLURM_JOB_ID": "4242", "SLURM_JOB_NUM_NODES": "2", "SLURM_NODEID": "1",
             "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_GPUS_ON_NODE": "4"}


@pytest.mark.parametrize("env,source", [
    ({"SLURM_NODEID": "9"}, "SLURM_NODEID=9"),
    ({"MASTER_PORT": "999999"}, "MASTER_PORT=999999"),
    ({"SLURM_JOB_NUM_NODES": "4000000"}, "SLURM_JOB_NUM_NODES=4000000"),
    ({"SLURM_JOB_NUM_NODES": "9" * 30}, "SLURM_JOB_NUM_NODES="),
    ({"SLURM_GPUS_ON_NODE": "0"}, "SLURM_GPUS_ON_NODE=0"),
    ({"SLURM_GPUS_ON_NODE": "5000"}, "SLURM_GPUS_ON_NODE=5000"),
])
def test_slurm_values_are_checked_and_named_by_their_variable(monkeypatch, capsys, script, env, source):
    """Were passed to torchrun (SLURM_NODEID=9 of 2 nodes, MASTER_PORT=999999), or blamed on --gpus, a flag the user
    never gave (SLURM_GPUS_ON_NODE=0)."""
    monkeypatch.setenv("PATH", "/nonexistent")  # no scontrol
    for k, v in {**SLURM_ENV, **env}.items():
        monkeypatch.setenv(k, v)
    code, _, err = run_main(monkeypatch, capsys, "run", "--dry-run", script)
    lines = [ln for ln in err.strip().splitlines() if not ln.startswith("tpcli run: SLURM job")]
    assert code == 2 and len(lines) == 1 and source in lines[0] and "Error: --gpus" not in lines[0], err


def test_a_huge_nodelist_is_never_expanded(monkeypatch):
    """'node[0-999999]' built a million names (140 MB; 'node[0-9999999]' 1.4 GB) for its first host."""
    monkeypatch.setenv("PATH", "/nonexistent")
    env = {**SLURM_ENV, "SLURM_JOB_NODELIST": "node[0-999999],x[5-6]"}
    tracemalloc.start()
    try:
        assert slurm.from_env(env).rdzv_endpoint == "node0:29500"
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20, peak
    with pytest.raises(UsageError, match="1,000,002 hosts"):  # counted before any name is made
        slurm.expand_nodelist("node[0-999999],x[5-6]")
    assert slurm.expand_nodelist("a[09-10]b[1,3]") == ["a09b1", "a09b3", "a10b1", "a10b3"]


def _fake_scontrol(tmp_path, body):
    bindir = tmp_path / "bin"
    bindir.mkdir(exist_ok=True)
    fake = bindir / "scontrol"
    fake.write_text(f"#!/bin/sh\nPATH=/usr/bin:/bin\n{body}\n")
    fake.chmod(0o755)
    return bindir


def test_scontrol_is_called_only_when_needed_and_bounded(monkeypatch, tmp_path):
    """A hanging scontrol added 30 s to every run in an allocation, one node included; one printing without end
    was read to the end (all in memory)."""
    marker = tmp_path / "called"
    monkeypatch.setenv("PATH", str(_fake_scontrol(tmp_path, f"touch {marker}; sleep 60")))
    one_node = slurm.from_env({**SLURM_ENV, "SLURM_JOB_NUM_NODES": "1"})
    flags, _ = slurm.apply(one_node, gpus=None, cpu=None, nnodes=None, node_rank=None, rdzv_endpoint=None,
                           rdzv_id=None)
    assert flags["nnodes"] == 1 and flags["rdzv_endpoint"] is None and not marker.exists()
    given = slurm.from_env(SLURM_ENV)
    flags, _ = slurm.apply(given, gpus=None, cpu=None, nnodes=None, node_rank=None, rdzv_endpoint="h:1",
                           rdzv_id=None)
    assert flags["rdzv_endpoint"] == "h:1" and not marker.exists()  # --rdzv-endpoint given: no host needed
    monkeypatch.setattr(slurm, "SCONTROL_TIMEOUT_S", 1.0, raising=False)
    started = time.monotonic()
    assert slurm.from_env(SLURM_ENV).host == "gpu07"  # scontrol hung: the list's own first entry
    assert marker.exists() and time.monotonic() - started < 5
    monkeypatch.setenv("PATH", str(_fake_scontrol(tmp_path, "exec yes first-from-scontrol")))
    started = time.monotonic()
    assert slurm.from_env(SLURM_ENV).host == "first-from-scontrol"
    assert time.monotonic() - started < 5


# --- item 12: -m MODULE checked before spawning -------------------------------------------------------------------

def test_missing_module_is_refused_before_spawning(tmp_path, monkeypatch, capsys):
    """Was: the workers started and printed 54 lines of traceback per rank after 11 s. In-process (the real entry
    point): a run folder would be made under the test's own temporary folder."""
    import tempfile

    (tmp_path / "tmp").mkdir()
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))  # gettempdir() caches TMPDIR's first value
    monkeypatch.chdir(tmp_path)
    started = time.monotonic()
    code, _, err = run_main(monkeypatch, capsys, "run", "--cpu", 2, "-m", "no.such.module")
    line = _one_usage_line(code, err, "-m no.such.module")
    assert "no such module" in line and time.monotonic() - started < 10
    assert not list((tmp_path / "tmp").iterdir())  # no run folder: nothing started


def test_module_check_imports_parents_only(monkeypatch, capsys, tmp_path):
    """The module itself is never imported by the check (it may do anything at import); a parent package that fails
    to import, or a package without __main__, is refused in one line."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    marker = tmp_path / "imported"
    (tmp_path / "guardpkg34").mkdir()
    (tmp_path / "guardpkg34" / "__init__.py").write_text("")
    (tmp_path / "guardpkg34" / "job.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    (tmp_path / "guardbroken34").mkdir()
    (tmp_path / "guardbroken34" / "__init__.py").write_text("raise RuntimeError('broken package')\n")
    (tmp_path / "guardbroken34" / "job.py").write_text("")
    code, out, err = run_main(monkeypatch, capsys, "run", "--cpu", 1, "--dry-run", "-m", "guardpkg34.job")
    assert code == 0 and "bootstrap.py module guardpkg34.job" in out, err
    assert not marker.exists()
    for name, why in (("guardbroken34.job", "RuntimeError: broken package"), ("guardpkg34", "without __main__"),
                      ("guardpkg34.nope", "no such module"), ("a..b", "not a module name")):
        code, _, err = run_main(monkeypatch, capsys, "run", "--cpu", 1, "--dry-run", "-m", name)
        assert why in _one_usage_line(code, err, "-m ")


# --- item 9: pid files name workers, not whatever process a pid now is ---------------------------------------------

def test_malformed_pid_files_are_refused(tmp_path):
    from tpcli.commands.job_watch import is_worker, read_pid_file

    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        start = open(f"/proc/{sleeper.pid}/stat").read().rsplit(")", 1)[1].split()[19]
        for text in (str(sleeper.pid), "x", "", "²", f"{sleeper.pid} {start} 7", "1" * 70, f"-{sleeper.pid} {start}"):
            (tmp_path / "pid-0").write_text(text)
            assert read_pid_file(tmp_path / "pid-0") is None, text
        (tmp_path / "pid-0").write_text(f"{sleeper.pid} {start}")
        assert read_pid_file(tmp_path / "pid-0") == (sleeper.pid, start)
        assert not is_worker(sleeper.pid, start, tmp_path)  # right pid and start, but not started by this run
        assert not is_worker(sleeper.pid, str(int(start) + 1), tmp_path)  # a reused pid
    finally:
        sleeper.kill()
        sleeper.wait()


REWRITE_WORKER = """
import os, sys
run_dir = os.environ["TPCLI_RUN_DIR"]
bare, full = (int(x) for x in sys.argv[1:3])
start = open(f"/proc/{full}/stat").read().rsplit(")", 1)[1].split()[19]
open(os.path.join(run_dir, "pid-0"), "w").write(str(bare))  # a bare pid, as tpcli once wrote them
open(os.path.join(run_dir, "pid-5"), "w").write(f"{full} {start}")  # pid and the right start time
print("rewritten", flush=True)
"""


@pytest.mark.dist
def test_rewritten_pid_files_kill_nothing_unrelated(tmp_path):
    """`run` SIGKILLed whatever live pid RUN_DIR/pid-N named once the job ended."""
    script = tmp_path / "w.py"
    script.write_text(REWRITE_WORKER)
    sleepers = [subprocess.Popen(["sleep", "300"]) for _ in range(2)]
    try:
        proc = tpcli_run("--cpu", 1, script, sleepers[0].pid, sleepers[1].pid, timeout=120)
        assert proc.returncode == 0 and "rewritten" in proc.stdout, proc.stderr[-2000:]
        assert [s.poll() for s in sleepers] == [None, None]  # both still running
    finally:
        for s in sleepers:
            s.kill()
            s.wait()


# --- item 8: a BaseException is the root cause, with its traceback -------------------------------------------------

def test_a_rank_that_raised_is_preferred_over_one_that_was_stopped():
    from tpcli.commands.failure_report import failure_report, root_cause, root_json

    # rank 0 stopped by torchrun's SIGTERM without raising, its death seen before rank 1's raise was stamped
    stopped = {"rank": 0, "pid": 10, "exitcode": -15, "message": "signal SIGTERM", "traceback": ""}
    raised = {"rank": 1, "pid": 11, "exitcode": 1, "message": "CheckpointException: load", "traceback": "T"}
    assert root_cause([stopped, raised], {10: 5, 11: 9}, raised={11})["rank"] == 1
    assert root_cause([stopped, raised], {})["rank"] == 1
    # rank 1 raised, then torchrun stopped it in its exit handlers: its exception, exit code 1, not SIGTERM/143
    late = {**raised, "exitcode": -15}
    root = root_cause([stopped, late], {10: 50, 11: 9}, raised={11})
    assert root_json(root) == {"rank": 1, "exit_code": 1, "signal": None, "message": "CheckpointException: load"}
    assert failure_report([stopped, late], root, [])[0] == (
        "tpcli run: rank 1 failed, exit code 1: CheckpointException: load (then stopped by SIGTERM as the job ended)")


BASE_EXCEPTION_WORKER = """
import os, time, torch, torch.distributed as dist
from datetime import timedelta
from torch.distributed.checkpoint.api import CheckpointException
dist.init_process_group("gloo", timeout=timedelta(seconds=float(os.environ["TPCLI_TIMEOUT"])))
if dist.get_rank() == 1:
    time.sleep(0.5)
    raise CheckpointException("load_state", {1: (ValueError("BROKEN shard on rank 1"), None)})
t = torch.ones(1)
dist.all_reduce(t)  # rank 0 waits here for rank 1
"""


@pytest.mark.dist
def test_a_base_exception_is_reported_with_its_traceback(tmp_path):
    """Was "rank 1 failed with exit code 1 (no Python traceback: exited via sys.exit/os._exit)", or, when rank 1 was
    stopped while exiting, --json root_cause signal SIGTERM and exit 143: torch's `record` writes the error file of
    an Exception only, and DCP's CheckpointException is a BaseException."""
    script = tmp_path / "w.py"
    script.write_text(BASE_EXCEPTION_WORKER)
    proc = tpcli_run("--cpu", 2, "--json", script, env={**base_env(), "TPCLI_TIMEOUT": "20"})
    doc = json.loads(proc.stdout)
    summary = [ln for ln in proc.stderr.splitlines() if ln.startswith("tpcli run: rank")]
    assert summary and summary[0].startswith("tpcli run: rank 1 failed, exit code 1: CheckpointException"), \
        proc.stderr[-3000:]
    assert "no Python traceback" not in proc.stderr and "  ValueError: BROKEN shard on rank 1" in proc.stderr
    assert 'raise CheckpointException("load_state"' in proc.stderr  # the user's frame
    assert proc.returncode == 1 and doc["root_cause"]["rank"] == 1 and doc["root_cause"]["exit_code"] == 1
    assert doc["root_cause"]["signal"] is None and "CheckpointException" in doc["root_cause"]["message"]
    assert os.path.isdir(doc["log_dir"])  # kept for the failure
