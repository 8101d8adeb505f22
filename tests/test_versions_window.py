"""The tested window is what CI proves: `make install` pins the lowest transformers of tpcli/versions.py and
`make test-newest` (run by .ci/run) the newest; pyproject declares the license as an SPDX string."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tpcli import versions

ROOT = Path(__file__).parents[1]


def _make_var(text: str, name: str) -> str:
    return re.search(rf"^{name}\s*\?=\s*(\S+)", text, re.M).group(1)


def test_ci_runs_both_ends_of_the_transformers_window():
    low, high = versions.TESTED["transformers"]
    makefile = (ROOT / "Makefile").read_text()
    assert f'"transformers=={low}.*"' in makefile  # `make install`: the lowest
    assert _make_var(makefile, "TRANSFORMERS_NEWEST") == f"{high}.*"  # `make test-newest`: the newest
    ci = (ROOT / ".ci" / "run").read_text().split()
    assert ci.index("test-newest") > ci.index("test")


def test_pyproject_license_is_an_spdx_string():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["license"] == "Apache-2.0"
