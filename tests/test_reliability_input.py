"""Issue 23 (items 5, 9 and the tracebacks) and issue 27 item 8: one-line errors instead of tracebacks or hangs,
bounded flags, one size parser, and an --out that appears mid-write is never deleted.

Every case is the real entry point (`cli.main`) in-process: exactly one `Error:` line naming the flag or file,
the stated exit code, no traceback, and nothing left in the output's parent.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import base_env, run_main

from tpcli.commands import shard as sharding
from tpcli.commands.shard import shard_checkpoint
from tpcli.formats import manifest as manifest_mod

BIG = "9" * 400


@pytest.fixture(scope="module")
def sharded(model_dirs, tmp_path_factory):
    out = tmp_path_factory.mktemp("rel") / "sharded"
    shard_checkpoint(str(model_dirs("llama3")), tp=2, out=str(out))
    return out


def _one_error_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), err
    return lines[0]


def _tp_size_3(root: Path, sharded: Path, model: Path) -> list:
    folder = root / "s"
    subprocess.run(["cp", "-a", str(sharded), str(folder)], check=True)
    doc = json.loads((folder / "tpcli.json").read_text())
    doc["tp_size"] = 3
    (folder / "tpcli.json").write_text(json.dumps(doc))
    return ["gather", folder, "--out", root / "out"]


def _plan(text: str):
    def make(root: Path, sharded: Path, model: Path) -> list:
        (root / "plan.json").write_text(text)
        return ["inspect", model, "--tp", "2", "--plan", root / "plan.json"]
    return make


def _args(*args):
    return lambda root, sharded, model: [a.format(root=root, sharded=sharded, model=model) for a in args]


CASES = {  # name: (setup, exit code, needles in the error line)
    "gpu-mem-400-digits": (_args("inspect", "{model}", "--gpu-mem", BIG), 2, ["--gpu-mem", "1 EiB"]),
    "reserve-400-digits": (_args("inspect", "{model}", "--gpu-mem", "24GiB", "--reserve", BIG), 2, ["--reserve"]),
    "max-shard-size-400-digits": (_args("gather", "{sharded}", "--out", "{root}/out", "--max-shard-size", BIG), 2,
                                  ["--max-shard-size"]),
    "seq-len-400-digits": (_args("inspect", "{model}", "--seq-len", BIG), 2, ["--seq-len", "at most"]),
    "gpu-mem-without-unit": (_args("inspect", "{model}", "--gpu-mem", "24"), 2, ["--gpu-mem", "24GiB"]),
    "gpu-mem-below-1MiB": (_args("inspect", "{model}", "--gpu-mem", "2kb"), 2, ["--gpu-mem", "1 MiB"]),
    "max-shard-size-without-unit": (_args("gather", "{sharded}", "--out", "{root}/out", "--max-shard-size", "1000"),
                                    2, ["--max-shard-size", "unit"]),
    "tp-200000": (_args("inspect", "{model}", "--tp", "200000"), 2, ["--tp", "at most 1,024"]),
    "shard-tp-200000": (_args("shard", "{model}", "--tp", "200000", "--out", "{root}/out"), 2, ["--tp", "1,024"]),
    "kv-dtype-empty": (_args("inspect", "{model}", "--seq-len", "8", "--kv-dtype="), 2, ["--kv-dtype"]),
    "plan-is-a-folder": (_args("inspect", "{model}", "--tp", "2", "--plan", "{root}"), 2, ["--plan", "directory"]),
    "plan-dotdot": (_args("verify", "{model}", "--tp", "2", "--plan", ".."), 2, ["--plan ..", "directory"]),
    "plan-nested-200k": (_plan("[" * 200_000), 1, ["--plan", "nested"]),
    "verify-tp-size-3-two-files": (_tp_size_3, 1, ["tpcli.json", "tp_size 3"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_one_line_errors(case, model_dirs, sharded, tmp_path, monkeypatch, capsys):
    setup, code, needles = CASES[case]
    root = tmp_path / "work"
    root.mkdir()
    monkeypatch.chdir(root)
    args = setup(root, sharded, model_dirs("llama3"))
    before = sorted(p.name for p in root.iterdir())
    rc, out, err = run_main(monkeypatch, capsys, *args)
    assert rc == code and "Traceback" not in out + err, (rc, out, err)
    line = _one_error_line(err)
    assert len(line) < 600, len(line)
    for needle in needles:
        assert needle in line, (needle, line)
    assert sorted(p.name for p in root.iterdir()) == before


def test_verify_of_tp_size_3_with_two_rank_files_is_an_error(sharded, tmp_path, monkeypatch, capsys):
    args = _tp_size_3(tmp_path, sharded, Path())
    rc, out, err = run_main(monkeypatch, capsys, "verify", args[1], "--json")
    assert rc != 0 and "tp_size 3" in out + err, (rc, out, err)


def test_a_50k_rule_plan_gives_a_short_error(model_dirs, tmp_path, monkeypatch, capsys):
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({f"model.nothing{i}.proj": "colwise" for i in range(50_000)}))
    rc, _, err = run_main(monkeypatch, capsys, "inspect", model_dirs("llama3"), "--tp", "2", "--plan", plan)
    line = _one_error_line(err)
    assert rc == 1 and "--plan" in line and "model.nothing0.proj" in line and len(line) < 600, line[:300]


def test_verify_plan_fifo_refuses_without_blocking(model_dirs, tmp_path):
    fifo = tmp_path / "plan.fifo"
    os.mkfifo(fifo)
    proc = subprocess.run([sys.executable, "-m", "tpcli", "verify", str(model_dirs("llama3")), "--tp", "2",
                           "--plan", str(fifo)], env=base_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--plan" in _one_error_line(proc.stderr) and "FIFO" in proc.stderr, proc.stderr


@pytest.mark.parametrize("text,expected", [("24G", 24 * 2**30), ("24GiB", 24 * 2**30), ("24GB", 24 * 10**9),
                                           ("1.5 TiB", 3 * 2**39), ("4096m", 4 * 2**30)])
def test_gpu_mem_units(text, expected, model_dirs, monkeypatch, capsys):
    rc, out, err = run_main(monkeypatch, capsys, "inspect", model_dirs("llama3"), "--gpu-mem", text, "--json")
    assert rc == 0, err
    assert json.loads(out)["fit"]["gpu_mem_bytes"] == expected


def test_reserve_zero_is_no_reserve(model_dirs, monkeypatch, capsys):
    rc, out, err = run_main(monkeypatch, capsys, "inspect", model_dirs("llama3"), "--gpu-mem", "8MiB", "--reserve", "0",
                            "--json")
    assert rc == 0 and json.loads(out)["fit"]["reserve_bytes"] == 0, err


def test_one_parser_for_every_size_flag():
    """--gpu-mem, --reserve and --max-shard-size all go through tpcli.formats.units.parse_size (the CLI and the
    memory planner had one each, treating 0 differently)."""
    from tpcli import cli
    from tpcli.formats import units
    from tpcli.planning import memory

    assert cli.parse_size is units.parse_size
    assert not hasattr(memory, "parse_size")
    for text in ("24G", "80GB", "3.5MiB"):
        assert units.parse_size(text, "--x") == {"24G": 24 * 2**30, "80GB": 80 * 10**9, "3.5MiB": 7 * 2**19}[text]


# --- the output folder: what appears at --out while tpcli writes is never deleted (issue 23 item 5) -----------

def _appear_mid_write(monkeypatch, out: Path, make) -> None:
    """Run `make(out)` when the manifest is written into the temporary folder: after the work, before publishing."""
    real = manifest_mod.write

    def write(folder, doc):
        make(out)
        return real(folder, doc)

    monkeypatch.setattr(sharding.manifest, "write", write)


def _precious(out: Path) -> None:
    out.mkdir(exist_ok=True)
    (out / "precious.txt").write_text("x")


@pytest.mark.parametrize("force", [False, True])
def test_an_out_created_mid_shard_is_not_deleted(force, model_dirs, tmp_path, monkeypatch, capsys):
    out = tmp_path / "race2"
    _appear_mid_write(monkeypatch, out, _precious)
    rc, _, err = run_main(monkeypatch, capsys, "shard", model_dirs("llama3"), "--tp", "2", "--out", out,
                          *(["--force"] if force else []))
    line = _one_error_line(err)
    assert rc == 1 and "--out" in line and "precious.txt" in line, (rc, err)
    assert (out / "precious.txt").read_text() == "x" and sorted(os.listdir(out)) == ["precious.txt"]
    assert sorted(os.listdir(tmp_path)) == ["race2"]  # the temporary folder is gone too


@pytest.mark.parametrize("force", [False, True])
def test_an_out_filled_between_the_check_and_the_rename_is_put_back(force, model_dirs, tmp_path, monkeypatch,
                                                                     capsys):
    """The race after `check_replaceable`: `_publish` checks again what it moved aside, and puts it back."""
    from tpcli.formats import output

    out = tmp_path / "race3"
    _appear_mid_write(monkeypatch, out, _precious)
    monkeypatch.setattr(output, "check_replaceable", lambda *a, **k: None)  # as if filled just after the check
    rc, _, err = run_main(monkeypatch, capsys, "shard", model_dirs("llama3"), "--tp", "2", "--out", out,
                          *(["--force"] if force else []))
    assert rc == 1 and "precious.txt" in _one_error_line(err), err
    assert sorted(os.listdir(out)) == ["precious.txt"] and sorted(os.listdir(tmp_path)) == ["race3"]


def test_a_force_target_refilled_mid_shard_by_someone_else_is_not_deleted(sharded, model_dirs, tmp_path,
                                                                          monkeypatch, capsys):
    out = tmp_path / "prev"
    subprocess.run(["cp", "-a", str(sharded), str(out)], check=True)  # a tpcli output: --force may replace it

    def refill(path: Path) -> None:
        for p in path.iterdir():
            p.unlink()
        (path / "precious.txt").write_text("x")  # same folder (dev/inode), no longer a tpcli output

    _appear_mid_write(monkeypatch, out, refill)
    rc, _, err = run_main(monkeypatch, capsys, "shard", model_dirs("llama3"), "--tp", "2", "--out", out, "--force")
    assert rc == 1 and "precious.txt" in _one_error_line(err)
    assert sorted(os.listdir(out)) == ["precious.txt"] and sorted(os.listdir(tmp_path)) == ["prev"]


def test_force_still_replaces_a_tpcli_output_and_an_empty_folder_still_works(sharded, model_dirs, tmp_path,
                                                                            monkeypatch, capsys):
    out = tmp_path / "prev"
    subprocess.run(["cp", "-a", str(sharded), str(out)], check=True)
    rc, _, err = run_main(monkeypatch, capsys, "shard", model_dirs("llama3"), "--tp", "2", "--out", out, "--force")
    assert rc == 0, err
    empty = tmp_path / "empty"
    empty.mkdir()
    rc, _, err = run_main(monkeypatch, capsys, "shard", model_dirs("llama3"), "--tp", "2", "--out", empty)
    assert rc == 0 and (empty / "tpcli.json").is_file(), err


def test_a_source_truncated_during_a_byte_copy_shard_is_one_line(model_dirs, tmp_path, monkeypatch, capsys):
    from tpcli.formats import bytecopy

    model = tmp_path / "m"
    subprocess.run(["cp", "-a", str(model_dirs("llama3")), str(model)], check=True)
    weights = model / "model.safetensors"
    real = bytecopy.write_files

    def truncate_first(*a, **k):
        os.truncate(weights, weights.stat().st_size // 2)
        return real(*a, **k)

    monkeypatch.setattr(bytecopy, "write_files", truncate_first)
    rc, out, err = run_main(monkeypatch, capsys, "shard", model, "--tp", "2", "--out", tmp_path / "out")
    line = _one_error_line(err)
    assert rc == 1 and str(weights) in line and "Traceback" not in err, err
    assert not (tmp_path / "out").exists() and sorted(os.listdir(tmp_path)) == ["m"]
