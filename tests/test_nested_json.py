"""Every JSON file tpcli reads from disk goes through the bounded reader (`tpcli.formats.jsonfile.read_json`):
nested 100,000 levels deep, each kind is one line naming the file and a non-zero exit (or, for files tpcli only
consults, a miss), never the parser's RecursionError traceback (issue 34 item 7)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import run_main

from tpcli.commands.shard import shard_checkpoint
from tpcli.formats import cache
from tpcli.formats.output import TEMP_MARKER

DEEP = "[" * 100_000 + "]" * 100_000


@pytest.fixture(scope="module")
def sharded(model_dirs, tmp_path_factory):
    out = tmp_path_factory.mktemp("nested") / "s"
    shard_checkpoint(str(model_dirs("llama4kv")), tp=2, out=str(out))
    return out


def _model(model_dirs, root: Path) -> Path:
    return Path(shutil.copytree(model_dirs("llama4kv"), root / "model"))


def _config_in_model(model_dirs, root):
    m = _model(model_dirs, root)
    (m / "config.json").write_text(DEEP)
    return ["inspect", m, "--tp", "2"], "config.json"


def _config_in_model_shard(model_dirs, root):
    m = _model(model_dirs, root)
    (m / "config.json").write_text(DEEP)
    return ["shard", m, "--tp", "2", "--out", root / "out"], "config.json"


def _generation_config(model_dirs, root):
    m = _model(model_dirs, root)
    (m / "generation_config.json").write_text(DEEP)
    return ["inspect", m, "--tp", "2"], "generation_config.json"


def _index(model_dirs, root):
    m = _model(model_dirs, root)
    (m / "model.safetensors.index.json").write_text('{"weight_map": ' + DEEP + "}")
    return ["shard", m, "--tp", "2", "--out", root / "out"], "model.safetensors.index.json"


def _copy(sharded, root) -> Path:
    return Path(shutil.copytree(sharded, root / "s"))


def _manifest(kind):
    def setup(sharded, root):
        s = _copy(sharded, root)
        (s / "tpcli.json").write_text(DEEP)
        return (["gather", s, "--out", root / "out"] if kind == "gather" else ["verify", s, "--json"]), "tpcli.json"
    return setup


def _sharded_config(kind):
    def setup(sharded, root):
        s = _copy(sharded, root)
        (s / "config.json").write_text(DEEP)
        return (["gather", s, "--out", root / "out"] if kind == "gather" else ["verify", s, "--json"]), "config.json"
    return setup


def _output_marker(sharded, root):
    s = _copy(sharded, root)
    (root / "out").mkdir()
    (root / "out" / "tpcli.json").write_text(DEEP)  # not a tpcli output: --force must not replace it
    return ["gather", s, "--out", root / "out", "--force"], "not a tpcli output"


def _sharding_info(sharded, root):
    from test_bad_input import SHARD1, _rewrite_header

    s = _copy(sharded, root)
    (s / "tpcli.json").unlink()  # a transformers DCP save

    def edit(h, order):
        h["__metadata__"]["DCP_SHARDING_INFO"] = DEEP
    _rewrite_header(s / SHARD1, edit)
    return ["gather", s, "--out", root / "out"], "DCP_SHARDING_INFO"


def _state_manifest(kind):
    def setup(sharded, root):  # a training-state folder's manifest (read with json.loads before: RecursionError)
        s = _copy(sharded, root)
        (s / "tpcli.json").unlink()
        (s / "tpcli-state.json").write_text(DEEP)
        return (["gather", s, "--out", root / "out"] if kind == "gather" else ["verify", s, "--json"]), \
            "tpcli-state.json"
    return setup


MODEL_CASES = {"config-inspect": _config_in_model, "config-shard": _config_in_model_shard,
               "generation-config": _generation_config, "index": _index}
SHARDED_CASES = {"manifest-gather": _manifest("gather"), "manifest-verify": _manifest("verify"),
                 "config-gather": _sharded_config("gather"), "config-verify": _sharded_config("verify"),
                 "output-marker": _output_marker, "sharding-info": _sharding_info,
                 "state-manifest-verify": _state_manifest("verify"), "state-manifest-gather": _state_manifest("gather")}


def _check(rc, out, err, args, needle):
    assert rc == 1 and "Traceback" not in out + err and "RecursionError" not in out + err, (rc, out[-500:], err[-2000:])
    if args[0] == "verify":
        doc = json.loads(out)
        assert not doc["ok"] and len(doc["findings"]) == 1 and needle in doc["findings"][0]["message"], doc
    else:
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].startswith("Error: ") and needle in lines[0], err[-2000:]


@pytest.mark.parametrize("case", list(MODEL_CASES))
def test_a_deeply_nested_model_file_is_one_line(case, model_dirs, tmp_path, monkeypatch, capsys):
    args, needle = MODEL_CASES[case](model_dirs, tmp_path)
    _check(*run_main(monkeypatch, capsys, *args), args, needle)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("case", list(SHARDED_CASES))
def test_a_deeply_nested_sharded_folder_file_is_one_line(case, sharded, tmp_path, monkeypatch, capsys):
    args, needle = SHARDED_CASES[case](sharded, tmp_path)
    _check(*run_main(monkeypatch, capsys, *args), args, needle)


def test_a_deeply_nested_stale_temp_marker_is_left_alone(model_dirs, tmp_path, monkeypatch, capsys):
    m = _model(model_dirs, tmp_path)
    stale = tmp_path / ".out.tpcli-tmp-x"
    stale.mkdir()
    (stale / TEMP_MARKER).write_text(DEEP)
    rc, out, err = run_main(monkeypatch, capsys, "shard", m, "--tp", "2", "--out", tmp_path / "out")
    assert rc == 0 and "Traceback" not in err, err[-2000:]
    assert (stale / TEMP_MARKER).exists()  # not a marker tpcli wrote: not removed


def test_a_deeply_nested_cache_entry_is_a_miss(tmp_path, monkeypatch):
    monkeypatch.setenv(cache.ENV, str(tmp_path / "c"))
    cache.put("k", {"a": 1})
    (tmp_path / "c" / "k.json").write_text('{"key": "k", "result": ' + DEEP + "}")
    assert cache.get("k") is None


def test_a_deeply_nested_failure_report_file_is_no_message(tmp_path):
    from tpcli.commands.failure_report import collect_failures
    from tpcli.commands.run import LaunchSpec

    (tmp_path / "0").mkdir()
    (tmp_path / "0" / "error.json").write_text('{"message": ' + DEEP + "}")
    spec = LaunchSpec(module="m", args=[], cpu=1)
    failures = collect_failures([], tmp_path, spec)
    assert len(failures) == 1 and failures[0]["message"].startswith("exit code")
