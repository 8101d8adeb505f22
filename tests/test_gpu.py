"""The CUDA path, checked on real GPUs (`make gpu-check`); every test here is skipped on a machine without one.

The oracle is the same as on the CPU: the plain single-process model, run on the CPU. Tolerances: fp32 on a GPU
differs from the CPU only in reduction order (TF32 matmuls are off by default in torch), 1e-4; bf16, 5e-2 (as
`tpcli verify --numerics` uses).

`make gpu-check` runs these with `pytest -s`: each test prints lines starting "gpu-check:" that say what it proved
(the devices every rank's tensors were on, the process group's backend, bytes read, the max logit error against
the CPU model), so its output can be read as evidence. Every check of a device or backend would fail on CPU workers.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch
from conftest import INPUT_IDS, base_env, single_process_logits
from test_loading_device import _jobs, sharded  # noqa: F401 - `sharded` is a fixture used below
from test_numerics_wait import DELAY_S, TIMEOUT_S
from test_numerics_wait import WORKER as SLOW_REFERENCE_WORKER

from tpcli.commands.shard import shard_checkpoint
from tpcli.formats.staging import STAGING_CHUNK, staging_spans
from tpcli.runtime.fast_load import SliceReader

GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(GPUS < 1, reason="no CUDA GPU visible")]
two_gpus = pytest.mark.skipif(GPUS < 2, reason="needs 2 CUDA GPUs")
four_gpus = pytest.mark.skipif(GPUS < 4, reason="needs 4 CUDA GPUs (tp=2 x fsdp=2)")
TOL = {"float32": 1e-4, "bfloat16": 5e-2}
MiB = 2**20

# Runs under `tpcli run --gpus N --model PATH`: where every tensor of the model lives, the process group's backend,
# and (rank 0) logits/tokens.
WORKER = f"""
import itertools, json, os, sys
from pathlib import Path
import torch
import tpcli

out, dtype = Path(sys.argv[1]), (sys.argv[2] if len(sys.argv) > 2 else None)
model = tpcli.load_model(dtype=dtype)
dist = torch.distributed
rank = dist.get_rank() if dist.is_initialized() else 0
tensors = itertools.chain(model.parameters(), model.buffers())
devices = sorted({{str(getattr(t, "_local_tensor", t).device) for t in tensors}})
ids = torch.tensor({INPUT_IDS!r}, device=model.device)
with torch.no_grad():
    logits = model(ids).logits
    tokens = model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0)
(out / f"rank{{rank}}.json").write_text(json.dumps({{
    "devices": devices, "local_rank": os.environ["LOCAL_RANK"], "current_device": torch.cuda.current_device(),
    "backend": str(dist.get_backend()) if dist.is_initialized() else None,
    "bytes_read": getattr(model, "tpcli_bytes_read", None)}}))
if rank == 0:
    torch.save(logits.cpu(), out / "logits.pt")
    torch.save(tokens.cpu(), out / "tokens.pt")
"""

# Runs under `tpcli run --gpus N` before anything of tpcli's: which GPU the user's first CUDA work lands on.
FIRST_CUDA_WORK = """
import json, os, sys
import torch

x = torch.ones(1, device="cuda")  # no index: the current device
with open(os.path.join(sys.argv[1], f"rank{os.environ['RANK']}.json"), "w") as f:
    json.dump({"local_rank": int(os.environ["LOCAL_RANK"]), "current": torch.cuda.current_device(),
               "tensor": str(x.device)}, f)
"""


def say(line: str) -> None:
    print(f"gpu-check: {line}", flush=True)


def tpcli(*args, timeout=300, env=None) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "tpcli", *map(str, args)], env={**base_env(), **(env or {})},
                          capture_output=True, text=True, timeout=timeout)
    if proc.returncode:
        raise AssertionError(f"tpcli {args[0]} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def _run_worker(tmp_path, gpus: int, model, dtype: str, *flags):
    script = tmp_path / "gpu_worker.py"
    script.write_text(WORKER)
    out = tmp_path / f"out-{gpus}-{model.name}-{dtype}-{len(flags)}"
    out.mkdir()
    tpcli("run", "--gpus", gpus, *flags, "--model", model, script, out, dtype)
    reports = [json.loads((out / f"rank{r}.json").read_text()) for r in range(gpus)]
    return reports, torch.load(out / "logits.pt"), torch.load(out / "tokens.pt")


def _check_against_cpu(src, reports, logits, tokens, dtype: str, what: str) -> None:
    for rep in reports:  # every parameter and buffer on this rank's own GPU, none left on the CPU or GPU 0
        assert rep["devices"] == [f"cuda:{rep['local_rank']}"], rep
        assert rep["current_device"] == int(rep["local_rank"]), rep
    world = len(reports)
    backends = {rep["backend"] for rep in reports}
    assert backends == ({"nccl"} if world > 1 else {None}), backends  # world 1: no process group at all
    ref_logits, ref_tokens = single_process_logits(src, dtype=getattr(torch, dtype))
    assert logits.dtype == ref_logits.dtype
    err = (logits.float() - ref_logits.float()).abs().max().item()
    tokens_equal = torch.equal(tokens, ref_tokens)
    read = [rep["bytes_read"] for rep in reports]
    say(f"{what} {dtype}: devices {[rep['devices'][0] for rep in reports]}, backend {backends.pop()}, "
        f"bytes read per rank {read}, max |logits - CPU model| {err:.3g} (tol {TOL[dtype]:g}), "
        f"greedy tokens {'equal' if tokens_equal else 'differ'}")
    assert err <= TOL[dtype]
    if dtype == "float32":
        assert tokens_equal


@two_gpus
def test_bootstrap_binds_local_rank_before_the_script(tmp_path):
    """Issue 28 item 5: CUDA work done before `load_model` lands on cuda:LOCAL_RANK (it landed on cuda:0 in every rank
    before the bootstrap bound the device)."""
    script = tmp_path / "first_cuda_work.py"
    script.write_text(FIRST_CUDA_WORK)
    n = min(GPUS, 4)
    tpcli("run", "--gpus", n, script, tmp_path)
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(n)]
    say(f"bootstrap: first CUDA tensor of each rank on {[r['tensor'] for r in reports]}")
    for rep in reports:
        assert rep["current"] == rep["local_rank"] and rep["tensor"] == f"cuda:{rep['local_rank']}", rep


@pytest.mark.parametrize("name", ["qwen3", "mixtral"])
def test_staged_reader_fills_cuda_tensors_with_the_direct_paths_bytes(sharded, name):  # noqa: F811
    """The fast loader's device branch on a real GPU, on the fixture models' tensors (each one piece)."""
    _, folder, doc, placements = sharded(name)
    for rank in range(2):
        for dtype in (None, torch.bfloat16):
            host, device = SliceReader(folder), SliceReader(folder)
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
    say(f"staged reader, {name} tp=2 shards: every local tensor on cuda equal to the CPU read, stored dtype and bf16")


def _big_file(folder):
    """A safetensors file of tensors larger than a staging chunk, with sizes that are no multiple of it."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    tensors = {"a": torch.randn(1000, 10_003, generator=g),  # 40 MB of fp32: 2.4 chunks
               "b": torch.randn(4097, 4099, generator=g).to(torch.bfloat16),  # 33.6 MB: 2.0003 chunks
               "c": torch.randn(7, generator=g)}
    save_file(tensors, str(folder / "big.safetensors"))
    return {n: {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch."),
                "chunks": [{"file": "big.safetensors", "offsets": [0] * t.dim(), "sizes": list(t.shape)}]}
            for n, t in tensors.items()}


class _Delayed(SliceReader):
    """Each copy to the device queued behind tens of ms of GPU work: the DMA out of a buffer starts long after the
    host has moved on, so a buffer refilled without waiting for its event is overwritten before it is read."""

    SLEEP_CYCLES = 100_000_000  # ~50-70 ms at the clocks of current datacenter GPUs

    def _to_target(self, out, host):
        torch.cuda._sleep(self.SLEEP_CYCLES)
        super()._to_target(out, host)


def test_chunked_staging_on_a_delayed_stream(tmp_path):
    """Issue 28 items 3 and 6: tensors of tens of MB go through two pinned 16 MiB buffers in pieces; with the
    stream delayed, the bytes are right only because each refill waits for its event (shown: without the wait they
    are wrong); pinned memory peaks at 2 chunks and is given back by `finish`."""
    entries = _big_file(tmp_path)
    jobs = [(n, e, None, None, e["shape"]) for n, e in entries.items()]
    jobs.append(("a", entries["a"], 0, [(0, 100), (500, 700)], [300, 10_003]))  # rows from two places: host-assembled
    plain = SliceReader(tmp_path)
    expected = [plain.read_tensor(n, e, dim, runs) for n, e, dim, runs, _ in jobs]
    pieces = sum(len(staging_spans(math.prod(shape), getattr(torch, e["dtype"]).itemsize)) for _, e, _, _, shape in jobs)

    def load(*, cast=None, event_wait=True):
        reader = _Delayed(tmp_path)
        if not event_wait:  # the bug the test must catch: no event recorded, so buffer() never waits
            reader.staging.copied = lambda slot, device: None
        targets = []
        for n, e, dim, runs, shape in jobs:
            targets.append(torch.empty(shape, dtype=cast or getattr(torch, e["dtype"]), device="cuda"))
            reader.read_into(targets[-1], n, e, dim, runs)
        return reader, targets

    torch.cuda.synchronize()
    torch.accelerator.empty_host_cache()
    torch.cuda.reset_peak_host_memory_stats()
    pinned_before = torch.cuda.host_memory_stats().get("allocated_bytes.current", 0)
    reader, targets = load()
    pinned_peak = torch.cuda.host_memory_stats()["allocated_bytes.peak"]
    reader.finish()
    pinned_after = torch.cuda.host_memory_stats()["allocated_bytes.current"]
    assert all(torch.equal(t.cpu(), x) for t, x in zip(targets, expected, strict=True))
    reader, cast = load(cast=torch.float16)
    reader.finish()
    assert all(torch.equal(t.cpu(), x.to(torch.float16)) for t, x in zip(cast, expected, strict=True))
    reader, broken = load(event_wait=False)
    torch.cuda.synchronize()
    wrong = sum((t.cpu() != x).sum().item() for t, x in zip(broken, expected, strict=True))
    reader.finish()
    total = sum(x.numel() * x.element_size() for x in expected)
    say(f"staging: {total / MiB:.1f} MiB into cuda:{torch.cuda.current_device()} in {pieces} pieces of "
        f"<= {STAGING_CHUNK // MiB} MiB, stream delayed per piece: equal (fp32/bf16 as stored, and cast to fp16); "
        f"without the event wait {wrong} elements wrong; pinned memory peak {(pinned_peak - pinned_before) / MiB:.1f}"
        f" MiB over the {pinned_before / MiB:.1f} MiB before, {pinned_after / MiB:.1f} MiB after finish()")
    assert wrong > 0, "the delayed stream did not expose a missing event wait: the test proves nothing here"
    assert pinned_peak - pinned_before <= 2 * STAGING_CHUNK
    assert pinned_after <= pinned_before


def test_run_gpus_1_load_model_and_examples(model_dirs, tmp_path):
    """`tpcli run --gpus 1`: load_model puts the model on cuda:0; the generate example decodes on the GPU the tokens
    it decodes on the CPU."""
    src = model_dirs("qwen3")
    for dtype in ("float32", "bfloat16"):
        _check_against_cpu(src, *_run_worker(tmp_path, 1, src, dtype), dtype, what="run --gpus 1, from_pretrained")
    prompt = ("--prompt", "Tensor parallel", "--max-new-tokens", "8")
    gpu = tpcli("run", "--gpus", 1, "--model", src, "-m", "tpcli.examples.generate", *prompt).stdout
    cpu = tpcli("run", "--cpu", 1, "--model", src, "-m", "tpcli.examples.generate", *prompt).stdout
    tokens = [line.split("tokens:", 1)[1] for line in gpu.splitlines() if "tokens:" in line]
    assert tokens and tokens == [line.split("tokens:", 1)[1] for line in cpu.splitlines() if "tokens:" in line]
    say(f"run --gpus 1 -m tpcli.examples.generate: tokens equal to the CPU run's ({tokens[0].strip()})")


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
            _check_against_cpu(src, reports, logits, tokens, dtype, what=f"run --gpus 2, {name} tp=2 fast path")
    gen = tpcli("run", "--gpus", 2, "--model", tmp_path / "qwen3-tp2", "-m", "tpcli.examples.generate").stdout
    assert "tokens:" in gen


@four_gpus
def test_tp_x_fsdp_mesh_on_4_gpus(model_dirs, tmp_path):
    """Issue 28 item 7: `tpcli run --gpus 4 --tp 2 --fsdp 2` loads through transformers' DistributedConfig on 4 GPUs
    and computes the CPU model's logits."""
    src = model_dirs("qwen3")  # the mesh tests/test_run_mesh.py checks against transformers' own load on CPU
    for dtype in ("float32", "bfloat16"):
        reports, logits, tokens = _run_worker(tmp_path, 4, src, dtype, "--tp", 2, "--fsdp", 2)
        _check_against_cpu(src, reports, logits, tokens, dtype, what="run --gpus 4 --tp 2 --fsdp 2, qwen3")


@two_gpus
def test_verify_numerics_on_gpus(model_dirs):
    result = json.loads(tpcli("verify", model_dirs("qwen3"), "--tp", 2, "--numerics", "--gpus", "--json").stdout)
    n = result["numerics"]
    say(f"verify --numerics --gpus: devices {n.get('devices')}, backend {n.get('backend')}, max |logits - CPU model| "
        f"{n['logits']['max_abs']:.3g} (tol {n['tolerance']:g}), tokens equal: {n['tokens_equal']}")
    assert result["ok"] and n["world_size"] == 2, result
    assert n["backend"] == "nccl" and n["devices"] == ["cuda:0", "cuda:1"], n


@two_gpus
def test_numerics_ranks_outlive_the_nccl_timeout_while_rank0_runs_the_reference(model_dirs, tmp_path):
    """Issue 28 item 2 on NCCL: with a process-group timeout of TIMEOUT_S and a reference taking DELAY_S longer, the
    waiting rank survives (it waits in a gloo group of its own, not in an NCCL barrier)."""
    script = tmp_path / "slow_reference.py"
    script.write_text(SLOW_REFERENCE_WORKER)
    out = tmp_path / "numerics.json"
    tpcli("run", "--gpus", 2, script, model_dirs("qwen3"), out, DELAY_S, env={"TPCLI_TIMEOUT": str(TIMEOUT_S)})
    n = json.loads(out.read_text())
    say(f"verify --numerics worker, reference delayed {DELAY_S} s past a {TIMEOUT_S} s process-group timeout: "
        f"devices {n['devices']}, backend {n['backend']}, max |logits - CPU model| {n['logits']['max_abs']:.3g}")
    assert n["backend"] == "nccl" and n["devices"] == ["cuda:0", "cuda:1"] and n["tokens_equal"], n
