"""The package's shape: arrows point down, modules stay readable, the command line starts without torch."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "paramsal"

#: What each part of the package may import from paramsal (besides itself): cli -> analyses -> engine -> kernels.
BASE = {"paramsal.errors", "paramsal.options", "paramsal._io", "paramsal._lazy", "paramsal._typing",
        "paramsal._version"}
ALLOWED = {
    "kernels": BASE,
    "engine": BASE | {"paramsal.kernels"},
    "zoo": BASE,
    # the oracles sit beside the analyses they check (the pruned copy shares the unit editor's map of layers)
    "reference": BASE | {"paramsal.kernels", "paramsal.engine", "paramsal.analyses"},
    "analyses": BASE | {"paramsal.kernels", "paramsal.engine", "paramsal.zoo"},
    "bench": BASE | {"paramsal.kernels", "paramsal.engine", "paramsal.zoo"},
}

#: A module may be longer than this if its docstring says why.
MAX_LINES = 400


def modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


def imported(path: Path) -> set[str]:
    """Every paramsal module a file imports, at the top or inside functions (``TYPE_CHECKING`` blocks too)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return {name for name in names if name == "paramsal" or name.startswith("paramsal.")}


@pytest.mark.parametrize("part", sorted(ALLOWED))
def test_imports_point_down(part):
    wrong = []
    for path in sorted((PACKAGE / part).rglob("*.py")):
        for name in imported(path):
            if name.startswith(f"paramsal.{part}") or any(name == a or name.startswith(a + ".") for a in ALLOWED[part]):
                continue
            wrong.append(f"{path.relative_to(PACKAGE.parent)} imports {name}")
    assert wrong == []


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
