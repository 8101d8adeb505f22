"""One training step per rank (`tpcli.planning.step`, `inspect --train --seq-len --json`): activations saved for
backward and bytes per collective, against real steps.

The oracle is tests/oracles/step_oracle.py: transformers' own `DistributedConfig` load on CPU gloo workers, one
forward + backward, saved tensors counted with `saved_tensors_hooks` (distinct storages, parameters excluded) and
collectives with a `TorchDispatchMode` over the c10d ops. One mesh per torchrun job, so the matrix is small.
"""

import json

import pytest
from conftest import ORACLES, run_main, tiny_models, torchrun

from tpcli.commands.inspect import expand_runs

BATCH, SEQ_LEN = 2, 40
MODELS = {
    "llama": ("llama", {"vocab": 512, "intermediate": 128}),  # the tiny llama issue 37 measured
    "qwen3": ("qwen3", {}),  # tied embeddings, q/k norms (replicated_with_grad_allreduce), vocab 1001 uneven
    "mixtral": ("mixtral", {}),  # MoE: eager experts, TP (moe_tp_experts) or EP (ep_dispatch_experts)
    "llama_bf16": ("llama", {"vocab": 512, "intermediate": 128, "dtype": "bfloat16"}),  # norms' fp32 copies
}
# What issue 37 measured for the tiny llama at tp=2, 2 x 40 tokens, fp32.
ISSUE = {"tp2": {"activation_bytes": 705_604, "all_reduce": 327_680, "all_gather": 163_840},
         "tp2_gc": {"activation_bytes": 267_844}}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("step_models")
    tiny = tiny_models(root, MODELS)

    def get(name: str):
        return mistral_sliding(root / name) if name == "mistral" else tiny(name)

    return get


def mistral_sliding(folder):
    """A tiny mistral with a 16-token sliding window (every layer), random weights, fp32."""
    if not (folder / "config.json").exists():
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM

        cfg = AutoConfig.for_model("mistral", hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, head_dim=16, intermediate_size=128, vocab_size=512,
                                   max_position_embeddings=256, sliding_window=16, bos_token_id=1, eos_token_id=2,
                                   pad_token_id=0)
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(cfg).save_pretrained(folder)
    return folder


def measured(tmp_path, folder, *, world: int, flags: list) -> list[dict]:
    out = tmp_path / "step"
    torchrun(world, ORACLES / "step_oracle.py", out, folder, "--batch", BATCH, "--seq-len", SEQ_LEN, *flags)
    return [json.loads((tmp_path / f"step.rank{r}.json").read_text()) for r in range(world)]


def ours(monkeypatch, capsys, folder, flags: list) -> dict:
    code, out, err = run_main(monkeypatch, capsys, "inspect", folder, "--train", "--batch", BATCH, "--seq-len", SEQ_LEN,
                              *flags, "--json")
    assert code == 0, err
    return json.loads(out)


CASES = {  # name -> (model, world, oracle flags)
    "tp2": ("llama", 2, ["--tp", "2"]),
    "tp2_gc": ("llama", 2, ["--tp", "2", "--gradient-checkpointing"]),
    "qwen3_tp2": ("qwen3", 2, ["--tp", "2"]),
    "tp2_fsdp2": ("llama", 4, ["--tp", "2", "--fsdp", "2"]),
    "mixtral_fsdp2_ep2": ("mixtral", 2, ["--fsdp", "2", "--ep", "2"]),
    "mixtral_tp2": ("mixtral", 2, ["--tp", "2"]),
    "bf16_tp2": ("llama_bf16", 2, ["--tp", "2"]),
    "mistral_sliding_tp2": ("mistral", 2, ["--tp", "2"]),  # the window's mask, B L^2 per layer (L 40 > window 16)
    "dp_replicate2": ("llama", 2, ["--dp-replicate", "2"]),  # FSDP2 over a replicate dim: gradients all-reduced
    "tp2_fsdp2_gc": ("llama", 4, ["--tp", "2", "--fsdp", "2", "--gradient-checkpointing"]),
}
QUICK = ["tp2", "qwen3_tp2", "tp2_fsdp2", "mixtral_fsdp2_ep2"]


def check_case(name, tmp_path, models, monkeypatch, capsys):
    model, world, flags = CASES[name]
    folder = models(model)
    theirs = measured(tmp_path, folder, world=world, flags=flags)
    gc = ["--gradient-checkpointing"] if "--gradient-checkpointing" in flags else []
    mesh = [f for f in flags if f != "--gradient-checkpointing"]
    report = ours(monkeypatch, capsys, folder, (mesh if "--tp" in mesh else ["--tp", "1", *mesh]) + gc)
    rows = report["mesh"]["ranks"] if report["mesh"] else expand_runs(report["tp"]["rank_runs"])
    assert report["memory"]["step_unmodelled"] is None
    assert len(rows) == world
    for r, (row, m) in enumerate(zip(rows, theirs, strict=True)):
        # the experts' token counts depend on the routing: exact on average over the ranks (below)
        if "--ep" not in flags:
            assert row["comm_bytes"] == m["comm_bytes"], (name, r)
        assert abs(row["activation_bytes"] / m["activation_bytes"] - 1) < (0.2 if "--ep" in flags else 1e-9), (name, r)
    if "--ep" in flags:  # every dispatched slot is received somewhere: the mean over ranks is exact
        for kind in ("all_reduce", "all_gather", "reduce_scatter"):
            assert [row["comm_bytes"][kind] for row in rows] == [m["comm_bytes"][kind] for m in theirs], kind
        assert sum(row["comm_bytes"]["all_to_all"] for row in rows) == sum(m["comm_bytes"]["all_to_all"]
                                                                          for m in theirs)
        assert sum(row["activation_bytes"] for row in rows) == sum(m["activation_bytes"] for m in theirs)
    if name in ISSUE:
        for key, value in ISSUE[name].items():
            got = rows[0][key] if key == "activation_bytes" else rows[0]["comm_bytes"][key]
            assert got == value, key
    return rows, theirs


@pytest.mark.dist
@pytest.mark.parametrize("name", QUICK)
def test_step_matches_a_real_step(name, tmp_path, models, monkeypatch, capsys):
    check_case(name, tmp_path, models, monkeypatch, capsys)


@pytest.mark.dist
@pytest.mark.parametrize("name", sorted(set(CASES) - set(QUICK)))
def test_step_matches_a_real_step_more(name, tmp_path, models, monkeypatch, capsys):
    check_case(name, tmp_path, models, monkeypatch, capsys)


def test_fsdp_terms_each_count(models, monkeypatch, capsys):
    """The FSDP terms of tp2 x fsdp2 (measured by the dist test above): forward + backward all-gathers of the
    layers and embedding, forward only for the root (lm_head + norm), one reduce-scatter per parameter."""
    report = ours(monkeypatch, capsys, models("llama"), ["--tp", "2", "--fsdp", "2"])
    comm = report["mesh"]["ranks"][0]["comm_bytes"]
    assert comm == {"all_reduce": 327_680, "all_gather": 657_664, "reduce_scatter": 279_808, "all_to_all": 0}


def test_gradient_checkpointing_needs_train(models, monkeypatch, capsys):
    code, _, err = run_main(monkeypatch, capsys, "inspect", models("llama"), "--seq-len", "8",
                            "--gradient-checkpointing")
    assert code != 0 and "--gradient-checkpointing only applies with --train" in err


def test_tp_with_ep_is_refused_by_name(models, monkeypatch, capsys):
    """Measured (step_oracle, mixtral --tp 2 --ep 2): the dispatch splits the tokens over the TP ranks; the step
    model does not cover it and says so instead of printing wrong figures."""
    report = ours(monkeypatch, capsys, models("mixtral"), ["--tp", "2", "--ep", "2"])
    assert "EP together with TP (--tp 2 --ep 2) is not modelled" in report["memory"]["step_unmodelled"]
    assert all(row["activation_bytes"] is None for row in report["mesh"]["ranks"])


def test_unmodelled_model_says_why(tmp_path, monkeypatch, capsys):
    """gemma3 (scaled embedding, four norms per layer): the step figures are None and `step_unmodelled` says why."""
    from tpcli.testing import build_tiny

    report = ours(monkeypatch, capsys, build_tiny("gemma3", tmp_path / "g"), ["--tp", "2"])
    assert "Gemma3TextScaledWordEmbedding is not modelled" in report["memory"]["step_unmodelled"]
    assert expand_runs(report["tp"]["rank_runs"])[0]["activation_bytes"] is None


GENERATE = {"tp2": ("llama", 2, ["--tp", "2"]), "tp2_fsdp2": ("llama", 4, ["--tp", "2", "--fsdp", "2"]),
            "mixtral_fsdp2_ep2": ("mixtral", 2, ["--fsdp", "2", "--ep", "2"])}


@pytest.mark.dist
@pytest.mark.parametrize("name", sorted(GENERATE))
def test_inference_comm_matches_generate(name, tmp_path, models, monkeypatch, capsys):
    """`inference_comm_bytes`: the prefill and each new token of a greedy generate(), per collective."""
    model, world, flags = GENERATE[name]
    folder = models(model)
    theirs = measured(tmp_path, folder, world=world, flags=[*flags, "--generate", "3"])  # 3 forwards
    code, out, err = run_main(monkeypatch, capsys, "inspect", folder, "--batch", BATCH, "--seq-len", SEQ_LEN,
                              *(flags if "--tp" in flags else ["--tp", "1", *flags]), "--json")
    assert code == 0, err
    report = json.loads(out)
    rows = report["mesh"]["ranks"] if report["mesh"] else expand_runs(report["tp"]["rank_runs"])
    ours = [row["inference_comm_bytes"] for row in rows]
    if "--ep" not in flags:
        assert [[o["prefill"], o["decode_token"], o["decode_token"]] for o in ours] == [m["forwards"] for m in theirs]
        return
    for i, phase in enumerate(("prefill", "decode_token")):  # routing-dependent all_to_all: exact over the ranks
        for kind in ("all_reduce", "all_gather", "reduce_scatter"):
            assert [o[phase][kind] for o in ours] == [m["forwards"][i][kind] for m in theirs]
        assert sum(o[phase]["all_to_all"] for o in ours) == sum(m["forwards"][i]["all_to_all"] for m in theirs)


# --- the step-time ESTIMATE (tpcli.planning.steptime) -----------------------------------------------------------
SLOW_GPU = {"gpus": {"T": {"memory": "1GB", "bf16_flops": 1e12, "intra_link": "slow"}},
            "links": {"slow": {"bytes_per_s": 1e9}}, "mfu": 1.0}


def test_step_time_is_the_stated_formula(models, tmp_path, monkeypatch, capsys):
    """tiny llama (2 layers, h 64, q 64, kv 32, I 128, V 512), 2 x 40 tokens on 2 GPUs of 1 TFLOP/s and 1 GB/s:
    compute = 3 x (2 N P_dense / tp + 2 layers B L^2 q / tp), P_dense = 2 x 36,864 + 512 x 64 = 106,496;
    comm = TP all_reduce 327,680 B x 2 (2-1)/2 + all_gather 163,840 B x (2-1)/2 (the measured bytes above)."""
    hw = tmp_path / "hw.json"
    hw.write_text(json.dumps(SLOW_GPU))
    report = ours(monkeypatch, capsys, models("llama"), ["--gpus", "2", "--gpu-mem", "1GiB", "--reserve", "0",
                                                         "--hardware", str(hw), "--gpu", "T"])
    (tp2,) = [m for m in report["fit"]["meshes"] if m["tp"] == 2]
    est = tp2["step_time"]
    assert est["flops"] == 3 * (2 * 80 * 106_496 / 2 + 2 * 2 * 2 * 40**2 * 64 / 2)
    assert est["compute_s"] == pytest.approx(est["flops"] / 1e12, rel=1e-12)
    assert est["comm_s"] == pytest.approx((327_680 + 163_840 / 2) / 1e9, rel=1e-12)
    assert est["step_s"] == pytest.approx(est["compute_s"] + est["comm_s"], rel=1e-12)
    assert report["fit"]["best"] == report["fit"]["meshes"][0] and report["fit"]["why"]
    assert any("ESTIMATE" in a for a in report["fit"]["time_assumptions"])


@pytest.mark.parametrize("doc, words", [
    ({"gpus": {"T": {"memory": "1GB", "bf16_flops": -1, "intra_link": "nvlink4"}}}, "bf16_flops must be a positive"),
    ({"gpus": {"T": {"memory": "1GB", "bf16_flops": 1e12}}}, "needs ['bf16_flops', 'intra_link', 'memory']"),
    ({"gpus": {"H100": {"shell": "rm -rf"}}}, "may only hold"),
    ({"links": {"x": {"bytes_per_s": "fast"}}}, "bytes_per_s must be a positive"),
    ({"inter_link": "carrier pigeon"}, "inter_link 'carrier pigeon' is not a link"),
    ({"mfu": 3}, "mfu must be in (0, 1]"),
    ([1, 2], "expected an object"),
])
def test_a_bad_hardware_file_is_one_line_naming_it(doc, words, models, tmp_path, monkeypatch, capsys):
    hw = tmp_path / "hw.json"
    hw.write_text(json.dumps(doc))
    code, out, err = run_main(monkeypatch, capsys, "inspect", models("llama"), "--gpus", "2", "--gpu-mem", "8GiB",
                              "--train", "--seq-len", "8", "--hardware", str(hw))
    assert code != 0 and out == "" and "Traceback" not in err and f"--hardware {hw}" in err and words in err, err


def test_unknown_gpu_and_timing_flags_without_a_step(models, monkeypatch, capsys):
    code, _, err = run_main(monkeypatch, capsys, "inspect", models("llama"), "--gpus", "2", "--gpu-mem", "8GiB",
                            "--train", "--seq-len", "8", "--gpu", "Z80")
    assert code != 0 and "--gpu Z80: not in the catalogue (H100, H200, B200, A100, L40S, RTX4090)" in err
    code, _, err = run_main(monkeypatch, capsys, "inspect", models("llama"), "--gpu", "H100")
    assert code != 0 and "need --gpus W --train --seq-len L" in err


# Qwen/Qwen3-235B-A22B's config.json (values as published on the hub; no weights needed).
QWEN3_235B = {
    "architectures": ["Qwen3MoeForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": 151643, "decoder_sparse_step": 1, "eos_token_id": 151645, "head_dim": 128, "hidden_act": "silu",
    "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 12288, "max_position_embeddings": 40960,
    "max_window_layers": 94, "mlp_only_layers": [], "model_type": "qwen3_moe", "moe_intermediate_size": 1536,
    "norm_topk_prob": True, "num_attention_heads": 64, "num_experts": 128, "num_experts_per_tok": 8,
    "num_hidden_layers": 94, "num_key_value_heads": 4, "output_router_logits": False, "rms_norm_eps": 1e-06,
    "rope_scaling": None, "rope_theta": 1000000.0, "router_aux_loss_coef": 0.001, "sliding_window": None,
    "tie_word_embeddings": False, "torch_dtype": "bfloat16", "use_cache": True, "use_sliding_window": False,
    "vocab_size": 151936}


def test_235b_moe_meshes_ranked_by_step_time_quickly(tmp_path):
    """W = 64 H100s, 8 per node, 80 GB, 4096 tokens: the fitting meshes ranked by estimated step time, TP inside a
    node, the winner explained; the table and its ranking take about a second after the plan."""
    import time

    from tpcli.planning.checks import valid_tp_sizes
    from tpcli.planning.memory import MemoryOptions
    from tpcli.planning.mesh_fit import fit_meshes
    from tpcli.planning.plan import load_config, resolve_plan
    from tpcli.planning.steptime import load_hardware, pick_gpu, rank_by_time

    (tmp_path / "config.json").write_text(json.dumps(QWEN3_235B))
    plan = resolve_plan(load_config(tmp_path))
    valid, _ = valid_tp_sizes(plan, 64)
    started = time.perf_counter()
    fit = fit_meshes(plan, MemoryOptions(batch=1, seq_len=4096, train=True), world=64, per_node=8, valid_tp=valid,
                     gpu_mem=80 * 10**9, reserve=2 * 2**30)
    table = time.perf_counter()
    rank_by_time(plan, fit, batch=1, seq_len=4096, checkpointing=False, gpu=pick_gpu(load_hardware(), None, None),
                 gpu_named=False)
    ranked = time.perf_counter()
    fitting = [m for m in fit["meshes"] if m["fits"]]
    assert fitting and all(m["tp"] <= 8 for m in fitting)
    timed = [m for m in fitting if m["step_time"]]  # TP together with EP is not modelled: ranked after, by memory
    assert timed and fitting[:len(timed)] == timed and all(m["tp"] == 1 or m["ep"] == 1 for m in timed)
    times = [m["step_time"]["step_s"] for m in timed]
    assert times == sorted(times) and fit["best"] is timed[0] and fit["why"].startswith(f"tp={timed[0]['tp']}")
    # generous bounds against a blow-up only (the brief: speed targets live in `make bench`); measured on a loaded
    # 2-core machine: ranking 0.13 s, the memory table itself 1.8 s
    assert ranked - table < 10, ranked - table
    assert ranked - started < 60, ranked - started
