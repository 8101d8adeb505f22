"""`gather` / `verify DIR` from tpcli.json alone (`tpcli.formats.manifest_gather`) against the path through transformers.

The oracle is the general path (`byte_copy=False`: transformers' reverse conversions and huggingface_hub's split,
itself tested against transformers' own saves in test_gather.py): on every architecture the suite shards, the
manifest path must write the same files, byte for byte; where it does not apply (conversions, an older manifest,
an edited config.json, another transformers) it must not run at all.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import MODELS

from tpcli.commands.gather import gather_checkpoint
from tpcli.commands.shard import shard_checkpoint
from tpcli.commands.verify import verify
from tpcli.errors import CheckpointError
from tpcli.formats import manifest, manifest_gather
from tpcli.runtime.folders import model_record

CONVERTED = {"mixtral", "mixtral3", "mixtral4kv", "qwen3_moe"}  # per-expert checkpoint keys, fused experts at run time
CASES = [(name, 3 if name in ("mixtral3", "llama3") else 2) for name in MODELS]  # "*3": valid at tp=3


def _digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(Path(folder).iterdir())}


@pytest.mark.parametrize("name,tp", CASES, ids=[f"{n}-tp{t}" for n, t in CASES])
def test_manifest_path_writes_the_general_paths_files(model_dirs, tmp_path, name, tp):
    shard_checkpoint(str(model_dirs(name)), tp=tp, out=str(tmp_path / "s"))
    names = json.loads((tmp_path / "s" / manifest.NAME).read_text())["names"]
    assert names["checkpoint"] is (name not in CONVERTED)
    for size in ("5GB", "60KB"):  # one file, and several files + index.json
        fast = gather_checkpoint(str(tmp_path / "s"), out=str(tmp_path / f"fast-{size}"), max_shard_size=size)
        slow = gather_checkpoint(str(tmp_path / "s"), out=str(tmp_path / f"slow-{size}"), max_shard_size=size,
                                 byte_copy=False)
        assert fast["path"] == ("transformers" if name in CONVERTED else "manifest") and slow["path"] == "transformers"
        assert _digests(tmp_path / f"fast-{size}") == _digests(tmp_path / f"slow-{size}")
        assert fast["files"] == slow["files"] and fast["tensors"] == slow["tensors"]
    assert len(list((tmp_path / "fast-60KB").glob("*.safetensors"))) > 1
    r = verify(str(tmp_path / "s"), quick=True)
    assert r["ok"] and r["path"] == "manifest"  # config.json is vouched for even where names are converted


def test_cast_to_the_stored_dtype_is_merged_as_bytes_and_config_dtype_is_set(model_dirs, tmp_path):
    shard_checkpoint(str(model_dirs("llama")), tp=2, out=str(tmp_path / "s"), dtype="bf16")
    fast = gather_checkpoint(str(tmp_path / "s"), out=str(tmp_path / "fast"), dtype="bf16")
    gather_checkpoint(str(tmp_path / "s"), out=str(tmp_path / "slow"), dtype="bf16", byte_copy=False)
    assert fast["path"] == "manifest" and _digests(tmp_path / "fast") == _digests(tmp_path / "slow")
    assert gather_checkpoint(str(tmp_path / "s"), out=str(tmp_path / "fp32"), dtype="fp32")["path"] == "transformers"


SCRIPT = """
import json, sys
from tpcli.cli import main
sys.argv = ["tpcli", *sys.argv[1:]]
try:
    main()
except SystemExit:
    pass
print("LOADED", json.dumps(sorted(m for m in ("torch", "transformers") if m in sys.modules)))
"""


def _cli(*args, cache: Path | str = "off") -> tuple[dict, list[str]]:
    """Run `tpcli ARGS --json` in a fresh interpreter: (its JSON, which of torch/transformers it imported)."""
    proc = subprocess.run([sys.executable, "-c", SCRIPT, *map(str, args), "--json"], capture_output=True, text=True,
                          env={**os.environ, "TPCLI_CACHE_DIR": str(cache)})
    out, loaded = proc.stdout.rsplit("LOADED", 1)
    return json.loads(out), json.loads(loaded)


@pytest.mark.e2e
def test_a_second_gather_and_verify_of_a_folder_import_neither_torch_nor_transformers(model_dirs, tmp_path):
    """The first look at a folder asks transformers what config.json's model is (the manifest's own word is not
    trusted: issue 34 item 4); its answer is cached, so later ones import neither torch nor transformers."""
    shard_checkpoint(str(model_dirs("qwen3")), tp=2, out=str(tmp_path / "s"))  # tied embeddings, a tokenizer
    cache = tmp_path / "cache"
    result, loaded = _cli("gather", tmp_path / "s", "--out", tmp_path / "g0", cache=cache)
    assert result["path"] == "manifest" and loaded == ["torch", "transformers"]
    result, loaded = _cli("gather", tmp_path / "s", "--out", tmp_path / "g", cache=cache)
    assert result["path"] == "manifest" and loaded == []
    gather_checkpoint(str(tmp_path / "s"), out=str(tmp_path / "ref"), byte_copy=False)
    assert _digests(tmp_path / "g") == _digests(tmp_path / "ref") == _digests(tmp_path / "g0")
    for flags in (["--quick"], []):
        result, loaded = _cli("verify", tmp_path / "s", *flags, cache=cache)
        assert result["ok"] and result["path"] == "manifest" and result["hashes_checked"] == (not flags)
        assert loaded == []
    # the same folder whose manifest no longer vouches for config.json: the path through transformers
    cfg = tmp_path / "s" / "config.json"
    cfg.write_text(cfg.read_text() + " ")
    result, loaded = _cli("verify", tmp_path / "s", "--quick", cache=cache)
    assert result["ok"] and result["path"] == "transformers" and loaded == ["torch", "transformers"]


def _edit_manifest(folder: Path, edit) -> None:
    path = folder / manifest.NAME
    doc = json.loads(path.read_text())
    edit(doc)
    path.write_text(json.dumps(doc, indent=1) + "\n")


def _no_names(doc):
    del doc["names"]


def _other_transformers(doc):
    doc["versions"]["transformers"] = "5.0.0"


def _other_config(folder: Path):
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(cfg, indent=4))  # same model, other bytes


@pytest.mark.parametrize("change", ["no names record", "other transformers", "config.json rewritten"])
def test_falls_back_where_the_manifest_does_not_vouch(model_dirs, tmp_path, change):
    shard_checkpoint(str(model_dirs("llama")), tp=2, out=str(tmp_path / "s"))
    folder = tmp_path / "s"
    if change == "no names record":
        _edit_manifest(folder, _no_names)
    elif change == "other transformers":
        _edit_manifest(folder, _other_transformers)
    else:
        _other_config(folder)
    assert manifest_gather.why_not_vouched(folder, manifest.read(folder)) is not None
    result = gather_checkpoint(str(folder), out=str(tmp_path / "g"))
    assert result["path"] == "transformers"
    assert verify(str(folder), quick=True)["path"] == "transformers"
    gather_checkpoint(str(folder), out=str(tmp_path / "ref"), byte_copy=False)
    assert _digests(tmp_path / "g") == _digests(tmp_path / "ref")


def test_a_manifest_tie_without_its_twin_is_not_trusted(model_dirs, tmp_path):
    shard_checkpoint(str(model_dirs("qwen3")), tp=2, out=str(tmp_path / "s"))
    folder = tmp_path / "s"
    meta = manifest.read(folder)
    record = model_record(folder, meta)
    assert manifest_gather.why_not_mergeable(folder, meta, None, record) is None
    tied = next(n for n, t in meta["tensors"].items() if t["tied_to"])
    meta["tensors"][tied]["tied_to"] = "model.norm.weight"  # another shape: not a twin
    assert "tied" in manifest_gather.why_not_mergeable(folder, meta, None, record)


def _sharding_info_swapped(folder: Path) -> None:
    """Rewrite rank 1's header (same length) so that it claims rank 0's offsets for one column-split tensor."""
    path = folder / "shard-00002-model-00001-of-00001.safetensors"
    raw = bytearray(path.read_bytes())
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    info = json.loads(header["__metadata__"]["DCP_SHARDING_INFO"])
    name = next(k for k, v in info.items() if k.endswith("down_proj.weight"))
    info[name]["saved_offsets"] = [0] * len(info[name]["saved_offsets"])
    header["__metadata__"]["DCP_SHARDING_INFO"] = json.dumps(info)
    new = json.dumps(header, separators=(",", ":")).encode()
    assert len(new) <= n
    raw[8:8 + n] = new + b" " * (n - len(new))
    path.write_bytes(raw)


def _manifest_chunks_swapped(folder: Path) -> None:
    """The manifest says rank 0's chunk of a row-split tensor is rank 1's and vice versa."""
    def edit(doc):
        t = next(t for n, t in doc["tensors"].items() if n.endswith("q_proj.weight"))
        t["chunks"][0]["offsets"], t["chunks"][1]["offsets"] = t["chunks"][1]["offsets"], t["chunks"][0]["offsets"]
    _edit_manifest(folder, edit)


@pytest.mark.parametrize("break_it", [_sharding_info_swapped, _manifest_chunks_swapped],
                         ids=["rank-header-edited", "manifest-chunks-edited"])
def test_headers_that_disagree_with_the_manifest_are_refused(model_dirs, tmp_path, break_it):
    shard_checkpoint(str(model_dirs("llama")), tp=2, out=str(tmp_path / "s"))
    folder = tmp_path / "s"
    break_it(folder)
    meta = manifest.read(folder)
    assert manifest_gather.why_not_mergeable(folder, meta, None, model_record(folder, meta)) is None  # still vouches
    with pytest.raises(CheckpointError, match="overlaps|differ from the shard files"):
        gather_checkpoint(str(folder), out=str(tmp_path / "g"))
    assert not (tmp_path / "g").exists()
    r = verify(str(folder), quick=True)
    assert not r["ok"] and r["findings"][0]["code"] == "integrity"


def test_dot_natural_key_is_transformers_own():
    from transformers.core_model_loading import dot_natural_key

    names = ["model.layers.10.mlp.fc11.weight", "model.layers.2.mlp.fc2.weight", "model.layers.2.mlp.fc11.weight",
             "lm_head.weight", "model.layers.1.self_attn.q_proj.weight", "model.layers_x.0", "model.layers.1",
             "a.b0.c", "a.b.c", "a_b.c", "x.007.y", "x.7.y", "x.y7z.w", "model.embed_tokens.weight", "model.norm.weight"]
    assert [manifest_gather.dot_natural_key(n) for n in names] == [dot_natural_key(n) for n in names]
    assert sorted(names, key=manifest_gather.dot_natural_key) == sorted(names, key=dot_natural_key)


def test_an_older_manifest_still_reads_and_a_malformed_record_is_refused(model_dirs, tmp_path):
    shard_checkpoint(str(model_dirs("llama")), tp=2, out=str(tmp_path / "s"))
    folder = tmp_path / "s"
    copy = tmp_path / "old"
    shutil.copytree(folder, copy)
    _edit_manifest(copy, _no_names)
    assert "names" not in manifest.read(copy)

    def malformed(doc):
        doc["names"]["checkpoint"] = "yes"
    _edit_manifest(folder, malformed)
    with pytest.raises(CheckpointError, match="field names must be"):
        manifest.read(folder)
