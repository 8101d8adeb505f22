"""Under --json an error is also one JSON object on stdout ({"error", "exit_code", "kind"}), besides the one-line
text on stderr: a program that reads stdout always gets JSON. Without --json stdout stays empty."""

from __future__ import annotations

import json

import pytest
from conftest import run_main

# (argv with MODEL/OUT placeholders, exit code, kind)
CASES = [
    (["inspect", "MODEL", "--tpp", "2", "--json"], 2, "usage"),  # click's usage error
    (["verify", "MODEL", "--tp", "0", "--json"], 2, "usage"),  # tpcli's UsageError
    (["inspect", "MODEL", "--plan", "/no/such/plan.json", "--json"], 1, "PlanError"),
    (["shard", "MODEL", "--tp", "3", "--out", "OUT", "--json"], 1, "PlanError"),
    (["gather", "MODEL", "--out", "OUT", "--json"], 1, "CheckpointError"),
]


@pytest.mark.parametrize("argv,code,kind", CASES, ids=[" ".join(c[0][:2]) + f" {c[2]}" for c in CASES])
def test_error_under_json_is_a_json_object_on_stdout(model_dirs, tmp_path, monkeypatch, capsys, argv, code, kind):
    subs = {"MODEL": str(model_dirs("qwen3")), "OUT": str(tmp_path / "out")}
    rc, out, err = run_main(monkeypatch, capsys, *[subs.get(a, a) for a in argv])
    assert rc == code
    doc = json.loads(out)  # the whole of stdout is one JSON document
    line = [ln for ln in err.splitlines() if ln.startswith("Error: ")]
    assert line == [f"Error: {doc['error']}"], err
    assert doc["exit_code"] == code and doc["kind"] == kind

    rc, out, err = run_main(monkeypatch, capsys, *[subs.get(a, a) for a in argv if a != "--json"])
    assert rc == code and out == "" and err.count("Error: ") == 1


def test_json_after_the_script_belongs_to_the_script(tmp_path, monkeypatch, capsys):
    """`run SCRIPT --json`: the script's flag, not tpcli's: the error (no such file) stays text only."""
    rc, out, err = run_main(monkeypatch, capsys, "run", "--cpu", "1", str(tmp_path / "missing.py"), "--json")
    assert rc == 2 and out == "" and "missing.py: no such file" in err
