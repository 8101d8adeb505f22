"""Rendering on a narrow (80-column) console and in pipes: in a pipe identifiers stay whole, at 80 columns the
tables fit, nothing is cut with "…", columns are labelled and explained, a pipe gets full hashes and no empty line
from a progress bar (terminals of 80 and 50 columns: tests/test_terminal_width.py)."""

from __future__ import annotations

import io
import re
import subprocess
import sys

import pytest
from conftest import base_env
from rich.console import Console

from tpcli import render, render_inspect


@pytest.fixture
def narrow(monkeypatch):
    """render's stdout console as an 80-column non-terminal (a log of a narrow terminal): returns its text."""
    buf = io.StringIO()
    monkeypatch.setattr(render, "console", Console(file=buf, width=80, force_terminal=False, soft_wrap=True))
    return buf.getvalue


def _identifiers(report: dict) -> set[str]:
    names = {r["rule"] for r in report["plan"]} | {r["style"] for r in report["plan"]}
    names |= {g["pattern"] for g in report["tp"]["groups"]} | {g["placement"] for g in report["tp"]["groups"]}
    for f in report["tp"]["findings"]:
        names |= set(re.findall(r"[A-Za-z_][\w*]*(?:\.[\w*]+)+", f["message"])) | {f["code"]}
    return names


def test_identifiers_stay_whole_in_a_pipe_and_tables_fit_80_columns(model_dirs, narrow, monkeypatch):
    from tpcli.commands.inspect import inspect_model

    report = inspect_model(str(model_dirs("qwen3")), tp=3)  # invalid at 3: long findings, uneven shapes
    render_inspect.render_inspect(report)
    tables = [line for line in narrow().splitlines() if not line.startswith(("  ", "Coverage"))]  # prose apart
    assert tables and max(len(line) for line in tables) <= 80, [len(line) for line in tables]
    assert "…" not in narrow()
    buf = io.StringIO()
    monkeypatch.setattr(render, "console", Console(file=buf, width=render.UNLIMITED, force_terminal=False))
    render_inspect.render_inspect(report)
    out = buf.getvalue()
    names = _identifiers(report)
    assert "model.layers.*.post_attention_layernorm.weight" in names and "replicated_with_grad_allreduce" in names
    assert [n for n in names if n not in out] == []
    assert "…" not in out
    for g in report["tp"]["groups"]:  # every shape whole too
        assert all(render.shape(s) in out for s in [g["global_shape"], *(s["shape"] for s in g["local_shapes"])])
    assert "matches: modules and parameters the rule applies to" in out  # the plan table's columns explained


def test_numerics_table_labels_its_verdict_column(narrow):
    n = {"world_size": 2, "dtype": "float32", "tolerance": 1e-5, "tokens_equal": True, "first_bad": None,
         "layers": [{"name": "layer 0", "max_abs": 2e-7, "max_rel": 1e-7}],
         "logits": {"max_abs": 3e-4, "max_rel": 1e-4}}
    render.render_verify({"ok": False, "mode": "static", "architecture": "X", "tp": 2, "plan_source": "p",
                          "findings": [], "numerics": n})
    out = narrow()
    header = next(ln for ln in out.splitlines() if "max abs err" in ln)
    assert "within tolerance" in header
    assert re.search(r"layer 0 .* yes", out) and re.search(r"logits .* no", out)


@pytest.mark.e2e
def test_piped_shard_prints_full_hashes_and_no_empty_stderr_line(model_dirs, tmp_path):
    out = tmp_path / "tp2"
    proc = subprocess.run([sys.executable, "-m", "tpcli", "shard", str(model_dirs("qwen3")), "--tp", "2", "--out",
                           str(out)], capture_output=True, text=True, env=base_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert [ln for ln in proc.stderr.splitlines() if not ln.strip()] == [], repr(proc.stderr)  # no bar's blank line
    hashes = re.findall(r"sha256 (\S+)", proc.stdout)
    assert len(hashes) == 2 and all(re.fullmatch(r"[0-9a-f]{64}", h) for h in hashes), proc.stdout


def test_tied_finding_says_what_the_files_hold(model_dirs, tmp_path):
    from safetensors import safe_open

    from tpcli.commands.inspect import inspect_model
    from tpcli.commands.shard import shard_checkpoint

    report = inspect_model(str(model_dirs("qwen3")), tp=2)
    (tied,) = [f["message"] for f in report["tp"]["findings"] if f["code"] == "tied"]
    assert "each rank file stores both names" in tied
    out = tmp_path / "tp2"
    shard_checkpoint(str(model_dirs("qwen3")), tp=2, out=str(out))
    for f in sorted(out.glob("shard-*.safetensors")):  # what the message claims
        with safe_open(str(f), "pt") as h:
            assert {"lm_head.weight", "model.embed_tokens.weight"} <= set(h.keys())
