"""`tpcli.load_model` of a tpcli tp=T folder on a mesh whose tp is T (tp x fsdp, tp x dp_replicate): the per-rank
fast path, equal to transformers' own `from_pretrained(ORIGINAL, distributed_config=DistributedConfig(...))`, each
rank reading about its own share of the bytes; other shapes fall back to transformers and say so."""

import json
import struct
import subprocess
import sys

import pytest
from conftest import ORACLES, base_env, run_main, single_process_sgd_losses

from tpcli.formats import manifest
from tpcli.formats.units import tensor_bytes
from tpcli.planning.mesh import Mesh
from tpcli.runtime.loading import fast_path_refusal, mesh_fast_path_refusal

TPCLI = [sys.executable, "-m", "tpcli"]
PY_BUFFER = 8192  # Python's buffered `open().read(8)` of a header asks the kernel for a whole buffer


@pytest.fixture(scope="module")
def tp2_folders(model_dirs, tmp_path_factory):
    from tpcli.commands.shard import shard_checkpoint

    root, made = tmp_path_factory.mktemp("tp2"), {}

    def get(name):
        if name not in made:
            plan_file = None
            if name == "llama-plan":  # a user plan: the MLPs replicated (stored once, split only by FSDP)
                plan_file = root / "plan.json"
                plan_file.write_text(json.dumps({f"model.layers.*.mlp.{p}_proj": "replicate"
                                                 for p in ("gate", "up", "down")}))
            made[name] = shard_checkpoint(str(model_dirs(name.removesuffix("-plan"))), tp=2, out=str(root / name),
                                          plan_file=plan_file and str(plan_file))["out"]
        return made[name]

    return get


def share_bound(folder, doc, fsdp: int, *, tp: int | None = None, slack: float = 1.1) -> int:
    """What one rank may read on tp=T (`tp`, else the folder's) x fsdp=F: `slack` x (sharded bytes / (T x F) +
    replicated bytes / F) of the untied tensors (slack 1.1: uneven splits, vocab 1001 -> 501/500 -> 251/250) +
    metadata: tpcli.json and the config files, each read twice (the dispatch and the load), and each safetensors
    header read twice plus 8 KiB of Python's read buffer twice (a bound: `RankFile` reads each header once, by
    pread, and safetensors' own check maps it)."""
    t = doc["tp_size"] if tp is None else tp
    stored = [e for e in doc["tensors"].values() if not e["tied_to"]]  # a tied lm_head is stored but never read
    sharded = sum(tensor_bytes(e["dtype"], e["shape"]) for e in stored if e["placement"] != "Replicate")
    replicated = sum(tensor_bytes(e["dtype"], e["shape"]) for e in stored if e["placement"] == "Replicate")
    meta = sum((folder / n).stat().st_size for n in ("tpcli.json", "config.json", "generation_config.json")
               if (folder / n).is_file())
    for name in doc["files"]:
        with open(folder / name, "rb") as f:
            meta += 8 + struct.unpack("<Q", f.read(8))[0]
    return int(slack * (sharded / (t * fsdp) + replicated / fsdp)) + 2 * meta + 2 * PY_BUFFER * len(doc["files"])


@pytest.mark.dist
@pytest.mark.parametrize("name,flags", [
    ("llama", ["--fsdp", 2]),
    ("qwen3", ["--fsdp", 2]),  # tied embeddings
    ("llama", ["--dp-replicate", 2]),
    ("qwen3", ["--dp-replicate", 2]),
    ("qwen3", ["--fsdp", 2, "--dp-replicate", 2]),  # 8 workers: (Replicate(), _StridedShard(0, sf=2), Shard(0))
    ("llama-plan", ["--fsdp", 2]),
], ids=["llama-tp2xfsdp2", "qwen3-tp2xfsdp2", "llama-tp2xdp2", "qwen3-tp2xdp2", "qwen3-tp2xfsdp2xdp2",
        "llama-plan-tp2xfsdp2"])
def test_tpcli_folder_on_a_mesh_is_the_fast_path_and_transformers_own(model_dirs, tp2_folders, tmp_path, name,
                                                                      flags):
    from pathlib import Path

    src, folder, out = model_dirs(name.removesuffix("-plan")), Path(tp2_folders(name)), tmp_path / "out"
    sizes = dict(zip(flags[::2], flags[1::2], strict=True))
    fsdp, world = sizes.get("--fsdp", 1), 2 * sizes.get("--fsdp", 1) * sizes.get("--dp-replicate", 1)
    proc = subprocess.run([*TPCLI, "run", "--cpu", str(world), "--tp", "2", *map(str, flags), "--model", str(folder),
                           str(ORACLES / "mesh_fast_worker.py"), str(folder), str(src), str(out)],
                          env=base_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert "reads it through the per-rank fast path" in proc.stderr
    doc = manifest.read(folder)
    bound = share_bound(folder, doc, fsdp)
    whole_tp, everything = share_bound(folder, doc, 1, slack=1.0), share_bound(folder, doc, 1, tp=1, slack=1.0)
    for r in range(world):
        rep = json.loads((out / f"rank{r}.json").read_text())
        assert rep["fast"] and rep["bytes_read"] > 0, rep  # transformers' load sets no tpcli_bytes_read
        assert rep["mismatch"] == [] and rep["n_params"] > 0, rep["mismatch"]
        assert any("Shard" in p for p in rep["placements"]) and (fsdp == 1 or any(
            "_StridedShard" in p for p in rep["placements"]))  # really on the 2-D mesh
        assert rep["logits_max_abs"] <= 1e-5, rep["logits_max_abs"]
        assert rep["rchar"] <= bound, (r, rep["rchar"], bound)  # its own share
    # the check can fail: the bound is below what a rank reads when it ignores FSDP (its whole TP chunks and whole
    # replicated tensors, as on plain TP) or, with replicas only (where that is its share), every tensor
    assert (whole_tp if fsdp > 1 else everything) > bound, (whole_tp, everything, bound)


def test_other_shapes_fall_back_and_say_so(model_dirs, tp2_folders, monkeypatch, capsys, tmp_path):
    folder = tp2_folders("llama")
    doc = manifest.read(__import__("pathlib").Path(folder))
    assert mesh_fast_path_refusal(doc, Mesh(tp=2, fsdp=2)) is None
    assert mesh_fast_path_refusal(doc, Mesh(tp=2, fsdp=2, dp_replicate=2)) is None
    assert "differs from the mesh's tp=4" in mesh_fast_path_refusal(doc, Mesh(tp=4, fsdp=2))
    assert "ep=2" in mesh_fast_path_refusal(doc, Mesh(tp=2, fsdp=2, ep=2))
    assert "quantized" in mesh_fast_path_refusal({**doc, "quantization": {"representation": "stored"}},
                                                 Mesh(tp=2, fsdp=2))
    packed = {**doc, "tensors": {**doc["tensors"], "x": {"placement": "_StridedShard(0, sf=2)"}}}
    assert "packed" in mesh_fast_path_refusal(packed, Mesh(tp=2, fsdp=2))
    script = tmp_path / "s.py"
    script.write_text("")
    code, _, err = run_main(monkeypatch, capsys, "run", "--cpu", "4", "--tp", "2", "--fsdp", "2", "--model", folder,
                            "--dry-run", script)
    assert code == 0 and "reads it through the per-rank fast path" in err, err
    code, _, err = run_main(monkeypatch, capsys, "run", "--cpu", "8", "--tp", "4", "--fsdp", "2", "--model", folder,
                            "--dry-run", script)
    assert code == 0, err
    assert ("loads it through transformers (DCP), not the per-rank fast path (its tp=2 differs from the mesh's "
            "tp=4)") in err


def test_load_model_says_why_a_tpcli_folder_is_not_the_fast_path(tp2_folders, capsys, monkeypatch):
    """Plain TP takes a tp=world folder with tp_plan='auto' and no from_pretrained arguments; anything else is
    transformers' load, and load_model says so in one stderr line on rank 0 (outside `tpcli run --model`, whose
    preflight says it), here in one process loading the tp=2 folder."""
    folder = tp2_folders("llama")
    doc = manifest.read(__import__("pathlib").Path(folder))
    assert fast_path_refusal(doc, Mesh(tp=2), 2) is None
    assert fast_path_refusal(doc, Mesh(tp=2, fsdp=2), 4) is None
    assert "differs from the world size 4" in fast_path_refusal(doc, Mesh(tp=4), 4)
    assert "a tp_plan was passed" in fast_path_refusal(doc, Mesh(tp=2), 2, tp_plan={"x": "colwise"})
    assert "(attn_implementation)" in fast_path_refusal(doc, Mesh(tp=2), 2, kwargs={"attn_implementation": "eager"})
    assert "differs from the mesh's tp=4" in fast_path_refusal(doc, Mesh(tp=4, fsdp=2), 8)
    for name in ("WORLD_SIZE", "RANK", "TPCLI_MODEL", "TPCLI_MESH"):
        monkeypatch.delenv(name, raising=False)
    import tpcli

    model = tpcli.load_model(folder)
    err = capsys.readouterr().err
    assert model is not None and (f"tpcli.load_model: {folder} loads through transformers' from_pretrained (DCP: "
                                  "every rank reads what its placements need), not tpcli's per-rank fast path: one "
                                  "process (world size 1) loading a tp=2 folder") in err, err
    monkeypatch.setenv("TPCLI_MODEL", str(folder))  # `tpcli run --model FOLDER`: the preflight said it
    tpcli.load_model(folder)
    assert "tpcli.load_model:" not in capsys.readouterr().err


def test_box_reads_are_torch_slices_and_read_only_their_bytes(model_dirs, tp2_folders):
    """`SliceReader.read_box_into` (what each rank runs per parameter on a mesh) for boxes of every kind: rows of
    one TP chunk (FSDP), columns (not contiguous on disk: one pread per row), boxes across the two rank files, runs
    of several pieces, empty ones; each equals torch's slicing of the original tensor, read straight into the
    target or staged (whole, or in pieces of a few elements), and counts exactly the bytes of the box."""
    from pathlib import Path

    import torch
    from safetensors.torch import load_file

    from tpcli.runtime.fast_load import SliceReader

    folder = Path(tp2_folders("llama"))
    doc = manifest.read(folder)
    original = {}
    for f in sorted(Path(model_dirs("llama")).glob("*.safetensors")):
        original.update(load_file(f))
    cases = {  # name -> runs per dim
        "model.embed_tokens.weight": [((250, 501),), ((0, 64),)],  # the second FSDP half of TP chunk 0 (uneven)
        "model.layers.0.self_attn.q_proj.weight": [((20, 44),), ((3, 9),)],  # across both files, some columns
        "model.layers.0.self_attn.o_proj.weight": [((0, 32),), ((16, 48),)],  # rowwise: columns of both chunks
        "model.layers.1.mlp.down_proj.weight": [((1, 3), (40, 64)), ((0, 10), (90, 96))],  # several runs
        "model.norm.weight": [((32, 64),)],  # replicated, FSDP's half
        "lm_head.weight": [((7, 7),), ((0, 64),)],  # empty
    }
    for stage, chunk_bytes in ((False, None), (True, None), (True, 52)):  # 52 B: staged in pieces of 13 floats
        for name, runs in cases.items():
            entry = doc["tensors"][name]
            want = original[name]
            for d, r in enumerate(runs):
                want = torch.cat([want.narrow(d, a, b - a) for a, b in r], dim=d)
            reader = SliceReader(folder, stage=stage, **({"chunk_bytes": chunk_bytes} if chunk_bytes else {}))
            got = torch.full(want.shape, float("nan"))
            reader.read_box_into(got, name, entry, runs)
            reader.finish()
            assert torch.equal(got, want), (name, stage, chunk_bytes)
            assert reader.bytes_read == want.numel() * want.element_size(), (name, reader.bytes_read)


@pytest.mark.dist
def test_training_steps_from_a_tpcli_folder_match_one_process(model_dirs, tp2_folders):
    """FSDP2 over the fast path's parameters trains: 3 SGD steps of tpcli/examples/train_mesh.py on tp=2 x fsdp=2
    loaded from the tpcli tp=2 folder equal one process on the original (as tests/test_run_mesh.py checks the
    transformers load)."""
    import re

    proc = subprocess.run([*TPCLI, "run", "--cpu", "4", "--tp", "2", "--fsdp", "2", "--model", tp2_folders("llama"),
                           "-m", "tpcli.examples.train_mesh", "--steps", "3", "--optimizer", "sgd", "--lr", "0.5"],
                          env=base_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert "reads it through the per-rank fast path" in proc.stderr
    losses = [float(x) for x in re.findall(r"step \d+ loss ([0-9.]+)", proc.stdout)]
    ref = single_process_sgd_losses(model_dirs("llama"))
    assert len(losses) == 3 and len(set(ref)) == 3
    assert max(abs(a - b) for a, b in zip(losses, ref, strict=True)) <= 1e-5, (losses, ref)


@pytest.mark.dist
def test_a_folder_of_another_tp_on_a_mesh_falls_back_to_transformers(model_dirs, tp2_folders, tmp_path):
    """A tpcli tp=2 folder on tp=1 x fsdp=4: transformers' load (DCP), said in the preflight line, and still
    transformers' own result."""
    folder, out = tp2_folders("llama"), tmp_path / "out"
    proc = subprocess.run([*TPCLI, "run", "--cpu", "4", "--tp", "1", "--fsdp", "4", "--model", folder,
                           str(ORACLES / "mesh_fast_worker.py"), folder, str(model_dirs("llama")), str(out)],
                          env=base_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert ("loads it through transformers (DCP), not the per-rank fast path (its tp=2 differs from the mesh's "
            "tp=1)") in proc.stderr
    assert "tpcli.load_model:" not in proc.stderr  # said once, by the preflight
    for r in range(4):
        rep = json.loads((out / f"rank{r}.json").read_text())
        assert not rep["fast"] and rep["mismatch"] == [] and rep["logits_max_abs"] <= 1e-5, rep
