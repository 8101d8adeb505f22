"""`verify --numerics` on a model whose single-process reference takes longer than the job's process-group timeout.

Rank 0 loads and runs the reference after the TP forward; on a multi-GB model that takes longer than any
collective timeout. The other ranks must survive the wait (issue 28 item 2): shown here with 2 gloo workers, a
process-group timeout of TIMEOUT_S (TPCLI_TIMEOUT, as `verify --numerics` passes it on) and a reference slowed down
by DELAY_S > TIMEOUT_S (the test's own worker script wraps `numerics._reference`; tpcli has no test hook).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import base_env

from tpcli.runtime import numerics

TIMEOUT_S, DELAY_S = 8, 20  # the job's process-group timeout; how long the reference is made to take on top

WORKER = """
import sys, time
from tpcli.runtime import numerics

delay = float(sys.argv.pop())
real = numerics._reference


def slow(model, ids):
    time.sleep(delay)  # rank 0 only: the other ranks are waiting meanwhile
    return real(model, ids)


numerics._reference = slow
numerics.main()
"""


@pytest.mark.dist
def test_waiting_ranks_outlive_the_process_group_timeout(model_dirs, tmp_path):
    """Fails on the old worker (ranks 1..N-1 in a barrier of the job's group): gloo's barrier times out after
    TIMEOUT_S while rank 0 sleeps DELAY_S, and that rank exits non-zero."""
    script = tmp_path / "slow_reference.py"
    script.write_text(WORKER)
    out = tmp_path / "numerics.json"
    env = {**base_env(), "TPCLI_TIMEOUT": str(TIMEOUT_S)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(script),
           str(model_dirs("qwen3")), str(out), str(DELAY_S)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(out.read_text())
    assert result["world_size"] == 2 and result["tokens_equal"], result
    assert result["backend"] == "gloo" and result["devices"] == ["cpu", "cpu"], result
    assert result["logits"]["max_abs"] <= 1e-5, result["logits"]


def test_reference_runs_on_every_core_of_the_process():
    """torchrun gives each worker OMP_NUM_THREADS=1; the reference runs with the cores the process may use."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with numerics.all_cores():
            assert torch.get_num_threads() == len(os.sched_getaffinity(0))
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
