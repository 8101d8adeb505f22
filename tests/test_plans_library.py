"""plans/: every shipped plan proven against the single-process model, the library mechanism, and its bad input.

The plan files are discovered (a new plans/NAME.json is covered without editing this file); each is tested on a
tiny random model of kind NAME (or, when tpcli.testing has no such kind, its first model_type), fp32.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from conftest import ORACLES, run_main, torchrun

from tpcli.planning import plans_library
from tpcli.testing import KINDS, build_tiny

PLAN_FILES = sorted(plans_library.PLANS_DIR.glob("*.json"))
NAMES = [p.stem for p in PLAN_FILES]
TOL = 1e-5
TINY = {"heads": 8, "kv_heads": 4}  # valid at tp=2 and tp=4 for grouped-query models


def tiny_kind(name: str) -> str:
    return name if name in KINDS else plans_library.shipped()[name].model_types[0]


@pytest.fixture(scope="module")
def plan_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("plan-models")
    return {name: build_tiny(tiny_kind(name), root / name, **TINY) for name in NAMES}



def numerics_ok(r: dict) -> bool:
    return "error" not in r and r["logits"]["max_abs"] <= TOL and r["tokens_equal"] and \
        all(layer["max_abs"] <= TOL for layer in r["layers"])


def transformers_ships_plan(config) -> bool:
    """transformers ships its own TP plan for this architecture's decoder layers (a `*` rule in the config's
    `base_model_tp_plan`): tpcli then keeps it ("transformers default") and picks no plans/ entry. gptj and codegen
    gained one in transformers 5.24; gpt_oss's shards only the embedding."""
    return any("*" in rule for rule in getattr(config, "base_model_tp_plan", None) or {})


def auto_source(name: str, path: Path) -> str:
    """The plan source the automatic pick gives the tiny model of plans/NAME.json with this transformers."""
    from tpcli.planning.plan import load_config

    return "transformers default" if transformers_ships_plan(load_config(path)) else f"tpcli plans/{name}.json"


def valid_at(name: str, path: Path, tp: int) -> bool:
    from tpcli.planning.checks import check_plan, errors
    from tpcli.planning.plan import load_config, resolve_plan

    return not errors(check_plan(resolve_plan(load_config(path)), tp))


# ---------------------------------------------------------------- in-process: schema, automatic pick, bad input


def test_shipped_plans_validate_and_are_picked_automatically(plan_models):
    from tpcli.planning.plan import load_config, resolve_plan

    assert NAMES, "plans/ is empty"
    for name, path in plan_models.items():
        config = load_config(path)
        plan = resolve_plan(config)
        assert plan.plan_source == auto_source(name, path), name
        if transformers_ships_plan(config):  # transformers' own plan wins; plans/NAME still resolves by name
            assert plan.library is None and not plan.user_rules
            plan = resolve_plan(config, user_plan=plans_library.load_spec(name)[0], plan_file=name)
        assert plan.library is not None and plan.library.name == name
        assert plan.user_rules == plans_library.shipped()[name].tp_plan


def test_inspect_shows_the_library_plan_without_flag(plan_models, monkeypatch, capsys):
    code, out, _ = run_main(monkeypatch, capsys, "inspect", plan_models["gpt2"], "--tp", "2", "--json")
    assert code == 0 and json.loads(out)["summary"]["plan_source"] == "tpcli plans/gpt2.json"
    code, out, _ = run_main(monkeypatch, capsys, "inspect", plan_models["gpt2"], "--tp", "2")
    assert code == 0 and "plan: tpcli plans/gpt2.json" in " ".join(out.split())


def test_plan_by_name_and_by_library_file(plan_models, tmp_path):
    from tpcli.planning.plan import load_config, resolve_plan

    config = load_config(plan_models["opt"])
    by_name = resolve_plan(config, user_plan=plans_library.load_spec("opt")[0], plan_file="opt")
    assert by_name.library.name == "opt" and by_name.plan_source == "tpcli plans/opt.json"
    copy = tmp_path / "mine.json"
    copy.write_text((plans_library.PLANS_DIR / "opt.json").read_text())
    by_file = resolve_plan(config, user_plan=plans_library.load_spec(str(copy))[0], plan_file=str(copy))
    assert by_file.library.adaptations == ("opt_attention",) and by_file.plan_source == str(copy)


def _one_line_error(code, out, err, *needles):
    assert code == 1, (out, err)
    text = (out + err).strip()
    assert len(text.splitlines()) == 1 and text.startswith("Error:") and "Traceback" not in text, text
    for needle in needles:
        assert needle in text, text


def test_unknown_plan_name_lists_shipped_names(plan_models, monkeypatch, capsys, tmp_path):
    out_dir = tmp_path / "out"
    code, out, err = run_main(monkeypatch, capsys, "shard", plan_models["gpt2"], "--tp", "2", "--out", out_dir,
                              "--plan", "gtp2")
    _one_line_error(code, out, err, "--plan gtp2", *NAMES)
    assert not out_dir.exists()


def test_schema_error_names_the_field(plan_models, monkeypatch, capsys, tmp_path):
    doc = json.loads((plans_library.PLANS_DIR / "gpt2.json").read_text())
    for field, value in (("constraints", {"n_head": "tp"}), ("adaptations", ["gpt2_atention"]), ("tp_plan", None)):
        bad = dict(doc, **{field: value}) if value is not None else {k: v for k, v in doc.items() if k != field}
        path = tmp_path / f"bad-{field}.json"
        path.write_text(json.dumps(bad))
        out_dir = tmp_path / f"out-{field}"
        code, out, err = run_main(monkeypatch, capsys, "shard", plan_models["gpt2"], "--tp", "2", "--out", out_dir,
                                  "--plan", path)
        _one_line_error(code, out, err, str(path), f"'{field}'")
        assert not out_dir.exists()


def test_plan_for_another_model_type_is_refused(plan_models, monkeypatch, capsys, tmp_path):
    out_dir = tmp_path / "out"
    code, out, err = run_main(monkeypatch, capsys, "shard", plan_models["gpt2"], "--tp", "2", "--out", out_dir,
                              "--plan", "opt")
    _one_line_error(code, out, err, "tpcli plans/opt.json", "'gpt2'")
    assert not out_dir.exists()


def test_tp_forbidden_by_a_constraint(monkeypatch, capsys, tmp_path):
    # intermediate 90 at tp=4: 2 x 90 = 180 columns split evenly, but a rank's 45 columns cut a gate/up pair (the
    # grouped_mm stride check fails too; the plan's own constraint is reported first)
    model = build_tiny("gpt_oss", tmp_path / "m", intermediate=90, **TINY)
    out_dir = tmp_path / "out"
    code, out, err = run_main(monkeypatch, capsys, "shard", model, "--tp", "4", "--out", out_dir)
    _one_line_error(code, out, err, "intermediate_size=90", "divisible by tp=4", "tpcli plans/gpt_oss.json")
    assert not out_dir.exists()
    from tpcli.planning.checks import valid_tp_sizes
    from tpcli.planning.plan import load_config, resolve_plan

    _, invalid = valid_tp_sizes(resolve_plan(load_config(model)), 4)  # inspect's reason names it too
    assert "intermediate_size=90 is not divisible by tp=4" in invalid[4]


def test_verify_warns_when_less_than_half_is_sharded(plan_models, tmp_path):
    from tpcli.commands.verify import verify

    lm_head_only = tmp_path / "default.json"  # what transformers' own gpt_oss plan shards
    lm_head_only.write_text(json.dumps({"lm_head": "colwise_gather_output"}))
    r = verify(str(plan_models["gpt_oss"]), tp=2, plan_file=str(lm_head_only))
    low = [f for f in r["findings"] if f["code"] == "low-sharding"]
    assert len(low) == 1 and "mlp.experts.gate_up_proj" in low[0]["message"]
    assert "--plan gpt_oss (tpcli plans/gpt_oss.json)" in low[0]["message"]
    r = verify(str(plan_models["gpt_oss"]), tp=2)
    assert r["plan_source"] == "tpcli plans/gpt_oss.json" and r["ok"]
    assert not [f for f in r["findings"] if f["code"] == "low-sharding"]


# ---------------------------------------------------------------- torchrun: numerics, shards, mutated plans


def _mutations(tmp_path: Path) -> dict[str, Path]:
    """Broken variants of shipped plans; numerics must fail for each (proves the check can fail)."""
    out = {}

    def write(name: str, base: str, change) -> None:
        doc = json.loads((plans_library.PLANS_DIR / f"{base}.json").read_text())
        change(doc)
        out[name] = tmp_path / f"{name}.json"
        out[name].write_text(json.dumps(doc))

    if "opt" in NAMES:  # the global head count in OPT's view: runs, wrong numbers
        write("opt-no-adaptation", "opt", lambda d: d.update(adaptations=[]))
    if "gptj" in NAMES:
        def swap(d):
            d["tp_plan"] = {k: {"colwise": "rowwise", "rowwise": "colwise"}.get(v, v) for k, v in d["tp_plan"].items()}
        write("gptj-swapped", "gptj", swap)
    if "gpt_oss" in NAMES:  # the experts' output bias added on every rank
        write("gpt_oss-bias-per-rank", "gpt_oss",
              lambda d: d["tp_plan"].update({"model.layers.*.mlp.experts": "moe_tp_experts"}))
    return out


@pytest.mark.dist
@pytest.mark.timeout(900)
@pytest.mark.parametrize("tp", [2, 4])
def test_every_plan_numerics_and_round_trip(tp, plan_models, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    from tpcli.commands.gather import gather_checkpoint
    from tpcli.commands.shard import shard_checkpoint
    from tpcli.commands.verify import verify_sharded
    from tpcli.formats.manifest import read

    names = [n for n in NAMES if valid_at(n, plan_models[n], tp)]
    assert tp == 4 or names == NAMES, "every plan must be valid at tp=2 on its tiny model"
    cases = [{"id": n, "model": str(plan_models[n]), "plan": n} for n in names]
    mutations = _mutations(tmp_path) if tp == 2 else {}
    for mid, path in mutations.items():
        cases.append({"id": mid, "model": str(plan_models[mid.split("-")[0]]), "plan": str(path)})
    sharded = {}
    if tp == 2:  # shard with no flag (the automatic pick) -> verify DIR -> load_model from it (in the worker)
        for n in names:
            sharded[n] = tmp_path / f"{n}-tp{tp}"
            shard_checkpoint(str(plan_models[n]), tp=tp, out=str(sharded[n]))
            assert read(sharded[n])["plan"]["source"] == auto_source(n, plan_models[n])
            assert verify_sharded(sharded[n], tp=tp, quick=False)["ok"]
            cases.append({"id": f"{n}-sharded", "model": str(plan_models[n]), "plan": None,
                          "load_from": str(sharded[n])})
    spec, out = tmp_path / "cases.json", tmp_path / "results.json"
    spec.write_text(json.dumps(cases))
    torchrun(tp, ORACLES / "plans_worker.py", spec, out, timeout=840)
    results = json.loads(out.read_text())

    failed = {n: results[n] for n in names if not numerics_ok(results[n])}
    failed |= {f"{n}-sharded": results[f"{n}-sharded"] for n in sharded if not numerics_ok(results[f"{n}-sharded"])}
    assert not failed, json.dumps(failed, indent=1)
    for mid in mutations:
        assert not numerics_ok(results[mid]), f"{mid}: a broken plan passed numerics"
    if "opt-no-adaptation" in mutations:  # not a crash: the forward runs and computes different numbers
        assert results["opt-no-adaptation"]["logits"]["max_abs"] > 1e-3

    for n, folder in sharded.items():  # gather -> plain from_pretrained gives the original tensors
        gathered = tmp_path / f"{n}-gathered"
        gather_checkpoint(str(folder), out=str(gathered))
        want = AutoModelForCausalLM.from_pretrained(plan_models[n]).state_dict()
        got = AutoModelForCausalLM.from_pretrained(gathered).state_dict()
        assert want.keys() == got.keys()
        assert all(torch.equal(want[k], got[k]) for k in want), n


def test_refused_architectures_say_why():
    from transformers import AutoConfig

    from tpcli.errors import PlanError
    from tpcli.planning.checks import low_sharding_findings
    from tpcli.planning.plan import resolve_plan

    codegen = AutoConfig.for_model("codegen", n_embd=64, n_layer=1, n_head=4, vocab_size=101)
    if transformers_ships_plan(codegen):  # transformers >= 5.24: its own plan, no refusal
        assert resolve_plan(codegen).plan_source == "transformers default"
    else:
        with pytest.raises(PlanError, match=re.escape("tpcli refuses it: qkv_proj packs 4 hard-coded")):
            resolve_plan(codegen)
    dbrx = AutoConfig.for_model("dbrx", d_model=64, n_heads=4, n_layers=1, vocab_size=101,
                                attn_config={"kv_n_heads": 2, "rope_theta": 10000.0},
                                ffn_config={"ffn_hidden_size": 32, "moe_num_experts": 2})
    plan = resolve_plan(dbrx)  # transformers shards only lm_head
    (low,) = low_sharding_findings(plan)
    assert "plans/ has no plan for dbrx: its fused Wqkv packs q | k | v of different widths" in low.message


def test_declared_adaptation_names_are_exactly_the_implemented_ones():
    """planning validates plans against ADAPTATION_NAMES without importing the runtime; the two must not drift."""
    from tpcli.planning.plans_library import ADAPTATION_NAMES
    from tpcli.runtime.adaptations import ADAPTATIONS, adaptation

    assert set(ADAPTATIONS) == ADAPTATION_NAMES
    with pytest.raises(RuntimeError, match="not declared"):
        adaptation("no_such_family")(lambda model, tp, rank: None)
