"""The checked folder object (`tpcli.runtime.folders.ShardedFolder`): one hostile folder per check, refused by
`ShardedFolder.open` itself (so by verify, gather, reshard, run's preflight and load_model, which all open it), the
hash check the same now, deferred to `check_hashes()`, or skipped (`quick`), and every command reading tpcli.json
once. The state folder's checks (`StateFolder`) are exercised through `load_state` and `verify STATE` in
tests/test_state.py and tests/test_state_hostile.py.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from tpcli.commands.shard import shard_checkpoint
from tpcli.errors import CheckpointError
from tpcli.runtime.folders import ShardedFolder

SHARD1 = "shard-00001-model-00001-of-00001.safetensors"
SHARD2 = "shard-00002-model-00001-of-00001.safetensors"


@pytest.fixture(scope="module")
def sharded(model_dirs, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("folders") / "s"
    shard_checkpoint(str(model_dirs("qwen3")), tp=2, out=str(out))  # tied embeddings: the tie is proven too
    return out


def _copy(sharded: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(sharded, tmp_path / "s"))


def _flip(s: Path) -> None:
    from tpcli.formats.rankfile import data_spans

    f = s / SHARD1
    begin, _ = data_spans(f)["model.layers.0.mlp.down_proj.weight"]  # not part of the tie `quick` still compares
    data = bytearray(f.read_bytes())
    data[begin] ^= 1
    f.write_bytes(bytes(data))


def _truncate(s: Path) -> None:
    f = s / SHARD2
    f.write_bytes(f.read_bytes()[:1000])


def _unlisted(s: Path) -> None:
    shutil.copy(s / SHARD2, s / "shard-00003-model-00001-of-00001.safetensors")


def _link_out(s: Path) -> None:
    """Rank 2's file replaced by a link to an identical copy outside the folder (sizes and hashes still match)."""
    target = s.parent / "elsewhere-rank.safetensors"
    shutil.copy(s / SHARD2, target)
    (s / SHARD2).unlink()
    (s / SHARD2).symlink_to(target)


def _edited_chunk(s: Path) -> None:
    doc = json.loads((s / "tpcli.json").read_text())
    doc["tensors"]["model.embed_tokens.weight"]["chunks"][1]["offsets"] = [500, 0]
    (s / "tpcli.json").write_text(json.dumps(doc))


HOSTILE = {  # name: (edit of a copy of a qwen3 tp=2 folder, needles of the error)
    "missing-rank-file": (lambda s: (s / SHARD1).unlink(), [SHARD1, "missing (rank 0 of 2)"]),
    "truncated-rank-file": (_truncate, [SHARD2, "1000 bytes, the manifest records"]),
    "unlisted-rank-file": (_unlisted, ["shard-00003", "not listed in tpcli.json"]),
    "rank-file-link-out": (_link_out, [SHARD2, "outside", "rank files"]),
    "manifest-chunk-edited": (_edited_chunk, ["tpcli.json", "chunks of model.embed_tokens.weight", "was edited"]),
    "flipped-byte": (_flip, [SHARD1, "sha256", "does not match the manifest"]),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_open_refuses_each_hostile_folder(case, sharded, tmp_path):
    """Each check of `ShardedFolder.open`, shown to fail on its broken input (the untouched copy opens); the hash
    check fails the same when deferred (at `check_hashes()`, which gather and reshard call before publishing) and
    is the one check `quick` (run's preflight, load_model) skips."""
    edit, needles = HOSTILE[case]
    s = _copy(sharded, tmp_path)
    folder = ShardedFolder.open(s, with_plan=True)
    assert folder.kind == "tpcli" and folder.tp_size == 2 and folder.files == [SHARD1, SHARD2]
    assert folder.plan is not None and set(folder.record["tensors"]) >= set(folder.tensors)
    edit(s)
    with pytest.raises(CheckpointError) as now:
        ShardedFolder.open(s, with_plan=True)
    assert all(n in str(now.value) for n in needles) and "\n" not in str(now.value), now.value
    hashes_only = "sha256" in needles
    with pytest.raises(CheckpointError) as deferred:
        ShardedFolder.open(s, with_plan=True, defer_hashes=True).check_hashes()
    assert str(deferred.value) == str(now.value)
    if hashes_only:
        assert ShardedFolder.open(s, quick=True, with_plan=True).manifest["tp_size"] == 2
    else:
        with pytest.raises(CheckpointError, match="^" + re.escape(str(now.value)) + "$"):
            ShardedFolder.open(s, quick=True)


def test_every_command_reads_the_manifest_once(sharded, tmp_path, monkeypatch):
    """verify, gather (its manifest path) and reshard open the folder once and pass the object along: tpcli.json is
    read once per command. Shown to fail before `ShardedFolder` (verify and gather read it twice: once to decide
    whether the manifest vouches for config.json, once more in the integrity check)."""
    from tpcli.commands.gather import gather_checkpoint
    from tpcli.commands.verify import verify
    from tpcli.formats import manifest

    s = _copy(sharded, tmp_path)
    monkeypatch.setenv("TPCLI_CACHE_DIR", str(tmp_path / "cache"))
    reads = []
    real = manifest.read
    monkeypatch.setattr(manifest, "read", lambda folder: reads.append(Path(folder)) or real(folder))
    for name, call in [("verify", lambda: verify(str(s))),
                       ("gather", lambda: gather_checkpoint(str(s), out=str(tmp_path / "g"))),
                       ("reshard", lambda: shard_checkpoint(str(s), tp=1, out=str(tmp_path / "r")))]:
        reads.clear()
        result = call()
        assert result.get("ok", True) and reads == [s], (name, reads)


def test_load_model_opens_the_folder_with_the_cheap_checks(sharded, tmp_path, monkeypatch):
    """load_model opens a sharded folder once, through `ShardedFolder.open(quick=True)`: tpcli.json is read once
    (it was read twice: by the library-plan pick and by the routing); a truncated rank file is refused in the
    folder's words before transformers opens anything (it reached transformers' DCP load, which failed with its own
    AssertionError); the sha256 is not checked (documented: loading reads the bytes once; `tpcli verify` checks
    them), so a flipped data byte still loads."""
    from tpcli import load_model
    from tpcli.formats import manifest

    s = _copy(sharded, tmp_path)
    _flip(s)
    reads = []
    real = manifest.read
    monkeypatch.setattr(manifest, "read", lambda folder: reads.append(Path(folder)) or real(folder))
    assert load_model(s).config.model_type == "qwen3" and reads == [s]
    _truncate(s)
    with pytest.raises(CheckpointError, match=f"{SHARD2}: 1000 bytes, the manifest records"):
        load_model(s)
