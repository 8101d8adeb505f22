"""`tpcli gather` and resharding: bit-exact against the original checkpoint and transformers' saves."""

import json
import shutil

import pytest
import torch
from conftest import assert_same_shards, load_safetensors_dir, single_process_logits

from tpcli.commands.gather import gather_checkpoint
from tpcli.commands.shard import shard_checkpoint
from tpcli.errors import CheckpointError

PHI3_PACKED = {"model.layers.*.mlp.gate_up_proj": "packed_colwise", "model.layers.*.mlp.down_proj": "rowwise"}
ROUND_TRIPS = [("llama", 2, None), ("qwen3", 2, None), ("mixtral", 2, None), ("phi3", 2, PHI3_PACKED),
               ("mixtral3", 3, None), ("llama3", 3, None), ("qwen3_moe", 2, None)]


def assert_same_checkpoint(a, b):
    x, y = load_safetensors_dir(a), load_safetensors_dir(b)
    assert set(x) == set(y), set(x) ^ set(y)
    for k in x:
        assert x[k].dtype == y[k].dtype and torch.equal(x[k], y[k]), k


@pytest.mark.parametrize("name,tp,plan", ROUND_TRIPS, ids=[f"{c[0]}-tp{c[1]}" for c in ROUND_TRIPS])
def test_shard_then_gather_returns_the_original(model_dirs, tmp_path, name, tp, plan):
    plan_file = None
    if plan:
        plan_file = tmp_path / "plan.json"
        plan_file.write_text(json.dumps(plan))
    shard_checkpoint(str(model_dirs(name)), tp=tp, out=str(tmp_path / "s"), plan_file=plan_file and str(plan_file))
    gather_checkpoint(str(tmp_path / "s"), out=str(tmp_path / "g"))
    assert_same_checkpoint(tmp_path / "g", model_dirs(name))
    assert (tmp_path / "g" / "config.json").is_file() and not (tmp_path / "g" / "tpcli.json").exists()


def test_gather_splits_files_with_an_index(model_dirs, tmp_path):
    shard_checkpoint(str(model_dirs("llama")), tp=2, out=str(tmp_path / "s"))
    result = gather_checkpoint(str(tmp_path / "s"), out=str(tmp_path / "g"), max_shard_size="100KB")
    index = json.loads((tmp_path / "g" / "model.safetensors.index.json").read_text())
    assert len(result["files"]) > 1 and set(index["weight_map"].values()) == set(result["files"])
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size()
                                                  for t in load_safetensors_dir(tmp_path / "g").values())
    logits, _ = single_process_logits(tmp_path / "g")
    reference, _ = single_process_logits(model_dirs("llama"))
    assert torch.equal(logits, reference)


@pytest.mark.dist
@pytest.mark.parametrize("name,tp", [("qwen3", 2), ("mixtral", 2), ("mixtral3", 3)])
def test_gather_of_transformers_dcp_save_equals_its_save_pretrained(model_dirs, oracle, tmp_path, name, tp):
    dcp = oracle(name, tp) / "dcp"  # written by save_pretrained(distributed_checkpoint=True) under torchrun
    gather_checkpoint(str(dcp), out=str(tmp_path / "g"))
    # the fixture folder itself was written by transformers' non-distributed save_pretrained of the same weights
    assert_same_checkpoint(tmp_path / "g", model_dirs(name))


@pytest.mark.parametrize("name,n,m", [("mixtral3", 2, 3), ("llama3", 3, 2), ("qwen3", 2, 1), ("mixtral", 2, 1)])
def test_reshard_equals_direct_shard(model_dirs, tmp_path, name, n, m):
    shard_checkpoint(str(model_dirs(name)), tp=n, out=str(tmp_path / "n"))
    shard_checkpoint(str(tmp_path / "n"), tp=m, out=str(tmp_path / "nm"))
    shard_checkpoint(str(model_dirs(name)), tp=m, out=str(tmp_path / "m"))
    assert_same_shards(tmp_path / "nm", tmp_path / "m")
    doc = json.loads((tmp_path / "nm" / "tpcli.json").read_text())
    assert doc["source"]["kind"] == "sharded" and doc["tp_size"] == m


@pytest.fixture
def sharded(model_dirs, tmp_path):
    out = tmp_path / "s"
    shard_checkpoint(str(model_dirs("llama")), tp=2, out=str(out))
    return out


def _gather_fails(folder, tmp_path, match):
    out = tmp_path / "g"
    with pytest.raises(CheckpointError, match=match):
        gather_checkpoint(str(folder), out=str(out))
    assert not out.exists() and not [p for p in tmp_path.iterdir() if "tpcli-tmp" in p.name]


def test_gather_refuses_a_flipped_byte(sharded, tmp_path):
    f = sharded / "shard-00002-model-00001-of-00001.safetensors"
    data = bytearray(f.read_bytes())
    data[-10] ^= 0xFF
    f.write_bytes(bytes(data))
    _gather_fails(sharded, tmp_path, "shard-00002.*sha256")


def test_gather_refuses_a_truncated_file(sharded, tmp_path):
    f = sharded / "shard-00001-model-00001-of-00001.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    _gather_fails(sharded, tmp_path, "shard-00001.*truncated")


def test_gather_refuses_a_missing_rank_file(sharded, tmp_path):
    (sharded / "shard-00002-model-00001-of-00001.safetensors").unlink()
    _gather_fails(sharded, tmp_path, "shard-00002.*missing")


def test_gather_without_manifest_checks_coverage(sharded, tmp_path):
    (sharded / "tpcli.json").unlink()
    (sharded / "shard-00002-model-00001-of-00001.safetensors").unlink()
    _gather_fails(sharded, tmp_path, "a rank file is missing")


def test_gather_refuses_an_edited_manifest(sharded, tmp_path):
    doc = json.loads((sharded / "tpcli.json").read_text())
    doc["tensors"]["model.norm.weight"]["shape"] = [65]
    (sharded / "tpcli.json").write_text(json.dumps(doc))
    _gather_fails(sharded, tmp_path, "manifest was edited")


def test_gather_of_a_plain_folder_is_refused(model_dirs, tmp_path):
    _gather_fails(model_dirs("llama"), tmp_path, "no shard-")


def test_gather_refuses_a_shard_not_in_the_manifest(sharded, tmp_path):
    shutil.copy(sharded / "shard-00001-model-00001-of-00001.safetensors",
                sharded / "shard-00003-model-00001-of-00001.safetensors")
    _gather_fails(sharded, tmp_path, "shard-00003.*not listed")
