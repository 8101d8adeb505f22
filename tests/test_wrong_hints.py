"""Each error names the problem the user actually has and a fix that exists (issue 39): verify's --gpus without GPUs
(verify has no --cpu), a size with a unit below 1 MiB, --ep on a dense model, a missing or file DIR/MODEL, and a
folder without weights refused before transformers is imported."""

from __future__ import annotations

import pytest
from conftest import run_main


def one_line(err: str) -> str:
    (line,) = err.strip().splitlines()
    return line


def test_verify_numerics_gpus_without_gpus_says_drop_gpus(model_dirs, monkeypatch, capsys):
    import torch

    if torch.cuda.is_available() and torch.cuda.device_count() >= 2:
        pytest.skip("2 GPUs are visible: the workers would start")
    rc, _, err = run_main(monkeypatch, capsys, "verify", model_dirs("qwen3"), "--tp", "2", "--numerics", "--gpus")
    line = one_line(err)
    assert rc == 1 and "drop --gpus" in line and "--cpu" not in line, line


def test_a_size_with_a_unit_below_1_mib_does_not_ask_for_a_unit(model_dirs, tmp_path, monkeypatch, capsys):
    rc, _, err = run_main(monkeypatch, capsys, "gather", tmp_path, "--out", tmp_path / "o", "--max-shard-size", "1MB")
    line = one_line(err)
    assert rc == 2 and "1,000,000 bytes is below the smallest size, 1 MiB" in line and "give a unit" not in line


def test_ep_on_a_dense_model_says_drop_ep(model_dirs, monkeypatch, capsys):
    rc, _, err = run_main(monkeypatch, capsys, "inspect", model_dirs("qwen3"), "--tp", "2", "--ep", "2")
    line = one_line(err)
    assert rc == 2 and "drop --ep" in line and "Qwen3ForCausalLM has no experts" in line
    assert "Pass `ep_plan`" not in line  # transformers' advice to write an EP plan for a model without experts


@pytest.mark.parametrize("what", ["missing", "file"])
def test_gather_names_a_missing_or_file_dir(tmp_path, monkeypatch, capsys, what):
    target = tmp_path / "nope"
    if what == "file":
        target.write_text("hi")
    rc, _, err = run_main(monkeypatch, capsys, "gather", target, "--out", tmp_path / "o")
    line = one_line(err)
    assert rc == 1 and ("no such folder" if what == "missing" else "is a file, not a folder") in line, line
    assert "no shard-" not in line


def test_inspect_of_a_file_says_it_is_a_file(tmp_path, monkeypatch, capsys):
    (tmp_path / "file.txt").write_text("hi")
    rc, _, err = run_main(monkeypatch, capsys, "inspect", tmp_path / "file.txt")
    line = one_line(err)
    assert rc == 1 and "is a file, not a folder" in line and "no such directory" not in line


def test_shard_of_a_folder_without_weights_fails_before_planning(model_dirs, tmp_path, monkeypatch, capsys):
    """The weights are looked for before the plan is resolved (importing transformers took ~6 s first)."""
    from tpcli.commands import shard

    def no_planning(*a, **k):
        raise AssertionError("the plan was resolved before the weights were looked for")

    monkeypatch.setattr(shard, "resolve_plan", no_planning)
    folder = tmp_path / "config-only"
    folder.mkdir()
    (folder / "config.json").write_text((model_dirs("qwen3") / "config.json").read_text())
    rc, _, err = run_main(monkeypatch, capsys, "shard", folder, "--tp", "2", "--out", tmp_path / "o")
    assert rc == 1 and "has no *.safetensors weights" in one_line(err)
