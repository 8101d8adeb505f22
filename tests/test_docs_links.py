"""The docs hold together: every relative link in README.md and docs/*.md names a file that exists and, with a
`#anchor`, a heading of that file (GitHub's slugs); the README stays a first screen and a tour (<= 200 lines)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")  # [text](target), not images


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, markup and punctuation dropped, spaces to hyphens."""
    text = re.sub(r"`|\*\*|\[|\]\([^)]*\)", "", heading.strip()).lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """Every heading's slug, with GitHub's -1, -2 suffixes for repeats; fenced code is not a heading."""
    seen: dict[str, int] = {}
    out = set()
    fenced = False
    for line in page.read_text().splitlines():
        if line.startswith("```"):
            fenced = not fenced
        m = None if fenced else re.match(r"^#{1,6} (.+)$", line)
        if m:
            s = slug(m.group(1))
            out.add(s if s not in seen else f"{s}-{seen[s]}")
            seen[s] = seen.get(s, 0) + 1
    return out


def links(page: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)  # links in code blocks are code
    text = re.sub(r"`[^`\n]*`", "", text)
    return LINK.findall(text)


def broken(page: Path, root: Path = ROOT) -> list[str]:
    bad = []
    for target in links(page):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto: ...: not checked offline
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            bad.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            bad.append(f"{target}: no heading #{anchor} in {dest.relative_to(root)}")
    return bad


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(page):
    assert links(page) or page.name != "README.md"
    assert broken(page) == []


def test_the_checker_catches_a_broken_file_and_anchor(tmp_path):
    (tmp_path / "a.md").write_text("# A page\n\n## Its `part`: one\n\n[ok](#its-part-one) [ok](b.md) [ok](b.md#b)\n"
                                   "[no file](c.md) [no anchor](b.md#nothing) `[code](d.md)`\n")
    (tmp_path / "b.md").write_text("# B\n")
    assert broken(tmp_path / "a.md", tmp_path) == ["c.md: no such file", "b.md#nothing: no heading #nothing in b.md"]


def test_readme_is_a_first_screen_not_the_reference():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 200, f"README.md has {len(lines)} lines; move reference text into docs/"
    setup = "\n".join(lines[:40])
    assert "make install demo" in setup and "make test-quick" in setup and "make test " in setup
    for page in ("cli", "memory-and-meshes", "python-api", "formats", "gpu", "performance", "development"):
        assert (ROOT / "docs" / f"{page}.md").is_file()
        assert f"docs/{page}.md" in "\n".join(lines), f"README does not link docs/{page}.md"
