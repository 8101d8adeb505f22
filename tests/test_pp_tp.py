"""`shard --pp P --tp T` (issue 36, item 3): rank files that hold each stage's tensors cut by the TP plan, checked
against transformers' own loads on CPU workers, and loaded per rank by `tpcli.load_model` on the pp x tp mesh.

Oracles: the stage names come from transformers' own PP load (tests/oracles/pp_oracle.py, the `measured` fixture of
test_pp: 3-layer models, so pp=2 splits them [0, 1) and [1, 3) and a boundary one layer off moves a whole layer);
the TP chunks from transformers' own tp=2 load and DCP save (tests/oracles/tp_oracle.py): rank (p, t) of a pp x tp
folder must hold, for the tensors stage p holds, exactly the chunks transformers' TP rank t saves, bit for bit.
"""

import json

import pytest
from conftest import ORACLES, run_main
from test_load_mesh_fast import share_bound
from test_pp import MODELS, _tpcli, measured, models  # noqa: F401  (module-scoped fixtures, used by name)

from tpcli.commands.shard import plan_job
from tpcli.formats import dcp, manifest
from tpcli.planning import pipeline
from tpcli.planning.mesh import Mesh
from tpcli.planning.plan import load_config, resolve_plan
from tpcli.runtime.loading import fast_path_refusal, mesh_fast_path_refusal

TP, PP = 2, 2


def _chunks(folder) -> dict:
    """{(name, saved offsets): (rank, tensor)} over a folder's rank files (transformers' DCP layout)."""
    from safetensors import safe_open

    out = {}
    for r in range(len(list(folder.glob("shard-*.safetensors")))):
        with safe_open(str(folder / dcp.shard_file_name(r)), "pt") as f:
            info = json.loads(f.metadata()[dcp.SHARDING_KEY])
            out.update({(k, tuple(info[k]["saved_offsets"])): (r, f.get_tensor(k)) for k in f.keys()})
    return out


def _tied(src) -> dict:
    return {t.name: t.tied_to for t in resolve_plan(load_config(src)).tensors.values() if t.tied_to}


def _stage_names(rank_names: list[list[str]], tied: dict) -> list[set]:
    """Per stage, the tensors its TP ranks' files hold together (a tied copy under its twin's name)."""
    return [{tied.get(n, n) for r in range(p * TP, (p + 1) * TP) for n in rank_names[r]} for p in range(PP)]


@pytest.mark.dist
@pytest.mark.parametrize("name", list(MODELS))
def test_shard_tp_x_pp_files_are_each_stages_tp_chunks(models, measured, oracle, tmp_path, monkeypatch, capsys,  # noqa: F811
                                                       name):
    """`shard --tp 2 --pp 2`: 4 rank files; rank (p, t) holds only tensors stage p holds on transformers' PP load,
    the stage's files together hold all of them, and every chunk is, offsets and bytes, the one transformers' own
    tp=2 load saves for TP rank t; `verify DIR` passes and says pp=2 x tp=2; `gather` gives the original back
    bit for bit."""
    import torch
    from safetensors.torch import load_file

    src, out = models(name), tmp_path / "pp2tp2"
    code, _, err = run_main(monkeypatch, capsys, "shard", src, "--tp", TP, "--pp", PP, "--out", out)
    assert code == 0, err
    ours, theirs, tied = _chunks(out), _chunks(oracle(name, TP, src=src) / "dcp"), _tied(src)
    assert len(list(out.glob("shard-*.safetensors"))) == TP * PP
    names = [[n for (n, _), (r, _) in ours.items() if r == rank] for rank in range(TP * PP)]
    stages = _stage_names(names, tied)
    assert stages == [set(measured[name][p]["names"]) for p in range(PP)]
    for (n, offsets), (rank, tensor) in ours.items():
        twin = tied.get(n, n)  # transformers saves a tied lm_head once, as the embedding
        assert twin in measured[name][rank // TP]["names"], (n, rank)
        assert torch.equal(tensor, theirs[(twin, offsets)][1]), (n, offsets)
    for p in range(PP):  # every chunk transformers' TP ranks save of the stage's tensors is in the stage's files
        want = {key for key in theirs if key[0] in stages[p]}
        have = {(tied.get(n, n), o) for (n, o), (r, _) in ours.items() if r // TP == p}
        assert have == want, p
    code, report, _ = run_main(monkeypatch, capsys, "verify", out, "--json")
    doc = json.loads(report)
    assert code == 0 and doc["ok"] and doc["saved_by"]["description"] == "pp=2 x tp=2"
    code, _, err = run_main(monkeypatch, capsys, "gather", out, "--out", tmp_path / "back")
    assert code == 0, err
    original, back = ({k: v for f in sorted(d.glob("*.safetensors")) for k, v in load_file(f).items()}
                      for d in (src, tmp_path / "back"))
    assert original.keys() == back.keys() and all(torch.equal(original[k], back[k]) for k in original)


@pytest.mark.dist
def test_tp_x_pp_stage_boundaries_off_by_one_layer_are_caught(models, measured, monkeypatch):  # noqa: F811
    """The layout above, planned with tpcli's stage boundaries one layer off ([0, 2) and [2, 3), the ceil split),
    no longer holds each stage's tensors as transformers' PP load does."""

    def planned_stages(name):
        job = plan_job(str(models(name)), tp=TP, plan_file=None, cast=None, revision=None, pp=PP)
        if job.stream is not None:
            job.stream.close()
        files = sorted(job.plan.files, key=lambda f: f.name)  # shard-<rank>-of-<world>.safetensors
        return _stage_names([[t.name for t in f.tensors] for f in files], _tied(models(name)))

    def shifted(pp, stage, num_layers):
        per_stage = -(-num_layers // pp)
        return range(stage * per_stage, min(num_layers, (stage + 1) * per_stage))

    want = {name: [set(measured[name][p]["names"]) for p in range(PP)] for name in MODELS}
    assert all(planned_stages(name) == want[name] for name in MODELS)
    monkeypatch.setattr(pipeline, "layer_range", shifted)
    assert all(planned_stages(name) != want[name] for name in MODELS)


def _stage_share(folder, doc, stage: int | None) -> int:
    """`share_bound` over the tensors stage `stage` holds (None: every stage's, what a rank reading its TP share
    of the whole model would read)."""
    layout = pipeline.stages(resolve_plan(load_config(folder)), doc["pp_size"])
    held = {n: e for n, e in doc["tensors"].items() if stage is None or stage in layout.stages_of(n)}
    return share_bound(folder, {**doc, "tensors": held}, 1, slack=1.1 if stage is not None else 1.0)


@pytest.mark.dist
@pytest.mark.e2e
@pytest.mark.parametrize("name,tp", [("llama", 2), ("qwen3", 2), ("mixtral", 2), ("llama", 1)],
                         ids=["llama-pp2xtp2", "qwen3-pp2xtp2", "mixtral-pp2xtp2", "llama-pp2"])
def test_a_pp_folder_loads_per_rank_on_its_mesh(models, tmp_path, name, tp):  # noqa: F811
    """`run --tp T --pp 2 --model FOLDER` with a `shard --tp T --pp 2` folder: `tpcli.load_model` takes the per-rank
    fast path; every parameter equals (placements and local tensor) transformers' load of the original on the same
    mesh, logits and greedy tokens equal one process's (fp32), and each rank reads (rchar) no more than its stage's
    share of the files (its TP chunks of the stage's tensors, the replicated ones whole) plus metadata. mixtral:
    its experts' packed gate_up (`_StridedShard(1, sf=2)`) is read as two runs of the chunk of each half."""
    src, folder, out = models(name), tmp_path / "pp", tmp_path / "out"
    _tpcli("shard", src, "--tp", tp, "--pp", PP, "--out", folder)
    proc = _tpcli("run", "--cpu", tp * PP, "--tp", tp, "--pp", PP, "--model", folder, ORACLES / "pp_fast_worker.py",
                  folder, src, out, timeout=400)
    assert f"is a tpcli pp=2 x tp={tp} sharded folder" in proc.stderr
    assert "reads it through the per-rank fast path" in proc.stderr
    doc = manifest.read(folder)
    layout = pipeline.stages(resolve_plan(load_config(src)), PP)
    bounds = []
    for r in range(tp * PP):
        rep = json.loads((out / f"rank{r}.json").read_text())
        assert rep["fast"] and rep["mismatch"] == [] and rep["n_params"] > 0, rep["mismatch"]
        assert rep["logits_max_abs"] <= 1e-5 and rep["tokens_equal"], rep["logits_max_abs"]
        assert all(r // tp in layout.stages_of(n) for n in rep["names"])
        bounds.append(_stage_share(folder, doc, r // tp))
        assert rep["rchar"] <= bounds[-1], (r, rep["rchar"], bounds[-1])
        if tp > 1:
            assert any("Shard" in p for p in rep["placements"])
    assert _stage_share(folder, doc, None) > max(bounds)  # the check can fail: reading every stage is above it


def test_pp_folders_take_the_fast_path_on_their_own_mesh_only(models, tmp_path, monkeypatch, capsys):  # noqa: F811
    code, _, err = run_main(monkeypatch, capsys, "shard", models("llama"), "--tp", TP, "--pp", PP, "--out",
                            tmp_path / "pp")
    assert code == 0, err
    doc = manifest.read(tmp_path / "pp")
    assert (doc["tp_size"], doc["pp_size"]) == (TP, PP)
    assert fast_path_refusal(doc, Mesh(tp=2, pp=2), 4) is None
    assert fast_path_refusal(doc, Mesh(tp=4), 4) == "its pp=2 differs from the mesh's pp=1"
    assert mesh_fast_path_refusal(doc, Mesh(tp=1, pp=2)) == "its tp=2 differs from the mesh's tp=1"
    assert mesh_fast_path_refusal(doc, Mesh(tp=2, pp=2, ep=2)).startswith("expert parallelism")
    assert mesh_fast_path_refusal({**doc, "pp_size": 1}, Mesh(tp=2, pp=2)) == "its pp=1 differs from the mesh's pp=2"


def test_shard_warns_of_a_stage_without_layers(models, tmp_path, monkeypatch, capsys):  # noqa: F811
    """3 layers at --pp 4: stages 0-2 own no decoder layer (transformers gives the last all 3); shard writes the
    folder (their files hold the embeddings or nothing) and says so, as verify and inspect do."""
    code, out, err = run_main(monkeypatch, capsys, "shard", models("llama"), "--tp", 2, "--pp", 4, "--out",
                              tmp_path / "pp4", "--json")
    warnings = [w for w in json.loads(out)["warnings"] if w["code"] == "pp-empty-stage"]
    assert code == 0 and len(warnings) == 1 and "stages 0, 1, 2 without a layer" in warnings[0]["message"], err
    code, report, _ = run_main(monkeypatch, capsys, "verify", tmp_path / "pp4", "--json")
    assert code == 0 and json.loads(report)["saved_by"]["description"] == "pp=4 x tp=2"


@pytest.mark.dist
@pytest.mark.e2e
def test_a_pp_x_tp_folder_loads_on_another_mesh_through_dcp(models, tmp_path):  # noqa: F811
    """The folder is a transformers DCP folder too: `run --tp 2 --model FOLDER` (no pp) hands it to
    `from_pretrained`, whose DCP load reassembles every rank's TP slice from the four stage files: each parameter
    equal to transformers' tp=2 load of the original, logits and greedy tokens as one process."""
    src, folder, out = models("qwen3"), tmp_path / "pp2tp2", tmp_path / "out"
    _tpcli("shard", src, "--tp", TP, "--pp", PP, "--out", folder)
    proc = _tpcli("run", "--cpu", 2, "--tp", 2, "--model", folder, ORACLES / "pp_fast_worker.py", folder, src, out)
    assert "it was not saved at tp=2" in proc.stderr
    for r in range(2):
        rep = json.loads((out / f"rank{r}.json").read_text())
        assert not rep["fast"] and rep["mismatch"] == [] and rep["n_params"] > 0, rep["mismatch"]
        assert rep["logits_max_abs"] <= 1e-5 and rep["tokens_equal"], rep["logits_max_abs"]
