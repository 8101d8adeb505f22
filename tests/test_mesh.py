"""Meshes (`inspect`/`verify --tp T --fsdp F --dp-replicate R --ep E`, `tpcli.planning.mesh`) against real runs.

The oracle is tests/oracles/mesh_oracle.py: transformers' own `from_pretrained(distributed_config=
DistributedConfig(...))` on CPU/gloo workers, then a backward and one AdamW step (and, on a fresh load, a B x L
forward with `use_cache=True`), with every rank's local bytes, KV cache storages and mesh coordinates measured.
One torchrun launch per world size loads every (model, mesh) case of that size.
"""

import json
from pathlib import Path

import pytest
from conftest import ORACLES, run_main, tiny_models, torchrun

from tpcli.commands.inspect import expand_runs
from tpcli.errors import UsageError
from tpcli.planning.memory import MemoryOptions
from tpcli.planning.mesh import Mesh, distributed_config, mesh_memory
from tpcli.planning.plan import load_config, resolve_plan

MODELS = {name: (name, {}) for name in ("llama", "qwen3", "mixtral", "qwen3_moe")}
MODELS["mixtral_i100"] = ("mixtral", {"intermediate": 100})  # at tp=2 its experts' TP widths break grouped_mm
DENSE_4 = ["tp=2,fsdp=2", "tp=2,dp_replicate=2"]
MOE_4 = DENSE_4 + ["fsdp=4,ep=2", "fsdp=4,ep=4", "tp=2,fsdp=2,ep=2", "dp_replicate=2,fsdp=2,ep=2"]
# world -> [(model, mesh)]: tp x fsdp, tp x dp_replicate, fsdp x ep and tp x ep (with and without FSDP)
CASES = {
    4: [(m, s) for m in ("llama", "qwen3") for s in DENSE_4] + [(m, s) for m in ("mixtral", "qwen3_moe") for s in MOE_4],
    2: [(m, s) for m in ("mixtral", "qwen3_moe") for s in ("tp=2,ep=2", "fsdp=2,ep=2")] + [("llama", "fsdp=2")]
    + [("mixtral_i100", "tp=2,ep=2,kernel=default")],
}
LOGITS_TOLERANCE = 1e-5  # fp32
BATCH, SEQ_LEN = 3, 8  # per data-parallel rank, as `inspect --batch --seq-len` means it


def _mesh(spec: str) -> Mesh:
    return Mesh(**{k: int(v) for k, v in (item.split("=") for item in spec.split(",")) if k != "kernel"})


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return tiny_models(tmp_path_factory.mktemp("mesh-models"), MODELS)


@pytest.fixture(scope="module")
def measured(models, tmp_path_factory):
    """measured(world) -> {(model, mesh spec): [rank 0 dict, ...]}, one torchrun launch per world size."""
    root = tmp_path_factory.mktemp("mesh-oracle")
    cache: dict[int, dict] = {}

    def get(world: int) -> dict:
        if world not in cache:
            out = root / f"w{world}"
            cases = [f"{models(m)}@{s}" for m, s in CASES[world]]
            torchrun(world, ORACLES / "mesh_oracle.py", out, *cases, "--batch", BATCH, "--seq-len", SEQ_LEN)
            ranks = [json.loads(Path(f"{out}.rank{r}.json").read_text()) for r in range(world)]
            cache[world] = {key: [rank[case] for rank in ranks] for key, case in zip(CASES[world], cases, strict=True)}
        return cache[world]

    return get


@pytest.mark.dist
@pytest.mark.parametrize("world,name,spec", [(w, m, s) for w, cases in CASES.items() for m, s in cases])
def test_every_rank_holds_what_tpcli_says(models, measured, world, name, spec):
    """Weights, the KV cache of a B x L forward (every storage the cache object reaches), gradients after one
    backward and AdamW state after one step, per rank, byte for byte, and each rank's coordinates on transformers' dense and expert meshes; and the mesh computes the single-process logits
    (a mesh `verify` passes runs and is exact)."""
    oracle = measured(world)[(name, spec)]
    mesh = _mesh(spec)
    assert mesh.world == world
    doc = mesh_memory(resolve_plan(load_config(models(name))), mesh, MemoryOptions(
        train=True, batch=BATCH, seq_len=SEQ_LEN))
    ours = [{k: rk[k] for k in ("weight_bytes", "kv_cache_bytes", "grad_bytes", "optimizer_bytes")} | {"coords": rk["coords"]}
            for rk in doc["ranks"]]
    theirs = [{"weight_bytes": o["weight_bytes"], "kv_cache_bytes": o["kv_cache_storage_bytes"],
               "grad_bytes": o["grad_bytes"], "optimizer_bytes": o["optimizer_bytes"],
               "coords": {k: o["coords"][k] for k in ("dp_replicate", "fsdp", "tp", "efsdp", "ep")}} for o in oracle]
    assert ours == theirs
    assert all(o["logits_max_abs"] <= LOGITS_TOLERANCE for o in oracle), [o["logits_max_abs"] for o in oracle]


def test_mesh_rules_are_transformers_own():
    """Every mesh of sizes 1..4 is refused by tpcli exactly when transformers' DistributedConfig refuses it."""
    from transformers.distributed import DistributedConfig

    for tp in range(1, 5):
        for fsdp in range(1, 5):
            for ep in range(1, 9):
                try:
                    DistributedConfig(tp_size=tp, fsdp_size=fsdp, ep_size=ep)
                    refused = None
                except ValueError as exc:
                    refused = str(exc)
                if refused is None:
                    distributed_config(Mesh(tp=tp, fsdp=fsdp, ep=ep))
                else:
                    with pytest.raises(UsageError, match=f"^--ep {ep}: "):
                        distributed_config(Mesh(tp=tp, fsdp=fsdp, ep=ep))


def test_coordinates_follow_transformers_mesh_order():
    """rank = (r * F + f) * T + t on the dense mesh; (r * EF + g) * E + e on the expert mesh."""
    m = Mesh(tp=2, fsdp=4, dp_replicate=2, ep=4)
    assert m.world == 16 and m.efsdp == 2
    assert m.coords(13) == {"dp_replicate": 1, "fsdp": 2, "tp": 1, "efsdp": 1, "ep": 1}
    assert [m.coords(r)["ep"] for r in range(8)] == [0, 1, 2, 3, 0, 1, 2, 3]


@pytest.mark.parametrize("args,rule", [
    (["--tp", "2", "--ep", "3"], "--ep 3: `ep_size` must be a multiple of `tp_size` (--tp 2)"),
    (["--tp", "2", "--fsdp", "3", "--ep", "4"], "--ep 4: `ep_size` must divide `fsdp_size * tp_size`"),
    (["--fsdp", "2"], "--fsdp describes a mesh around a TP size: add --tp T"),
    (["--tp", "2", "--dp-replicate", "0"], "--dp-replicate must be >= 1"),
])
def test_an_invalid_mesh_is_one_line_naming_the_rule(monkeypatch, capsys, models, args, rule):
    for command in ("inspect", "verify"):
        code, out, err = run_main(monkeypatch, capsys, command, models("mixtral"), *args)
        assert code == 2 and out == "" and err.count("\n") == 1 and rule in err, (command, err)


def test_model_level_mesh_rules(monkeypatch, capsys, models):
    """Rules only the model can decide: a dense model has no EP plan; experts must split evenly over --ep."""
    code, _, err = run_main(monkeypatch, capsys, "inspect", models("llama"), "--tp", "2", "--ep", "2")
    assert code == 2 and err.startswith("Error: --ep 2: LlamaForCausalLM has no experts to distribute") \
        and "drop --ep" in err
    code, _, err = run_main(monkeypatch, capsys, "verify", models("mixtral"), "--tp", "1", "--fsdp", "8", "--ep", "8")
    assert code == 2 and "--ep 8: model.layers.0.mlp.experts.gate_up_proj has 4 experts" in err


def test_ep_drops_findings_about_the_experts_tp_shards(monkeypatch, capsys, models):
    """With --ep the experts follow the EP plan (whole experts per rank), not their TP rules: the grouped_mm stride
    error of mixtral_i100's TP-split experts at tp=2 does not apply at tp=2 x ep=2 (a real grouped_mm run of that
    mesh matches the single process, test_every_rank_holds_what_tpcli_says[2-mixtral_i100-...])."""
    code, out, _ = run_main(monkeypatch, capsys, "verify", models("mixtral_i100"), "--tp", "2", "--json")
    assert code == 1 and "grouped-mm-stride" in {f["code"] for f in json.loads(out)["findings"]}
    code, out, _ = run_main(monkeypatch, capsys, "verify", models("mixtral_i100"), "--tp", "2", "--ep", "2", "--json")
    assert code == 0 and "grouped-mm-stride" not in {f["code"] for f in json.loads(out)["findings"]}
    code, out, _ = run_main(monkeypatch, capsys, "inspect", models("mixtral_i100"), "--tp", "2", "--ep", "2", "--json")
    assert code == 0 and json.loads(out)["tp"]["valid"]


def test_inspect_json_mesh(monkeypatch, capsys, models):
    code, out, _ = run_main(monkeypatch, capsys, "inspect", models("qwen3"), "--tp", "2", "--json")
    doc = json.loads(out)
    assert code == 0 and doc["schema"] == "tpcli.inspect/4" and doc["mesh"] is None
    code, out, _ = run_main(monkeypatch, capsys, "inspect", models("qwen3"), "--tp", "2", "--dp-replicate", "2",
                            "--train", "--seq-len", "8", "--batch", "3", "--json")
    doc = json.loads(out)
    mesh = doc["mesh"]
    assert code == 0 and {k: mesh[k] for k in ("tp", "fsdp", "dp_replicate", "ep", "world")} == {
        "tp": 2, "fsdp": 1, "dp_replicate": 2, "ep": 1, "world": 4}
    assert [r["rank"] for r in mesh["ranks"]] == [0, 1, 2, 3]
    # replicas hold what the plain TP ranks hold; --batch is per data-parallel rank, so the KV cache is tp=2's
    for rk in mesh["ranks"]:
        tp_rank = expand_runs(doc["tp"]["rank_runs"])[rk["coords"]["tp"]]
        for key in ("weight_bytes", "kv_cache_bytes", "grad_bytes", "optimizer_bytes", "activation_bytes_estimate"):
            assert rk[key] == tp_rank[key], key
        assert rk["fsdp_gather_bytes_estimate"] == 0  # fsdp=1: nothing to gather
        assert rk["total_bytes"] == tp_rank["total_bytes"]


def test_mesh_table_fits_80_columns_in_a_pipe(monkeypatch, capsys, models):
    """The table is narrow by design (80 columns even in a pipe); its notes are prose, never wrapped in a pipe."""
    code, out, _ = run_main(monkeypatch, capsys, "inspect", models("mixtral"), "--tp", "2", "--fsdp", "2", "--ep", "2",
                            "--train", "--seq-len", "16")
    section = out[out.index("Memory per rank on the mesh"):].splitlines()
    section = section[:next((i for i, ln in enumerate(section) if ln.startswith(("One step", "No step"))), None)]
    table = [line for line in section[2:] if not line.startswith("  ")]
    assert code == 0 and table and all(len(line) <= 80 for line in table), [len(x) for x in table]
    assert "tp=2 x fsdp=2 x ep=2 (4 ranks)" in section[0] and "coords: (fsdp, tp, efsdp, ep)" in section[1]
    assert any(line.startswith("0 *") for line in section) and any("gather: ESTIMATE" in line for line in section)


def test_dense_mesh_table_has_no_expert_coordinates_and_says_why_fsdp_can_cost_more(monkeypatch, capsys, models):
    """efsdp (= fsdp x tp / ep) only places experts: at ep=1 it repeated the fsdp coordinate on a dense model. The
    FSDP gather estimate made tp1 x fsdp2 x dp2 larger than 4 replicas with no word of why."""
    code, out, _ = run_main(monkeypatch, capsys, "inspect", models("qwen3"), "--tp", "1", "--fsdp", "2",
                            "--dp-replicate", "2")
    section = out[out.index("Memory per rank on the mesh"):].splitlines()
    assert code == 0 and "coords: (dp_replicate, fsdp)" in section[1], section
    assert any(line.startswith("0,2 *") and "(*,0)" in line for line in section), section
    note = next(line for line in section if "gather: ESTIMATE" in line)
    assert "FSDP can cost a rank more than it saves" in note


def test_verify_mesh(monkeypatch, capsys, models):
    code, out, _ = run_main(monkeypatch, capsys, "verify", models("qwen3_moe"), "--tp", "2", "--fsdp", "2", "--ep", "4",
                            "--json")
    doc = json.loads(out)
    assert code == 0 and doc["ok"] and doc["mesh"] == {"tp": 2, "fsdp": 2, "dp_replicate": 1, "ep": 4, "world": 4,
                                                       "efsdp": 1}
    # `--numerics` on a mesh runs the mesh's workers: tests/test_run_mesh.py::test_verify_numerics_on_a_mesh


def _brute_force(world: int, per_node: int, valid_tp: list[int]) -> set[tuple]:
    """Every (tp, fsdp, dp_replicate, ep) of `world` ranks transformers' DistributedConfig accepts, TP in a node."""
    from transformers.distributed import DistributedConfig

    out = set()
    for tp in range(1, world + 1):
        for fsdp in range(1, world + 1):
            for dp in range(1, world + 1):
                for ep in range(1, world + 1):
                    if tp * fsdp * dp != world or per_node % tp or tp not in valid_tp:
                        continue
                    try:
                        DistributedConfig(tp_size=tp, fsdp_size=fsdp, dp_replicate_size=dp, ep_size=ep)
                    except ValueError:
                        continue
                    out.add((tp, fsdp, dp, ep))
    return out


def test_fit_over_meshes_lists_every_valid_mesh_ranked(monkeypatch, capsys, models):
    """--gpus 8 --gpus-per-node 4: the meshes listed plus those the model refuses are exactly the size combinations
    transformers accepts with TP inside a node; each total is the largest rank of that mesh's table; fitting
    meshes come first, and the best is the first."""
    from tpcli.planning.mesh_fit import candidate_meshes

    code, out, _ = run_main(monkeypatch, capsys, "inspect", models("qwen3_moe"), "--gpus", "8", "--gpus-per-node", "4",
                            "--gpu-mem", "3MiB", "--reserve", "1MiB", "--train", "--seq-len", "16", "--json")
    fit = json.loads(out)["fit"]
    listed = {(m["tp"], m["fsdp"], m["dp_replicate"], m["ep"]) for m in fit["meshes"]}
    valid_tp = json.loads(out)["valid_tp_sizes"]
    candidates = {(m.tp, m.fsdp, m.dp_replicate, m.ep) for m in candidate_meshes(8, 4, valid_tp)}
    assert code == 0 and candidates == _brute_force(8, 4, valid_tp)
    assert listed <= candidates and len(candidates - listed) == fit["refused_by_model"]
    # TP never spans nodes
    assert {m.tp for m in candidate_meshes(8, 4, [1, 2, 4, 8])} == {1, 2, 4}
    assert {m.tp for m in candidate_meshes(8, 1, [1, 2, 4, 8])} == {1}
    plan = resolve_plan(load_config(models("qwen3_moe")))
    opts = MemoryOptions(train=True, seq_len=16)
    for m in fit["meshes"][:3]:
        doc = mesh_memory(plan, Mesh(tp=m["tp"], fsdp=m["fsdp"], dp_replicate=m["dp_replicate"], ep=m["ep"]), opts)
        assert m["total_bytes"] == max(rk["total_bytes"] for rk in doc["ranks"])
    fits = [m["fits"] for m in fit["meshes"]]
    assert fits == sorted(fits, reverse=True) and any(fits) and not all(fits)
    assert all(m["fits"] == (m["total_bytes"] <= 2 * 2**20) for m in fit["meshes"])
    assert fit["best"] == fit["meshes"][0]
    # training with --seq-len: fitting meshes by estimated step time (tpcli.planning.steptime, tests/test_step.py)
    times = [m["step_time"]["step_s"] for m in fit["meshes"] if m["fits"] and m["step_time"]]
    assert times == sorted(times) and fit["why"]
    assert fit["best"]["run_flags"].startswith("--gpus 4 --nnodes 2 ")
    best = fit["best"]
    assert f" --tp {best['tp']}" in best["run_flags"].partition("  #")[0]


def test_fit_over_meshes_renders_in_80_columns(monkeypatch, capsys, models):
    code, out, _ = run_main(monkeypatch, capsys, "inspect", models("mixtral"), "--gpus", "4", "--gpu-mem", "4MiB",
                            "--reserve", "1MiB")
    section = out[out.index("Meshes of 4 GPUs"):].splitlines()
    table = [line for line in section[2:] if not line.startswith("  ")]
    assert code == 0 and all(len(line) <= 80 for line in table), [len(x) for x in table]
    assert any(line.startswith("Best: ") for line in section)
    # prose is not wrapped in a pipe: the ranking rule and the from_pretrained call are one line each
    ranked = [line for line in section if line.startswith("  ranked: ")]
    assert len(ranked) == 1 and ranked[0].endswith("then the smallest total"), section
    script = [line for line in section if "DistributedConfig(tp_size=" in line]
    assert len(script) == 1 and "ep_size=" in script[0], section
    code, _, err = run_main(monkeypatch, capsys, "inspect", models("mixtral"), "--gpus", "4")
    assert code == 2 and "add --gpu-mem SIZE" in err


def test_fit_over_meshes_never_recommends_a_mesh_static_verify_refuses(monkeypatch, capsys, tmp_path):
    """vocab 3 at tp 2 x fsdp 2 leaves a rank an empty shard (transformers' load crashes there): fit must skip it."""
    from tpcli.testing import build_tiny

    model = build_tiny("qwen3", tmp_path / "v3", vocab=3)
    code, out, err = run_main(monkeypatch, capsys, "inspect", model, "--gpus", "4", "--gpu-mem", "4GiB", "--json")
    assert code == 0, err
    meshes = json.loads(out)["fit"]["meshes"]
    assert meshes and not any(m["tp"] == 2 and m["fsdp"] == 2 for m in meshes)
    assert json.loads(out)["fit"]["refused_by_model"] >= 1


def test_a_split_router_under_ep_is_named_in_eps_words(model_dirs, tmp_path):
    """A colwise MoE router is a pairing error at any mesh; under --ep the block's experts are the EP plan's
    (ep_dispatch_experts), so the finding says to keep the router whole instead of naming TP partners the EP plan
    has replaced (moe_tp_experts, "make the output projection rowwise")."""
    from tpcli.commands.inspect import load_resolved
    from tpcli.planning.checks import check_plan
    from tpcli.planning.mesh import mesh_findings

    plan_file = tmp_path / "gate.json"
    plan_file.write_text(json.dumps({"model.layers.*.mlp.gate": "colwise"}))
    _, plan = load_resolved(str(model_dirs("mixtral")), plan_file=str(plan_file))

    def pairing(mesh, as_dicts=False):
        found = check_plan(plan, mesh.tp)
        found = mesh_findings(plan, mesh, [f.to_dict() for f in found] if as_dicts else found, as_dicts=as_dicts)
        return [f["message"] if as_dicts else f.message for f in found
                if (f["code"] if as_dicts else f.code) == "pairing"]

    (tp_only,) = pairing(Mesh(tp=2, fsdp=2))
    assert "moe_tp_experts" in tp_only and "make the block's output projection rowwise" in tp_only
    for as_dicts in (False, True):
        (ep,) = pairing(Mesh(tp=2, fsdp=2, ep=2), as_dicts)
        assert ep.startswith("model.layers.*.mlp: gate: colwise splits its output") and "--ep 2" in ep, ep
        assert "ep_dispatch_experts" in ep and "keep the router whole" in ep and "moe_tp_experts" not in ep, ep
