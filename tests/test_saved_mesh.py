"""`gather` / `verify DIR` name the mesh a transformers DCP save was made on (inferred from its chunk layout, as
config.json does not record it), checked against transformers' own `save_pretrained(distributed_checkpoint=True)`
on tp x fsdp, tp x dp_replicate, fsdp x dp_replicate and fsdp x ep meshes (4 CPU workers): never the old "tp=4"."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ORACLES, load_safetensors_dir, run_main, torchrun

from tpcli.commands.shard import shard_checkpoint
from tpcli.planning.mesh import Mesh
from tpcli.planning.saved_mesh import infer
from tpcli.runtime.folders import ShardedFolder


def assert_same_checkpoint(a, b):
    x, y = load_safetensors_dir(a), load_safetensors_dir(b)
    assert set(x) == set(y), set(x) ^ set(y)
    for k in x:
        assert x[k].dtype == y[k].dtype and torch.equal(x[k], y[k]), k


def save_on_mesh(src: Path, out: Path, mesh: Mesh) -> Path:
    """transformers' own load on `mesh` and its own distributed save (tests/oracles/mesh_save_worker.py)."""
    torchrun(mesh.world, ORACLES / "mesh_save_worker.py", src, out, mesh.tp, mesh.fsdp, mesh.dp_replicate, mesh.ep)
    return out


def m(**sizes) -> dict:
    return Mesh(**sizes).to_dict()


# (model, the mesh transformers saved on, every mesh the layout is consistent with, the report's words)
CASES = {
    "tp2-fsdp2": ("llama", Mesh(tp=2, fsdp=2), [m(tp=2, fsdp=2)], "tp=2 x fsdp=2"),
    "tp2-replicas2": ("llama", Mesh(tp=2, dp_replicate=2), [m(tp=2, dp_replicate=2)], "tp=2 x dp_replicate=2"),
    "fsdp2-replicas2": ("llama", Mesh(tp=1, fsdp=2, dp_replicate=2), [m(fsdp=2, dp_replicate=2)],
                        "fsdp=2 x dp_replicate=2"),  # HSDP
    # tp=1: EP gives each rank whole experts exactly where FSDP alone would put them: the same bytes, ep not recorded
    "fsdp4-ep2": ("mixtral", Mesh(tp=1, fsdp=4, ep=2), [m(fsdp=4), m(fsdp=4, ep=2), m(fsdp=4, ep=4)],
                  "saved by 4 ranks (mesh not recorded; layout consistent with fsdp=4, fsdp=4 x ep=2 or "
                  "fsdp=4 x ep=4)"),
    # tp=2 x fsdp=2: EP (experts split 4 ways along dim 0) differs from ep=1 (experts split by TP, then FSDP)
    "tp2-fsdp2-ep2": ("qwen3_moe", Mesh(tp=2, fsdp=2, ep=2), [m(tp=2, fsdp=2, ep=2), m(tp=2, fsdp=2, ep=4)],
                      "saved by 4 ranks (mesh not recorded; layout consistent with tp=2 x fsdp=2 x ep=2 or "
                      "tp=2 x fsdp=2 x ep=4)"),
}


@pytest.mark.dist
@pytest.mark.parametrize("case", list(CASES))
def test_gather_and_verify_name_the_mesh_of_a_transformers_save(model_dirs, tmp_path, monkeypatch, capsys, case):
    name, mesh, consistent, words = CASES[case]
    src = model_dirs(name)
    save = save_on_mesh(src, tmp_path / "save", mesh)
    assert len(list(save.glob("shard-*.safetensors"))) == 4
    assert "distributed_config" not in json.loads((save / "config.json").read_text())  # not recorded by transformers
    determined = len(consistent) == 1

    code, out, err = run_main(monkeypatch, capsys, "gather", save, "--out", tmp_path / "g", "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert doc["saved_by"]["consistent_with"] == consistent and mesh.to_dict() in consistent
    assert doc["saved_by"]["mesh"] == (consistent[0] if determined else None)
    assert doc["saved_by"]["recorded"] is False and doc["saved_by"]["ranks"] == 4
    assert doc["tp_size"] == mesh.tp  # every consistent mesh has the same tp: never 4 (the old report)
    assert_same_checkpoint(tmp_path / "g", src)  # the tensors themselves: the original, bit for bit

    code, out, _ = run_main(monkeypatch, capsys, "gather", save, "--out", tmp_path / "g", "--force")
    line = " ".join(out.split())  # the console wraps at 80 columns
    assert code == 0 and "tp=4" not in line
    source = f"from a {words} transformers-dcp folder," if determined else f"from a transformers-dcp folder {words},"
    assert source in line, line

    code, out, _ = run_main(monkeypatch, capsys, "verify", save)
    first = " ".join(out.split("Integrity")[0].split())
    assert code == 0 and "tp=4" not in first
    assert f"sharded folder{',' if determined else ''} {words}, " in first, first
    code, out, _ = run_main(monkeypatch, capsys, "verify", save, "--json", "--tp", "4")
    v = json.loads(out)
    assert v["ok"] and v["tp"] == mesh.tp and v["saved_by"] == doc["saved_by"]
    (warning,) = [f["message"] for f in v["findings"] if f["code"] == "tp-mismatch"]
    assert warning.startswith(f"folder is {words}, --tp is 4"), warning
    code, out, _ = run_main(monkeypatch, capsys, "verify", save, "--json", "--tp", mesh.tp)
    assert not [f for f in json.loads(out)["findings"] if f["code"] == "tp-mismatch"]  # saved at that tp



@pytest.mark.dist
def test_plain_tp2_transformers_save_is_reported_as_before(oracle, tmp_path, monkeypatch, capsys):
    dcp = oracle("qwen3", 2) / "dcp"  # transformers' own tp_plan="auto" load at tp=2 and its DCP save
    code, out, _ = run_main(monkeypatch, capsys, "gather", dcp, "--out", tmp_path / "g")
    assert code == 0 and "tensors from a tp=2 transformers-dcp folder, 1 file," in " ".join(out.split())
    code, out, _ = run_main(monkeypatch, capsys, "verify", dcp, "--json")
    v = json.loads(out)
    assert v["tp"] == 2 and v["saved_by"]["mesh"] == m(tp=2) and v["saved_by"]["consistent_with"] == [m(tp=2)]


def _without_manifest(model_dirs, tmp_path, name="llama", tp=2) -> Path:
    """tpcli's tp=T folder (transformers' own layout, tests/test_shard.py) without its tpcli.json: a folder as
    transformers' save leaves it, made without workers."""
    out = tmp_path / "s"
    shard_checkpoint(str(model_dirs(name)), tp=tp, out=str(out))
    (out / "tpcli.json").unlink()
    return out


def test_inference_refuses_a_layout_no_mesh_writes(model_dirs, tmp_path):
    folder = _without_manifest(model_dirs, tmp_path)
    info = ShardedFolder.open(folder, with_plan=True)
    doc = infer(info.plan, info.tensors, info.files)
    assert doc["mesh"] == m(tp=2) and doc["consistent_with"] == [m(tp=2)] and doc["description"] == "tp=2"
    # rank 0 holding rank 1's q_proj rows and the other way round: the same boxes, but no mesh puts them there
    chunks = info.tensors["model.layers.0.self_attn.q_proj.weight"].chunks
    chunks[0].rank, chunks[1].rank = chunks[1].rank, chunks[0].rank
    doc = infer(info.plan, info.tensors, info.files)
    assert doc["mesh"] is None and doc["consistent_with"] == []
    assert doc["description"] == ("saved by 2 ranks (mesh not recorded; its chunk layout matches no mesh of 2 ranks "
                                  "that transformers accepts for this model)")
    # a gap in the rank files' numbering: not a whole save
    doc = infer(info.plan, info.tensors, [info.files[0], "shard-00003-model-00001-of-00001.safetensors"])
    assert doc["consistent_with"] == [] and doc["ranks"] == 2


def test_tpcli_folder_reports_its_recorded_tp(model_dirs, tmp_path, monkeypatch, capsys):
    shard_checkpoint(str(model_dirs("llama3")), tp=3, out=str(tmp_path / "s"))
    code, out, _ = run_main(monkeypatch, capsys, "verify", tmp_path / "s", "--json")
    v = json.loads(out)
    assert code == 0 and v["tp"] == 3 and v["saved_by"]["recorded"] and v["saved_by"]["mesh"] == m(tp=3)


def test_run_preflight_names_what_the_folder_was_saved_on(model_dirs, tmp_path):
    """`tpcli run --model DIR` without mesh flags: the folder's mesh as gather/verify name it, not its file count."""
    from tpcli.commands.run import LaunchSpec, preflight_model

    folder = _without_manifest(model_dirs, tmp_path, "llama3", tp=2)  # 6 heads: valid at tp=2, 3 and 6
    notes = preflight_model(LaunchSpec(script="x.py", cpu=2, model=str(folder)))
    assert len(notes) == 1 and notes[0].startswith(f"preflight: {folder} is a tp=2 sharded folder; files OK"), notes
    notes = preflight_model(LaunchSpec(script="x.py", cpu=3, model=str(folder)))
    assert notes[1].startswith("preflight: it was not saved at tp=3 (the world size): tpcli.load_model falls back"), notes


GATHER = """
import json, sys
from tpcli.commands.gather import gather_checkpoint
r = gather_checkpoint(sys.argv[1], out=sys.argv[2])
print(json.dumps([r["path"], r["saved_by"], sorted(m for m in ("torch", "transformers") if m in sys.modules)]))
"""


@pytest.mark.e2e
def test_a_cached_gather_names_the_mesh_without_torch(model_dirs, tmp_path):
    folder = _without_manifest(model_dirs, tmp_path)
    env = {**os.environ, "TPCLI_CACHE_DIR": str(tmp_path / "cache")}
    runs = [json.loads(subprocess.run([sys.executable, "-c", GATHER, str(folder), str(tmp_path / f"g{i}")], env=env,
                                      capture_output=True, text=True, check=True).stdout.splitlines()[-1])
            for i in range(2)]
    assert runs[0][0] == "transformers" and runs[1][0] == "cache" and runs[1][2] == []
    assert runs[0][1] == runs[1][1] and runs[1][1]["mesh"] == m(tp=2)
