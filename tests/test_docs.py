"""The documentation is executed, not trusted: every Python example of README.md and docs/, the doctests of the API's
docstrings, and the tutorial notebook run here, and every relative link of the docs points at a file.

* A ```python block runs in one namespace per page, in page order, in a fresh working directory. A block is left
  out only when its info string says ```python skip, or the line above it is ``<!-- skip -->``: for examples that
  need a GPU, torchrun, the network or a user's own files.
* Doctests run on every module of the package whose docstrings hold ``>>>`` (found by reading the sources), with
  ELLIPSIS and NORMALIZE_WHITESPACE. An example may use, without defining them, the names of :func:`_doctest_names`:
  the demo model, 600 of its held-out images profiled into a run that records its specs, and a batch of them.
* The notebook runs on a kernel of this interpreter, installed into a temporary Jupyter path.
"""

from __future__ import annotations

import doctest
import importlib
import json
import re
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGES = [ROOT / "README.md", *sorted(DOCS.rglob("*.md"))]
NOTEBOOK = DOCS / "tutorial.ipynb"
README_MAX_LINES = 250

#: The modules whose examples run even before any of them holds one (the public entry points).
DOCTEST_MODULES = ("paramsal.engine.profile", "paramsal.jobs.bulk", "paramsal.config")

_FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})[ \t]*(?P<info>[^`\n]*?)[ \t]*$")
_SKIP_MARK = "<!-- skip -->"


def _blocks(page: Path) -> list[tuple[int, str, str]]:
    """Every fenced block of a page: (line of its first body line, 1-based; info string; dedented body)."""
    lines = page.read_text(encoding="utf-8").splitlines()
    found, i = [], 0
    while i < len(lines):
        opening = _FENCE.match(lines[i])
        if not opening:
            i += 1
            continue
        indent, fence, info = opening["indent"], opening["fence"], opening["info"]
        above = next((line.strip() for line in reversed(lines[:i]) if line.strip()), "")
        body, j = [], i + 1
        while j < len(lines):
            closing = _FENCE.match(lines[j])
            if closing and closing["fence"].startswith(fence[0]) and len(closing["fence"]) >= len(fence) \
                    and not closing["info"]:
                break
            body.append(lines[j][len(indent):] if lines[j].startswith(indent) else lines[j].lstrip())
            j += 1
        if above == _SKIP_MARK:
            info = f"{info} skip"
        found.append((i + 2, info, textwrap.dedent("\n".join(body))))
        i = j + 1
    return found


def _python_blocks(page: Path) -> list[tuple[int, str]]:
    """The page's Python examples that run: (first line, code)."""
    chosen = []
    for line, info, body in _blocks(page):
        words = info.replace("{", " ").replace("}", " ").replace(".", " ").split()
        if words and words[0] in ("python", "py") and "skip" not in words[1:]:
            chosen.append((line, body))
    return chosen


_PAGES_WITH_CODE = [page for page in PAGES if _python_blocks(page)]


@pytest.mark.parametrize("page", _PAGES_WITH_CODE, ids=[str(p.relative_to(ROOT)) for p in _PAGES_WITH_CODE])
def test_page_examples_run(page: Path, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MPLBACKEND", "Agg")
    namespace: dict = {"__name__": f"docs:{page.name}"}
    path = list(sys.path)
    try:
        for line, code in _python_blocks(page):
            # Padding the block to its place in the page makes a traceback name the page's own line numbers.
            source = "\n" * (line - 1) + code
            exec(compile(source, str(page), "exec"), namespace)
    finally:  # an example may import a module it wrote (a spec's factory): it leaves with the page
        sys.path[:] = path
        for name, module in list(sys.modules.items()):
            if str(getattr(module, "__file__", None) or "").startswith(str(tmp_path)):
                del sys.modules[name]


def _doctest_module_names() -> list[str]:
    """The modules whose docstrings hold an interactive example, by reading the package's sources."""
    names = set(DOCTEST_MODULES)
    for path in sorted((ROOT / "paramsal").rglob("*.py")):
        if ">>>" in path.read_text(encoding="utf-8"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            names.add(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return sorted(names)


@pytest.fixture(scope="module")
def _doctest_names(tmp_path_factory) -> dict:
    """Names a docstring example may use without defining them: ``model`` (the demo model), ``data`` (its first 600
    held-out images), ``run`` (them profiled, with features and with the specs that rebuild both recorded),
    ``images`` ``[8, 1, 28, 28]`` and ``labels`` ``[8]`` (the first 8 of them)."""
    import paramsal
    from paramsal.zoo.specs import first_samples, load_data, load_model

    model = load_model("demo")
    data = first_samples(load_data("demo:test"), 600)
    run = paramsal.profile_dataset(model, data, tmp_path_factory.mktemp("doctest") / "run", batch_size=64,
                                   features=True, progress=False, model_name="demo", data_name="demo:test",
                                   source={"model": "demo", "data": "demo:test", "limit": 600})
    images, labels = data.dataset.images[:8], data.dataset.labels[:8]
    return {"model": model, "data": data, "run": run, "images": images, "labels": labels}


@pytest.mark.parametrize("module_name", _doctest_module_names())
def test_docstring_examples_run(module_name: str, _doctest_names: dict, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    module = importlib.import_module(module_name)
    tests = [t for t in doctest.DocTestFinder(exclude_empty=True).find(module, module_name) if t.examples]
    if not tests:
        assert module_name in DOCTEST_MODULES
        pytest.skip(f"{module_name} has no docstring examples yet")
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    for test in tests:
        test.globs = {**_doctest_names, **test.globs}
        runner.run(test)
    result = runner.summarize(verbose=False)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples of {module_name} failed (above)"


def _python_kernel(prefix: Path) -> str:
    """A Jupyter kernel of this interpreter, installed under ``prefix``; returns its name."""
    from ipykernel.kernelspec import install

    name = "paramsal-docs"
    install(kernel_name=name, prefix=str(prefix))
    spec = json.loads((prefix / "share" / "jupyter" / "kernels" / name / "kernel.json").read_text())
    assert Path(spec["argv"][0]).resolve() == Path(sys.executable).resolve(), spec["argv"]
    return name


def test_tutorial_notebook_runs(tmp_path, monkeypatch) -> None:
    import nbclient
    import nbformat

    notebook = nbformat.read(NOTEBOOK, as_version=4)
    assert all(not cell.get("outputs") and not cell.get("execution_count")
               for cell in notebook.cells if cell.cell_type == "code"), "commit the notebook with its outputs cleared"
    kernel = _python_kernel(tmp_path / "jupyter")
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter" / "share" / "jupyter"))
    monkeypatch.setenv("TMPDIR", str(tmp_path))  # the notebook's run goes into a temporary folder: this one
    monkeypatch.setenv("MPLBACKEND", "Agg")
    work = tmp_path / "work"
    work.mkdir()
    nbclient.NotebookClient(notebook, timeout=600, kernel_name=kernel,
                            resources={"metadata": {"path": str(work)}}).execute()

    outputs = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs]
    errors = [output for output in outputs if output.output_type == "error"]
    assert not errors, "\n".join(f"{e.ename}: {e.evalue}" for e in errors)
    text = "\n".join(_text(output) for output in outputs)
    assert re.search(r"samples\s+600\b", text), text[:2000]
    assert "salient" in text and "random" in text and "least" in text, "the pruning summary is missing"
    report = re.search(r"^(\S+index\.html) True$", text, re.MULTILINE)
    assert report and Path(report.group(1)).is_file(), text[-2000:]
    assert str(tmp_path) in report.group(1)


def _text(output) -> str:
    if output.output_type == "stream":
        return output.text
    data = output.get("data", {})
    return data.get("text/plain", "") + data.get("text/html", "")


def test_readme_is_a_front_page() -> None:
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines; the manual lives in docs/"


_LINK = re.compile(r"!?\[[^\]\n]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_CODE = re.compile(r"^[ \t]*(`{3,}|~{3,}).*?^[ \t]*\1[ \t]*$|`[^`\n]+`", re.MULTILINE | re.DOTALL)


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_relative_links_resolve(page: Path) -> None:
    text = _CODE.sub("", page.read_text(encoding="utf-8"))
    broken = []
    for target in _LINK.findall(text):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.IGNORECASE) or target.startswith("#"):
            continue  # a URL, or an anchor of the page itself
        path = target.split("#", 1)[0].split("?", 1)[0]
        if not (page.parent / path).exists():
            broken.append(target)
    assert not broken, f"{page.relative_to(ROOT)} links to missing files: {broken}"


def _docs_hooks():
    """docs/hooks.py, the module mkdocs runs, imported the way mkdocs finds it: from its folder."""
    sys.path.insert(0, str(DOCS))
    try:
        return importlib.import_module("hooks")
    finally:
        sys.path.remove(str(DOCS))


def test_placeholders_name_real_things() -> None:
    """The build fills these in (docs/hooks.py); a typo would fail `make docs`, and fails here sooner."""
    hooks = _docs_hooks()
    for page in DOCS.rglob("*.md"):
        text = page.read_text(encoding="utf-8")
        for name in hooks.PLACEHOLDER.findall(text):
            assert name in hooks.CLASSES, f"{page}: <!-- options: {name} -->"
        for command in hooks.HELP.findall(text):
            assert hooks.command_help(command).startswith("usage: paramsal"), f"{page}: <!-- help: {command} -->"


def test_options_tables_keep_their_rows() -> None:
    """Each options row has its four cells, whatever its description holds (a "|" is escaped)."""
    hooks = _docs_hooks()
    for kind in hooks.CLASSES.values():
        for row in hooks.markdown_table(kind).splitlines():
            assert len(re.findall(r"(?<!\\)\|", row)) == 5, row

