"""`tpcli run` and `tpcli.load_model`: real torchrun workers on CPU/gloo."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
from conftest import ORACLES, base_env, single_process_logits

from tpcli.sharding import shard_checkpoint

TPCLI = [sys.executable, "-m", "tpcli"]


def tpcli_run(*args, timeout=240, check=True):
    proc = subprocess.run([*TPCLI, "run", *map(str, args)], env=base_env(), capture_output=True, text=True,
                          timeout=timeout)
    if check and proc.returncode:
        raise AssertionError(f"tpcli run failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


@pytest.mark.dist
@pytest.mark.parametrize("name,sharded", [("qwen3", True), ("qwen3", False), ("mixtral", True),
                                          ("mixtral", False), ("llama", True)])
def test_load_model_matches_transformers_and_single_process(model_dirs, tmp_path, name, sharded):
    src = model_dirs(name)
    model = src
    if sharded:
        model = tmp_path / "sharded"
        shard_checkpoint(str(src), tp=2, out=str(model))
    out = tmp_path / "out"
    tpcli_run("--cpu", 2, "--model", model, ORACLES / "load_worker.py", src, out)
    for r in range(2):
        rep = json.loads((out / f"rank{r}.json").read_text())
        assert rep["mismatch"] == [] and rep["hooks_equal"] and rep["logits_equal_to_transformers_tp"], rep
        if sharded:  # each rank reads about half the model (plus replicated tensors)
            total = sum(f.stat().st_size for f in model.glob("shard-*.safetensors"))
            assert rep["bytes_read"] < 0.62 * total, (rep["bytes_read"], total)
    logits, tokens = single_process_logits(src)
    assert (torch.load(out / "logits.pt") - logits).abs().max().item() <= 1e-5
    assert torch.equal(torch.load(out / "tokens.pt"), tokens)


@pytest.mark.dist
def test_load_model_casts_like_from_pretrained(model_dirs, tmp_path):
    model = tmp_path / "sharded"
    shard_checkpoint(str(model_dirs("mixtral")), tp=2, out=str(model))
    out = tmp_path / "out"
    tpcli_run("--cpu", 2, "--model", model, ORACLES / "load_worker.py", model_dirs("mixtral"), out,
              "--dtype", "bfloat16")
    for r in range(2):
        rep = json.loads((out / f"rank{r}.json").read_text())
        assert rep["mismatch"] == [] and rep["logits_equal_to_transformers_tp"], rep
    assert torch.load(out / "logits.pt").dtype == torch.bfloat16


@pytest.mark.dist
def test_generate_example_decodes_text(model_dirs, tmp_path):
    model = tmp_path / "s"
    shard_checkpoint(str(model_dirs("qwen3")), tp=2, out=str(model))
    proc = tpcli_run("--cpu", 2, "-m", "tpcli.examples.generate", "--model", model, "--prompt", "hello",
                     "--max-new-tokens", 4)
    assert "[rank0]:tokens:" in proc.stdout and "[rank0]:text:" in proc.stdout
    assert "preflight:" in proc.stderr


@pytest.mark.dist
def test_failing_worker_names_rank_and_exception(tmp_path):
    script = tmp_path / "fail.py"
    script.write_text("import os\nif os.environ['RANK'] == '1':\n    raise RuntimeError('kaput on purpose')\n")
    proc = tpcli_run("--cpu", 2, script, check=False)
    assert proc.returncode != 0
    assert "tpcli run: rank 1 failed" in proc.stderr and "RuntimeError: kaput on purpose" in proc.stderr
    assert "fail.py" in proc.stderr and "ChildFailedError" not in proc.stderr


@pytest.mark.dist
def test_killed_worker_reports_signal(tmp_path):
    script = tmp_path / "die.py"
    script.write_text("import os, signal, time\nif os.environ['RANK'] == '0':\n    os.kill(os.getpid(), signal.SIGKILL)\n"
                      "time.sleep(30)\n")
    proc = tpcli_run("--cpu", 2, script, check=False)
    assert proc.returncode != 0 and "rank 0 failed with signal SIGKILL" in proc.stderr


@pytest.mark.dist
def test_sigint_stops_every_worker(tmp_path):
    script = tmp_path / "sleep.py"
    script.write_text("import os, time\nprint('ready', os.getpid(), flush=True)\ntime.sleep(120)\n")
    proc = subprocess.Popen([*TPCLI, "run", "--cpu", "2", str(script)], env=base_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    pids = []
    deadline = time.monotonic() + 60
    while len(pids) < 2 and time.monotonic() < deadline:
        line = proc.stdout.readline()
        if "ready" in line:
            pids.append(int(line.split()[-1]))
    assert len(pids) == 2
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=30)
    assert proc.returncode == 130
    time.sleep(0.5)
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_gpus_without_gpus_fails_before_spawning(tmp_path):
    marker = tmp_path / "spawned"
    script = tmp_path / "s.py"
    script.write_text(f"open({str(marker)!r}, 'w').write('x')\n")
    proc = tpcli_run("--gpus", 1, script, check=False, timeout=60)
    assert proc.returncode == 1 and "--gpus 1" in proc.stderr and "--cpu 1" in proc.stderr
    assert not marker.exists()


def test_preflight_refuses_invalid_world_size(model_dirs, tmp_path):
    marker = tmp_path / "spawned"
    script = tmp_path / "s.py"
    script.write_text(f"open({str(marker)!r}, 'w').write('x')\n")
    proc = tpcli_run("--cpu", 4, "--model", model_dirs("llama"), script, check=False, timeout=60)
    assert proc.returncode == 1 and "num_key_value_heads=2 not divisible by 4" in proc.stderr
    assert not marker.exists() and "Traceback" not in proc.stderr


def test_usage_errors_exit_2(tmp_path):
    proc = tpcli_run("--cpu", 2, check=False, timeout=60)
    assert proc.returncode == 2 and "SCRIPT.py or -m MODULE" in proc.stderr
    proc = tpcli_run("--cpu", 2, "--gpus", 2, "x.py", check=False, timeout=60)
    assert proc.returncode == 2 and "exclusive" in proc.stderr


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.dist
def test_two_node_rendezvous_on_loopback(tmp_path):
    script = tmp_path / "allreduce.py"
    script.write_text(
        "import torch, torch.distributed as dist\n"
        "from datetime import timedelta\n"
        "dist.init_process_group('gloo', timeout=timedelta(seconds=60))\n"
        "t = torch.tensor([dist.get_rank() + 1.0])\n"
        "dist.all_reduce(t)\n"
        "print('world', dist.get_world_size(), 'rank', dist.get_rank(), 'sum', int(t.item()), flush=True)\n"
        "dist.barrier()\n"
        "dist.destroy_process_group()\n")
    port = _free_port()
    nodes = [subprocess.Popen([*TPCLI, "run", "--cpu", "1", "--nnodes", "2", "--node-rank", str(r),
                               "--rdzv-endpoint", f"127.0.0.1:{port}", str(script)], env=base_env(),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(2)]
    outs = [n.communicate(timeout=120) for n in nodes]
    assert [n.returncode for n in nodes] == [0, 0], outs
    assert "world 2 rank 0 sum 3" in outs[0][0] and "world 2 rank 1 sum 3" in outs[1][0]
    assert "[n1.rank0]:" in outs[1][0]
