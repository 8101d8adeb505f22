"""Silent waits: in a terminal a status line on stderr says what a command is doing (loading transformers,
building the model, starting N workers) from the start; never in a pipe or under --json."""

from __future__ import annotations

import io
import json
import subprocess
import sys

import pytest
from conftest import base_env, run_main
from rich.console import Console

from tpcli import render


@pytest.fixture
def terminal(monkeypatch):
    """render's stderr console as a terminal writing into a buffer: returns its text."""
    buf = io.StringIO()
    monkeypatch.setattr(render, "err_console", Console(file=buf, force_terminal=True, width=120))
    return buf.getvalue


@pytest.mark.parametrize("command", ["inspect", "verify"])
def test_terminal_shows_what_is_happening(model_dirs, monkeypatch, capsys, terminal, command):
    rc, out, _ = run_main(monkeypatch, capsys, command, model_dirs("llama"), "--tp", "2")
    assert rc == 0
    shown = terminal()
    assert "loading transformers…" in shown and "building the model (no weights)" in shown, shown


def test_json_shows_no_status(model_dirs, monkeypatch, capsys, terminal):
    rc, out, _ = run_main(monkeypatch, capsys, "verify", model_dirs("llama"), "--tp", "2", "--json")
    assert rc == 0 and json.loads(out)["ok"] and terminal() == ""


@pytest.mark.e2e
def test_a_pipe_shows_no_status(model_dirs, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "tpcli", "shard", str(model_dirs("llama")), "--tp", "2", "--out",
                           str(tmp_path / "o")], capture_output=True, text=True, env=base_env(), timeout=300)
    assert proc.returncode == 0 and "…" not in proc.stderr and "loading" not in proc.stderr, proc.stderr


FIRST = """
import json, sys
from rich.console import Console
from tpcli import cli
from tpcli import render
render.err_console = Console(file=open("/dev/null", "w"), force_terminal=True)
seen = []
shown = render.status_line.__call__
def record(self, text):
    seen.append([text, "torch" in sys.modules, "transformers" in sys.modules])
    shown(self, text)
render.status_line.__call__ = record
sys.argv = ["tpcli", *sys.argv[1:]]
try:
    cli.main()
except SystemExit:
    pass
print(json.dumps(seen), file=sys.__stderr__)
"""


@pytest.mark.e2e
@pytest.mark.parametrize("command", ["inspect", "verify", "shard"])
def test_first_status_comes_before_torch_is_imported(model_dirs, tmp_path, command):
    """Something is said at once, not after the seconds of importing torch and transformers."""
    args = [command, str(model_dirs("llama")), "--tp", "2"] + (["--out", str(tmp_path / "o")] if command == "shard"
                                                               else [])
    proc = subprocess.run([sys.executable, "-c", FIRST, *args], capture_output=True, text=True, env=base_env(),
                          timeout=300)
    seen = json.loads(proc.stderr.strip().splitlines()[-1])
    assert seen and seen[0][1:] == [False, False], seen
    assert any(text == "loading transformers" and not torch for text, torch, _ in seen), seen
