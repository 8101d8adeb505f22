"""The byte plan (`tpcli.formats.byteplan`) and its one executor (`tpcli.formats.executor`), issue 35 item 1.

A plan read back from the cache is data from disk: `BytePlan.from_json` must refuse every field tpcli would not have
written (each edit below), so that a planted or stale entry is a miss, never a write outside --out or a read outside
the model. The executor must leave nothing behind when a write or the input check fails, whichever way the bytes
move (byte copy or stream), and report each file's real sha256.
"""

from __future__ import annotations

import copy
import hashlib
import os

import pytest

from tpcli.commands import no_progress
from tpcli.errors import CheckpointError
from tpcli.formats.byteplan import BytePlan, Invalid, header_digest
from tpcli.formats.executor import execute


@pytest.fixture(scope="module")
def shard_plan(model_dirs):
    """A tp=2 byte-copy plan of the tiny llama ("src" boxes: one per rank chunk)."""
    from tpcli.commands.shard import plan_job

    folder = model_dirs("llama").resolve()
    return folder, plan_job(str(folder), tp=2, plan_file=None, cast=None, revision=None).plan


@pytest.fixture(scope="module")
def gather_plan(model_dirs, tmp_path_factory):
    """A byte-copy gather plan of its tp=2 folder ("dest" boxes: the chunks tile each tensor)."""
    from tpcli.commands.gather import _manifest_job
    from tpcli.commands.shard import shard_checkpoint
    from tpcli.runtime.folders import ShardedFolder

    folder = tmp_path_factory.mktemp("bp") / "tp2"
    shard_checkpoint(str(model_dirs("llama")), tp=2, out=str(folder))
    job, _ = _manifest_job(ShardedFolder.open(folder, defer_hashes=True), max_shard_size="5GB", cast=None)
    headers = {p.name: header_digest(p) for p in folder.glob("shard-*.safetensors")}
    return folder, BytePlan(**{**job.plan.__dict__, "headers": headers})


def _load(folder, doc, command="shard"):
    return BytePlan.from_json(doc, source=folder, aux_folder=folder, command=command)


def _box(doc, t=0):
    return doc["files"][0]["tensors"][t]["boxes"][0]


EDITS = {  # what a planted or stale entry could hold; each must be refused
    "unknown field": lambda d: d.update(extra=1),
    "missing field": lambda d: d.pop("headers"),
    "other command": lambda d: d.update(command="gather"),
    "other source folder": lambda d: d.update(source="/"),
    "bool as a count": lambda d: d.update(total=True),
    "output name leaves the folder": lambda d: d["files"][0].update(name="../../pwned.safetensors"),
    "output name twice": lambda d: d["files"][1].update(name=d["files"][0]["name"]),
    "aux name leaves the folder": lambda d: d.update(aux=["../secret.json"]),
    "unknown dtype": lambda d: d["files"][0]["tensors"][0].update(dtype="float99"),
    "negative dim": lambda d: d["files"][0]["tensors"][0].update(shape=[-1, 2]),
    "tensor named twice": lambda d: d["files"][0]["tensors"][1].update(name=d["files"][0]["tensors"][0]["name"]),
    "box of another size": lambda d: _box(d)[4].__setitem__(0, _box(d)[4][0] + 1),
    "box outside its array": lambda d: _box(d)[3].__setitem__(0, _box(d)[2][0]),
    "box in the header": lambda d: _box(d).__setitem__(1, 0),
    "box in the JSON header": lambda d: _box(d).__setitem__(1, 8),
    "box past the end of its file": lambda d: _box(d).__setitem__(1, 10**12),
    "box from an unlisted file": lambda d: _box(d).__setitem__(0, "other.safetensors"),
    "source outside the folder": lambda d: d["headers"].update({"../x.safetensors": [8, "0" * 64]}),
    "source header changed": lambda d: [v.__setitem__(1, "0" * 64) for v in d["headers"].values()],
    "source size changed": lambda d: [v.__setitem__(0, v[0] + 1) for v in d["headers"].values()],
    "metadata not text": lambda d: d["files"][0].update(metadata={"format": 1}),
}


def test_a_stored_plan_round_trips_executes_and_every_bad_field_is_refused(shard_plan, tmp_path):
    folder, plan = shard_plan
    doc = plan.to_json()
    back = _load(folder, copy.deepcopy(doc))
    assert back == plan  # the plan tpcli wrote is accepted as it is
    written = execute(back, tmp_path / "out", progress=no_progress, sha256=True)
    for name, (size, digest) in written.files.items():  # each file's real size and sha256
        data = (tmp_path / "out" / name).read_bytes()
        assert (size, digest) == (len(data), hashlib.sha256(data).hexdigest())
    assert "config.json" in written.copied
    for edit, how in EDITS.items():
        bad = copy.deepcopy(doc)
        how(bad)
        with pytest.raises(Invalid):
            _load(folder, bad)
            pytest.fail(f"{edit}: accepted")


def test_gather_boxes_must_tile_their_tensor_exactly_once(gather_plan):
    folder, plan = gather_plan
    doc = plan.to_json()
    assert _load(folder, copy.deepcopy(doc), "gather") == plan
    for edit in ("overlap", "gap", "mixed"):
        bad = copy.deepcopy(doc)
        tensor = next(t for f in bad["files"] for t in f["tensors"] if len(t["boxes"]) == 2)
        first, second = tensor["boxes"]
        if edit == "overlap":  # both chunks placed at the first one's offsets
            second[3] = list(first[3])
        elif edit == "gap":
            tensor["boxes"] = [first]
        else:
            second[5] = "src"
        with pytest.raises(Invalid):
            _load(folder, bad, "gather")
            pytest.fail(f"{edit}: accepted")


@pytest.mark.parametrize("how", ["byte copy", "stream"])
def test_a_failure_leaves_nothing_and_never_publishes(how, model_dirs, tmp_path, monkeypatch):
    """A write that fails mid-file (the 5th tensor), or inputs found changed after the last byte: the error
    surfaces, OUT does not exist, and no temporary folder is left beside it."""
    import tpcli.formats.bytecopy as bytecopy
    import tpcli.formats.executor as executor
    from tpcli.commands.shard import plan_job

    for fails in ("a write", "the input check"):
        job = plan_job(str(model_dirs("llama")), tp=2, plan_file=None, cast=None, revision=None,
                       byte_copy=how == "byte copy")
        module, name = (bytecopy, "_copy_unit") if how == "byte copy" else (executor, "cast_tensor")
        real, calls = getattr(module, name), []

        def failing(*args, fails=fails, real=real, calls=calls):
            calls.append(1)
            if fails == "a write" and len(calls) == 5:
                raise KeyboardInterrupt
            return real(*args)

        def changed():
            raise CheckpointError("an input changed")

        monkeypatch.setattr(module, name, failing)
        parent = tmp_path / fails.replace(" ", "-")
        parent.mkdir()
        with pytest.raises(KeyboardInterrupt if fails == "a write" else CheckpointError):
            execute(job.plan, parent / "out", progress=no_progress, sha256=True, stream=job.stream,
                    check_inputs=changed if fails == "the input check" else lambda: None)
        assert len(calls) >= 5 and os.listdir(parent) == [], fails  # no OUT, no temporary folder
        monkeypatch.undo()
