"""Fused-QKV plans (falcon, falcon-mha, falcon-mq, bloom, gpt_bigcode): the layout picks, refusals, ALiBi.

tests/test_plans_library.py already proves every shipped plan (these included) at tp=2 and tp=4 on a tiny model with
8 heads, and its shard -> verify -> load_model -> gather round trip. This file adds what is specific to fused QKV:
each Falcon layout gets its own plan and a plan for another layout is refused; BLOOM with 12 heads (ALiBi slopes from
the non-power-of-two branch on rank 1) is exact at tp=2; and BLOOM without its adaptation fails.
"""

from __future__ import annotations

import json

import pytest
from conftest import ORACLES, torchrun

from tpcli.errors import PlanError
from tpcli.planning import plans_library
from tpcli.planning.plan import load_config

# tiny kind (tpcli.testing presets) -> the shipped plan the automatic pick must choose for it
KINDS = {"falcon": "falcon", "falcon-mha": "falcon-mha", "falcon-mq": "falcon-mq", "bloom": "bloom",
         "gpt_bigcode": "gpt_bigcode", "gpt_bigcode-mha": "gpt_bigcode-mha"}
TOLERANCE = 1e-5  # fp32 max abs logit error


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from tpcli.testing import build_tiny

    root = tmp_path_factory.mktemp("fused_qkv")
    return {kind: build_tiny(kind, root / kind) for kind in KINDS}


def test_auto_pick_chooses_the_plan_of_each_layout(models):
    for kind, name in KINDS.items():
        assert plans_library.auto_pick(load_config(models[kind])).name == name, kind


def test_a_plan_for_another_layout_is_refused(models):
    # a colwise split of query_key_value would cut the multi-query K/V head: the equals constraint refuses it
    with pytest.raises(PlanError, match="multi_query"):
        plans_library.check_fits(plans_library.find("falcon-mha"), load_config(models["falcon-mq"]))
    with pytest.raises(PlanError, match="new_decoder_architecture"):
        plans_library.check_fits(plans_library.find("falcon-mq"), load_config(models["falcon"]))
    with pytest.raises(PlanError, match="multi_query"):
        plans_library.check_fits(plans_library.find("gpt_bigcode-mha"), load_config(models["gpt_bigcode"]))


def test_tp_sizes_that_cut_a_head_or_kv_group_are_refused(models):
    # tiny falcon: 8 heads in 4 KV groups -> tp=8 would split a group; bloom: 12 heads -> tp=8 splits a head
    errors = plans_library.constraint_errors(plans_library.find("falcon"), load_config(models["falcon"]), 8)
    assert [attr for attr, _ in errors] == ["num_kv_heads"]
    errors = plans_library.constraint_errors(plans_library.find("bloom"), load_config(models["bloom"]), 8)
    assert [attr for attr, _ in errors] == ["n_head"]
    assert not plans_library.constraint_errors(plans_library.find("bloom"), load_config(models["bloom"]), 4)


def _run(tmp_path, tp: int, cases: list[dict]) -> dict:
    (tmp_path / "cases.json").write_text(json.dumps(cases))
    torchrun(tp, ORACLES / "plans_worker.py", tmp_path / "cases.json", tmp_path / "out.json")
    return json.loads((tmp_path / "out.json").read_text())


def _assert_exact(case: str, result: dict) -> None:
    assert "error" not in result, f"{case}: {result}"
    assert result["logits"]["max_abs"] <= TOLERANCE, f"{case}: {result['logits']}"
    assert result["tokens_equal"], f"{case}: {result['tokens_tp']} != {result['tokens_ref']}"


@pytest.mark.dist
def test_bloom_alibi_slopes_per_rank_and_without_adaptation(models, tmp_path):
    # 12 heads at tp=2: rank 1's heads 6..11 include the slopes of the non-power-of-two branch
    mutated = json.loads(plans_library.find("bloom").path.read_text())
    mutated["adaptations"] = []  # no per-rank head count, no per-rank ALiBi rows
    (tmp_path / "bloom-mutated.json").write_text(json.dumps(mutated))
    results = _run(tmp_path, 2, [
        {"id": "bloom", "model": str(models["bloom"]), "plan": None},
        {"id": "bloom-mutated", "model": str(models["bloom"]), "plan": str(tmp_path / "bloom-mutated.json")},
    ])
    _assert_exact("bloom", results["bloom"])
    bad = results["bloom-mutated"]
    assert "error" in bad or bad["generate_error"] or bad["logits"]["max_abs"] > TOLERANCE, bad
