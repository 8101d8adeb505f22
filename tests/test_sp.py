"""Sequence parallel (issue 36, item 4) against transformers 5.23's own loads on CPU workers.

What transformers offers: `DistributedConfig(enable_sequence_parallel=True)`, documented "Reserved for sequence
parallelism. Not wired up yet", and a registered `sequence_parallel` style (`SequenceParallel`: the module's
parameters become Replicate DTensors, its input is re-wrapped as a Shard(1) DTensor, its output given back local).
The oracle is tests/oracles/sp_worker.py: tp=2 loads with and without the flag, and with a user plan that puts the
style on every norm, against one process. Measured (tiny llama, fp32): the flag changes nothing at all; the plan
loads, holds the same bytes and computes the single-process logits (2.2e-7). So `--sp` is refused in one line and
a `sequence_parallel` plan is handled as any other plan (its norms counted whole on every rank).
"""

import json
from pathlib import Path

import pytest
from conftest import ORACLES, run_main, torchrun

from tpcli.planning.memory import MemoryOptions
from tpcli.planning.mesh import Mesh, mesh_memory
from tpcli.planning.plan import load_config, resolve_plan

SP_PLAN = {"model.layers.*.input_layernorm": "sequence_parallel",
           "model.layers.*.post_attention_layernorm": "sequence_parallel", "model.norm": "sequence_parallel"}


@pytest.fixture(scope="module")
def sp_plan(tmp_path_factory):
    path = tmp_path_factory.mktemp("sp") / "sp_plan.json"
    path.write_text(json.dumps(SP_PLAN))
    return path


@pytest.fixture(scope="module")
def measured(model_dirs, sp_plan, tmp_path_factory):
    out = tmp_path_factory.mktemp("sp-oracle") / "sp"
    torchrun(2, ORACLES / "sp_worker.py", model_dirs("llama"), sp_plan, out)
    return [json.loads(Path(f"{out}.rank{r}.json").read_text()) for r in range(2)]


@pytest.mark.dist
def test_enable_sequence_parallel_changes_nothing_in_transformers(measured):
    """Why `--sp` is refused: with the flag, transformers' tp=2 load has the same parameters (placements and local
    values), the same forward hooks, the same hidden states after every layer and the same logits, bit for bit.
    When this test fails, transformers has wired the flag: measure what it does and accept --sp."""
    for rank in measured:
        assert rank["flag_config"]  # the flag reached the model's config: it is read by nobody
        assert rank["flag_mismatch"] == [] and rank["flag_hooks_equal"]
        assert rank["flag_outputs_equal"] and rank["flag_logits_equal"]


@pytest.mark.dist
def test_a_sequence_parallel_plan_is_counted_as_transformers_loads_it(measured, model_dirs):
    """A user plan with the `sequence_parallel` style on the norms: transformers loads it (the norms Replicate
    DTensors), its logits and greedy tokens equal one process's, and every rank holds the weight bytes `inspect
    --plan` says (the norms whole, as transformers keeps them)."""
    plan = resolve_plan(load_config(model_dirs("llama")), user_plan=SP_PLAN)
    ours = [r["weight_bytes"] for r in mesh_memory(plan, Mesh(tp=2), MemoryOptions())["ranks"]]
    assert ours == [r["plan_weight_bytes"] for r in measured] == [r["base_weight_bytes"] for r in measured]
    for rank in measured:
        assert rank["plan_error"] is None, rank["plan_error"]
        assert set(rank["plan_placements"].values()) == {"(Replicate(),)"}
        assert rank["plan_logits_max_abs"] <= 1e-5 and rank["plan_tokens_equal"]


@pytest.mark.e2e
def test_verify_numerics_runs_a_sequence_parallel_plan(model_dirs, sp_plan):
    import subprocess
    import sys

    from conftest import base_env

    proc = subprocess.run([sys.executable, "-m", "tpcli", "verify", str(model_dirs("llama")), "--tp", "2", "--plan",
                           str(sp_plan), "--numerics", "--json"], env=base_env(), capture_output=True, text=True,
                          timeout=300)
    doc = json.loads(proc.stdout)
    assert proc.returncode == 0 and doc["ok"], proc.stderr[-3000:]
    assert doc["numerics"]["logits"]["max_abs"] <= 1e-5 and doc["numerics"]["tokens_equal"]


@pytest.mark.parametrize("command", [
    ["inspect", "{model}", "--tp", "2", "--sp"],
    ["verify", "{model}", "--tp", "2", "--numerics", "--sp"],
    ["run", "--cpu", "2", "--sp", "{script}"],
])
def test_sp_flag_is_refused_in_one_line_before_anything_runs(monkeypatch, capsys, model_dirs, tmp_path, command):
    marker = tmp_path / "started"
    script = tmp_path / "worker.py"
    script.write_text(f"open({str(marker)!r}, 'w').write('x')\n")
    args = [a.format(model=model_dirs("llama"), script=script) for a in command]
    code, out, err = run_main(monkeypatch, capsys, *args)
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1, err
    assert "--sp: transformers" in err and "enable_sequence_parallel) but does not wire it" in err
    assert "'sequence_parallel' style" in err and not marker.exists()


def test_step_planner_refuses_a_sequence_parallel_plan_by_name(model_dirs):
    """The step figures (`inspect --train --seq-len`) do not model the style: StepUnmodelled naming the rule, not
    figures that ignore it; the same model without it is modelled."""
    from tpcli.planning.step import StepUnmodelled, step_ranks

    config = load_config(model_dirs("llama"))
    with pytest.raises(StepUnmodelled, match=r"model\.layers\.0\.input_layernorm: style 'sequence_parallel' is not"):
        step_ranks(resolve_plan(config, user_plan=SP_PLAN), Mesh(tp=2), 1, 8)
    assert step_ranks(resolve_plan(config), Mesh(tp=2), 1, 8)
