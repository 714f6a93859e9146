"""The package's shape: arrows point down, modules stay readable, the command line starts without torch."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "paramsal"

#: What each part of the package may import from paramsal (besides itself): cli -> analyses -> jobs -> rundir ->
#: ranking, and jobs -> engine -> kernels. The statistics and rankings are numpy over what a run's reader gives; the
#: run directory stores them and reads, never computes a profile; the bulk job joins the engine and the run.
BASE = {"paramsal.errors", "paramsal.options", "paramsal.config", "paramsal._io", "paramsal._arrow", "paramsal._lazy",
        "paramsal._typing", "paramsal._version"}
ALLOWED = {
    "kernels": BASE,
    "engine": BASE | {"paramsal.kernels"},
    "ranking": BASE,
    "rundir": BASE | {"paramsal.ranking"},
    "jobs": BASE | {"paramsal.kernels", "paramsal.engine", "paramsal.ranking", "paramsal.rundir"},
    "zoo": BASE,
    # the oracles sit beside the analyses they check (the pruned copy shares the unit editor's map of layers)
    "reference": BASE | {"paramsal.kernels", "paramsal.engine", "paramsal.ranking", "paramsal.analyses"},
    "analyses": BASE | {"paramsal.kernels", "paramsal.engine", "paramsal.ranking", "paramsal.rundir", "paramsal.jobs",
                        "paramsal.zoo"},
    "bench": BASE | {"paramsal.kernels", "paramsal.engine", "paramsal.ranking", "paramsal.rundir", "paramsal.jobs",
                     "paramsal.zoo"},
}

#: A module may be longer than this if its docstring says why.
MAX_LINES = 400


def modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


def imported(path: Path) -> set[str]:
    """Every paramsal module a file imports, at the top or inside functions (``TYPE_CHECKING`` blocks too)."""
    return {name for name in _all_imports(path) if name == "paramsal" or name.startswith("paramsal.")}


@pytest.mark.parametrize("part", sorted(ALLOWED))
def test_imports_point_down(part):
    wrong = []
    for path in sorted((PACKAGE / part).rglob("*.py")):
        for name in imported(path):
            if name.startswith(f"paramsal.{part}") or any(name == a or name.startswith(a + ".") for a in ALLOWED[part]):
                continue
            wrong.append(f"{path.relative_to(PACKAGE.parent)} imports {name}")
    assert wrong == []


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Each paramsal module and the paramsal modules it imports (``from pkg import sub`` counts as ``pkg.sub`` where
    ``sub`` is a module)."""
    known = {module_name(p) for p in modules()}
    graph: dict[str, set[str]] = {}
    for path in modules():
        edges = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                edges |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                subs = {f"{node.module}.{alias.name}" for alias in node.names} & known
                edges |= subs or {node.module}
        graph[module_name(path)] = {e for e in edges if e in known and e != module_name(path)}
    return graph


def test_there_is_no_import_cycle_anywhere():
    """Between modules, within a package or across packages (a package's ``__init__`` importing its own modules
    aside: it is what exports them)."""
    graph = import_graph()
    graph = {name: {e for e in edges if not (name.count(".") == 1 and e.startswith(name + "."))}
             for name, edges in graph.items()}
    state: dict[str, int] = {}
    cycles = []

    def visit(name: str, path: list[str]) -> None:
        state[name] = 1
        for target in sorted(graph.get(name, ())):
            if state.get(target) == 1:
                cycles.append(" -> ".join(path[path.index(target):] + [target]) if target in path else target)
            elif target not in state:
                visit(target, path + [target])
        state[name] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert cycles == []


def test_the_engine_computes_and_the_run_directory_stores():
    """No module of the engine imports pyarrow (files are the run directory's); none of the run directory imports
    torch at its top (it takes arrays; a reader of runs needs no torch)."""
    wrong = []
    for path in sorted((PACKAGE / "engine").rglob("*.py")):
        if any(name.split(".")[0] == "pyarrow" for name in _all_imports(path)):
            wrong.append(f"{path.name} imports pyarrow")
    for path in sorted((PACKAGE / "rundir").rglob("*.py")) + sorted((PACKAGE / "ranking").rglob("*.py")):
        if "torch" in _top_imports(path):
            wrong.append(f"{path.relative_to(PACKAGE)} imports torch")
    assert wrong == []


def _all_imports(path: Path) -> set[str]:
    """Every module a file imports, anywhere in it."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def _top_imports(path: Path) -> set[str]:
    names = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_no_module_is_long_without_a_reason():
    long = []
    for path in modules():
        lines = len(path.read_text().splitlines())
        docstring = ast.get_docstring(ast.parse(path.read_text())) or ""
        if lines > MAX_LINES and "longer than" not in docstring:
            long.append(f"{path.relative_to(PACKAGE.parent)}: {lines} lines")
    assert long == []


def test_the_command_line_starts_without_torch():
    script = ("import sys\nfrom paramsal.cli import build_parser\nparser = build_parser()\nparser.format_help()\n"
              "for action in parser._subparsers._group_actions[0].choices.values(): action.format_help()\n"
              "print(sorted(m for m in ('torch', 'numpy', 'pandas', 'matplotlib') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]", done.stdout
    assert subprocess.run([sys.executable, "-m", "paramsal", "--help"], capture_output=True).returncode == 0


@pytest.mark.parametrize("package", ["paramsal", "paramsal.analyses", "paramsal.reference"])
def test_lazy_public_names_are_listed_and_resolve(package):
    import importlib

    module = importlib.import_module(package)
    assert sorted(module.__all__) == sorted(set(module.__all__) | set(getattr(module, "_LAZY", {})))
    for name in module.__all__:
        assert getattr(module, name) is not None, name
