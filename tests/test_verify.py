"""`tpcli verify`: static findings, numerics on real workers, integrity of sharded folders."""

import json
from pathlib import Path

import pytest

from tpcli.commands.shard import shard_checkpoint
from tpcli.commands.verify import verify
from tpcli.errors import UsageError

PLANS = Path(__file__).parent.parent / "tpcli" / "examples"  # example user plans; plans/ is the verified library


@pytest.mark.parametrize("name,tp,ok", [("llama", 2, True), ("llama", 3, False), ("llama", 4, False),
                                        ("llama", 8, False), ("llama3", 3, True), ("mixtral3", 3, True),
                                        ("qwen3", 2, True)])
def test_static_verdicts(model_dirs, name, tp, ok):
    r = verify(str(model_dirs(name)), tp=tp)
    assert r["ok"] is ok
    assert r["mode"] == "static"
    if not ok:
        assert any(f["severity"] == "error" and "not divisible" in f["message"] for f in r["findings"])


def test_static_needs_tp(model_dirs):
    with pytest.raises(UsageError, match="--tp"):
        verify(str(model_dirs("llama")))


def test_unknown_style_in_plan_file_is_reported(model_dirs, tmp_path):
    f = tmp_path / "p.json"
    f.write_text(json.dumps({"model.layers.*.mlp.up_proj": "diagonal"}))
    from tpcli.errors import PlanError

    with pytest.raises(PlanError, match="unknown style 'diagonal'"):
        verify(str(model_dirs("llama")), tp=2, plan_file=str(f))


@pytest.mark.dist
@pytest.mark.parametrize("name", ["llama", "qwen3", "mixtral"])
def test_numerics_pass_for_default_plans(model_dirs, name):
    r = verify(str(model_dirs(name)), tp=2, numerics=True)
    n = r["numerics"]
    assert r["ok"], n
    assert n["logits"]["max_abs"] <= 1e-5 and n["tokens_equal"] and n["first_bad"] is None
    assert [layer["name"] for layer in n["layers"]][:2] == ["embeddings", "layer 0"]


@pytest.mark.dist
def test_numerics_fail_a_wrong_plan_and_say_where(model_dirs):
    r = verify(str(model_dirs("opt")), tp=2, plan_file=str(PLANS / "opt-naive.json"), numerics=True)
    n = r["numerics"]
    assert not r["ok"]
    assert n["logits"]["max_abs"] > 1e-2  # runs, but computes different numbers
    assert n["first_bad"] == "layer 0"


@pytest.fixture
def sharded(model_dirs, tmp_path):
    out = tmp_path / "s"
    shard_checkpoint(str(model_dirs("qwen3")), tp=2, out=str(out))
    return out


def _integrity_error(folder, **kw) -> str:
    r = verify(str(folder), **kw)
    assert r["mode"] == "integrity" and not r["ok"]
    assert r["hashes_checked"] is None and r["tp"] is None  # stopped at the first error: neither is known
    (err,) = [f for f in r["findings"] if f["severity"] == "error"]
    return err["message"]


def test_integrity_ok(sharded):
    r = verify(str(sharded))
    assert r["ok"] and r["hashes_checked"] and r["tp"] == 2


def test_quick_still_compares_the_bytes_of_a_tie(sharded):
    from tpcli.formats.rankfile import data_spans

    f = sharded / "shard-00001-model-00001-of-00001.safetensors"
    begin, _ = data_spans(f)["lm_head.weight"]
    data = bytearray(f.read_bytes())
    data[begin] ^= 1
    f.write_bytes(bytes(data))
    assert "different values" in _integrity_error(sharded, quick=True)  # a tie is left out only if the bytes agree


def test_integrity_detects_a_config_mismatch(sharded):
    cfg = json.loads((sharded / "config.json").read_text())
    cfg["intermediate_size"] = 128
    (sharded / "config.json").write_text(json.dumps(cfg))
    assert "config.json" in _integrity_error(sharded)


@pytest.mark.dist
def test_integrity_of_a_transformers_dcp_save(oracle):
    r = verify(str(oracle("qwen3", 2) / "dcp"))
    assert r["ok"] and not r["hashes_checked"]
    assert any(f["code"] == "no-manifest" for f in r["findings"])


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """tiny("deepseek_v3", kv_heads=2) -> a locally built model folder, cached per arguments."""
    from tpcli.testing import build_tiny

    root, cache = tmp_path_factory.mktemp("tiny"), {}

    def get(kind: str, **overrides) -> Path:
        key = (kind, tuple(sorted(overrides.items())))
        if key not in cache:
            cache[key] = build_tiny(kind, root / f"{kind}-{len(cache)}", **overrides)
        return cache[key]

    return get


@pytest.mark.parametrize("kv,ok", [(2, False), (1, False), (4, True)])
def test_mla_kv_heads_below_heads_fail_statically(tiny, kv, ok):
    """Issue 12: deepseek_v3 with num_key_value_heads < num_attention_heads passed, then every TP forward crashed
    (tests/test_verify_sweep.py runs the forward); at every TP size, so inspect lists no valid size either."""
    r = verify(str(tiny("deepseek_v3", heads=4, kv_heads=kv)), tp=2)
    assert r["ok"] is ok
    assert any(f["code"] == "mla-kv-heads" for f in r["findings"]) is not ok
    from tpcli.commands.inspect import load_resolved
    from tpcli.planning.checks import valid_tp_sizes

    valid, _ = valid_tp_sizes(load_resolved(str(tiny("deepseek_v3", heads=4, kv_heads=kv)))[1], max_tp=4)
    assert valid == ([1, 2, 3, 4] if ok else [])  # the default plan leaves MLA attention whole; experts: 96 rows


def test_llama4_unused_default_rules_are_one_line(tiny):
    """transformers ships Llama 4's text rules as `language_model.layers.*` and `language_model.model.layers.*`:
    the spelling that cannot match is counted, the rules that really match nothing are listed in full, once."""
    r = verify(str(tiny("llama4")), tp=2)
    unused = [f for f in r["findings"] if f["code"] == "unused-rule"]
    assert len(unused) == 1 and unused[0]["severity"] == "warning"
    msg = unused[0]["message"]
    assert msg.startswith("3 default rules match nothing")  # the dense-MLP rules of an all-MoE tiny config
    assert "language_model.model.layers.*.feed_forward.gate_proj" in msg and "14 more are other spellings" in msg
    assert "language_model.layers.*.self_attn.q_proj" not in msg


@pytest.mark.dist
def test_numerics_of_a_multimodal_checkpoint(tiny):
    """Qwen2_5_VLForConditionalGeneration is not an AutoModelForCausalLM: numerics builds the declared class and
    compares its text path (input_ids only) with the single-process model."""
    r = verify(str(tiny("qwen2_5_vl")), tp=2, numerics=True)
    assert r["architecture"] == "Qwen2_5_VLForConditionalGeneration"
    n = r["numerics"]
    assert r["ok"], n
    assert n["logits"]["max_abs"] <= 1e-5 and n["tokens_equal"] and len(n["layers"]) == 3


def test_load_model_builds_the_declared_class(tiny):
    """Single process (no WORLD_SIZE): tpcli.load_model == transformers' own load of the declared class."""
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    import tpcli

    path = tiny("qwen2_5_vl")
    ours = tpcli.load_model(path)
    theirs = Qwen2_5_VLForConditionalGeneration.from_pretrained(path)
    assert type(ours) is Qwen2_5_VLForConditionalGeneration
    ids = torch.tensor([[1, 17, 256, 3, 999, 42]])
    with torch.no_grad():
        assert torch.equal(ours(input_ids=ids).logits, theirs(input_ids=ids).logits)
