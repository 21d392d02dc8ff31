"""The packages' dependencies point one way: ``scorers`` (the reward models and the shapes world) is imported by
the trainer and by the server, and imports neither; the trainer never imports the server (``reward_servers``).
Every import counts, the ones inside functions too."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _imports(path: Path) -> set[str]:
    """Every module ``path`` imports, anywhere in it (absolute names; a relative import as its package's)."""
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level else ""
            module = ".".join(part for part in (base, node.module) if part)
            names.add(module)
            names.update(f"{module}.{alias.name}" for alias in node.names)
    return names


def _offenders(package: str, forbidden: str) -> list[str]:
    files = sorted((ROOT / package).rglob("*.py"))
    assert files, f"no Python files under {package}/"
    return [f"{path.relative_to(ROOT)}: {name}" for path in files for name in sorted(_imports(path))
            if name == forbidden or name.startswith(forbidden + ".")]


@pytest.mark.parametrize(("package", "forbidden"), [
    ("trainer", "reward_servers"),
    ("scorers", "reward_servers"),
    ("scorers", "trainer"),
])
def test_package_does_not_import(package, forbidden):
    assert not _offenders(package, forbidden), f"{package}/ imports {forbidden}"


def test_the_check_sees_function_level_imports():
    path = ROOT / "trainer" / "sample.py"  # imports create_scorer inside a function
    assert "scorers.scorer.create_scorer" in _imports(path)
