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
