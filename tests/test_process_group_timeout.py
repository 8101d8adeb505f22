"""The job's process-group timeout (issue 28 item 4): tpcli creates the group before transformers would, so it
gives it transformers' own timeout (2 hours, sized for sharded loading), unless TPCLI_TIMEOUT says otherwise.

The oracle is transformers' `_ensure_torch_distributed`, the group it makes when none exists, read back from
torch (`ProcessGroup._get_backend(device).options._timeout`) in a fresh one-rank gloo job.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys

import pytest
from conftest import base_env

from tpcli.errors import UsageError
from tpcli.runtime.process_group import process_group_timeout

PROBE = """
import json, os, sys
import torch, torch.distributed as dist

def timeout():
    seconds = dist.distributed_c10d._get_default_group()._get_backend(torch.device("cpu")).options._timeout
    dist.destroy_process_group()
    return seconds.total_seconds()

from transformers.distributed.utils import _ensure_torch_distributed
_ensure_torch_distributed("cpu")
theirs = timeout()
from tpcli.runtime.process_group import start_process_group
start_process_group()
print(json.dumps({"transformers": theirs, "tpcli": timeout()}))
"""


def _probe(**env) -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**base_env(), "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(port), "CUDA_VISIBLE_DEVICES": "", **env}
    proc = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.splitlines()[-1])


@pytest.mark.e2e
def test_tpcli_group_has_transformers_timeout_unless_tpcli_timeout_is_set(monkeypatch):
    monkeypatch.delenv("TPCLI_TIMEOUT", raising=False)
    assert _probe() == {"transformers": 7200.0, "tpcli": 7200.0}
    assert _probe(TPCLI_TIMEOUT="42.5") == {"transformers": 7200.0, "tpcli": 42.5}


@pytest.mark.parametrize("text", ["abc", "0", "-5", "inf", "nan", "", "1e300", "10000001"])
def test_a_bad_tpcli_timeout_is_a_usage_error_naming_the_variable(monkeypatch, text):
    monkeypatch.setenv("TPCLI_TIMEOUT", text)
    with pytest.raises(UsageError, match="TPCLI_TIMEOUT="):
        process_group_timeout()


def test_default_is_two_hours(monkeypatch):
    monkeypatch.delenv("TPCLI_TIMEOUT", raising=False)
    assert process_group_timeout() == 7200.0
    monkeypatch.setenv("TPCLI_TIMEOUT", "90")
    assert process_group_timeout() == 90.0
