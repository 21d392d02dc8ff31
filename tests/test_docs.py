"""The README is a short front door and every relative link in it and in docs/ leads somewhere: the file exists
and, for a link with an anchor, the page has a heading of that name (GitHub's slugs)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [
    ROOT / "README.md",
    *sorted((ROOT / "docs").glob("*.md")),
    ROOT / "deploy/README.md",
    ROOT / "protocol/README.md",
]


def _slug(heading: str) -> str:
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    anchors, fenced = set(), False
    for line in page.read_text().splitlines():
        fenced ^= line.startswith("```")
        if not fenced and line.startswith("#"):
            anchors.add(_slug(line.lstrip("#")))
    return anchors


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(page):
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
        if target.startswith(("http://", "https://", "mailto:")):
            continue
        path, _, anchor = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        if not linked.exists():
            broken.append(f"{target}: no such file")
        elif anchor and anchor not in _anchors(linked):
            broken.append(f"{target}: no heading #{anchor}")
    assert not broken, broken


def test_the_readme_is_a_short_front_door():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 200
    assert "](bench/figures/shapes_sd3_before_after.png)" in readme
    # .ci/run installs exactly as the README says and runs its test command
    ci = (ROOT / ".ci/run").read_text()
    for command in ("pip install torch==2.13.0", "pip install -e '.[dev]' -c constraints.txt", "python -m pytest -q"):
        assert command in ci and command in readme


def test_the_readme_table_names_every_preset():
    from trainer.config.presets import PRESETS

    readme = (ROOT / "README.md").read_text()
    missing = [name for name in PRESETS if not name.endswith("-1gpu") and f"`{name}`" not in readme]
    assert not missing, f"presets missing from the README's table: {missing}"
