"""A small finished run of the demo model, and helpers to tamper with copies of it."""

import json
import shutil
from pathlib import Path

import pytest
from torch.utils.data import Subset

import paramsal
from paramsal.zoo import demo_dataset, demo_model

SAMPLES = 64

#: How the run records its model and data: built-in specs only, as `paramsal profile --limit 64` would.
SOURCE = {"model": "demo", "data": "demo:test", "limit": SAMPLES}


@pytest.fixture(scope="session")
def small_run(tmp_path_factory) -> Path:
    """The directory of a finished run of the first 64 demo test images (never modified: copy it first)."""
    out = tmp_path_factory.mktemp("reliability") / "run"
    paramsal.profile_dataset(demo_model(), Subset(demo_dataset("test"), range(SAMPLES)), out, batch_size=32,
                             progress=False, source=dict(SOURCE))
    return out


@pytest.fixture
def run_dir(small_run, tmp_path) -> Path:
    """A private copy of :func:`small_run` that a test may damage."""
    return Path(shutil.copytree(small_run, tmp_path / "run"))


def _edit_manifest(run_dir: Path, change) -> None:
    """Applies ``change(manifest)`` to the run's manifest.json, leaving every other field as it is."""
    path = run_dir / "manifest.json"
    manifest = json.loads(path.read_text())
    change(manifest)
    path.write_text(json.dumps(manifest, indent=2))


@pytest.fixture
def edit_manifest():
    """``edit_manifest(run_dir, change)``: applies ``change(manifest)`` to a run's manifest.json."""
    return _edit_manifest


@pytest.fixture
def set_source():
    """``set_source(run_dir, **fields)``: changes fields of the manifest's ``source`` only (the rest of the
    format is not these tests' business)."""
    return lambda run_dir, **fields: _edit_manifest(run_dir, lambda manifest: manifest["source"].update(fields))
