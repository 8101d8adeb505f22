"""The command line as a user runs it: output, exit codes, one-line errors, cheap --help."""

import json
import shutil
import subprocess
import sys
import time

import pytest
from conftest import base_env, run_main
from typer.testing import CliRunner

from tpcli.cli import app
from tpcli.commands.inspect import expand_runs, local_shapes

runner = CliRunner()



def test_help_and_version_do_not_import_torch():
    code = ("import sys\nsys.argv = ['tpcli', '--help']\nfrom tpcli.cli import main\n"
            "try:\n    main()\nexcept SystemExit:\n    pass\n"
            "print('LOADED', 'torch' in sys.modules, 'transformers' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=base_env())
    assert "LOADED False False" in proc.stdout
    for cmd in ("inspect", "verify", "shard", "run", "gather"):
        assert cmd in proc.stdout
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "tpcli", "--version"], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.startswith("tpcli ")
    assert time.perf_counter() - started < 5  # generous: the target (<= 0.4 s) is measured in `make bench`


def test_inspect_json_is_stable_and_complete(model_dirs):
    result = runner.invoke(app, ["inspect", str(model_dirs("mixtral3")), "--tp", "3", "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["schema"] == "tpcli.inspect/4"
    assert set(doc) == {"schema", "source", "summary", "checkpoint", "plan", "unused_rules", "valid_tp_sizes",
                        "invalid_tp_sizes", "coverage", "tp", "memory", "fit", "mesh"}
    assert doc["checkpoint"]["files"] == 1 and sum(doc["checkpoint"]["parameters_by_dtype"].values()) == \
        doc["summary"]["parameters"]
    assert doc["summary"]["architecture"] == "MixtralForCausalLM"
    groups = {g["pattern"]: g for g in doc["tp"]["groups"]}
    assert local_shapes(groups["model.embed_tokens.weight"]) == [[334, 96], [334, 96], [333, 96]]
    assert groups["model.layers.*.mlp.experts.gate_up_proj"]["placement"] == "_StridedShard(1, sf=2)"
    assert 3 in doc["valid_tp_sizes"] and "4" in doc["invalid_tp_sizes"]
    ranks = expand_runs(doc["tp"]["rank_runs"])
    assert doc["tp"]["largest_rank"] == 0 and ranks[0]["total_bytes"] > ranks[2]["total_bytes"]
    assert 0.9 < doc["coverage"]["sharded_fraction"] <= 1.0


def test_inspect_tables(model_dirs, monkeypatch, capsys):
    monkeypatch.setenv("COLUMNS", "200")
    code, out, _ = run_main(monkeypatch, capsys, "inspect", model_dirs("qwen3"), "--tp", "2")
    assert code == 0
    for text in ("Qwen3ForCausalLM", "TP plan", "embedding_rowwise", "(501, 64) / (500, 64)", "Memory per rank",
                 "Valid TP sizes: 1, 2", "num_key_value_heads=2 not divisible by 4"):
        assert text in out, text


@pytest.mark.parametrize("setup,args,code,needle", [
    ("missing", [], 1, "no such directory"),
    ("noconfig", [], 1, "config.json is missing"),
    ("badtype", [], 1, "config.json"),
    ("noplan", [], 1, "--plan FILE"),
    ("badplan", ["--plan", "PLAN"], 1, "not valid JSON"),
    ("llama", ["--tp", "0"], 2, "--tp must be >= 1"),
])
def test_bad_input_is_one_line_and_non_zero(model_dirs, tmp_path, monkeypatch, capsys, setup, args, code, needle):
    target = tmp_path / "model"
    if setup == "noconfig":
        target.mkdir()
    elif setup == "badtype":
        target.mkdir()
        (target / "config.json").write_text(json.dumps({"model_type": "no-such-architecture"}))
    elif setup == "noplan":  # jetmoe: no plan in transformers, none in plans/
        from transformers import AutoConfig

        AutoConfig.for_model("jetmoe", hidden_size=64, num_hidden_layers=1, num_key_value_heads=2, kv_channels=16,
                             vocab_size=101, intermediate_size=32).save_pretrained(target)
    elif setup == "llama":
        target = model_dirs(setup)
    elif setup == "badplan":
        target = model_dirs("llama")
        (tmp_path / "plan.json").write_text("{oops")
    args = [a.replace("PLAN", str(tmp_path / "plan.json")) for a in args]
    monkeypatch.delenv("TPCLI_DEBUG", raising=False)
    rc, out, err = run_main(monkeypatch, capsys, "inspect", target, *args)
    assert rc == code
    assert needle in err
    if code == 1:
        assert err.startswith("Error: ") and err.count("\n") == 1 and "Traceback" not in err


def test_debug_variable_shows_the_traceback(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TPCLI_DEBUG", "1")
    rc, _, err = run_main(monkeypatch, capsys, "inspect", tmp_path / "nope")
    assert rc == 1 and "Traceback" in err


def test_shard_and_gather_commands(model_dirs, tmp_path, monkeypatch, capsys):
    rc, out, _ = run_main(monkeypatch, capsys, "shard", model_dirs("llama"), "--tp", "2", "--out", tmp_path / "s",
                          "--json")
    assert rc == 0 and json.loads(out)["tp_size"] == 2
    rc, _, err = run_main(monkeypatch, capsys, "shard", model_dirs("llama"), "--tp", "2", "--out", tmp_path / "s")
    assert rc == 1 and "--force" in err
    rc, out, _ = run_main(monkeypatch, capsys, "gather", tmp_path / "s", "--out", tmp_path / "g")
    assert rc == 0 and "Wrote" in out
    rc, _, err = run_main(monkeypatch, capsys, "shard", model_dirs("llama"), "--tp", "2", "--out", tmp_path / "x",
                          "--dtype", "int4")
    assert rc == 2 and "--dtype int4" in err


def test_verify_command_exit_codes(model_dirs, monkeypatch, capsys):
    rc, out, _ = run_main(monkeypatch, capsys, "verify", model_dirs("llama"), "--tp", "2")
    assert rc == 0 and "OK" in out
    rc, out, _ = run_main(monkeypatch, capsys, "verify", model_dirs("llama"), "--tp", "3", "--json")
    assert rc == 1 and json.loads(out)["ok"] is False


def _hub_cache(root, repo_id, folder):
    """A local HF cache holding `folder` as repo_id@main, laid out as huggingface_hub lays it out."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    base = root / "hub" / ("models--" + repo_id.replace("/", "--"))
    snap = base / "snapshots" / commit
    shutil.copytree(folder, snap)
    (base / "refs").mkdir(parents=True)
    (base / "refs" / "main").write_text(commit)
    return commit


def use_hub_cache(monkeypatch, hf_home) -> None:
    """Point huggingface_hub at `hf_home` for this test, offline (in-process: its cache folder is read per call)."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HOME", str(hf_home))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hf_home / "hub"))


def test_hub_id_from_an_offline_cache(model_dirs, tmp_path, monkeypatch, capsys):
    hf_home = tmp_path / "hf"
    _hub_cache(hf_home, "tiny-org/tiny-qwen3", model_dirs("qwen3"))
    use_hub_cache(monkeypatch, hf_home)

    rc, out, err = run_main(monkeypatch, capsys, "inspect", "tiny-org/tiny-qwen3", "--tp", "2", "--json")
    assert rc == 0, err
    doc = json.loads(out)
    assert doc["source"]["hub_id"] == "tiny-org/tiny-qwen3" and doc["summary"]["model_type"] == "qwen3"
    assert doc["source"]["path"].startswith(str(hf_home))  # read from the cache, not from the fixture's folder
    rc, out, err = run_main(monkeypatch, capsys, "shard", "tiny-org/tiny-qwen3", "--tp", "2", "--out", tmp_path / "s",
                            "--json")
    assert rc == 0, err
    assert json.loads((tmp_path / "s" / "tpcli.json").read_text())["source"]["hub_id"] == "tiny-org/tiny-qwen3"
    rc, _, err = run_main(monkeypatch, capsys, "inspect", "tiny-org/not-cached")
    assert rc == 1 and "not in the HF cache" in err and "HF_HUB_OFFLINE" in err
    rc, _, err = run_main(monkeypatch, capsys, "inspect", "tiny-org/tiny-qwen3", "--revision", "v9")
    assert rc == 1 and "v9" in err
