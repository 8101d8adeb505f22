"""transformers' `Trainer` with a TP model under `tpcli run` (transformers 5.23): what its checkpoints and resume do.

One script (tests/data/trainer_tp.py) trains a tiny fp32 llama (untied embeddings) 4 AdamW steps, checkpointing at
step 2, then resumes from a checkpoint; the oracle is the uninterrupted run of one process (fp32, 1e-5). Found:
- Trainer refuses a TP model outright with its default save settings (the optimizer cannot be checkpointed), and
  on CPU workers accelerate refuses it before that. The worker drops only accelerate's CPU check to follow the
  multi-GPU path on gloo.
- With `save_only_model=True` it trains like one process and saves a full, gathered model.safetensors per checkpoint,
  with no optimizer, scheduler or RNG state.
- Resuming from it at any TP mesh (the same one included) crashes loading plain tensors into DTensor parameters;
  resuming in one process restores the weights and the data position but silently starts a fresh AdamW.
The tests pin each failure precisely so that a transformers release that changes it makes them fail. README: "Trainer
and TP checkpoints".
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import base_env
from safetensors.torch import load_file
from test_run_mesh import tpcli_run

WORKER = Path(__file__).parent / "data" / "trainer_tp.py"
TOL = 1e-5  # fp32
DTENSOR_COPY = "aten.copy_.default got mixed torch.Tensor and DTensor"
MODEL_ONLY = ["config.json", "generation_config.json", "model.safetensors", "trainer_state.json", "training_args.bin"]


def _report(out: Path) -> dict:
    return json.loads((out / "report.json").read_text())


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    from tpcli.testing import build_tiny

    return build_tiny("llama", tmp_path_factory.mktemp("trainer") / "llama", kv_heads=4)


@pytest.fixture(scope="module")
def tp2(llama, tmp_path_factory):
    """tp=2 on 2 workers: the refusals, 4 steps with save_only_model, then resume from its own checkpoint-2."""
    out = tmp_path_factory.mktemp("tp2")
    tpcli_run("--cpu", 2, "--model", llama, WORKER, "--out", out, "--probe-refusals", "--resume-from", "own")
    return out, _report(out)


@pytest.fixture(scope="module")
def one(llama, tp2, tmp_path_factory):
    """One process, no TP: the oracle run (full checkpoints), resumed from its own checkpoint-2 and from tp2's."""
    out = tmp_path_factory.mktemp("one")
    cmd = [sys.executable, WORKER, "--model", llama, "--out", out, "--full-checkpoints", "--resume-from", "own",
           "--resume-from", tp2[0] / "checkpoint-2"]
    proc = subprocess.run(list(map(str, cmd)), env=base_env(), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out, _report(out)


def assert_losses_equal(got: dict, want: dict):
    assert got.keys() <= want.keys() and got
    for step, loss in got.items():
        assert abs(loss - want[step]) <= TOL * abs(want[step]), (step, loss, want[step])


def max_weight_diff(a: Path, b: Path) -> tuple[float, int]:
    """(max |a - b| over all parameters, how many entries differ by more than TOL) of two final.pt files."""
    x, y = torch.load(a), torch.load(b)
    assert x.keys() == y.keys()
    diffs = [(x[k] - y[k]).abs() for k in x]
    return max(d.max().item() for d in diffs), sum(int((d > TOL).sum()) for d in diffs)


@pytest.mark.dist
def test_trainer_refuses_a_tp_model_on_cpu_and_with_optimizer_checkpoints(tp2):
    refusals = tp2[1]["refusals"]
    assert refusals["cpu"] == ("ValueError: ParallelismConfig is only compatible DistributedType.FSDP (version 2) or "
                               "DistributedType.Multi{Device} or DistributedType.DEEPSPEED, but got "
                               "DistributedType.MULTI_CPU.")
    assert refusals["optimizer"] == (
        "ValueError: Resuming is not supported for models sharded at load time (`DistributedConfig`), so their "
        "optimizer state cannot be checkpointed. Pass `save_only_model=True` or `save_strategy='no'`.")


@pytest.mark.dist
def test_one_process_resume_is_exact(one):
    """The control: without TP, Trainer's own checkpoint (optimizer included) resumes bit for bit."""
    out, rep = one
    assert rep["checkpoints"]["checkpoint-2"] == sorted([*MODEL_ONLY, "optimizer.pt", "rng_state.pth", "scheduler.pt"])
    assert_losses_equal(rep["resumed"]["0"]["losses"], rep["losses"])
    assert list(rep["resumed"]["0"]["losses"]) == ["3", "4"]
    assert max_weight_diff(out / "resumed-0" / "final.pt", out / "final.pt") == (0.0, 0)


@pytest.mark.dist
def test_tp_training_and_its_model_only_checkpoints_match_one_process(tp2, one):
    (out, rep), (one_out, one_rep) = tp2, one
    assert_losses_equal(rep["losses"], one_rep["losses"])
    assert list(rep["losses"]) == ["1", "2", "3", "4"]
    assert max_weight_diff(out / "final.pt", one_out / "final.pt")[1] == 0
    # every checkpoint: the full model gathered into one plain safetensors file, no optimizer/scheduler/RNG state
    assert rep["checkpoints"] == {"checkpoint-2": MODEL_ONLY, "checkpoint-4": MODEL_ONLY}
    got, want = (load_file(d / "checkpoint-2" / "model.safetensors") for d in (out, one_out))
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=TOL, msg=name)


@pytest.mark.dist
def test_resume_at_the_same_tp_mesh_crashes_on_dtensor_parameters(tp2):
    err = tp2[1]["resumed"]["0"]["error"]
    assert err.startswith("RuntimeError: Error(s) in loading state_dict for LlamaForCausalLM:"), err[:300]
    assert DTENSOR_COPY in err and '"lm_head.weight"' in err


@pytest.mark.dist
def test_tp2_x_fsdp2_trains_right_but_resume_crashes_from_tp2_and_from_itself(llama, tp2, one, tmp_path):
    tpcli_run("--cpu", 4, "--tp", 2, "--fsdp", 2, "--model", llama, WORKER, "--out", tmp_path,
              "--resume-from", tp2[0] / "checkpoint-2", "--resume-from", "own")
    rep = _report(tmp_path)
    assert rep["dp_size"] == 2
    assert_losses_equal(rep["losses"], one[1]["losses"])  # training and saving are right on this mesh
    assert rep["checkpoints"]["checkpoint-2"] == MODEL_ONLY
    got, want = (load_file(d / "checkpoint-2" / "model.safetensors") for d in (tmp_path, one[0]))
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=TOL, msg=name)
    for resumed in rep["resumed"].values():
        err = resumed["error"]
        assert err.startswith("RuntimeError: Error(s) in loading state_dict for FSDPLlamaForCausalLM:"), err[:300]
        assert DTENSOR_COPY in err


@pytest.mark.dist
def test_resume_from_tp2_in_one_process_restores_weights_but_silently_drops_adamw_state(one):
    """Step 3's loss (weights after step 2, data position) is right; step 4 and the final weights are not: there is
    no optimizer.pt, so Trainer resumes with a fresh AdamW (exp_avg = exp_avg_sq = 0, step 0) without a word.
    Measured: step 4 loss 6.957332 vs 6.957529 (2.8e-5 relative), final weights up to 3.4e-4 off in 125,930 of
    198,080 entries. A transformers that restores the optimizer state makes this test fail: then move the case to
    the working ones (README table)."""
    out, rep = one
    resumed = rep["resumed"]["1"]["losses"]
    assert_losses_equal({"3": resumed["3"]}, rep["losses"])
    assert abs(resumed["4"] - rep["losses"]["4"]) > TOL * abs(rep["losses"]["4"])
    worst, n_off = max_weight_diff(out / "resumed-1" / "final.pt", out / "final.pt")
    assert worst > 10 * TOL and n_off > 100_000, (worst, n_off)
