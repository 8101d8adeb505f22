"""`tpcli run --tp --fsdp --dp-replicate --ep`: the mesh resolved, handed to the workers and loaded by
`tpcli.load_model` exactly as transformers' own `from_pretrained(distributed_config=...)`; `--dry-run`; SLURM."""

import json
import re
import subprocess
import sys

import pytest
import torch
from conftest import ORACLES, base_env, run_main, single_process_sgd_losses

from tpcli.commands import slurm
from tpcli.commands.run import LaunchSpec, resolve_mesh
from tpcli.errors import UsageError
from tpcli.planning.mesh import Mesh
from tpcli.runtime.meshinfo import mesh_from_env, mesh_info, parse_mesh

TPCLI = [sys.executable, "-m", "tpcli"]


def tpcli_run(*args, timeout=300):
    proc = subprocess.run([*TPCLI, "run", *map(str, args)], env=base_env(), capture_output=True, text=True,
                          timeout=timeout)
    if proc.returncode:
        raise AssertionError(f"tpcli run failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


# --- the mesh from the flags -------------------------------------------------------------------------------------

def spec(**kw):
    return LaunchSpec(script="x.py", **kw)


def test_no_mesh_flag_is_plain_tp_over_the_world():
    assert resolve_mesh(spec(cpu=4)) == Mesh(tp=4)
    assert resolve_mesh(spec(gpus=4, nnodes=2, rdzv_endpoint="h:1")) == Mesh(tp=8)


def test_mesh_flags_resolve_and_tp_fills_the_rest():
    assert resolve_mesh(spec(cpu=4, tp=2, fsdp=2)) == Mesh(tp=2, fsdp=2)
    assert resolve_mesh(spec(cpu=4, dp_replicate=2)) == Mesh(tp=2, dp_replicate=2)
    assert resolve_mesh(spec(cpu=2, tp=1, fsdp=2, ep=2)) == Mesh(tp=1, fsdp=2, ep=2)
    assert resolve_mesh(spec(gpus=4, nnodes=2, tp=4, dp_replicate=2)) == Mesh(tp=4, dp_replicate=2)


def test_under_specified_mesh_names_both_completions(monkeypatch, capsys, tmp_path):
    script = tmp_path / "s.py"
    script.write_text("")
    code, out, err = run_main(monkeypatch, capsys, "run", "--cpu", "4", "--tp", "2", script)
    assert code == 2 and out == ""
    assert "--fsdp 2 (training: shards params, grads, optimizer)" in err
    assert "--dp-replicate 2 (inference replicas)" in err
    with pytest.raises(UsageError, match=r"add --fsdp 4 .* or --dp-replicate 2 "):
        resolve_mesh(spec(gpus=8, tp=2, fsdp=2))
    with pytest.raises(UsageError, match="must equal the world size 4"):
        resolve_mesh(spec(cpu=4, tp=3))


def test_tp_across_nodes_is_refused_with_the_reason():
    with pytest.raises(UsageError, match=r"--tp 8 with 4 workers per node: a TP group would span nodes.*intra-node"):
        resolve_mesh(spec(gpus=4, nnodes=2, rdzv_endpoint="h:1", tp=8))
    with pytest.raises(UsageError, match="span nodes"):  # 3 does not divide 4: a group straddles two nodes
        resolve_mesh(spec(gpus=4, nnodes=3, rdzv_endpoint="h:1", tp=3, fsdp=4))


def test_transformers_rules_refuse_a_bad_ep():
    with pytest.raises(UsageError, match=r"--ep 3: .*multiple of `tp_size`"):
        resolve_mesh(spec(cpu=4, tp=2, fsdp=2, ep=3))


def test_mesh_env_round_trip_and_bad_values(monkeypatch):
    assert parse_mesh("tp=2,fsdp=2,dp_replicate=1,ep=1") == Mesh(tp=2, fsdp=2)
    for bad in ("tp=0", "tp=2,tp=2", "sp=2", "tp", "tp=²", "tp=" + "9" * 5000):  # the last two: tracebacks before
        with pytest.raises(UsageError, match="TPCLI_MESH"):
            parse_mesh(bad)
    monkeypatch.setenv("TPCLI_MESH", "tp=2,fsdp=2")
    with pytest.raises(UsageError, match="4 ranks, but the job has 2"):
        mesh_from_env(2)
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("TPCLI_MESH", "tp=2,dp_replicate=2")
    info = mesh_info()
    assert (info.dp_rank, info.dp_size, info.tp_rank) == (1, 2, 1)
    monkeypatch.delenv("TPCLI_MESH")
    assert mesh_info().mesh == Mesh(tp=4) and mesh_info().dp_size == 1


# --- --dry-run ---------------------------------------------------------------------------------------------------

def test_dry_run_prints_mesh_command_and_env_without_gpus(monkeypatch, capsys, tmp_path):
    script = tmp_path / "train.py"
    script.write_text("raise SystemExit(3)\n")  # never started
    code, out, err = run_main(monkeypatch, capsys, "run", "--gpus", "8", "--tp", "4", "--fsdp", "2", "--dry-run",
                              script, "--lr", "1")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0] == "mesh: tp=4 x fsdp=2 x dp_replicate=1 (8 ranks), ep=1"
    command = next(ln for ln in lines if ln.startswith("command: "))
    assert "-m torch.distributed.run --nproc-per-node=8" in command and "--standalone" in command
    assert command.endswith(f"script {script} --lr 1")
    assert "  TPCLI_MESH=tp=4,fsdp=2,dp_replicate=1,ep=1" in lines
    assert not any(ln.startswith("  CUDA_VISIBLE_DEVICES") for ln in lines)  # GPU workers keep their GPUs
    assert not list(tmp_path.glob("tpcli-run-*"))


def test_dry_run_without_mesh_flags_is_todays_plain_tp(monkeypatch, capsys, tmp_path):
    script = tmp_path / "s.py"
    script.write_text("")
    code, out, _ = run_main(monkeypatch, capsys, "run", "--cpu", "2", "--dry-run", script)
    assert code == 0
    assert out.startswith("mesh: tp=2 x fsdp=1 x dp_replicate=1 (2 ranks), ep=1 (no mesh flag")
    assert "TPCLI_MESH" not in out and "  CUDA_VISIBLE_DEVICES=''" in out
    code, out, err = run_main(monkeypatch, capsys, "run", "--cpu", "2", "--dry-run", "--json", script)
    assert code == 0 and json.loads(out)["ok"] and "command: " in err


# --- SLURM -------------------------------------------------------------------------------------------------------

def test_nodelist_parser():
    assert slurm.expand_nodelist("node[07-08,10]") == ["node07", "node08", "node10"]
    assert slurm.expand_nodelist("gpu3,node[1-2],x") == ["gpu3", "node1", "node2", "x"]
    assert slurm.expand_nodelist("r[1-2]n[3-4]") == ["r1n3", "r1n4", "r2n3", "r2n4"]
    assert slurm.expand_nodelist("a[098-101]-ib") == ["a098-ib", "a099-ib", "a100-ib", "a101-ib"]
    for bad in ("node[1-", "node[3-1]", "node[a]", "x,,y"):
        with pytest.raises(UsageError, match="SLURM_JOB_NODELIST"):
            slurm.expand_nodelist(bad)


SLURM_ENV = {"SLURM_JOB_ID": "4242", "SLURM_JOB_NUM_NODES": "2", "SLURM_NODEID": "1",
             "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_GPUS_ON_NODE": "4"}


def test_slurm_derivation_from_a_fake_environment(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")  # no scontrol: the parser gives the first host
    nodes = slurm.from_env(SLURM_ENV)
    assert (nodes.nnodes, nodes.node_rank, nodes.rdzv_endpoint, nodes.gpus_per_node) == (2, 1, "gpu07:29500", 4)
    flags, line = slurm.apply(nodes, gpus=None, cpu=None, nnodes=None, node_rank=None, rdzv_endpoint=None,
                              rdzv_id=None)
    assert flags == {"gpus": 4, "cpu": None, "nnodes": 2, "node_rank": 1, "rdzv_endpoint": "gpu07:29500",
                     "rdzv_id": "4242"}
    assert line.startswith("tpcli run: SLURM job 4242: --nnodes 2, --node-rank 1, --rdzv-endpoint gpu07:29500, "
                           "--rdzv-id 4242, --gpus 4")
    flags, _ = slurm.apply(nodes, gpus=2, cpu=None, nnodes=2, node_rank=0, rdzv_endpoint="h:1", rdzv_id="mine")
    assert flags == {"gpus": 2, "cpu": None, "nnodes": 2, "node_rank": 0, "rdzv_endpoint": "h:1", "rdzv_id": "mine"}
    assert slurm.from_env({**SLURM_ENV, "SLURM_GPUS_ON_NODE": "", "SLURM_GPUS_PER_NODE": "h100:8"}).gpus_per_node == 8
    assert slurm.from_env({}) is None


def test_scontrol_is_used_when_present(monkeypatch, tmp_path):
    fake = tmp_path / "scontrol"
    fake.write_text("#!/bin/sh\necho first-from-scontrol\necho second\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    assert slurm.from_env(SLURM_ENV).host == "first-from-scontrol"


def test_slurm_dry_run_end_to_end(monkeypatch, capsys, tmp_path):
    script = tmp_path / "s.py"
    script.write_text("")
    monkeypatch.setenv("PATH", "/nonexistent")
    for k, v in SLURM_ENV.items():
        monkeypatch.setenv(k, v)
    code, out, err = run_main(monkeypatch, capsys, "run", "--tp", "4", "--dp-replicate", "2", "--dry-run", script)
    assert code == 0, err
    assert len([ln for ln in err.splitlines() if "SLURM job 4242" in ln]) == 1
    assert "mesh: tp=4 x fsdp=1 x dp_replicate=2 (8 ranks), ep=1" in out
    command = next(ln for ln in out.splitlines() if ln.startswith("command: "))
    for part in ("--nproc-per-node=4", "--nnodes=2", "--node-rank=1", "--master-addr=gpu07", "--master-port=29500",
                 "--rdzv-id=4242"):
        assert part in command
    code, out, _ = run_main(monkeypatch, capsys, "run", "--cpu", "2", "--nnodes", "1", "--dry-run", script)
    assert code == 0 and "--standalone" in out and "--nproc-per-node=2" in out  # explicit flags win


# --- real workers: load_model on the mesh vs transformers' own load and one process ------------------------------

def _reports(out, world):
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(world)]


@pytest.mark.dist
@pytest.mark.parametrize("name,flags,world", [
    ("qwen3", ["--tp", 2, "--fsdp", 2], 4),
    ("mixtral", ["--tp", 1, "--fsdp", 2, "--ep", 2], 2),
])
def test_load_model_on_a_mesh_is_transformers_own(model_dirs, tmp_path, name, flags, world):
    src, out = model_dirs(name), tmp_path / "out"
    proc = tpcli_run("--cpu", world, *flags, "--model", src, ORACLES / "mesh_load_worker.py", src, out)
    assert "plan OK on the mesh" in proc.stderr
    sizes = dict(zip(flags[::2], flags[1::2], strict=True))
    want = f"tp={sizes['--tp']},fsdp={sizes['--fsdp']},dp_replicate=1,ep={sizes.get('--ep', 1)}"
    for r, rep in enumerate(_reports(out, world)):
        assert rep["env_mesh"] == want
        assert rep["future_warnings"] == [], rep["future_warnings"]
        assert rep["device_mesh_ours"] == rep["device_mesh_theirs"], rep
        assert rep["mismatch"] == [] and rep["n_params"] > 0, rep["mismatch"]
        assert any("Shard" in p for p in rep["placements"])  # really sharded over the mesh
        assert rep["logits_max_abs"] <= 1e-5, (r, rep["logits_max_abs"])
        assert rep["info_env"] == rep["info_model"] and rep["info_env"]["rank"] == r


@pytest.mark.dist
def test_plain_tp_load_has_no_future_warning(model_dirs, tmp_path):
    """No mesh flag: plain TP over the world, through DistributedConfig(tp_size=world, tp_plan=...)."""
    src, out = model_dirs("llama"), tmp_path / "out"
    tpcli_run("--cpu", 2, ORACLES / "mesh_load_worker.py", src, out)
    for rep in _reports(out, 2):
        assert rep["env_mesh"] is None and rep["future_warnings"] == []
        assert rep["mismatch"] == [] and rep["logits_max_abs"] <= 1e-5
        assert rep["device_mesh_ours"] == {"names": ["pp", "fsdp", "tp"], "shape": [1, 1, 2]}


# --- the examples, under `tpcli run --cpu 4` --------------------------------------------------------------------

@pytest.mark.dist
def test_replicas_generate_different_prompts_like_one_process(model_dirs):
    from transformers import AutoModelForCausalLM

    from tpcli.examples.replicas_generate import prompt_ids

    src = model_dirs("llama")  # no tokenizer: prompts become token ids
    prompts = ["alpha", "beta gamma", "delta", "epsilon zeta eta"]
    args = [a for p in prompts for a in ("--prompt", p)]
    proc = tpcli_run("--cpu", 4, "--tp", 2, "--dp-replicate", 2, "--model", src,
                     "-m", "tpcli.examples.replicas_generate", *args, "--max-new-tokens", 4)
    got = {int(m[1]): (int(m[2]), json.loads(m[3]))
           for m in re.finditer(r"prompt (\d+) \(replica (\d+)\): tokens (\[[^\]]*\])", proc.stdout)}
    assert sorted(got) == [0, 1, 2, 3]
    assert {i: replica for i, (replica, _) in got.items()} == {0: 0, 1: 1, 2: 0, 3: 1}
    single = AutoModelForCausalLM.from_pretrained(src)
    for i, p in enumerate(prompts):
        ids = prompt_ids(p)
        with torch.no_grad():
            ref = single.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0)
        assert got[i][1] == ref[0, ids.shape[1]:].tolist(), (i, got[i])


@pytest.mark.dist
def test_tp_fsdp_training_steps_match_one_process(model_dirs):
    """3 SGD steps on tp=2 x fsdp=2, each data-parallel rank on its own batch, vs one process on both batches."""
    src = model_dirs("llama")  # untied embeddings: see the tied-weights note in README 'Meshes, run'
    proc = tpcli_run("--cpu", 4, "--tp", 2, "--fsdp", 2, "--model", src, "-m", "tpcli.examples.train_mesh",
                     "--steps", 3, "--optimizer", "sgd", "--lr", 0.5)
    losses = [float(x) for x in re.findall(r"step \d+ loss ([0-9.]+)", proc.stdout)]
    assert len(losses) == 3
    ref = single_process_sgd_losses(src)
    assert max(abs(a - b) for a, b in zip(losses, ref, strict=True)) <= 1e-5, (losses, ref)
    assert len(set(ref)) == 3  # the steps changed the model


@pytest.mark.dist
def test_two_nodes_on_loopback_tp_within_nodes_replicas_across(model_dirs):
    """2 nodes x 2 CPU workers, --tp 2 --dp-replicate 2: each node holds one replica (a TP group never spans
    nodes), and each replica's tokens are one process's."""
    import socket

    from transformers import AutoModelForCausalLM

    from tpcli.examples.replicas_generate import prompt_ids

    src = model_dirs("llama")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    prompts = ["alpha", "beta gamma"]
    nodes = [subprocess.Popen([*TPCLI, "run", "--cpu", "2", "--nnodes", "2", "--node-rank", str(r),
                               "--rdzv-endpoint", f"127.0.0.1:{port}", "--tp", "2", "--dp-replicate", "2",
                               "--model", str(src), "-m", "tpcli.examples.replicas_generate", "--prompt", prompts[0],
                               "--prompt", prompts[1], "--max-new-tokens", "3"], env=base_env(),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(2)]
    outs = [n.communicate(timeout=300) for n in nodes]
    assert [n.returncode for n in nodes] == [0, 0], outs
    single = AutoModelForCausalLM.from_pretrained(src)
    for node, (out, err) in enumerate(outs):
        assert "mesh tp=2 x fsdp=1 x dp_replicate=2 (4 ranks), ep=1 over --cpu 2 x --nnodes 2" in err
        m = re.search(rf"\[n{node}\.rank0\]:prompt {node} \(replica {node}\): tokens (\[[^\]]*\])", out)
        assert m, out
        ids = prompt_ids(prompts[node])
        with torch.no_grad():
            ref = single.generate(ids, max_new_tokens=3, min_new_tokens=3, do_sample=False, pad_token_id=0)
        assert json.loads(m[1]) == ref[0, ids.shape[1]:].tolist()


def test_model_preflight_on_the_mesh(monkeypatch, capsys, tmp_path, model_dirs):
    script = tmp_path / "s.py"
    script.write_text("")
    qwen3, llama = model_dirs("qwen3"), model_dirs("llama")  # 4 heads, 2 KV heads
    code, out, err = run_main(monkeypatch, capsys, "run", "--cpu", "4", "--tp", "2", "--fsdp", "2", "--model", qwen3,
                              "--dry-run", script)
    assert code == 0 and "plan OK on the mesh tp=2 x fsdp=2" in err
    assert "tied weights" in err  # qwen3 ties lm_head to the embedding: the FSDP training caveat
    code, _, err = run_main(monkeypatch, capsys, "run", "--cpu", "8", "--tp", "4", "--fsdp", "2", "--model", qwen3,
                            "--dry-run", script)
    assert code != 0 and "mesh tp=4 x fsdp=2 x dp_replicate=1 (8 ranks), ep=1 is invalid for Qwen3ForCausalLM" in err
    code, _, err = run_main(monkeypatch, capsys, "run", "--cpu", "2", "--tp", "2", "--ep", "2", "--model", llama,
                            "--dry-run", script)
    assert code == 2 and "--ep 2" in err, err
    code, _, err = run_main(monkeypatch, capsys, "run", "--cpu", "2", "--tp", "2", "--model", llama, "--dry-run",
                            script)  # --tp W alone: the plain-TP preflight, as without flags
    assert code == 0 and "plan OK at tp=2" in err


# --- verify --numerics on a mesh ----------------------------------------------------------------------------------

@pytest.mark.dist
@pytest.mark.parametrize("name,sizes", [("qwen3", {"tp": 2, "fsdp": 2}), ("mixtral", {"tp": 1, "fsdp": 2, "ep": 2})])
def test_verify_numerics_on_a_mesh(model_dirs, name, sizes):
    from tpcli.commands.verify import verify

    mesh = Mesh(**sizes)
    r = verify(str(model_dirs(name)), tp=mesh.tp, numerics=True, mesh=mesh)
    n = r["numerics"]
    assert r["ok"] and n["mesh"] == mesh.to_dict() and n["world_size"] == mesh.world, n
    assert n["first_bad"] is None and n["tokens_equal"] and n["logits"]["max_abs"] <= 1e-5
    assert len(n["layers"]) == 3  # embeddings + 2 decoder layers, each compared


@pytest.mark.dist
def test_verify_numerics_fails_a_wrong_ep_plan_at_its_layer(model_dirs, tmp_path, monkeypatch, capsys):
    """On --tp 2 --fsdp 2 --ep 2, an all-reduce of the MoE block's output (the old `ep_router` + `moe_tp_experts`
    combine, carried over to EP, where `ep_dispatch_experts` already combines the experts): it loads and runs, and
    each decoder layer adds its MoE output twice. verify --numerics must fail, at layer 0."""
    plan = tmp_path / "moe-allreduce.json"
    plan.write_text(json.dumps({"model.layers.*.mlp": "all_reduce"}))
    flags = ["--tp", "2", "--fsdp", "2", "--ep", "2", "--numerics", "--plan", plan]
    code, out, err = run_main(monkeypatch, capsys, "verify", model_dirs("mixtral"), *flags, "--json")
    r = json.loads(out)
    assert code == 1 and not r["ok"], err
    n = r["numerics"]
    assert r["findings"] and not any(f["severity"] == "error" for f in r["findings"])  # static checks let it through
    assert n["mesh"] == Mesh(tp=2, fsdp=2, ep=2).to_dict() and n["world_size"] == 4
    assert n["layers"][0]["max_abs"] == 0 and n["first_bad"] == "layer 0"  # embeddings exact, the MoE layer not
    assert n["logits"]["max_abs"] > 1e-3 and not n["tokens_equal"]
    # a router split by TP under EP (colwise gate) is refused before any worker starts, naming the block
    plan.write_text(json.dumps({"model.layers.*.mlp.gate": "colwise"}))
    code, out, _ = run_main(monkeypatch, capsys, "verify", model_dirs("mixtral"), *flags, "--json")
    r = json.loads(out)
    assert code == 1 and r["numerics"] == {"skipped": "static errors: the workers would crash or compute garbage"}
    (bad,) = [f for f in r["findings"] if f["severity"] == "error"]
    assert bad["message"].startswith("model.layers.*.mlp: gate: colwise"), bad
    # in EP's words: the experts are dispatched by the EP plan, not moe_tp_experts; the fix is a whole router
    assert "--ep 2" in bad["message"] and "ep_dispatch_experts" in bad["message"], bad
    assert "keep the router whole" in bad["message"] and "moe_tp_experts" not in bad["message"], bad
