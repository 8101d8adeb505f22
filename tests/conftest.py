"""Shared fixtures: tiny models built locally, a torchrun helper, and transformers' own TP oracle runs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TPCLI_TIMEOUT", "120")  # process-group collectives give up long before pytest's 300 s
os.environ["TPCLI_CACHE_DIR"] = "off"  # no result cache across tests (tests/test_cache.py turns it on)

ORACLES = Path(__file__).parent / "oracles"
INPUT_IDS = [[1, 17, 256, 3, 999, 42, 7, 512], [1, 5, 6, 7, 8, 900, 13, 21]]
DIST_TIMEOUT = 240  # per torchrun; collectives inside time out at 90 s, pytest-timeout at 300 s

# Fixture models: name -> (kind, build overrides). "*3" variants are valid at tp=2 and tp=3 (6 heads, 6 KV heads).
MODELS = {
    "llama": ("llama", {"max_shard_size": "100KB"}),  # several files + index.json
    "qwen3": ("qwen3", {"tokenizer": True}),  # tied embeddings, q/k norms
    "mixtral": ("mixtral", {}),  # MoE: per-expert w1/w2/w3 on disk, fused gate_up_proj at run time
    "phi3": ("phi3", {}),
    "qwen3_moe": ("qwen3_moe", {}),
    "mixtral3": ("mixtral", {"heads": 6, "kv_heads": 6, "hidden": 96}),
    "llama3": ("llama", {"heads": 6, "kv_heads": 6, "hidden": 96}),
    "opt": ("opt", {}),
    "llama4kv": ("llama", {"kv_heads": 4}),  # untied, 4 heads and 4 KV heads: valid at tp=1, 2 and 4
    "mixtral4kv": ("mixtral", {"kv_heads": 4}),
}


def pytest_terminal_summary(terminalreporter) -> None:
    """The run's CPU at the end of the log (`make test-quick` promises a bound on it; --durations shows wall only):
    this process's user+sys, and its waited-for children's (torchrun and its workers, tpcli subprocesses)."""
    t = os.times()
    terminalreporter.write_line(f"cpu: {t.user + t.system:.1f} s in pytest, {t.children_user + t.children_system:.1f} "
                                "s in child processes (user+sys)")


def base_env() -> dict:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error", PYTHONWARNINGS="ignore")
    return env


def torchrun(nproc: int, script: str | Path, *args, timeout: int = DIST_TIMEOUT) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           str(script), *map(str, args)]
    proc = subprocess.run(cmd, env=base_env(), capture_output=True, text=True, timeout=timeout)
    if proc.returncode:
        raise AssertionError(f"torchrun failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


def run_main(monkeypatch, capsys, *args):
    """Call the real entry point (error rendering included) in-process: (exit code, stdout, stderr)."""
    from tpcli.cli import main

    monkeypatch.setattr(sys, "argv", ["tpcli", *map(str, args)])
    capsys.readouterr()  # drop what fixtures printed
    with pytest.raises(SystemExit) as exc:
        main()
    out, err = capsys.readouterr()
    return exc.value.code, out, err


def tiny_models(root: Path, models: dict[str, tuple[str, dict]]):
    """get(name) -> the tiny model `models[name] = (kind, overrides)`, built under `root` on first use."""
    from tpcli.testing import build_tiny

    cache: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in cache:
            kind, overrides = models[name]
            cache[name] = build_tiny(kind, root / name, **overrides)
        return cache[name]

    return get


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory):
    """Lazily built tiny models: model_dirs("qwen3") -> Path."""
    return tiny_models(tmp_path_factory.mktemp("models"), MODELS)


@pytest.fixture(scope="session")
def oracle(tmp_path_factory, model_dirs):
    """transformers' own TP load (+ DCP save) of a fixture model, cached per (model, tp, plan)."""
    root = tmp_path_factory.mktemp("oracle")
    cache: dict[tuple, Path] = {}

    def get(name: str, tp: int, plan: Path | None = None, src: Path | None = None, dcp: bool = True) -> Path:
        key = (name, tp, str(plan), str(src), dcp)
        if key not in cache:
            out = root / f"{name}-tp{tp}-{len(cache)}"
            args = [src or model_dirs(name), out]
            if plan:
                args += ["--plan", plan]
            if dcp:
                args += ["--dcp-out", out / "dcp"]
            if MODELS.get(name, ("", {}))[0] in ("mixtral", "qwen3_moe") and tp == 3:
                args += ["--eager-experts"]
            torchrun(tp, ORACLES / "tp_oracle.py", *args)
            cache[key] = out
        return cache[key]

    return get


def single_process_logits(path: Path, **kwargs):
    """The numerics oracle: the plain single-process model's logits and greedy tokens."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    with torch.no_grad():
        ids = torch.tensor(INPUT_IDS)
        return model(ids).logits, model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0)


def single_process_sgd_losses(src: Path, *, steps: int = 3, lr: float = 0.5, dp: int = 2) -> list[float]:
    """The oracle of tpcli/examples/train_mesh.py --optimizer sgd: one process trains on the `dp` data-parallel
    ranks' batches together; returns the loss of each step."""
    import torch
    from transformers import AutoModelForCausalLM

    from tpcli.examples.train_mesh import batch_for, make_optimizer

    model = AutoModelForCausalLM.from_pretrained(src)
    model.train()
    opt = make_optimizer("sgd", model.parameters(), lr)
    losses = []
    for step in range(steps):
        ids = torch.cat([batch_for(step, d, vocab=model.config.vocab_size) for d in range(dp)])
        loss = model(ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def load_safetensors_dir(folder: Path) -> dict:
    from safetensors import safe_open

    out = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            out.update({k: h.get_tensor(k) for k in h.keys()})
    return out


def assert_same_shards(ours: Path, theirs: Path) -> None:
    """Every rank file holds the same tensors, bit for bit, with the same DCP_SHARDING_INFO."""
    import json

    import torch
    from safetensors import safe_open

    a = sorted(p.name for p in Path(ours).glob("shard-*.safetensors"))
    b = sorted(p.name for p in Path(theirs).glob("shard-*.safetensors"))
    assert a == b, (a, b)
    for name in a:
        with safe_open(str(Path(ours) / name), "pt") as x, safe_open(str(Path(theirs) / name), "pt") as y:
            assert set(x.keys()) == set(y.keys()), (name, set(x.keys()) ^ set(y.keys()))
            assert json.loads(x.metadata()["DCP_SHARDING_INFO"]) == json.loads(y.metadata()["DCP_SHARDING_INFO"])
            for k in x.keys():
                tx, ty = x.get_tensor(k), y.get_tensor(k)
                assert tx.dtype == ty.dtype and torch.equal(tx, ty), (name, k)
