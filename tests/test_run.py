"""`tpcli run` and `tpcli.load_model`: real torchrun workers on CPU/gloo."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import ORACLES, base_env, run_main, single_process_logits

from tpcli.commands.shard import shard_checkpoint

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


PLAN_WORKER = """
import json, torch, tpcli
m = tpcli.load_model()
w = m.model.layers[0].self_attn.o_proj.weight
local = w.to_local() if hasattr(w, "to_local") else w
print("o_proj:" + json.dumps({"placements": str(getattr(w, "placements", None)), "local": list(local.shape)}))
"""


@pytest.mark.dist
def test_run_plan_reaches_load_model_in_the_workers(model_dirs, tmp_path):
    """`tpcli run --model M --plan FILE`: tpcli.load_model() in the workers loads with that plan (it used to load
    with the model's own plan); a sharded folder keeps the plan it was sharded with, so --plan is refused there."""
    script = tmp_path / "w.py"
    script.write_text(PLAN_WORKER)
    plan = tmp_path / "plan.json"
    # attention left whole (a plan whose TP forward runs: o_proj alone replicated would meet split q/k/v)
    plan.write_text(json.dumps({f"model.layers.*.self_attn.{p}": "replicate" for p in ("q_proj", "k_proj", "v_proj",
                                                                                       "o_proj")}))
    model = model_dirs("qwen3")

    def o_proj(*extra):
        out = tpcli_run("--cpu", 2, "--model", model, *extra, script).stdout
        return [json.loads(line.split("o_proj:", 1)[1]) for line in out.splitlines() if "o_proj:" in line]

    default, planned = o_proj(), o_proj("--plan", plan)
    assert len(default) == len(planned) == 2
    assert all("Shard(dim=1)" in r["placements"] for r in default)
    assert all("Shard" not in r["placements"] for r in planned)
    assert planned[0]["local"][1] == 2 * default[0]["local"][1]  # whole on each rank
    shard_checkpoint(str(model), tp=2, out=str(tmp_path / "s"))
    proc = tpcli_run("--cpu", 2, "--model", tmp_path / "s", "--plan", plan, script, check=False)
    assert proc.returncode == 2 and "its plan is the one it was sharded with" in proc.stderr


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
    proc = tpcli_run("--cpu", 2, "--model", model, "-m", "tpcli.examples.generate", "--prompt", "hello",
                     "--max-new-tokens", 4)  # tpcli's --model before -m: what follows MODULE is the module's
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


def test_gpus_without_gpus_fails_before_spawning(tmp_path, monkeypatch, capsys):
    marker = tmp_path / "spawned"
    script = tmp_path / "s.py"
    script.write_text(f"open({str(marker)!r}, 'w').write('x')\n")
    rc, _, err = run_main(monkeypatch, capsys, "run", "--gpus", 1, script)
    assert rc == 1 and "--gpus 1" in err and "--cpu 1" in err
    assert not marker.exists()


def test_preflight_refuses_invalid_world_size(model_dirs, tmp_path, monkeypatch, capsys):
    marker = tmp_path / "spawned"
    script = tmp_path / "s.py"
    script.write_text(f"open({str(marker)!r}, 'w').write('x')\n")
    rc, _, err = run_main(monkeypatch, capsys, "run", "--cpu", 4, "--model", model_dirs("llama"), script)
    assert rc == 1 and "num_key_value_heads=2 not divisible by 4" in err
    assert not marker.exists() and "Traceback" not in err


def test_usage_errors_exit_2(monkeypatch, capsys):
    code, _, err = run_main(monkeypatch, capsys, "run", "--cpu", 2)
    assert code == 2 and "SCRIPT.py or -m MODULE" in err
    code, _, err = run_main(monkeypatch, capsys, "run", "--cpu", 2, "--gpus", 2, "x.py")
    assert code == 2 and "exclusive" in err


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


def _start(args, cwd=None, **kwargs):
    return subprocess.Popen([*TPCLI, "run", *map(str, args)], env=base_env(), cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kwargs)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (dead, not yet reaped by init) counts as gone
        return open(f"/proc/{pid}/stat").read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def _ready_pids(proc, n: int) -> set[int]:
    """Read worker lines 'ready PID PPID' until n workers reported; returns the worker pids and torchrun's pid."""
    pids: set[int] = set()
    seen = 0
    deadline = time.monotonic() + 120
    while seen < n and time.monotonic() < deadline:
        line = proc.stdout.readline()
        if "ready" in line:
            seen += 1
            pids.update(int(x) for x in line.split()[-2:])
    assert seen == n
    return pids


@pytest.mark.dist
def test_script_gets_every_argument_and_its_exit_code_is_tpclis(tmp_path):
    script = tmp_path / "args.py"
    # rank 0 fails only once rank 1 has printed: a failure makes torchrun stop the other workers, which could
    # otherwise stop rank 1 before its first line
    script.write_text("import os, pathlib, sys, time\nprint('ARGS', sys.argv[1:], flush=True)\n"
                      "print('VERBOSITY', os.environ.get('TRANSFORMERS_VERBOSITY'), flush=True)\n"
                      "printed = pathlib.Path(__file__).with_name('rank1-printed')\n"
                      "if os.environ['RANK'] == '1':\n    printed.write_text('ok')\n    sys.exit(0)\n"
                      "deadline = time.monotonic() + 120\n"
                      "while not printed.exists() and time.monotonic() < deadline:\n    time.sleep(0.05)\n"
                      "sys.exit(3)\n")
    env = base_env()
    del env["TRANSFORMERS_VERBOSITY"]  # tpcli sets it for its workers unless --verbose
    proc = subprocess.run([*TPCLI, "run", "--cpu", "2", script, "--cpu", "5", "--help", "-m", "x", "--model", "y",
                           "--", "z"], env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 3, proc.stderr
    assert "[rank0]:VERBOSITY error" in proc.stdout
    expected = "ARGS ['--cpu', '5', '--help', '-m', 'x', '--model', 'y', '--', 'z']"
    assert f"[rank0]:{expected}" in proc.stdout and f"[rank1]:{expected}" in proc.stdout
    assert "rank 0 failed with exit code 3" in proc.stderr
    logs = proc.stderr.split("per-rank logs kept in ")[1].split()[0]
    kept = os.path.dirname(logs)  # a fresh mkdtemp folder that only its owner can read
    assert os.path.isdir(logs) and (os.stat(kept).st_mode & 0o077) == 0
    shutil.rmtree(kept)


@pytest.mark.dist
def test_module_args_and_the_installed_tpcli_win_over_a_clone_in_cwd(tmp_path):
    """A `tpcli/` folder in the current directory (a clone) must not replace the installed package in workers;
    the module itself is still found in the current directory, as with `python -m`."""
    (tmp_path / "tpcli").mkdir()
    (tmp_path / "tpcli" / "__init__.py").write_text("FAKE = True\n")
    (tmp_path / "mod.py").write_text("import sys, tpcli\nprint('MOD', sys.argv[1:], hasattr(tpcli, 'load_model'),"
                                     " hasattr(tpcli, 'FAKE'), flush=True)\n")
    tpcli = Path(sys.executable).parent / "tpcli"  # the console script, as a user runs it (`python -m` finds the clone)
    proc = subprocess.run([tpcli, "run", "--cpu", "1", "-m", "mod", "--cpu", "5", "-h"], cwd=tmp_path,
                          env=base_env(), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr
    assert "[rank0]:MOD ['--cpu', '5', '-h'] True False" in proc.stdout


@pytest.mark.dist
@pytest.mark.parametrize("how", ["SIGHUP", "SIGKILL"])
def test_no_process_outlives_tpcli(tmp_path, how):
    script = tmp_path / "sleep.py"
    script.write_text("import os, time\nprint('ready', os.getpid(), os.getppid(), flush=True)\ntime.sleep(120)\n")
    proc = _start(["--cpu", 2, script])
    pids = _ready_pids(proc, 2)  # 2 workers + their torchrun agent
    assert len(pids) == 3
    proc.send_signal(getattr(signal, how))
    proc.wait(timeout=60)
    assert proc.returncode == (128 + signal.SIGHUP if how == "SIGHUP" else -signal.SIGKILL)
    deadline = time.monotonic() + 30
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not [p for p in pids if _alive(p)]


@pytest.mark.dist
def test_output_into_a_closed_pipe_does_not_hang(tmp_path):
    script = tmp_path / "many.py"
    script.write_text("for i in range(200000):\n    print('line', i)\n")
    proc = _start(["--cpu", 1, script])
    assert proc.stdout.readline().startswith("[rank0]:line 0")
    proc.stdout.close()  # like `| head -1`
    proc.wait(timeout=120)  # before the fix the pump died and torchrun blocked on a full pipe forever
    assert proc.returncode == 0, proc.stderr.read()


@pytest.mark.dist
def test_timeout_stops_a_hanging_rank_and_names_it(tmp_path):
    script = tmp_path / "hang.py"
    script.write_text("import os, time\nprint('started', flush=True)\nif os.environ['RANK'] == '1':\n"
                      "    print('rank one waits forever', flush=True)\n    time.sleep(300)\n")
    proc = tpcli_run("--cpu", 2, "--timeout", "30s", script, check=False)  # > worker start-up under load
    assert proc.returncode == 124, proc.stderr
    assert "--timeout 30s expired" in proc.stderr and "still running then: rank 1" in proc.stderr
    assert "rank one waits forever" in proc.stderr.split("expired")[1]


def test_preflight_of_a_sharded_folder_does_not_claim_unchecked_hashes(model_dirs, tmp_path):
    """Preflight checks sizes and the manifest only: a flipped byte passes it, so it must not say "OK" about the
    hashes, and it must say how to check them."""
    from tpcli.commands.run import LaunchSpec, preflight_model

    folder = tmp_path / "s"
    shard_checkpoint(str(model_dirs("llama")), tp=2, out=str(folder))
    victim = next(folder.glob("shard-*.safetensors"))
    data = bytearray(victim.read_bytes())
    data[-1] ^= 0xFF
    victim.write_bytes(bytes(data))
    notes = preflight_model(LaunchSpec(script="x.py", cpu=2, model=str(folder)))
    assert len(notes) == 1 and "sha256 NOT checked" in notes[0] and f"tpcli verify {folder}" in notes[0]
