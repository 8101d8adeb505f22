"""Plan resolution equals what transformers builds on the real model object."""

import json

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from tpcli.errors import PlanError
from tpcli.planning.checks import check_plan, valid_tp_sizes
from tpcli.planning.plan import load_config, load_plan_file, resolve_plan


@pytest.mark.parametrize("name", ["llama", "qwen3", "mixtral", "phi3", "qwen3_moe"])
def test_resolved_rules_equal_transformers_model_tp_plan(model_dirs, name):
    path = model_dirs(name)
    real = AutoModelForCausalLM.from_pretrained(path)  # a real, materialised model: the oracle
    plan = resolve_plan(load_config(path))
    assert plan.rules == real.tp_plan
    assert list(plan.tensors) == list(real.state_dict())
    for tname, t in plan.tensors.items():
        assert t.shape == tuple(real.state_dict()[tname].shape)


def test_embed_tokens_rule_is_added_automatically(model_dirs):
    plan = resolve_plan(load_config(model_dirs("llama")))
    assert plan.rules["model.embed_tokens"] == "embedding_rowwise"
    assert plan.tensors["model.embed_tokens.weight"].placement.describe() == "Shard(0)"


def test_tied_lm_head_is_recorded(model_dirs):
    plan = resolve_plan(load_config(model_dirs("qwen3")))
    assert plan.tensors["lm_head.weight"].tied_to == "model.embed_tokens.weight"
    assert plan.total_bytes == sum(t.nbytes for t in plan.tensors.values() if t.name != "lm_head.weight")


def test_user_plan_is_merged_and_replicate_switches_a_rule_off(model_dirs, tmp_path):
    f = tmp_path / "plan.json"
    f.write_text(json.dumps({"model.layers.*.mlp.down_proj": "replicate"}))
    plan = resolve_plan(load_config(model_dirs("llama")), user_plan=load_plan_file(f), plan_file=str(f))
    assert plan.rules["model.layers.*.mlp.down_proj"] == "replicate"
    assert plan.rules["model.layers.*.mlp.up_proj"] == "colwise"
    assert not plan.tensors["model.layers.0.mlp.down_proj.weight"].placement.is_sharded
    assert plan.plan_source.endswith(str(f))


def test_plan_file_with_unknown_key_names_the_key(model_dirs, tmp_path):
    f = tmp_path / "plan.json"
    f.write_text(json.dumps({"model.layers.*.mlp.nope": "colwise"}))
    with pytest.raises(PlanError, match="nope"):
        resolve_plan(load_config(model_dirs("llama")), user_plan=load_plan_file(f), plan_file=str(f))


@pytest.mark.parametrize("content,match", [("{not json", "not valid JSON"), ('["a"]', "JSON object"),
                                           ('{"lm_head": "diagonal"}', "unknown style 'diagonal'")])
def test_malformed_plan_files(tmp_path, content, match):
    f = tmp_path / "plan.json"
    f.write_text(content)
    with pytest.raises(PlanError, match=match):
        load_plan_file(f)


def test_model_without_plan_points_at_plan_flag():
    from transformers import AutoConfig

    # jetmoe: no plan in transformers and none in plans/ (opt, the old example here, now has one there)
    config = AutoConfig.for_model("jetmoe", hidden_size=64, num_hidden_layers=1, num_key_value_heads=2,
                                  kv_channels=16, vocab_size=101, intermediate_size=32)
    with pytest.raises(PlanError, match="--plan FILE"):
        resolve_plan(config)


def test_valid_tp_sizes_and_reasons(model_dirs):
    plan = resolve_plan(load_config(model_dirs("llama")))  # 4 heads, 2 KV heads
    valid, invalid = valid_tp_sizes(plan, 8)
    assert valid == [1, 2]
    assert invalid[4] == invalid[4] and "num_key_value_heads=2 not divisible by 4" in invalid[4]
    assert "num_attention_heads=4 not divisible by 3" in invalid[3]


def _findings(config, tp, user_plan=None):
    return {f.code: f for f in check_plan(resolve_plan(config, user_plan=user_plan), tp)}


def test_findings_heads_empty_shards_and_replicated(model_dirs):
    cfg = AutoConfig.from_pretrained(model_dirs("llama"))
    f = _findings(cfg, 8)
    assert f["kv-heads"].severity == "error" and f["heads"].severity == "error"
    assert "empty-shard" not in f  # 8 divides every sharded dim here
    small = AutoConfig.from_pretrained(model_dirs("llama"))
    small.num_attention_heads, small.num_key_value_heads, small.head_dim = 2, 2, 32
    small.intermediate_size = 2
    f = _findings(small, 4)
    # empty plain shards run (tests/test_verify_sweep.py): a warning; a packed rank without rows is an error
    assert f["empty-shard"].severity == "warning" and "mlp" in f["empty-shard"].message
    packed = check_plan(resolve_plan(small, user_plan={"model.layers.*.mlp.gate_proj": "packed_colwise"}), 4)
    assert any(f.code == "empty-shard" and f.severity == "error" and "packed" in f.message for f in packed)


def test_findings_uneven_tied_and_unused_default_rule(model_dirs):
    f = _findings(AutoConfig.from_pretrained(model_dirs("qwen3")), 2)
    assert f["uneven"].severity == "warning" and "1001 -> 501/500" in f["uneven"].message
    assert f["tied"].severity == "info"
    f = _findings(AutoConfig.from_pretrained(model_dirs("qwen3_moe")), 2)
    assert f["unused-rule"].severity == "warning"  # dense-MLP rules of an all-MoE config


def test_findings_packed_and_double_rules(model_dirs):
    cfg = AutoConfig.from_pretrained(model_dirs("phi3"))
    packed = {"model.layers.*.mlp.gate_up_proj": "packed_colwise", "model.layers.*.mlp.down_proj": "rowwise"}
    f = _findings(cfg, 4, packed)  # 2 x 96 rows: 96 % 4 == 0
    assert "gate_up_proj" not in f["uneven"].message  # only the vocabulary (1001) splits unevenly
    # uneven halves run and compute the right numbers (tests/test_verify_sweep.py): a warning, not an error
    five = check_plan(resolve_plan(cfg, user_plan=packed), 5)
    assert not [f for f in five if f.severity == "error"]
    # without the row-wise down_proj the split halves meet phi3's default rowwise_split_input: a crash
    half = _findings(cfg, 2, {"model.layers.*.mlp.gate_up_proj": "packed_colwise"})
    assert half["pairing"].severity == "error" and "gate_up_proj: packed_colwise" in half["pairing"].message
    # a colwise head leaves the logits split (each rank returns a slice of the vocabulary)
    head = _findings(cfg, 2, {"lm_head": "colwise"})
    assert head["pairing"].severity == "error" and "colwise_gather_output" in head["pairing"].message
    f = _findings(cfg, 2, {"model.layers.*.mlp.gate_up_proj.weight": "rowwise"})
    assert f["double-rule"].severity == "error"


def test_grouped_mm_stride_error(model_dirs):
    """transformers' default experts kernel crashes on these (tests/test_verify_sweep.py): an error, not a warning."""
    cfg = AutoConfig.from_pretrained(model_dirs("mixtral"))
    cfg.intermediate_size = 6  # local width 3 floats = 12 bytes at tp=2
    f = _findings(cfg, 2)
    assert f["grouped-mm-stride"].severity == "error" and "eager" in f["grouped-mm-stride"].message
    cfg.intermediate_size = 8  # 4 floats = 16 bytes
    assert "grouped-mm-stride" not in _findings(cfg, 2)


def test_meta_model_allocates_nothing(model_dirs):
    plan = resolve_plan(load_config(model_dirs("mixtral")))
    assert all(p.device == torch.device("meta") for p in plan.model.parameters())
