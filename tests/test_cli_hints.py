"""Hints that lead somewhere: an unknown style lists the styles and suggests the closest; an invalid --tp names the
valid sizes (tests/test_cli_contract.py covers it with run's flag typos and `run generate.py`)."""

from __future__ import annotations

import json

import pytest
from conftest import run_main

from tpcli.planning.placements import KNOWN_STYLES


@pytest.mark.parametrize("style,closest", [("colwize", "colwise"), ("rowise", "rowwise"), ("diagonal", None)])
def test_unknown_style_lists_styles_and_suggests_the_closest(model_dirs, tmp_path, monkeypatch, capsys, style, closest):
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"model.layers.*.mlp.up_proj": style}))
    rc, out, err = run_main(monkeypatch, capsys, "inspect", model_dirs("qwen3"), "--plan", plan)
    assert rc == 1 and out == ""
    (line,) = err.strip().splitlines()
    assert f"unknown style {style!r}" in line
    assert (f"(did you mean {closest!r}?)" in line) if closest else "did you mean" not in line
    listed = line.split("known styles: ", 1)[1].rstrip(".").split(", ")
    assert sorted(listed) == sorted(KNOWN_STYLES)


def test_unknown_style_in_a_library_plan_suggests_too(tmp_path):
    from tpcli.errors import PlanError
    from tpcli.planning import plans_library

    doc = json.loads((plans_library.PLANS_DIR / "gpt2.json").read_text())
    rule = next(iter(doc["tp_plan"]))
    doc["tp_plan"][rule] = "conv1d_colwize"
    path = tmp_path / "gpt2-typo.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(PlanError, match=r"\(did you mean 'conv1d_colwise'\?\); known styles: "):
        plans_library.load_spec(str(path))


def test_preflight_counts_one_warning_in_the_singular(model_dirs):
    from tpcli.commands.run import LaunchSpec, preflight_model

    (note,) = preflight_model(LaunchSpec(script="x.py", cpu=2, model=str(model_dirs("qwen3"))))  # uneven vocab only
    assert note.endswith("plan OK at tp=2 (1 warning, see `tpcli verify`)"), note


def test_module_arguments_that_look_like_flags_reach_the_module(monkeypatch, capsys):
    """`run -m MODULE --prompt x`: --prompt is the module's, not a mistyped run flag (the demo's own command)."""
    from tpcli.commands import run as run_mod

    seen = {}

    class Done:
        exit_code = 0

    monkeypatch.setattr(run_mod, "run_job", lambda spec, report: seen.setdefault("spec", spec) and Done())
    rc, _, err = run_main(monkeypatch, capsys, "run", "--cpu", "2", "-m", "tpcli.examples.generate", "--prompt",
                          "Tensor parallel", "--max-new-tokens", "12")
    assert rc == 0, err
    assert seen["spec"].module == "tpcli.examples.generate"
    assert seen["spec"].args == ["--prompt", "Tensor parallel", "--max-new-tokens", "12"]
