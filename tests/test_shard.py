"""`tpcli shard` against transformers' own TP load and DCP save (the oracle), and the single-process model."""

import json
import shutil

import pytest
import torch
from conftest import assert_same_shards, single_process_logits
from transformers.distributed.parallel_utils import replace_layer_number_by_wildcard

from tpcli.commands.inspect import inspect_model, local_shapes
from tpcli.commands.shard import shard_checkpoint
from tpcli.errors import CheckpointError, OutputError, PlanError
from tpcli.planning.layout import local_shape
from tpcli.planning.plan import load_config, load_plan_file, resolve_plan

PHI3_PACKED = {"model.layers.*.mlp.gate_up_proj": "packed_colwise", "model.layers.*.mlp.down_proj": "rowwise"}

# (fixture model, tp, plan) covering dense, multi-file, tied, MoE with converted experts, packed, uneven tp=3
CASES = [("llama", 2, None), ("qwen3", 2, None), ("mixtral", 2, None), ("phi3", 2, PHI3_PACKED),
         ("mixtral3", 3, None), ("llama3", 3, None)]


def _plan_file(tmp_path, plan):
    if plan is None:
        return None
    f = tmp_path / "plan.json"
    f.write_text(json.dumps(plan))
    return f


@pytest.mark.dist
@pytest.mark.parametrize("name,tp,plan", CASES, ids=[f"{c[0]}-tp{c[1]}" for c in CASES])
def test_shard_is_bit_identical_to_transformers_dcp_save(model_dirs, oracle, tmp_path, name, tp, plan):
    plan_file = _plan_file(tmp_path, plan)
    theirs = oracle(name, tp, plan_file)
    out = tmp_path / "ours"
    shard_checkpoint(str(model_dirs(name)), tp=tp, out=str(out), plan_file=str(plan_file) if plan_file else None)
    assert_same_shards(out, theirs / "dcp")

    # inspect's placements and per-rank local shapes equal those of the real TP load
    pf = str(plan_file) if plan_file else None
    plan = resolve_plan(load_config(model_dirs(name)), user_plan=load_plan_file(pf) if pf else None)
    report = inspect_model(str(model_dirs(name)), tp=tp, plan_file=pf)
    shapes = {g["pattern"]: local_shapes(g) for g in report["tp"]["groups"]}
    for r in range(tp):
        real = json.loads((theirs / f"layout-rank{r}.json").read_text())
        assert set(real) == set(plan.tensors)
        for tname, entry in real.items():
            t = plan.tensors[tname]
            assert [repr(t.placement.to_torch())] == entry["placements"], tname
            assert list(local_shape(t.shape, t.placement, tp, r)) == entry["local_shape"], (tname, r)
            if t.tied_to is None:
                assert shapes[replace_layer_number_by_wildcard(tname)][r] == entry["local_shape"], (tname, r)


@pytest.mark.dist
@pytest.mark.parametrize("name,tp", [("qwen3", 2), ("mixtral", 2), ("mixtral3", 3)])
def test_transformers_loads_tpcli_shards_with_single_process_numerics(model_dirs, oracle, tmp_path, name, tp):
    out = tmp_path / "sharded"
    shard_checkpoint(str(model_dirs(name)), tp=tp, out=str(out))
    loaded = oracle(name, tp, src=out, dcp=False)  # from_pretrained(out, tp_plan="auto") under torchrun
    reference = oracle(name, tp)  # from_pretrained(original, tp_plan="auto")
    for r in range(tp):
        a = json.loads((loaded / f"layout-rank{r}.json").read_text())
        b = json.loads((reference / f"layout-rank{r}.json").read_text())
        assert a == b
    kwargs = {"experts_implementation": "eager"} if tp == 3 and "mixtral" in name else {}
    logits, tokens = single_process_logits(model_dirs(name), **kwargs)
    tp_logits = torch.load(loaded / "logits.pt")
    assert (tp_logits - logits).abs().max().item() <= 1e-5
    assert torch.equal(torch.load(loaded / "tokens.pt"), tokens)


def test_shard_manifest_and_copied_files(model_dirs, tmp_path):
    out = tmp_path / "s"
    result = shard_checkpoint(str(model_dirs("qwen3")), tp=2, out=str(out))
    doc = json.loads((out / "tpcli.json").read_text())
    assert doc["format"] == "tpcli.sharded" and doc["format_version"] == 1 and doc["tp_size"] == 2
    assert set(doc["versions"]) == {"tpcli", "transformers", "torch"}
    assert doc["tensors"]["model.embed_tokens.weight"]["chunks"][1]["offsets"] == [501, 0]
    assert doc["tensors"]["lm_head.weight"]["tied_to"] == "model.embed_tokens.weight"
    from tpcli.formats.hashing import sha256_file

    for fname, f in doc["files"].items():
        assert sha256_file(out / fname) == f["sha256"] and (out / fname).stat().st_size == f["bytes"]
    for aux in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (out / aux).is_file()
    assert result["tp_size"] == 2 and len(result["files"]) == 2


def test_dtype_cast_while_streaming(model_dirs, tmp_path):
    from safetensors import safe_open

    out = tmp_path / "bf16"
    shard_checkpoint(str(model_dirs("llama")), tp=2, out=str(out), dtype="bf16")
    with safe_open(str(out / "shard-00001-model-00001-of-00001.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"


def test_invalid_tp_is_refused_before_writing(model_dirs, tmp_path):
    out = tmp_path / "x"
    with pytest.raises(PlanError, match="num_key_value_heads=2 not divisible by 4"):
        shard_checkpoint(str(model_dirs("llama")), tp=4, out=str(out))
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if "tpcli-tmp" in p.name]


def test_non_empty_out_needs_force(model_dirs, tmp_path):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(OutputError, match="--force"):
        shard_checkpoint(str(model_dirs("llama")), tp=2, out=str(out))
    with pytest.raises(OutputError, match="not a tpcli output"):  # --force never deletes a folder tpcli did not write
        shard_checkpoint(str(model_dirs("llama")), tp=2, out=str(out), force=True)
    assert (out / "keep.txt").read_text() == "x"
    (out / "keep.txt").unlink()
    shard_checkpoint(str(model_dirs("llama")), tp=2, out=str(out))
    (out / "note.txt").write_text("a previous tpcli output may hold anything")
    shard_checkpoint(str(model_dirs("llama")), tp=2, out=str(out), force=True)
    assert not (out / "note.txt").exists() and (out / "tpcli.json").exists() and (out / ".tpcli-output").exists()


def test_pickled_checkpoint_is_refused(model_dirs, tmp_path):
    src = tmp_path / "bin"
    shutil.copytree(model_dirs("llama"), src)
    for f in src.glob("*.safetensors*"):
        f.unlink()
    (src / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="pickled"):
        shard_checkpoint(str(src), tp=2, out=str(tmp_path / "o"))
