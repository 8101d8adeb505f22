"""Output fits the terminal: in an 80- or 50-column terminal no line is wider than the terminal (tables fold their
cells at the joints of names, prose wraps between words; only a single word longer than a line, a path, is left
whole), nothing ends in "…"; in a pipe nothing is folded or wrapped at all (COLUMNS ignored)."""

from __future__ import annotations

import fcntl
import io
import os
import pty
import re
import struct
import subprocess
import sys
import termios

import pytest
from conftest import base_env
from rich.table import Table

from tpcli import render, render_inspect
from tpcli.fit_width import FittingConsole, fit_table, fold_points

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07")


def too_wide(text: str, width: int) -> list[str]:
    """Lines wider than `width` that are not one single word (a path or a hash the terminal has to wrap)."""
    return [line for line in text.splitlines() if len(line) > width and len(line.split()) > 1]


def test_fold_points_cut_after_joints_else_at_the_width():
    name = "model.layers.*.self_attn.q_proj"
    cuts = fold_points(name, 20)
    pieces = [name[a:b] for a, b in zip([0, *cuts], [*cuts, len(name)], strict=True)]
    assert pieces == ["model.layers.*.self_", "attn.q_proj"]
    assert fold_points("abcdefghij", 4) == [4, 8] and fold_points("short", 10) == []


def test_a_table_folds_to_the_width_keeping_every_character():
    table = Table(title="TP plan")
    render.identifier_column(table, "rule", ["model.layers.*.self_attn.q_proj"])
    render.identifier_column(table, "style", ["replicated_with_grad_allreduce"])
    table.add_column("bytes sharded", justify="right")
    table.add_row("model.layers.*.self_attn.q_proj", "replicated_with_grad_allreduce", "250.25 KiB")
    for width in (80, 50, 30):
        buf = io.StringIO()
        FittingConsole(file=buf, width=width, force_terminal=False).print(fit_table(table, width))
        out = buf.getvalue()
        assert max(len(line) for line in out.splitlines()) <= width, out
        assert "…" not in out and "250.25 KiB" in out  # a number is not folded while the names can give way
        lines = out.splitlines()
        body = lines[next(i for i, line in enumerate(lines) if "─" in line or "━" in line) + 1:]
        rule = "".join(line.split()[0].strip("│┃") for line in body if line.strip("│┃└─┴┘ "))  # the first column
        assert rule.startswith("model.layers.*.self_attn.q_proj"), out  # every character, in order


def test_prose_wraps_between_words_in_a_terminal_only():
    line = "  largest replicated: " + ", ".join(f"model.layers.{i}.post_attention_layernorm.weight (64) 256 B"
                                               for i in range(3))
    buf = io.StringIO()
    FittingConsole(file=buf, width=50, force_terminal=True, color_system=None).print(line)
    wrapped = buf.getvalue().splitlines()
    assert len(wrapped) > 1 and all(len(x) <= 50 for x in wrapped)
    assert " ".join(x.strip() for x in wrapped) == line.strip()  # cut at spaces only: every name whole
    buf = io.StringIO()
    FittingConsole(file=buf, width=render.UNLIMITED, force_terminal=False).print(line)
    assert buf.getvalue() == line + "\n"


def test_mesh_fit_prose_is_one_line_in_a_pipe(monkeypatch):
    """The fit's ranking rule and the from_pretrained call were hard-wrapped at 78 characters even in a pipe."""
    buf = io.StringIO()
    monkeypatch.setattr(render, "console", FittingConsole(file=buf, width=render.UNLIMITED, force_terminal=False))
    rule = "fitting first; fewest ranks per model copy (tp x fsdp; the rest are replicas), TP before FSDP, " * 2
    mesh = {"tp": 1, "fsdp": 1, "dp_replicate": 4, "ep": 1, "total_bytes": 2**20, "fits": True}
    script = "tpcli.load_model() loads on this mesh; or from_pretrained(..., distributed_config=DistributedConfig(" \
             "tp_size=1, fsdp_size=1, dp_replicate_size=4, ep_size=1))"
    render_inspect.render_mesh_fit({"fit": {"gpus": 4, "gpus_per_node": 4, "gpu_mem_bytes": 2**30, "reserve_bytes": 0,
                                    "rule": rule, "meshes": [mesh], "refused_by_model": 0,
                                    "best": {**mesh, "run_flags": f"--gpus 4 --dp-replicate 4  # {script}"}}})
    lines = buf.getvalue().splitlines()
    assert f"  ranked: {rule}" in lines and f"  {script}" in lines


def _in_a_terminal(args: list[str], columns: int, cache: str) -> str:
    """Run `tpcli ARGS` with stdout on a pseudo-terminal of `columns` columns (and COLUMNS set); its output."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, columns, 0, 0))
    env = {**base_env(), "COLUMNS": str(columns), "TERM": "xterm", "TPCLI_CACHE_DIR": cache}
    proc = subprocess.Popen([sys.executable, "-m", "tpcli", *args], stdin=slave, stdout=slave,
                            stderr=subprocess.DEVNULL, env=env)
    os.close(slave)
    chunks = []
    while True:
        try:
            chunk = os.read(master, 1 << 16)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(master)
    assert proc.wait(timeout=300) in (0, 1)
    return ANSI.sub("", b"".join(chunks).decode()).replace("\r\n", "\n")


@pytest.mark.e2e
def test_inspect_fits_80_and_50_column_terminals_and_is_whole_in_a_pipe(model_dirs, tmp_path):
    args = ["inspect", str(model_dirs("qwen3")), "--tp", "3", "--seq-len", "64", "--train", "--gpu-mem", "4GiB"]
    cache = str(tmp_path / "cache")  # the first run fills it: the later ones take well under a second
    piped = subprocess.run([sys.executable, "-m", "tpcli", *args], capture_output=True, text=True, timeout=300,
                           env={**base_env(), "COLUMNS": "50", "TPCLI_CACHE_DIR": cache})
    assert piped.returncode == 1, piped.stderr  # tp=3 is invalid for this model: the report, then exit 1
    rows = [line for line in piped.stdout.splitlines() if "model.layers.*.self_attn.q_proj" in line]
    assert any("colwise" in line and "│" in line for line in rows), piped.stdout  # a whole row on one line
    assert max(len(line) for line in piped.stdout.splitlines()) > 100  # natural width, COLUMNS ignored
    for columns in (80, 50):
        out = _in_a_terminal(args, columns, cache)
        assert "TP plan" in out and "Per-rank shapes at tp=3" in out and "Checks at tp=3" in out, out
        assert too_wide(out, columns) == [], out
        assert "…" not in out
