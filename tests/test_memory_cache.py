"""The cache terms of issue 30 (MLA, linear attention / SSM states, mixed layers) and of gathered K/V (issue 24).

The real TP runs are in tests/test_memory.py (`test_cache_terms_equal_the_storage_a_real_tp_run_holds`); here: the
single-process oracle for the state dtypes (bf16), every family whose plan gathers k_proj, the fit advice with a
fixed part, and the one-line refusals.
"""

import json
import sys
from pathlib import Path

import pytest
from conftest import ORACLES, run_main, tiny_models

from tpcli.commands.inspect import expand_runs
from tpcli.planning.memory import MemoryOptions, fit_table, largest_per_tp, rank_memory
from tpcli.planning.plan import load_config, resolve_plan

sys.path.insert(0, str(ORACLES))
from cache_walk import cache_bytes  # noqa: E402

BATCH, SEQ_LEN = 2, 40
BF16 = {kind: (kind, {"dtype": "bfloat16"})
        for kind in ("qwen3_next", "minimax", "jamba", "granitemoehybrid", "falcon_h1", "deepseek_v2")}
MODELS = {**BF16, "olmo2": ("olmo2", {}), "qwen3_next_fp32": ("qwen3_next", {})}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return tiny_models(tmp_path_factory.mktemp("cache-models"), MODELS)


def _plan(path):
    return resolve_plan(load_config(path))


@pytest.mark.parametrize("name", BF16)
def test_state_dtypes_match_a_single_process_run(models, name):
    """In bf16 the conv states follow the model, the recurrent / SSM states are float32: tp=1 == one process."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(models(name), dtype=torch.bfloat16)
    ids = torch.randint(3, 1000, (BATCH, SEQ_LEN), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        real = cache_bytes(model(ids, use_cache=True).past_key_values)
    (ours,) = rank_memory(_plan(models(name)), 1, MemoryOptions(batch=BATCH, seq_len=SEQ_LEN))
    assert (ours.kv_cache_bytes, ours.kv_cache_visible_bytes) == (real["storage_bytes"], real["tensor_bytes"]), name


def _gathered_kv_families() -> list[str]:
    """Every config class of transformers whose default plan gathers k_proj's output (colwise_gather_output)."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING, CONFIG_MAPPING_NAMES

    found = []
    for model_type in CONFIG_MAPPING_NAMES:
        cls = CONFIG_MAPPING[model_type]
        plan: dict = {}
        for c in (cls, *getattr(cls, "sub_configs", {}).values()):  # multimodal: the text config's plan
            plan.update(getattr(c, "base_model_tp_plan", None) or {})
        if any(rule.endswith("self_attn.k_proj") and style in ("colwise_gather_output", "colwise_rep")
               for rule, style in plan.items()):
            found.append(model_type)
    return found


KNOWN_GATHERED = ("olmo2", "olmo3", "olmoe", "flex_olmo", "minimax_m2", "step3p7")  # transformers 5.23's, modelled


def _kv_whole_on_every_rank(folder, model_type: str) -> None:
    """At tp=2 k_proj's weight is split, and each rank's KV cache is the whole tp=1 cache."""
    from transformers import AutoConfig

    AutoConfig.for_model(model_type).save_pretrained(folder)
    plan = _plan(folder)
    one = rank_memory(plan, 1, MemoryOptions(batch=1, seq_len=8))[0].kv_cache_bytes
    two = rank_memory(plan, 2, MemoryOptions(batch=1, seq_len=8))
    k_proj = [t for t in plan.tensors.values()
              if t.name.endswith("self_attn.k_proj.weight") and t.style in ("colwise_gather_output", "colwise_rep")]
    assert k_proj and all(t.placement.is_sharded for t in k_proj), model_type  # the weight is split ...
    assert [m.kv_cache_bytes for m in two] == [one, one], model_type  # ... the cache is not


@pytest.mark.parametrize("model_type", KNOWN_GATHERED)
def test_a_gathered_kv_family_caches_every_kv_head_on_every_rank(tmp_path, model_type):
    """(olmo2 is also measured on a real TP run: tests/test_memory.py.) The scan below finds these and any new one."""
    _kv_whole_on_every_rank(tmp_path, model_type)


@pytest.mark.scan
def test_every_gathered_kv_family_caches_every_kv_head_on_every_rank(tmp_path):
    """Every family of the installed transformers whose default plan gathers k_proj (found by importing every
    config class: ~4 s, so the full suite only). A family transformers cannot build from its own default config,
    or whose other layers tpcli cannot model, is listed and skipped, not passed."""
    from tpcli.errors import ModelError

    families = _gathered_kv_families()
    assert set(KNOWN_GATHERED) <= set(families), families
    checked, skipped = [], {}
    for model_type in families:
        try:
            _kv_whole_on_every_rank(tmp_path / model_type, model_type)
        except ModelError as exc:
            skipped[model_type] = str(exc)
            continue
        checked.append(model_type)
    assert set(KNOWN_GATHERED) <= set(checked), skipped
    assert set(skipped) <= {"step3p5", "olmo_hybrid"}, skipped  # no model class / unmodelled linear_attention


def test_a_broken_gather_rule_would_be_caught(models, monkeypatch):
    """Rows by k_proj's weight shard (the old rule) halve olmo2's cache: 20,480 B, not the 40,960 B a run holds."""
    from tpcli.planning import memory

    plan = _plan(models("olmo2"))
    opts = MemoryOptions(batch=BATCH, seq_len=SEQ_LEN)
    assert [m.kv_cache_bytes for m in rank_memory(plan, 2, opts)] == [40_960, 40_960]
    monkeypatch.setattr(memory, "SPLIT_OUTPUT", memory.SPLIT_OUTPUT | {"colwise_gather_output"})
    assert [m.kv_cache_bytes for m in rank_memory(plan, 2, opts)] == [20_480, 20_480]


def test_fit_advice_solves_with_the_fixed_states_apart(models):
    """qwen3_next: 36,864 B of states per rank whatever L. The largest L and B that fit are exact; a rule that
    scales the whole cache with B x L (the old one) overshoots the budget."""
    plan = _plan(models("qwen3_next_fp32"))
    opts = MemoryOptions(batch=BATCH, seq_len=SEQ_LEN)

    def total(batch: int, seq_len: int) -> int:
        return largest_per_tp(plan, [2], MemoryOptions(batch=batch, seq_len=seq_len))[2].total_bytes

    per_tp = largest_per_tp(plan, [1, 2], opts)
    assert per_tp[2].kv_cache_fixed_bytes == 3 * BATCH * (512 + 1024) * 4
    budget = total(BATCH, SEQ_LEN) - 4000  # the best size misses by 4000 B
    fit = fit_table(plan, per_tp, opts, gpu_mem=budget + 1000, reserve=1000)
    changes = {c["option"]: c["value"] for c in fit["advice"]["changes"]}
    max_len, max_batch = changes["--seq-len"], changes["--batch"]
    assert total(BATCH, max_len) <= budget < total(BATCH, max_len + 1)
    assert max_batch == 1 and total(1, SEQ_LEN) <= budget
    m = per_tp[2]
    free = budget - m.weight_bytes
    naive_len = int(free // (m.kv_cache_bytes / SEQ_LEN))  # the whole cache taken as growing with L
    assert total(BATCH, naive_len) > budget and naive_len > max_len


def test_fit_advice_batch_counts_the_states_of_each_sequence(models):
    plan = _plan(models("qwen3_next_fp32"))
    opts = MemoryOptions(batch=8, seq_len=SEQ_LEN)

    def total(batch: int) -> int:
        return largest_per_tp(plan, [2], MemoryOptions(batch=batch, seq_len=SEQ_LEN))[2].total_bytes

    budget = total(5) + 10  # batch 5 fits, 6 does not
    per_tp = largest_per_tp(plan, [1, 2], opts)
    fit = fit_table(plan, per_tp, opts, gpu_mem=budget + 1000, reserve=1000)
    changes = {c["option"]: c["value"] for c in fit["advice"]["changes"]}
    assert changes["--batch"] == 5 and total(5) <= budget < total(6)


def test_inspect_names_each_cache_layer_kind(models, monkeypatch, capsys):
    monkeypatch.setenv("COLUMNS", "80")
    rc, out, _ = run_main(monkeypatch, capsys, "inspect", models("qwen3_next_fp32"), "--seq-len", "40", "--batch", "2")
    assert rc == 0
    assert "  3 gated delta net layers: 36.00 KiB replicated on every rank, fixed size" in out
    assert "  1 attention layer: 20.00 KiB at tp=1 .. 10.00 KiB at tp=2, split by TP" in out
    lines = [line for line in out.splitlines() if " layers: " in line or " layer: " in line]
    assert len(lines) == 2 and max(map(len, lines)) <= 80
    rc, out, _ = run_main(monkeypatch, capsys, "inspect", models("qwen3_next_fp32"), "--seq-len", "40", "--batch", "2",
                          "--tp", "2", "--json")
    doc = json.loads(out)
    layers = {c["label"]: c for c in doc["memory"]["cache_layers"]}
    assert layers["gated delta net"]["bytes_per_tp"] == {"1": 36_864, "2": 36_864}
    assert layers["gated delta net"]["states"] == [{"name": "conv", "elements": 512, "dtype": "float32"},
                                                   {"name": "recurrent", "elements": 1024, "dtype": "float32"}]
    assert [rk["kv_cache_bytes"] for rk in expand_runs(doc["tp"]["rank_runs"])] == [47_104, 47_104]
    assert [rk["kv_cache_fixed_bytes"] for rk in expand_runs(doc["tp"]["rank_runs"])] == [36_864, 36_864]


def _default_config(tmp_path: Path, model_type: str) -> Path:
    from transformers import AutoConfig

    folder = tmp_path / model_type
    AutoConfig.for_model(model_type).save_pretrained(folder)
    return folder


def test_an_unmodelled_cache_layer_is_one_line_naming_its_type(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("TPCLI_DEBUG", raising=False)
    rc, out, err = run_main(monkeypatch, capsys, "inspect", _default_config(tmp_path, "bamba"), "--seq-len", "8")
    assert rc == 1 and not out and err.count("\n") == 1, err
    assert err.startswith("Error: BambaForCausalLM: the KV cache of layer 0 (linear_attention) is not modelled")


@pytest.mark.parametrize("model_type,exception", [("dots1", "TypeError"), ("hunyuan_v1_moe", "TypeError"),
                                                  ("dbrx", "AttributeError")])
def test_a_config_transformers_cannot_build_is_one_line(tmp_path, monkeypatch, capsys, model_type, exception):
    monkeypatch.delenv("TPCLI_DEBUG", raising=False)
    folder = _default_config(tmp_path, model_type)
    rc, out, err = run_main(monkeypatch, capsys, "inspect", folder)
    assert rc == 1 and not out and err.count("\n") == 1, err
    assert err.startswith(f"Error: {folder / 'config.json'}: transformers cannot build {model_type!r}")
    assert f"({exception}: " in err
