"""A tpcli folder's manifest (and config.json) cannot change a tensor (issue 34 items 4 and 7).

Whoever can write the folder can rewrite tpcli.json and refresh every hash in it (nothing is signed), so the
manifest path trusts nothing the rank files' bytes can contradict: config.json's model (transformers' plan, cached)
must have exactly the rank files' tensors, a tensor is left out of `gather`'s output only where config.json ties it
and the bytes agree, and a name no model has is refused. Each forgery below passed `verify` and made `gather` drop
a tensor (the output then loads with a freshly initialised one) or crash, on b3d4079.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
from conftest import load_safetensors_dir, run_main
from test_bad_input import _rewrite_header

from tpcli.commands.gather import gather_checkpoint
from tpcli.commands.verify import verify
from tpcli.errors import CheckpointError
from tpcli.formats import cache


@pytest.fixture(scope="module")
def untied(model_dirs, tmp_path_factory):
    from tpcli.commands.shard import shard_checkpoint

    out = tmp_path_factory.mktemp("trust") / "s"
    shard_checkpoint(str(model_dirs("llama4kv")), tp=2, out=str(out))  # untied lm_head
    return out


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _refresh(folder: Path, edit=None) -> None:
    """Apply `edit(manifest)`, then make every record in tpcli.json agree with the files again (sizes, sha256,
    config_sha256): what an attacker who can write the folder does."""
    path = folder / "tpcli.json"
    doc = json.loads(path.read_text())
    if edit:
        edit(doc)
    for name, f in doc["files"].items():
        f["bytes"], f["sha256"] = (folder / name).stat().st_size, _sha(folder / name)
    doc["names"]["config_sha256"] = _sha(folder / "config.json")
    path.write_text(json.dumps(doc, indent=1) + "\n")


def _tie_lm_head(doc):
    doc["tensors"]["lm_head.weight"]["tied_to"] = "model.embed_tokens.weight"


def _edit_config(folder: Path, **changes) -> None:
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(changes)
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))


def _manifest_tie(folder):
    _refresh(folder, _tie_lm_head)


def _config_and_manifest_tie(folder):
    _edit_config(folder, tie_word_embeddings=True)
    _refresh(folder, _tie_lm_head)


def _config_more_layers(folder):
    cfg = json.loads((folder / "config.json").read_text())
    _edit_config(folder, num_hidden_layers=cfg["num_hidden_layers"] + 1)
    _refresh(folder)


def _config_fewer_layers(folder):
    cfg = json.loads((folder / "config.json").read_text())
    _edit_config(folder, num_hidden_layers=cfg["num_hidden_layers"] - 1)
    _refresh(folder)


def _superscript_name(folder):
    """model.norm.weight renamed model.norm.² in its rank file, its DCP_SHARDING_INFO and the manifest."""
    doc = json.loads((folder / "tpcli.json").read_text())
    files = {c["file"] for c in doc["tensors"]["model.norm.weight"]["chunks"]}

    def rename(h, order):
        h["model.norm.²"] = h.pop("model.norm.weight")
        info = json.loads(h["__metadata__"]["DCP_SHARDING_INFO"])
        info["model.norm.²"] = info.pop("model.norm.weight")
        h["__metadata__"]["DCP_SHARDING_INFO"] = json.dumps(info)
    for f in files:
        _rewrite_header(folder / f, rename)
    _refresh(folder, lambda d: d["tensors"].update({"model.norm.²": d["tensors"].pop("model.norm.weight")}))


def _user_plan_rowwise(folder):
    """tpcli.json's plan says q_proj is 'rowwise' over files cut 'colwise': no byte changes; load_model's fast path
    placed each rank's slice by that plan (logits off by 1.5e-2 against 2e-7 for the genuine folder)."""
    _refresh(folder, lambda d: d["plan"].update(user_plan={"model.layers.*.self_attn.q_proj": "rowwise"}))


FORGERIES = {
    "manifest-user-plan-rowwise": (_user_plan_rowwise, "the shards cut model.layers.0.self_attn.q_proj.weight "
                                                       "otherwise than the plan places it (along dim 1 over 2"),
    "manifest-ties-lm-head": (_manifest_tie, "the manifest was edited"),
    "config-and-manifest-tie-lm-head": (_config_and_manifest_tie, "different values"),
    "config-one-more-layer": (_config_more_layers, "no shard holds model.layers."),
    "config-one-layer-less": (_config_fewer_layers, "which LlamaForCausalLM (config.json) does not have"),
    "superscript-two-name": (_superscript_name, "is not a name a model's state dict has"),
}


@pytest.mark.parametrize("case", list(FORGERIES))
def test_a_forged_folder_is_refused_by_verify_and_gather(case, untied, tmp_path, monkeypatch, capsys):
    forge, needle = FORGERIES[case]
    folder = Path(shutil.copytree(untied, tmp_path / "s"))
    monkeypatch.setenv(cache.ENV, str(tmp_path / "cache"))  # a record cached before the forgery must not help it
    assert verify(str(folder), quick=True)["ok"]
    forge(folder)
    r = verify(str(folder), quick=False)
    assert not r["ok"] and len(r["findings"]) == 1 and needle in r["findings"][0]["message"], r
    with pytest.raises(CheckpointError) as exc:
        gather_checkpoint(str(folder), out=str(tmp_path / "g"))
    assert needle in str(exc.value)
    assert not (tmp_path / "g").exists()
    for args in (["gather", folder, "--out", tmp_path / "g"], ["shard", folder, "--tp", "1", "--out", tmp_path / "r"]):
        rc, out, err = run_main(monkeypatch, capsys, *args)
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert rc == 1 and len(lines) == 1 and needle in lines[0] and "Traceback" not in err, (args, err[-2000:])
    assert not (tmp_path / "g").exists() and not (tmp_path / "r").exists()


def test_a_genuine_tie_is_still_left_out_and_proven_by_the_bytes(model_dirs, tmp_path):
    from tpcli.commands.shard import shard_checkpoint

    shard_checkpoint(str(model_dirs("qwen3")), tp=2, out=str(tmp_path / "s"))  # tie_word_embeddings: true
    r = gather_checkpoint(str(tmp_path / "s"), out=str(tmp_path / "g"))
    assert r["path"] == "manifest"
    out = load_safetensors_dir(tmp_path / "g")
    assert "lm_head.weight" not in out and set(out) == set(load_safetensors_dir(model_dirs("qwen3")))


def test_a_dot_natural_key_of_a_non_ascii_digit_sorts_as_text():
    from tpcli.formats.manifest_gather import dot_natural_key

    assert dot_natural_key("model.norm.²") == [(1, "model"), (1, "norm"), (1, "²")]


def test_tied_bytes_are_compared_whole_where_the_two_are_cut_differently(tmp_path):
    """`a` cut by rows, `b` by columns (no chunk-by-chunk comparison possible): assembled and compared whole."""
    import torch
    from safetensors.torch import save_file

    from tpcli.formats.dcp import SHARDING_KEY, same_chunk_bytes, scan, shard_file_name
    from tpcli.runtime.folders import same_values

    full = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    other = full.clone()
    other[3, 5] = -1
    for rank in range(2):
        rows, cols = full[2 * rank:2 * rank + 2], slice(3 * rank, 3 * rank + 3)
        tensors = {"a": rows.clone(), "b": full[:, cols].clone(), "c": other[:, cols].clone()}
        info = {"a": {"saved_offsets": [2 * rank, 0]}, "b": {"saved_offsets": [0, 3 * rank]},
                "c": {"saved_offsets": [0, 3 * rank]}}
        save_file(tensors, tmp_path / shard_file_name(rank), metadata={SHARDING_KEY: json.dumps(info)})
    t = scan(tmp_path)
    assert same_chunk_bytes(tmp_path, t["a"], t["b"]) is None  # cut differently
    assert same_chunk_bytes(tmp_path, t["b"], t["c"]) is False  # same cuts, one element differs
    assert same_values(tmp_path, t["a"], t["b"]) and not same_values(tmp_path, t["a"], t["c"])
