"""The layout's rules, read from the source (every import, function-level ones too): no import cycle between the
modules of trainer/, scorers/, reward_servers/ and protocol/; the packages' dependencies point one way
(``scorers``, the reward models and the shapes world, is imported by the trainer and by the server and imports
neither; the trainer never imports the server); and protocol/ (the wire contract, imported by clients that
have no GPU stack) never imports torch, itself or through a project module it imports."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("trainer", "scorers", "reward_servers", "protocol")


def project_modules() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the project's packages (a package is its __init__.py)."""
    modules = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join(parts)] = path
    return modules


def imports(module: str, path: Path, modules: dict[str, Path]) -> tuple[set[str], set[str]]:
    """What ``module`` imports anywhere in its file: the project modules (``from a.b import c`` is the module
    a.b.c when there is one, else a.b, where c is a name) and every dotted name, relative imports resolved."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    targets, names = set(), set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
            targets.update(project_module_of(alias.name, modules) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            names.add(base)
            for alias in node.names:
                full = f"{base}.{alias.name}"
                targets.add(full if full in modules else project_module_of(base, modules))
    return targets - {None, module}, names


def project_module_of(name: str, modules: dict[str, Path]) -> str | None:
    """The project module a dotted name is or lies in (None outside the project)."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def import_graph() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """Each module's imported project modules (the edges), and every dotted name it imports."""
    modules = project_modules()
    found = {module: imports(module, path, modules) for module, path in modules.items()}
    return {m: targets for m, (targets, _) in found.items()}, {m: names for m, (_, names) in found.items()}


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One import cycle (its modules in order, the first repeated at the end), or None."""
    state: dict[str, str] = {}  # "open" on the current path, "done" when every path from it is searched
    path: list[str] = []

    def search(module: str) -> list[str] | None:
        state[module] = "open"
        path.append(module)
        for target in sorted(edges.get(module, ())):
            if state.get(target) == "open":
                return path[path.index(target) :] + [target]
            if target not in state and (cycle := search(target)):
                return cycle
        state[module] = "done"
        path.pop()
        return None

    for module in sorted(edges):
        if module not in state and (cycle := search(module)):
            return cycle
    return None


def test_the_project_modules_import_no_cycle():
    edges, _ = import_graph()
    assert {"trainer.families.models", "trainer.config.presets", "scorers.scorer", "protocol.client"} <= set(edges)
    assert "trainer.config.presets" in edges["trainer.config"]  # imported inside a method
    assert "trainer.families.tiny_pipeline" in edges["trainer.families.models"]  # from trainer.families import it
    cycle = find_cycle(edges)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_find_cycle_reports_the_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_protocol_never_imports_torch():
    edges, names = import_graph()
    reached, todo = set(), [m for m in edges if m == "protocol" or m.startswith("protocol.")]
    while todo:  # every project module protocol/ imports, directly or through another
        module = todo.pop()
        if module not in reached:
            reached.add(module)
            todo.extend(edges[module])
    torch_users = sorted(m for m in reached if any(n == "torch" or n.startswith("torch.") for n in names[m]))
    assert not torch_users, f"protocol/ imports torch through {torch_users}"


@pytest.mark.parametrize(
    ("package", "forbidden"),
    [
        ("trainer", "reward_servers"),
        ("scorers", "reward_servers"),
        ("scorers", "trainer"),
    ],
)
def test_package_does_not_import(package, forbidden):
    _, names = import_graph()
    offenders = sorted(
        f"{m}: {n}"
        for m, found in names.items()
        if m == package or m.startswith(package + ".")
        for n in found
        if n == forbidden or n.startswith(forbidden + ".")
    )
    assert not offenders, f"{package}/ imports {forbidden}: {offenders}"


def test_the_check_sees_function_level_imports():
    _, names = import_graph()
    assert "scorers.scorer" in names["trainer.tools.before_after"]  # imports create_scorer inside a function


def _algorithm_of(module: str) -> str | None:
    """The algorithm folder a module lies in (trainer.algorithms.<name>...), or None."""
    parts = module.split(".")
    return (
        parts[2] if len(parts) > 3 or (len(parts) == 3 and (ROOT / "trainer/algorithms" / parts[2]).is_dir()) else None
    )


def test_algorithms_never_import_each_other():
    """Each algorithm is its own folder (trainer/algorithms/<name>/): what two share lives outside every
    algorithm's folder (the shared engine), so adding or removing one
    touches no other."""
    edges, _ = import_graph()
    crossing = sorted(
        f"{m} -> {t}"
        for m, targets in edges.items()
        if _algorithm_of(m)
        for t in targets
        if _algorithm_of(t) and _algorithm_of(t) != _algorithm_of(m)
    )
    assert {"ddpo", "forward", "dpo", "refl"} <= {_algorithm_of(m) for m in edges if _algorithm_of(m)}
    assert not crossing, f"an algorithm imports another: {crossing}"


def test_the_shared_engine_names_no_algorithm():
    """Outside trainer/algorithms/, ``cfg.algorithm`` is only the key of the one dispatch,
    ``ALGORITHMS[cfg.algorithm]``: no ``cfg.algorithm == "ddpo"`` test, no ``getattr(cfg, cfg.algorithm)``."""
    offenders = []
    for module, path in project_modules().items():
        if not module.startswith("trainer") or module.startswith("trainer.algorithms"):
            continue
        tree = ast.parse(path.read_text(), str(path))
        keys = {
            id(node.slice)
            for node in ast.walk(tree)
            if isinstance(node, ast.Subscript) and isinstance(node.value, ast.Name) and node.value.id == "ALGORITHMS"
        }
        offenders += [
            f"{path.relative_to(ROOT)}:{node.lineno}"
            for node in ast.walk(tree)
            if isinstance(node, ast.Attribute) and node.attr == "algorithm" and id(node) not in keys
        ]
    assert not offenders, f"the shared engine tests the algorithm: {offenders}"


ENTRY_POINTS = ("trainer.evaluate", "trainer.before_after", "trainer.label")  # the commands, kept where they were


def test_nothing_that_trains_imports_the_tools():
    """trainer/tools/ holds the command lines run by hand; the training code never imports them. Only the
    modules that keep the documented commands (``python -m trainer.before_after``, ``trainer.label``) start them
    (``trainer.evaluate`` by name, in its ``__main__`` block: trainer.tools.evaluate imports it)."""
    edges, _ = import_graph()
    assert {"trainer.tools.evaluate", "trainer.tools.label", "trainer.tools.shapes_model"} <= set(edges)
    offenders = sorted(
        f"{m} -> {t}"
        for m, targets in edges.items()
        if not m.startswith("trainer.tools") and m not in ENTRY_POINTS
        for t in targets
        if t.startswith("trainer.tools")
    )
    assert not offenders, f"the training code imports a tool: {offenders}"


@pytest.mark.parametrize("command", ENTRY_POINTS)
def test_the_documented_commands_start_their_tools(command):
    import subprocess
    import sys

    shown = subprocess.run([sys.executable, "-m", command, "--help"], capture_output=True, text=True, timeout=120)
    assert shown.returncode == 0 and f"usage: python -m {command} " in shown.stdout, shown.stderr[-2000:]
