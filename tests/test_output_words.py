"""Output that does not contradict itself (issue 39): the checkpoint line of a sharded folder says why it holds more
elements than the model has parameters; the shard bar counts in MiB as the summary does; "1 rank file";
`tpcli --help` lists whole sentences; the demo says its weights are random."""

from __future__ import annotations

import io
import re
from pathlib import Path

from conftest import run_main
from rich.console import Console

from tpcli import render

ROOT = Path(__file__).resolve().parent.parent


def test_sharded_folder_checkpoint_line_explains_the_extra_elements(model_dirs, tmp_path, monkeypatch, capsys):
    from tpcli.commands.shard import shard_checkpoint

    shard_checkpoint(str(model_dirs("qwen3")), tp=2, out=str(tmp_path / "tp2"))  # tied: both names stored
    rc, out, _ = run_main(monkeypatch, capsys, "inspect", tmp_path / "tp2")
    params = int(re.search(r"parameters ([\d,]+)", out).group(1).replace(",", ""))
    (line,) = [ln for ln in out.splitlines() if "checkpoint:" in ln]
    stored = int(re.search(r"F32 ([\d,]+)", line).group(1).replace(",", ""))
    assert rc == 0 and stored > params
    assert "2 safetensors files" in line and "elements stored by dtype" in line
    assert f"({stored - params:,} more than the model's parameters: tied weights stored under each name" in line
    rc, out, _ = run_main(monkeypatch, capsys, "inspect", model_dirs("qwen3"))
    (line,) = [ln for ln in out.splitlines() if "checkpoint:" in ln]
    assert "1 safetensors file," in line and "more than" not in line  # the original stores the tied weight once


def test_shard_summary_says_1_rank_file(monkeypatch):
    buf = io.StringIO()
    monkeypatch.setattr(render, "console", Console(file=buf, width=render.UNLIMITED, force_terminal=False))
    render.render_shard({"out": "/o", "tp_size": 1, "tensors": 3, "bytes_written": 2048, "seconds": 0.1,
                         "files": {"shard-00001-model-00001-of-00001.safetensors": {"bytes": 2048, "sha256": "0" * 64}},
                         "unexpected_keys": [], "warnings": []})
    assert "1 rank file, 2.00 KiB" in buf.getvalue()


def test_gather_summary_says_1_file(monkeypatch):
    buf = io.StringIO()
    monkeypatch.setattr(render, "console", Console(file=buf, width=render.UNLIMITED, force_terminal=False))
    render.render_gather({"out": "/m", "tensors": 3, "source_kind": "tpcli", "files": ["model.safetensors"],
                          "bytes_written": 2048, "seconds": 0.1, "saved_by": {"description": "tp=2", "mesh": "tp=2"}})
    assert "1 file, 2.00 KiB" in buf.getvalue()


def test_the_progress_bar_counts_in_binary_units_as_the_summary(monkeypatch):
    buf = io.StringIO()
    monkeypatch.setattr(render, "err_console", Console(file=buf, force_terminal=True, width=120, color_system=None))
    with render.progress_bar(total=5 * 2**20, description="shard") as bar:
        bar.advance(3 * 2**20)
    drawn = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", buf.getvalue())
    assert "3.0/5.0 MiB" in drawn, drawn
    assert not re.search(r"\d MB\b", drawn), drawn


def test_help_lists_whole_command_summaries(monkeypatch, capsys):
    from tpcli.cli import SHORT_HELP

    monkeypatch.setenv("COLUMNS", "80")
    rc, out, _ = run_main(monkeypatch, capsys, "--help")
    assert rc == 0
    commands = out[out.index("Commands:"):]
    assert "..." not in commands and "…" not in commands
    flat = " ".join(commands.split())
    for name, text in SHORT_HELP.items():
        assert f"{name} {text}" in flat, (name, commands)


def test_the_demo_says_its_weights_are_random():
    make = (ROOT / "Makefile").read_text()
    demo = make[make.index("\ndemo:"):make.index("\n\n", make.index("\ndemo:"))]
    assert "random" in demo and demo.index("random") < demo.index("tpcli.examples.generate")
