"""Which device a worker binds (issue 28 item 5): the bootstrap of every `tpcli run` worker calls
`bind_local_device` before the user's script, and `start_process_group` binds the same device before the process
group exists. The rule is `local_device`: the accelerator at LOCAL_RANK when torch finds one, the CPU otherwise
(`run --cpu` hides the GPUs). The binding itself (`torch.accelerator.set_device_index`) needs a GPU: it is checked by
tests/test_gpu.py::test_bootstrap_binds_local_rank_before_the_script under `make gpu-check`.
"""

from __future__ import annotations

import pytest
import torch

from tpcli.runtime.process_group import bind_local_device, local_device


@pytest.mark.parametrize("local_rank", ["0", "3"])
def test_gpu_jobs_bind_the_local_rank_and_cpu_jobs_nothing(monkeypatch, local_rank):
    monkeypatch.setenv("LOCAL_RANK", local_rank)
    assert local_device("cuda") == torch.device("cuda", int(local_rank))
    assert local_device("xpu") == torch.device("xpu", int(local_rank))
    assert local_device("cpu") == torch.device("cpu")
    assert local_device("mps") == torch.device("cpu")  # transformers' TP mesh falls back to the CPU on MPS


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU side; on a GPU, test_gpu.py checks the binding")
def test_a_cpu_worker_binds_nothing(monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert bind_local_device() == torch.device("cpu")
    assert not torch.cuda.is_initialized()
