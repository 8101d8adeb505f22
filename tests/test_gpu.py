"""The CUDA path, checked on real GPUs (`make gpu-check`); every test here is skipped on a machine without one.

The oracle is the same as on the CPU: the plain single-process model, run on the CPU. Tolerances: fp32 on a GPU
differs from the CPU only in reduction order (TF32 matmuls are off by default in torch), 1e-4; bf16, 5e-2 (as
`tpcli verify --numerics` uses).
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from conftest import INPUT_IDS, base_env, single_process_logits
from test_loading_device import _jobs, sharded  # noqa: F401 - `sharded` is a fixture used below

from tpcli.commands.shard import shard_checkpoint
from tpcli.runtime.loading import _SliceReader

GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(GPUS < 1, reason="no CUDA GPU visible")]
two_gpus = pytest.mark.skipif(GPUS < 2, reason="needs 2 CUDA GPUs")
TOL = {"float32": 1e-4, "bfloat16": 5e-2}

# Runs under `tpcli run --gpus N --model PATH`: where every tensor of the model lives, and (rank 0) logits/tokens.
WORKER = f"""
import itertools, json, os, sys
from pathlib import Path
import torch
import tpcli

out, dtype = Path(sys.argv[1]), (sys.argv[2] if len(sys.argv) > 2 else None)
model = tpcli.load_model(dtype=dtype)
rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
tensors = itertools.chain(model.parameters(), model.buffers())
devices = sorted({{str(getattr(t, "_local_tensor", t).device) for t in tensors}})
ids = torch.tensor({INPUT_IDS!r}, device=model.device)
with torch.no_grad():
    logits = model(ids).logits
    tokens = model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0)
(out / f"rank{{rank}}.json").write_text(json.dumps({{"devices": devices, "local_rank": os.environ["LOCAL_RANK"],
                                                   "bytes_read": getattr(model, "tpcli_bytes_read", None)}}))
if rank == 0:
    torch.save(logits.cpu(), out / "logits.pt")
    torch.save(tokens.cpu(), out / "tokens.pt")
"""


def tpcli(*args, timeout=300) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "tpcli", *map(str, args)], env=base_env(), capture_output=True,
                          text=True, timeout=timeout)
    if proc.returncode:
        raise AssertionError(f"tpcli {args[0]} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def _run_worker(tmp_path, gpus: int, model, dtype: str):
    script = tmp_path / "gpu_worker.py"
    script.write_text(WORKER)
    out = tmp_path / f"out-{gpus}-{model.name}-{dtype}"
    out.mkdir()
    tpcli("run", "--gpus", gpus, "--model", model, script, out, dtype)
    reports = [json.loads((out / f"rank{r}.json").read_text()) for r in range(gpus)]
    return reports, torch.load(out / "logits.pt"), torch.load(out / "tokens.pt")


def _check_against_cpu(src, reports, logits, tokens, dtype: str):
    for rep in reports:  # every parameter and buffer on this rank's own GPU, none left on the CPU or GPU 0
        assert rep["devices"] == [f"cuda:{rep['local_rank']}"], rep
    ref_logits, ref_tokens = single_process_logits(src, dtype=getattr(torch, dtype))
    assert logits.dtype == ref_logits.dtype
    assert (logits.float() - ref_logits.float()).abs().max().item() <= TOL[dtype]
    if dtype == "float32":
        assert torch.equal(tokens, ref_tokens)


@pytest.mark.parametrize("name", ["qwen3", "mixtral"])
def test_staged_reader_fills_cuda_tensors_with_the_direct_paths_bytes(sharded, name):  # noqa: F811
    """The fast loader's device branch on a real GPU: pinned staging, non_blocking copies, events, buffer reuse."""
    _, folder, doc, placements = sharded(name)
    for rank in range(2):
        for dtype in (None, torch.bfloat16):
            host, device = _SliceReader(folder), _SliceReader(folder)
            pairs = []
            for tname, entry, dim, runs, shape in _jobs(doc, placements, rank):
                stored = getattr(torch, entry["dtype"])
                expect = torch.empty(shape, dtype=stored)
                host.read_into(expect, tname, entry, dim, runs)
                target = torch.empty(shape, dtype=dtype or stored, device="cuda")
                device.read_into(target, tname, entry, dim, runs)
                pairs.append((tname, target, expect.to(target.dtype)))
            device.finish()  # only now: the copies overlapped the reads and the two buffers were reused throughout
            for tname, target, expect in pairs:
                assert torch.equal(target.cpu(), expect), (rank, tname)
            assert device.bytes_read == host.bytes_read


def test_run_gpus_1_load_model_and_examples(model_dirs, tmp_path):
    """`tpcli run --gpus 1`: load_model puts the model on cuda:0; the shipped examples run on the GPU."""
    src = model_dirs("qwen3")
    for dtype in ("float32", "bfloat16"):
        _check_against_cpu(src, *_run_worker(tmp_path, 1, src, dtype), dtype)
    prompt = ("--prompt", "Tensor parallel", "--max-new-tokens", "8")
    gpu = tpcli("run", "--gpus", 1, "--model", src, "-m", "tpcli.examples.generate", *prompt).stdout
    cpu = tpcli("run", "--cpu", 1, "--model", src, "-m", "tpcli.examples.generate", *prompt).stdout
    tokens = [line.split("tokens:", 1)[1] for line in gpu.splitlines() if "tokens:" in line]
    assert tokens and tokens == [line.split("tokens:", 1)[1] for line in cpu.splitlines() if "tokens:" in line]
    tpcli("run", "--gpus", 1, "-m", "tpcli.examples.compare_logits", src, src)


@two_gpus
def test_tp2_fast_path_on_cuda_matches_the_cpu_model(model_dirs, tmp_path):
    """load_model on a tp=2 tpcli folder on 2 GPUs (the pre-sharded fast path) equals the CPU single-process model."""
    for name in ("qwen3", "mixtral"):
        src = model_dirs(name)
        folder = tmp_path / f"{name}-tp2"
        shard_checkpoint(str(src), tp=2, out=str(folder))
        for dtype in ("float32", "bfloat16"):
            reports, logits, tokens = _run_worker(tmp_path, 2, folder, dtype)
            assert all(rep["bytes_read"] for rep in reports)  # the fast path ran (transformers' load sets none)
            _check_against_cpu(src, reports, logits, tokens, dtype)
    gen = tpcli("run", "--gpus", 2, "--model", tmp_path / "qwen3-tp2", "-m", "tpcli.examples.generate").stdout
    assert "tokens:" in gen


@two_gpus
def test_verify_numerics_on_gpus(model_dirs):
    result = json.loads(tpcli("verify", model_dirs("qwen3"), "--tp", 2, "--numerics", "--gpus", "--json").stdout)
    assert result["ok"] and result["numerics"]["world_size"] == 2, result
