"""Pipeline parallelism (`--pp P`, `tpcli.planning.pipeline`) against transformers' own PP loads.

The oracle is tests/oracles/pp_oracle.py: `from_pretrained(distributed_config=DistributedConfig(pp_size=2))` on two
CPU/gloo workers, each rank's state-dict names and bytes, its KV cache after a B x L forward, its logits and greedy
tokens against one process. The models have 3 layers, so pp=2 splits them unevenly ([0, 1) and [1, 3)) and a stage
boundary off by one layer changes every figure.
"""

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import ORACLES, base_env, run_main, tiny_models, torchrun

from tpcli.errors import UsageError
from tpcli.planning import pipeline
from tpcli.planning.memory import MemoryOptions
from tpcli.planning.mesh import Mesh, distributed_config, mesh_memory
from tpcli.planning.plan import load_config, resolve_plan

MODELS = {"llama": ("llama", {"layers": 3}), "qwen3": ("qwen3", {"layers": 3}),  # qwen3: tied embeddings
          "mixtral": ("mixtral", {"layers": 3})}
BATCH, SEQ_LEN = 3, 8


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return tiny_models(tmp_path_factory.mktemp("pp-models"), MODELS)


@pytest.fixture(scope="module")
def measured(models, tmp_path_factory):
    """{model: [rank 0 dict, rank 1 dict]} from one torchrun launch of the PP oracle over every model."""
    out = tmp_path_factory.mktemp("pp-oracle") / "pp"
    cases = [f"{models(m)}@pp=2" for m in MODELS]
    torchrun(2, ORACLES / "pp_oracle.py", out, *cases, "--batch", BATCH, "--seq-len", SEQ_LEN)
    ranks = [json.loads(Path(f"{out}.rank{r}.json").read_text()) for r in range(2)]
    return {m: [rank[case] for rank in ranks] for m, case in zip(MODELS, cases, strict=True)}


def ours(models, name: str) -> list[dict]:
    """tpcli's per-rank figures at pp=2: coords, weight and KV bytes (`inspect --pp`), and the names each holds."""
    plan = resolve_plan(load_config(models(name)))
    doc = mesh_memory(plan, Mesh(pp=2), MemoryOptions(batch=BATCH, seq_len=SEQ_LEN))
    stages = pipeline.stages(plan, 2)
    return [{"coords": rk["coords"]["pp"], "weight_bytes": rk["weight_bytes"], "kv_cache_bytes": rk["kv_cache_bytes"],
             "names": sorted(t.name for t in plan.unique_tensors if p in stages.stages_of(t.name)
                             or any(p in stages.stages_of(u.name) for u in plan.tensors.values()
                                    if u.tied_to == t.name))}
            for p, rk in enumerate(doc["ranks"])]


def theirs(oracle: list[dict]) -> list[dict]:
    return [{"coords": o["coords"]["pp"], "weight_bytes": o["weight_bytes"], "kv_cache_bytes": o["kv_cache_storage_bytes"],
             "names": o["names"]} for o in oracle]


@pytest.mark.dist
@pytest.mark.parametrize("name", list(MODELS))
def test_every_stage_holds_what_tpcli_says(models, measured, name):
    """Per rank: the tensors it holds (names), their bytes and the KV cache of its layers, equal to transformers'
    own PP load; the embeddings on the first stage, norm and head on the last, a tied embedding on both; and the
    pp mesh computes the single-process logits and greedy tokens exactly."""
    oracle = measured[name]
    assert ours(models, name) == theirs(oracle)
    assert oracle[0]["weight_bytes"] != oracle[1]["weight_bytes"]  # the stages really differ
    embed = "model.embed_tokens.weight"
    assert [embed in o["names"] for o in oracle] == [True, name == "qwen3"]
    assert all(o["logits_max_abs"] == 0.0 and o["tokens_equal"] for o in oracle), oracle


@pytest.mark.dist
def test_stage_boundaries_off_by_one_layer_are_caught(models, measured, monkeypatch):
    """The comparison above fails when tpcli's stage boundaries are one layer off ([0, 2) and [2, 3) for 3 layers
    at pp=2, the ceil split some schedules use, instead of transformers' floor split [0, 1) and [1, 3))."""

    def shifted(pp, stage, num_layers):
        per_stage = -(-num_layers // pp)
        return range(stage * per_stage, min(num_layers, (stage + 1) * per_stage))

    monkeypatch.setattr(pipeline, "layer_range", shifted)
    for name in MODELS:
        got, want = ours(models, name), theirs(measured[name])
        assert got != want
        assert [g["weight_bytes"] for g in got] != [w["weight_bytes"] for w in want]
        assert [g["kv_cache_bytes"] for g in got] != [w["kv_cache_bytes"] for w in want]


def test_layer_ranges_are_transformers_own():
    """`pipeline.layer_range` equals transformers' `PipelineStage.layer_range_for_rank` (called on a stand-in for
    the stage: it reads only pp_size) for every P <= 8 and N <= 40, uneven splits and P > N included."""
    from transformers.distributed.pipeline_parallel import PipelineStage

    for pp in range(1, 9):
        for n in range(1, 41):
            for p in range(pp):
                start, end = PipelineStage.layer_range_for_rank(SimpleNamespace(pp_size=pp), p, n)
                assert pipeline.layer_range(pp, p, n) == range(start, end), (pp, n, p)


def test_pp_coordinates_follow_transformers_mesh_order():
    """Dense mesh (pp, dp_replicate, fsdp, tp): rank = ((p * R + r) * F + f) * T + t; pp only when pp > 1."""
    import torch

    m = Mesh(pp=2, tp=2, fsdp=2, dp_replicate=2)
    grid = torch.arange(m.world).reshape(2, 2, 2, 2)
    for rank in range(m.world):
        c = m.coords(rank)
        assert grid[c["pp"], c["dp_replicate"], c["fsdp"], c["tp"]] == rank
    assert "pp" not in Mesh(tp=2).coords(1) and "pp" not in Mesh(tp=2).to_dict()
    assert Mesh(pp=4).to_dict()["pp"] == 4 and Mesh(pp=4).world == 4


@pytest.mark.parametrize("mesh,message", [
    (Mesh(pp=2, fsdp=2), r"^--pp 2 with --fsdp 2: Combining FSDP with pipeline parallelism is not supported"),
    (Mesh(pp=2, dp_replicate=2), r"^--pp 2 with --dp-replicate 2: Combining FSDP with pipeline"),
])
def test_meshes_transformers_refuses_are_one_line(mesh, message):
    with pytest.raises(UsageError, match=message):
        distributed_config(mesh)
    assert distributed_config(Mesh(pp=2, tp=2)).pp_size == 2  # accepted; tpcli.load_model loads it


def test_inspect_pp_json_and_table(monkeypatch, capsys, models):
    code, out, _ = run_main(monkeypatch, capsys, "inspect", models("qwen3"), "--tp", "1", "--pp", "2", "--seq-len",
                            "8", "--json")
    mesh = json.loads(out)["mesh"]
    assert code == 0 and (mesh["pp"], mesh["world"]) == (2, 2)
    assert mesh["stages"] == [{"stage": 0, "layers": [0, 1], "embeddings": True, "head": False},
                              {"stage": 1, "layers": [1, 3], "embeddings": True, "head": True}]
    assert [r["coords"]["pp"] for r in mesh["ranks"]] == [0, 1]
    code, out, _ = run_main(monkeypatch, capsys, "inspect", models("qwen3"), "--tp", "1", "--pp", "2")
    section = out[out.index("Memory per rank on the mesh"):].splitlines()
    rows = [line for line in section[2:] if line and not line.startswith("  ")]  # the table; prose is never wrapped
    assert code == 0 and "pp=2 (2 ranks)" in section[0] and rows and all(len(line) <= 80 for line in rows)
    assert any("run one after another; inference only" in line for line in section)


@pytest.mark.parametrize("args,message", [
    (["--tp", "1", "--pp", "2", "--train"], "--train with --pp 2: transformers 5.23's pipeline parallelism is "
                                            "inference only"),
    (["--pp", "2"], "--pp describes a mesh around a TP size: add --tp T"),
])
def test_inspect_refusals_are_one_line(monkeypatch, capsys, models, args, message):
    code, out, err = run_main(monkeypatch, capsys, "inspect", models("llama"), *args)
    assert code == 2 and out == "" and message in err and len(err.strip().splitlines()) == 1, err


def test_fit_over_meshes_considers_pp_for_inference_only(monkeypatch, capsys, models):
    """--gpus 2: pp=2 is listed for inference (after the meshes with fewer stages per copy) and its figures are its
    mesh table's; training lists no pp mesh (transformers' PP has no backward)."""
    code, out, _ = run_main(monkeypatch, capsys, "inspect", models("llama"), "--gpus", "2", "--gpu-mem", "1MiB",
                            "--reserve", "0", "--seq-len", "8", "--json")
    fit = json.loads(out)["fit"]
    pp = [m for m in fit["meshes"] if m["pp"] == 2]
    assert code == 0 and len(pp) == 1 and pp[0]["tp"] == 1 and "stages" in fit["rule"]
    assert "--pp 2" in pp[0]["run_flags"] and "pp_size=2" in pp[0]["run_flags"]
    doc = mesh_memory(resolve_plan(load_config(models("llama"))), Mesh(pp=2), MemoryOptions(seq_len=8))
    assert pp[0]["total_bytes"] == max(r["total_bytes"] for r in doc["ranks"])
    code, out, _ = run_main(monkeypatch, capsys, "inspect", models("llama"), "--gpus", "2", "--gpu-mem", "1MiB",
                            "--reserve", "0", "--seq-len", "8", "--train", "--json")
    assert code == 0 and all(m["pp"] == 1 for m in json.loads(out)["fit"]["meshes"])
    code, out, _ = run_main(monkeypatch, capsys, "inspect", models("llama"), "--gpus", "2", "--gpu-mem", "1MiB",
                            "--reserve", "0")
    table = out[out.index("Meshes of 2 GPUs"):].splitlines()
    assert code == 0 and any(line.split()[:2] == ["#", "pp"] for line in table)


def test_verify_static_on_a_pp_mesh(monkeypatch, capsys, models):
    code, out, _ = run_main(monkeypatch, capsys, "verify", models("mixtral"), "--tp", "1", "--pp", "2", "--json")
    doc = json.loads(out)
    assert code == 0 and doc["ok"] and doc["mesh"] == {"tp": 1, "fsdp": 1, "dp_replicate": 1, "ep": 1, "pp": 2,
                                                       "world": 2, "efsdp": 1}


@pytest.mark.dist
def test_transformers_tp_x_pp_load_still_crashes(models, tmp_path):
    """Why `tpcli.load_model` filters the TP plan on tp x pp (`tpcli.runtime.pipeline_tp`): transformers 5.23's own
    load of tp=2 x pp=2 fails on every rank with a KeyError in apply_tensor_parallelism. When this test fails,
    transformers loads it itself: drop the filter."""
    out = tmp_path / "crash"
    torchrun(4, ORACLES / "pp_crash_worker.py", models("llama"), out)
    errors = [json.loads(Path(f"{out}.rank{r}.json").read_text()) for r in range(4)]
    assert all(e["type"] == "KeyError" for e in errors), errors


@pytest.mark.dist
@pytest.mark.e2e
@pytest.mark.parametrize("name", ["qwen3", "mixtral"])
def test_tp_x_pp_through_load_model(models, tmp_path, name):
    """`tpcli run --cpu 4 --tp 2 --pp 2`: `tpcli.load_model` loads the mesh transformers' own load crashes on (its
    TP plan limited to each stage's layers); measured on the loaded model, every rank holds the weight and KV bytes
    `inspect --tp 2 --pp 2` says, its parameters are really TP-sharded, and logits and greedy tokens equal one
    process's (fp32)."""
    src, out = models(name), tmp_path / "out"
    proc = _tpcli("run", "--cpu", 4, "--tp", 2, "--pp", 2, "--model", src, ORACLES / "pp_load_worker.py", src, out,
                  BATCH, SEQ_LEN, timeout=400)
    assert "transformers 5.23's own from_pretrained crashes on tp x pp" in proc.stderr  # the preflight's note
    doc = mesh_memory(resolve_plan(load_config(src)), Mesh(tp=2, pp=2), MemoryOptions(batch=BATCH, seq_len=SEQ_LEN))
    reports = [json.loads((out / f"rank{r}.json").read_text()) for r in range(4)]
    assert [(r["weight_bytes"], r["kv_cache_storage_bytes"], r["mesh"]["coords"]) for r in reports] == [
        (rk["weight_bytes"], rk["kv_cache_bytes"], rk["coords"]) for rk in doc["ranks"]]
    assert all(any("Shard" in p for p in r["placements"]) for r in reports)
    assert all(r["logits_max_abs"] <= 1e-5 and r["tokens_equal"] for r in reports), reports


def _tpcli(*args, timeout=300):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "tpcli", *map(str, args)], env=base_env(), capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, f"tpcli failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


@pytest.mark.dist
@pytest.mark.e2e
@pytest.mark.parametrize("name", ["qwen3", "mixtral"])
def test_load_model_on_a_pp_mesh_is_transformers_own(models, tmp_path, name):
    """`tpcli run --cpu 2 --pp 2`: TPCLI_MESH carries pp, `tpcli.load_model` loads each stage exactly as
    `from_pretrained(distributed_config=DistributedConfig(pp_size=2))` (same names, placements, values), its logits
    equal one process's, and `tpcli.mesh_info` says the same from the environment and from the model."""
    src, out = models(name), tmp_path / "out"
    proc = _tpcli("run", "--cpu", 2, "--pp", 2, "--model", src, ORACLES / "mesh_load_worker.py", src, out)
    assert "plan OK on the mesh pp=2" in proc.stderr
    reports = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    for r, rep in enumerate(reports):
        assert rep["env_mesh"] == "tp=1,fsdp=1,dp_replicate=1,ep=1,pp=2"
        assert rep["device_mesh_ours"] == rep["device_mesh_theirs"] == {"names": ["pp", "fsdp", "tp"],
                                                                        "shape": [2, 1, 1]}
        assert rep["mismatch"] == [] and rep["n_params"] > 0, rep["mismatch"]
        assert rep["logits_max_abs"] == 0.0, (r, rep["logits_max_abs"])
        assert rep["info_env"] == rep["info_model"] and rep["info_env"]["coords"]["pp"] == r
    assert reports[0]["n_params"] != reports[1]["n_params"]  # each stage holds its own layers


@pytest.mark.dist
@pytest.mark.e2e
@pytest.mark.parametrize("tp", [1, 2], ids=["pp2", "pp2xtp2"])
def test_verify_numerics_on_a_pp_mesh(models, tp):
    """`verify --numerics --tp T --pp 2`: the pp workers' logits (broadcast from the last stage) and greedy tokens
    against one process; transformers' PP forward returns no hidden states, so no per-layer rows. pp alone is
    transformers' own load (bit for bit); tp x pp is tpcli's per-stage TP load (runtime/pipeline_tp), whose
    all-reduces sum in another order (fp32 tolerance 1e-5)."""
    proc = _tpcli("verify", models("llama"), "--tp", tp, "--pp", 2, "--numerics", "--json")
    doc = json.loads(proc.stdout)
    assert doc["ok"] and doc["mesh"]["pp"] == 2 and doc["mesh"]["tp"] == tp, doc
    assert doc["numerics"]["world_size"] == 2 * tp and doc["numerics"]["tokens_equal"]
    assert doc["numerics"]["logits"]["max_abs"] <= (0.0 if tp == 1 else 1e-5)
    assert doc["numerics"]["layers"] == []


def test_a_stage_without_layers_is_a_warning(monkeypatch, capsys, models):
    """3 layers at --pp 4: transformers gives stages 0-2 no layer and the last all 3 (the figures say so too)."""
    code, out, _ = run_main(monkeypatch, capsys, "verify", models("llama"), "--tp", "1", "--pp", "4", "--json")
    doc = json.loads(out)
    warning = [f for f in doc["findings"] if f["code"] == "pp-empty-stage"]
    assert code == 0 and doc["ok"] and len(warning) == 1 and "stages 0, 1, 2 without a layer" in warning[0]["message"]
    code, out, _ = run_main(monkeypatch, capsys, "verify", models("llama"), "--tp", "1", "--pp", "3", "--json")
    assert code == 0 and not [f for f in json.loads(out)["findings"] if f["code"] == "pp-empty-stage"]
    code, out, _ = run_main(monkeypatch, capsys, "inspect", models("llama"), "--tp", "1", "--pp", "4", "--json")
    assert [s["layers"] for s in json.loads(out)["mesh"]["stages"]] == [[0, 0], [0, 0], [0, 0], [0, 3]]


@pytest.mark.dist
@pytest.mark.e2e
def test_a_tp_sharded_folder_loads_on_a_pp_mesh(models, tmp_path):
    """`run --pp 2 --model FOLDER` with a tpcli tp=2 folder: not the per-rank fast path (its tp differs), so
    `tpcli.load_model` hands it to transformers, whose DCP load reshards it into the two stages exactly."""
    src, folder, out = models("llama"), tmp_path / "tp2", tmp_path / "out"
    _tpcli("shard", src, "--tp", 2, "--out", folder)
    proc = _tpcli("run", "--cpu", 2, "--pp", 2, "--model", folder, ORACLES / "mesh_load_worker.py", folder, out)
    assert "not the per-rank fast path" in proc.stderr
    for r in range(2):
        rep = json.loads((out / f"rank{r}.json").read_text())
        assert rep["mismatch"] == [] and rep["logits_max_abs"] == 0.0 and rep["info_env"]["coords"]["pp"] == r


# --- shard --pp: one file per stage ------------------------------------------------------------------------------

def _file_names(path: Path) -> set[str]:
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        return set(f.keys())


@pytest.mark.dist
@pytest.mark.parametrize("name", list(MODELS))
def test_shard_pp_files_hold_only_their_stage(models, measured, tmp_path, monkeypatch, capsys, name):
    """`shard --tp 1 --pp 2`: rank p's file holds exactly the tensors stage p holds on transformers' own PP load
    (a tied lm_head is stored as its own copy on the last stage, under its name); `verify DIR` passes and says
    pp=2; `gather` gives back the original checkpoint bit for bit."""
    import torch
    from safetensors.torch import load_file

    from tpcli.formats import dcp

    out = tmp_path / "pp2"
    code, _, err = run_main(monkeypatch, capsys, "shard", models(name), "--tp", "1", "--pp", "2", "--out", out)
    assert code == 0, err
    tied = {t.name: t.tied_to for t in resolve_plan(load_config(models(name))).tensors.values() if t.tied_to}
    files = sorted(out.glob("shard-*.safetensors"))
    assert [f.name for f in files] == [dcp.shard_file_name(r) for r in range(2)]
    for r, f in enumerate(files):
        assert {tied.get(n, n) for n in _file_names(f)} == set(measured[name][r]["names"]), r
    code, report, _ = run_main(monkeypatch, capsys, "verify", out, "--json")
    doc = json.loads(report)
    assert code == 0 and doc["ok"] and doc["saved_by"]["mesh"]["pp"] == 2 and doc["saved_by"]["description"] == "pp=2"
    code, _, err = run_main(monkeypatch, capsys, "gather", out, "--out", tmp_path / "back")
    assert code == 0, err
    original, back = ({k: v for f in sorted(d.glob("*.safetensors")) for k, v in load_file(f).items()}
                      for d in (models(name), tmp_path / "back"))
    assert original.keys() == back.keys() and all(torch.equal(original[k], back[k]) for k in original)


@pytest.mark.dist
@pytest.mark.e2e
def test_a_pp_folder_loads_on_its_pp_mesh(models, tmp_path):
    """`run --pp 2 --model FOLDER` with a `shard --pp 2` folder: the per-rank fast path (each stage reads its own
    tensors; bytes read: tests/test_pp_tp.py) equals transformers' own PP load of the folder, and the logits equal
    one process's."""
    src, folder, out = models("qwen3"), tmp_path / "pp2", tmp_path / "out"
    _tpcli("shard", src, "--tp", 1, "--pp", 2, "--out", folder)
    proc = _tpcli("run", "--cpu", 2, "--pp", 2, "--model", folder, ORACLES / "mesh_load_worker.py", folder, out)
    assert "reads it through the per-rank fast path" in proc.stderr
    for r in range(2):
        rep = json.loads((out / f"rank{r}.json").read_text())
        assert rep["mismatch"] == [] and rep["logits_max_abs"] == 0.0 and rep["info_env"]["coords"]["pp"] == r


@pytest.mark.parametrize("edit,field", [
    ({"pp_size": 0}, "pp_size"),
    ({"pp_size": 2, "tp_size": 2}, "files"),  # 2 rank files for 2 stages x 2 TP ranks
    ({"pp_size": 3}, "files"),  # 2 rank files for 3 stages
])
def test_a_pp_manifest_is_checked(models, tmp_path, monkeypatch, capsys, edit, field):
    from tpcli.errors import CheckpointError
    from tpcli.formats import manifest

    out = tmp_path / "pp2"
    code, _, err = run_main(monkeypatch, capsys, "shard", models("llama"), "--tp", "1", "--pp", "2", "--out", out)
    assert code == 0, err
    doc = json.loads((out / manifest.NAME).read_text())
    assert manifest.read(out)["pp_size"] == 2
    (out / manifest.NAME).write_text(json.dumps({**doc, **edit}))
    with pytest.raises(CheckpointError, match=f"field {field} must be"):
        manifest.read(out)


def test_run_pp_mesh_resolution():
    """`run --pp`: tp fills what pp leaves (TP inside a node, stages across nodes); a pp mesh short of the world is
    completed with more stages (transformers refuses FSDP and replicas with PP)."""
    from tpcli.commands.run import LaunchSpec, resolve_mesh

    def spec(**kw):
        return LaunchSpec(script="x.py", **kw)

    assert resolve_mesh(spec(cpu=2, pp=2)) == Mesh(pp=2)
    assert resolve_mesh(spec(gpus=4, nnodes=2, rdzv_endpoint="h:1", pp=8)) == Mesh(pp=8)  # stages across nodes
    assert resolve_mesh(spec(gpus=4, nnodes=2, rdzv_endpoint="h:1", pp=2)) == Mesh(tp=4, pp=2)  # TP in a node
    with pytest.raises(UsageError, match=r"= 2 of the 4 ranks of --cpu 4: add --pp 4 \(more stages\)"):
        resolve_mesh(spec(cpu=4, tp=1, pp=2))


def test_ep_with_pp_is_transformers_refusal_in_one_line(monkeypatch, capsys, models):
    """mixtral's default EP plan dispatches tokens (`ep_dispatch_experts`), which transformers' plan resolution
    refuses with PP: its words, naming the flags."""
    code, out, err = run_main(monkeypatch, capsys, "inspect", models("mixtral"), "--tp", "2", "--ep", "2", "--pp", "2")
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1
    assert "--pp 2 with --ep 2: Combining token dispatch with pipeline parallelism is not supported" in err


def test_fit_ranks_pp_before_fsdp_at_equal_ranks_per_copy(monkeypatch, capsys, models):
    """Inference, 4 GPUs: at 4 ranks per model copy tp=2 x pp=2 (hidden states between stages) comes before
    tp=2 x fsdp=2 (every layer's weights all-gathered at every step), and pp=4 before fsdp=4."""
    code, out, _ = run_main(monkeypatch, capsys, "inspect", models("llama"), "--gpus", "4", "--gpu-mem", "1GiB",
                            "--reserve", "0", "--json")
    meshes = [(m["pp"], m["tp"], m["fsdp"], m["dp_replicate"]) for m in json.loads(out)["fit"]["meshes"]]
    assert code == 0 and meshes.index((2, 2, 1, 1)) < meshes.index((1, 2, 2, 1))
    assert meshes.index((4, 1, 1, 1)) < meshes.index((1, 1, 4, 1))
    keys = [(pp * tp * fsdp, fsdp, pp) for pp, tp, fsdp, _ in meshes]
    assert keys == sorted(keys)
