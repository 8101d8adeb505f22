"""Per-rank memory (`tpcli.planning.memory`, `inspect --seq-len/--train/--gpu-mem`) against what real TP runs hold.

The oracle is tests/oracles/memory_oracle.py: transformers' own `from_pretrained(tp_plan="auto")` on CPU workers,
a forward with `use_cache=True`, a backward and one AdamW step, with the local bytes measured on every rank.
"""

import json
from pathlib import Path

import pytest
from conftest import ORACLES, tiny_models, torchrun
from test_cli import _hub_cache, run_main, use_hub_cache

from tpcli.commands.inspect import expand_runs
from tpcli.errors import UsageError
from tpcli.formats.units import parse_dtype, parse_size
from tpcli.planning.memory import MemoryOptions, fit_table, largest_per_tp, rank_memory
from tpcli.planning.plan import load_config, resolve_plan

BATCH, SEQ_LEN = 2, 40  # 40 tokens > the tiny gemmas' 16-token window
# name -> (tiny kind, overrides); each oracle launch measures all models of one TP size.
MODELS = {
    "llama": ("llama", {}),  # GQA, untied embeddings
    "qwen3": ("qwen3", {}),  # tied embeddings, q/k norms
    "mixtral": ("mixtral", {}),  # MoE, fused gate_up experts
    "gemma3": ("gemma3", {}),  # sliding window 16 < L on layer 0, tied
    "gemma2_wide": ("gemma2", {"sliding_window": 64}),  # a window longer than L
    "phi3": ("phi3", {}),  # fused qkv_proj, gathered: every KV head cached on every rank
    "llama_bf16": ("llama", {"dtype": "bfloat16"}),  # cache, gradients and AdamW state in the model's dtype
    "mixtral3": ("mixtral", {"heads": 6, "kv_heads": 6, "hidden": 96}),  # valid at tp=3, vocab 1001 uneven
    "gemma3_3": ("gemma3", {"heads": 6, "kv_heads": 3, "hidden": 96}),
    # cache layouts of issue 30 (transformers' default configs, shrunk: tpcli/testing.py SHRUNK_KINDS)
    "deepseek_v3": ("deepseek_v3", {"kv_lora_rank": 32, "heads": 4, "kv_heads": 4}),  # MLA, attention replicated
    "deepseek_v2": ("deepseek_v2", {}),  # MLA, kv_a_proj_with_mqa `mla_kv_a_proj`, kv_b_proj colwise
    "longcat_flash": ("longcat_flash", {}),  # MLA, two attention sublayers (two cache layers) per decoder layer
    "qwen3_next": ("qwen3_next", {}),  # 3 gated-delta-net layers (fixed states) + 1 attention layer (split)
    "minimax": ("minimax", {}),  # 3 lightning-attention layers (MiniMaxCache.linear_cache) + 1 attention
    "jamba": ("jamba", {}),  # 2 mamba + 2 attention layers, neither split by the plan
    "granitemoehybrid": ("granitemoehybrid", {}),  # 2 mamba2 + 2 attention layers
    "falcon_h1": ("falcon_h1", {}),  # "hybrid" layers: attention K/V and mamba2 states in one cache layer
    "olmo2": ("olmo2", {}),  # k_proj/v_proj colwise_gather_output: every KV head on every rank
}
ORACLE_RUNS = {2: ["llama", "qwen3", "mixtral", "gemma3", "gemma2_wide", "phi3", "llama_bf16"], 3: ["mixtral3", "gemma3_3"]}
# One more tp=2 launch, forward only (`--cache-only`): weights and the cache of the layouts above.
CACHE_RUN = ["deepseek_v3", "deepseek_v2", "longcat_flash", "qwen3_next", "minimax", "jamba", "granitemoehybrid",
             "falcon_h1", "olmo2"]
# What the filer of issue 30 and 24 measured per rank at tp=2 (2 x 40 tokens, fp32): the fixtures reproduce it.
ISSUE_BYTES = {"deepseek_v3": 25_600, "qwen3_next": 47_104, "jamba": 65_536, "olmo2": 40_960}
TERMS = {"weight_bytes": "weight_bytes", "kv_cache_bytes": "kv_cache_storage_bytes",
         "kv_cache_visible_bytes": "kv_cache_tensor_bytes", "grad_bytes": "grad_bytes",
         "optimizer_bytes": "optimizer_bytes"}

# Qwen/Qwen3-0.6B's config.json (values as published on the hub; no weights needed for inspect).
QWEN3_06B = {
    "architectures": ["Qwen3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 151643,
    "eos_token_id": 151645, "head_dim": 128, "hidden_act": "silu", "hidden_size": 1024, "initializer_range": 0.02,
    "intermediate_size": 3072, "max_position_embeddings": 40960, "max_window_layers": 28, "model_type": "qwen3",
    "num_attention_heads": 16, "num_hidden_layers": 28, "num_key_value_heads": 8, "rms_norm_eps": 1e-06,
    "rope_scaling": None, "rope_theta": 1000000, "sliding_window": None, "tie_word_embeddings": True,
    "torch_dtype": "bfloat16", "use_cache": True, "use_sliding_window": False, "vocab_size": 151936,
}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return tiny_models(tmp_path_factory.mktemp("memory-models"), MODELS)


@pytest.fixture(scope="module")
def measured(models, tmp_path_factory):
    """measured(tp) -> {model name: [rank 0 dict, rank 1 dict, ...]}, one torchrun launch per TP size."""
    root = tmp_path_factory.mktemp("memory-oracle")
    cache: dict[int, dict] = {}

    def get(tp: int | str) -> dict:
        if tp not in cache:
            names, flags = (CACHE_RUN, ["--cache-only"]) if tp == "cache" else (ORACLE_RUNS[tp], [])
            out = root / f"tp{tp}"
            torchrun(2 if tp == "cache" else tp, ORACLES / "memory_oracle.py", out, *(models(n) for n in names),
                     "--batch", BATCH, "--seq-len", SEQ_LEN, "--eager-experts", *flags)
            tp_ranks = 2 if tp == "cache" else tp
            ranks = [json.loads(Path(f"{out}.rank{r}.json").read_text()) for r in range(tp_ranks)]
            cache[tp] = {n: [rank[str(models(n))] for rank in ranks] for n in names}
        return cache[tp]

    return get


def _plan(path: Path):
    return resolve_plan(load_config(path))


@pytest.mark.dist
@pytest.mark.parametrize("tp,name", [(tp, n) for tp, names in ORACLE_RUNS.items() for n in names])
def test_every_term_equals_the_bytes_a_real_tp_run_holds(models, measured, tp, name):
    oracle = measured(tp)[name]
    ours = rank_memory(_plan(models(name)), tp, MemoryOptions(batch=BATCH, seq_len=SEQ_LEN, train=True))
    for rank, (mine, real) in enumerate(zip(ours, oracle, strict=True)):
        for term, key in TERMS.items():
            assert getattr(mine, term) == real[key], (name, tp, rank, term, getattr(mine, term), real[key])
        assert real["optimizer_step_tensors"] == len(real["grads"])  # one 0-d step per parameter, not counted


@pytest.mark.dist
@pytest.mark.parametrize("name", CACHE_RUN)
def test_cache_terms_equal_the_storage_a_real_tp_run_holds(models, measured, name):
    """MLA latents, linear-attention / SSM states, mixed layers and gathered K/V: every storage the cache reaches."""
    oracle = measured("cache")[name]
    ours = rank_memory(_plan(models(name)), 2, MemoryOptions(batch=BATCH, seq_len=SEQ_LEN))
    for rank, (mine, real) in enumerate(zip(ours, oracle, strict=True)):
        assert (mine.weight_bytes, mine.kv_cache_bytes, mine.kv_cache_visible_bytes) == (
            real["weight_bytes"], real["kv_cache_storage_bytes"], real["kv_cache_tensor_bytes"]), (name, rank)
        if name in ISSUE_BYTES:
            assert real["kv_cache_storage_bytes"] == ISSUE_BYTES[name], (name, rank)


@pytest.mark.dist
def test_the_oracle_sees_what_naive_formulas_miss(measured):
    """The measured facts the model encodes; each would break a naive 'grads = weights, window = window' count."""
    runs = measured(2)
    for name in ("llama", "mixtral"):  # untied vocab-parallel embedding: its gradient is whole on every rank
        for real in runs[name]:
            assert real["grads"]["model.embed_tokens.weight"]["local_shape"] == [1001, 64]
            assert real["grads"]["model.embed_tokens.weight"]["placements"] == ["Replicate()"]
            assert real["grad_bytes"] > real["weight_bytes"]
    for real in runs["qwen3"]:  # tied to lm_head: the embedding gradient stays a shard
        assert real["grad_bytes"] == real["weight_bytes"]
    for real in runs["gemma3"]:  # window 16: the sliding layer shows 15 tokens but keeps the storage of 40
        assert real["kv_cache_layers"][0]["shapes"][0] == [BATCH, 1, 15, 16]
        assert real["kv_cache_tensor_bytes"] < real["kv_cache_storage_bytes"]
    for real in runs["gemma2_wide"]:  # window 64 > L: nothing cut
        assert real["kv_cache_tensor_bytes"] == real["kv_cache_storage_bytes"]


@pytest.mark.dist
def test_the_oracle_sees_where_the_plan_leaves_the_cache(measured):
    """MLA latents and gathered K/V are whole on every rank; linear-attention states are cache layers of their own."""
    runs = measured("cache")
    for real in runs["deepseek_v3"]:  # latent (kv_lora_rank 32) and rope key (8), one "head", not split
        assert real["kv_cache_layers"][0]["shapes"] == [[BATCH, 1, SEQ_LEN, 32], [BATCH, 1, SEQ_LEN, 8]]
    for real in runs["olmo2"]:  # k_proj colwise_gather_output: both KV heads on each of the 2 ranks
        assert real["kv_cache_layers"][0]["shapes"][0] == [BATCH, 2, SEQ_LEN, 16]
    for real in runs["qwen3_next"]:  # the attention layer's K/V split (1 of 2 heads), the states not
        assert [layer["type"] for layer in real["kv_cache_layers"]] == ["LinearAttentionLayer"] * 3 + ["DynamicLayer"]
        assert real["kv_cache_layers"][3]["shapes"][0] == [BATCH, 1, SEQ_LEN, 16]


def test_a_broken_gradient_rule_would_be_caught(models, monkeypatch):
    """Without the full-gradient rule the untied llama's count drops below what the oracle measures."""
    from tpcli.planning import memory

    plan = _plan(models("llama"))
    opts = MemoryOptions(batch=BATCH, seq_len=SEQ_LEN, train=True)
    right = rank_memory(plan, 2, opts)
    monkeypatch.setattr(memory, "keeps_full_gradient", lambda style, tied: False)
    naive = rank_memory(plan, 2, opts)
    assert [m.grad_bytes for m in naive] == [m.weight_bytes for m in naive]
    assert [r.grad_bytes - n.grad_bytes for r, n in zip(right, naive, strict=True)] == [500 * 64 * 4, 501 * 64 * 4]


def test_kv_cache_of_a_70b_config_matches_the_hand_count(tmp_path):
    """Llama-3-70B shapes (80 layers, 8 KV heads of 128, bf16): K+V per token and rank = 2 x 8/tp x 128 x 2 B."""
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 8192, "intermediate_size": 28672,
           "num_hidden_layers": 80, "num_attention_heads": 64, "num_key_value_heads": 8, "vocab_size": 128256,
           "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "torch_dtype": "bfloat16",
           "tie_word_embeddings": False}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    plan = _plan(tmp_path)
    opts = MemoryOptions(batch=3, seq_len=8192)
    per_tp = largest_per_tp(plan, [1, 2, 4, 8], opts)
    for tp, m in per_tp.items():
        assert m.kv_cache_bytes == 3 * 8192 * 80 * 2 * (8 // tp) * 128 * 2
    assert per_tp[8].weight_bytes < per_tp[1].weight_bytes / 7.9
    fp8 = rank_memory(plan, 8, MemoryOptions(batch=3, seq_len=8192, kv_dtype="float8_e4m3fn"))[0]
    assert fp8.kv_cache_bytes * 2 == per_tp[8].kv_cache_bytes


@pytest.mark.parametrize("text,expected", [("24GiB", 24 * 2**30), ("80GB", 80 * 10**9), ("1.5 TiB", 3 * 2**39),
                                           ("512MiB", 512 * 2**20), ("24G", 24 * 2**30), ("2048kb", 2048000)])
def test_parse_size(text, expected):
    assert parse_size(text, "--gpu-mem") == expected


@pytest.mark.parametrize("text", ["banana", "", "10XB", "-1GiB", "GiB", "24", "1000", "2kb", "0", "9" * 400])
def test_parse_size_rejects(text):
    with pytest.raises(UsageError, match="--gpu-mem"):
        parse_size(text, "--gpu-mem")


def test_parse_dtype():
    assert parse_dtype("bf16", "--kv-dtype") == "bfloat16" and parse_dtype("fp8", "--kv-dtype") == "float8_e4m3fn"
    with pytest.raises(UsageError, match="--kv-dtype"):
        parse_dtype("int3", "--kv-dtype")


def test_fit_table_names_the_smallest_fitting_tp_and_exact_advice(models):
    plan = _plan(models("llama"))
    opts = MemoryOptions(batch=BATCH, seq_len=SEQ_LEN, train=True)
    per_tp = largest_per_tp(plan, [1, 2], opts)
    t1, t2 = per_tp[1].total_bytes, per_tp[2].total_bytes
    assert t2 < t1
    reserve = 1000
    fit = fit_table(plan, per_tp, opts, gpu_mem=t2 + reserve, reserve=reserve)
    assert fit["smallest_fitting_tp"] == 2 and fit["per_tp"] == {"1": t1, "2": t2} and fit["advice"] is None
    assert fit_table(plan, per_tp, opts, gpu_mem=t1 + reserve, reserve=reserve)["smallest_fitting_tp"] == 1

    tight = t2 + reserve - 5000  # 5000 bytes short at the best size
    fit = fit_table(plan, per_tp, opts, gpu_mem=tight, reserve=reserve)
    assert fit["smallest_fitting_tp"] is None
    advice = fit["advice"]
    assert advice["best_tp"] == 2 and advice["miss_bytes"] == 5000
    changes = {c["option"]: c for c in advice["changes"]}
    max_len = changes["--seq-len"]["value"]
    assert 1 <= max_len < SEQ_LEN

    def total(seq_len: int) -> int:
        return largest_per_tp(plan, [2], MemoryOptions(batch=BATCH, seq_len=seq_len, train=True))[2].total_bytes

    assert total(max_len) <= tight - reserve < total(max_len + 1)
    assert changes["--batch"]["value"] == 1 and changes["--kv-dtype"]["fits"] in (True, False)

    with pytest.raises(UsageError, match="--reserve"):
        fit_table(plan, per_tp, opts, gpu_mem=reserve, reserve=reserve)


def test_inspect_json_memory_keys(models, monkeypatch, capsys):
    rc, out, _ = run_main(monkeypatch, capsys, "inspect", models("llama"), "--tp", "2", "--batch", "2", "--seq-len",
                          "40", "--train", "--gpu-mem", "8MiB", "--reserve", "1MiB", "--json")
    assert rc == 0
    doc = json.loads(out)
    assert doc["schema"] == "tpcli.inspect/4"
    for rk in expand_runs(doc["tp"]["rank_runs"]):
        assert {"weight_bytes", "kv_cache_bytes", "grad_bytes", "optimizer_bytes", "activation_bytes_estimate",
                "total_bytes", "sharded_bytes", "replicated_bytes"} <= set(rk)
        assert rk["total_bytes"] == sum(rk[k] for k in ("weight_bytes", "kv_cache_bytes", "grad_bytes",
                                                        "optimizer_bytes", "activation_bytes_estimate"))
        assert rk["weight_bytes"] == rk["sharded_bytes"] + rk["replicated_bytes"]
        assert rk["activation_bytes_estimate"] > 0 and rk["grad_bytes"] > rk["weight_bytes"]
    fit = doc["fit"]
    assert set(fit) >= {"gpu_mem_bytes", "reserve_bytes", "per_tp", "smallest_fitting_tp"}
    assert fit["gpu_mem_bytes"] == 8 * 2**20 and fit["reserve_bytes"] == 2**20
    assert set(fit["per_tp"]) == {"1", "2"} and fit["smallest_fitting_tp"] == 1
    assert fit["per_tp"]["2"] == max(rk["total_bytes"] for rk in expand_runs(doc["tp"]["rank_runs"]))

    rc, out, _ = run_main(monkeypatch, capsys, "inspect", models("llama"), "--tp", "2", "--json")
    doc = json.loads(out)
    assert doc["fit"] is None and doc["memory"] is None
    assert all(rk["kv_cache_bytes"] == rk["grad_bytes"] == 0 for rk in expand_runs(doc["tp"]["rank_runs"]))


def test_rank_table_has_one_row_per_distinct_layout(models, monkeypatch, capsys):
    monkeypatch.setenv("COLUMNS", "80")
    rc, out, _ = run_main(monkeypatch, capsys, "inspect", models("mixtral3"), "--tp", "3", "--seq-len", "40",
                          "--train")
    assert rc == 0
    assert "ranks 0-1 *" in out and "rank 2 " in out and "rank 0 " not in out
    assert "act. est" in out and "activations are an estimate" in out
    rows = [line for line in out.splitlines() if line.startswith(("ranks 0-1", " 3 "))]  # the table's, not step prose
    assert rows and max(len(line) for line in rows) <= 80


@pytest.mark.parametrize("args,needle", [
    (["--seq-len", "0"], "--seq-len must be >= 1"),
    (["--batch", "-2", "--seq-len", "8"], "--batch must be >= 1"),
    (["--gpu-mem", "banana"], "--gpu-mem 'banana'"),
    (["--gpu-mem", "1GiB"], "--reserve"),  # smaller than the 2 GiB default reserve
    (["--gpu-mem", "4GiB", "--reserve", "5GiB"], "--reserve"),
    (["--reserve", "1GiB"], "--reserve only applies with --gpu-mem"),
    (["--kv-dtype", "int3", "--seq-len", "8"], "--kv-dtype"),
    (["--train", "BASE"], "--train"),
])
def test_memory_usage_errors(models, tmp_path, monkeypatch, capsys, args, needle):
    target = models("llama")
    if "BASE" in args:  # a base model without an LM head: no loss to train on
        args = [a for a in args if a != "BASE"]
        target = tmp_path / "base"
        target.mkdir()
        cfg = json.loads((models("llama") / "config.json").read_text())
        (target / "config.json").write_text(json.dumps({**cfg, "architectures": ["LlamaModel"]}))
    monkeypatch.delenv("TPCLI_DEBUG", raising=False)
    rc, out, err = run_main(monkeypatch, capsys, "inspect", target, *args)
    assert rc == 2, err
    assert err.startswith("Error: ") and needle in err and err.count("\n") == 1 and not out


def test_will_qwen3_06b_fit_a_24gib_gpu_from_an_offline_cache(tmp_path, monkeypatch, capsys):
    """The issue's 'done when': config.json only, in a local HF cache, offline."""
    folder = tmp_path / "qwen3-0.6b"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(QWEN3_06B))
    hf_home = tmp_path / "hf"
    _hub_cache(hf_home, "Qwen/Qwen3-0.6B", folder)
    use_hub_cache(monkeypatch, hf_home)
    rc, out, err = run_main(monkeypatch, capsys, "inspect", "Qwen/Qwen3-0.6B", "--gpu-mem", "24GiB", "--seq-len",
                            "32768")
    assert rc == 0, err
    for text in ("Largest rank per TP size, GiB", "weights", "KV cache", "total", "fits",
                 "Smallest TP size that fits a 24.00 GiB GPU (2.00 GiB reserved): tp=1"):
        assert text in out, text
    rows = {line.split()[0]: line.split() for line in out.splitlines()
            if line[:3].strip() in ("1", "2", "4", "8") and "layers:" not in line}
    assert "28 attention layers: 3.50 GiB at tp=1 .. 448.00 MiB at tp=8, split by TP" in out
    assert set(rows) == {"1", "2", "4", "8"}  # 8 KV heads: tp 1, 2, 4, 8
    assert rows["1"][2] == "3.50"  # 28 layers x 2 x 8 heads x 128 x 2 B x 32768 tokens = 3.50 GiB
    assert rows["8"][2] == "0.44"
    # the numbers behind the table, from the same config (in-process: no second interpreter start)
    doc = json.loads(run_main(monkeypatch, capsys, "inspect", folder, "--gpu-mem", "24GiB", "--seq-len", "32768",
                              "--json")[1])
    assert doc["fit"]["smallest_fitting_tp"] == 1 and doc["summary"]["parameters"] == 596_049_920
    assert doc["memory"]["per_tp"]["1"]["kv_cache_bytes"] == 28 * 2 * 8 * 128 * 2 * 32768
