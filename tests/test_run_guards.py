"""`tpcli run` against hostile numbers, pid files and module names (issue 34 items 6, 8, 9, 12): bounded work before
anything starts, each error named by its true source; the true root cause of a BaseException; no unrelated process
killed; `-m` checked before spawning."""

import json
import os
import signal
import subprocess
import sys

import pytest
from conftest import base_env

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
    assert signal.SIGTERM and os.path.isdir(doc["log_dir"])
