"""`tpcli verify`: static findings, numerics on real workers, integrity of sharded folders."""

import json
from pathlib import Path

import pytest

from tpcli.errors import UsageError
from tpcli.sharding import shard_checkpoint
from tpcli.verification import verify

PLANS = Path(__file__).parent.parent / "plans"


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
    (err,) = [f for f in r["findings"] if f["severity"] == "error"]
    return err["message"]


def test_integrity_ok(sharded):
    r = verify(str(sharded))
    assert r["ok"] and r["hashes_checked"] and r["tp"] == 2


def test_integrity_detects_a_flipped_byte(sharded):
    f = sharded / "shard-00001-model-00001-of-00001.safetensors"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 1
    f.write_bytes(bytes(data))
    assert "shard-00001" in _integrity_error(sharded) and "sha256" in _integrity_error(sharded)
    assert verify(str(sharded), quick=True)["ok"]  # --quick skips the hashes


def test_integrity_detects_truncation(sharded):
    f = sharded / "shard-00002-model-00001-of-00001.safetensors"
    f.write_bytes(f.read_bytes()[:1000])
    assert "shard-00002" in _integrity_error(sharded, quick=True)


def test_integrity_detects_a_missing_rank_file(sharded):
    (sharded / "shard-00001-model-00001-of-00001.safetensors").unlink()
    assert "shard-00001" in _integrity_error(sharded) and "missing" in _integrity_error(sharded)


def test_integrity_detects_an_edited_manifest(sharded):
    doc = json.loads((sharded / "tpcli.json").read_text())
    chunk = doc["tensors"]["model.embed_tokens.weight"]["chunks"][1]
    chunk["offsets"] = [500, 0]
    (sharded / "tpcli.json").write_text(json.dumps(doc))
    assert "manifest was edited" in _integrity_error(sharded)


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
