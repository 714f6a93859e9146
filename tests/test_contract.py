"""Every analysis has the one contract: evaluate(run, data=None, samples=None) -> Result with the same methods,
a Result round-trips through save, every analysis checks its model and data against the run, and nothing
touches matplotlib's backend."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pandas as pd
import pytest
import torch
from torch.utils.data import Subset, TensorDataset

import paramsal
from paramsal import InputError
from paramsal.analyses.base import Result, load_result
from paramsal.zoo import demo_dataset, demo_model

SAMPLES = 240


@pytest.fixture(scope="module")
def data():
    return Subset(demo_dataset("test"), range(0, 3000, 3000 // SAMPLES))


@pytest.fixture(scope="module")
def run(tmp_path_factory, data):
    return paramsal.profile_dataset(demo_model(), data, tmp_path_factory.mktemp("contract") / "run", batch_size=60,
                                    features=True, progress=False)


def analyses(model):
    """One configuration of every analysis, small enough for a test; the samples each evaluates."""
    few = None  # the default, the misclassified samples
    return {
        "neighbors": (paramsal.Neighbors(k=3), few),
        "profiles": (paramsal.SaliencyProfiles(), few),
        "pruning": (paramsal.Pruning(model, ks=(1, 5), num_resamples=50), few),
        "perturbation": (paramsal.Pruning(model, ks=(1, 5), mode="noise", num_resamples=50), few),
        "finetune": (paramsal.FineTune(model, ks=(1, 5), neighbors=3, num_resamples=50), few),
        "attribution": (paramsal.InputSaliency(model, k=5), "first-two"),
        "masking": (paramsal.Masking(model, percents=(5, 10), k=5), "first-two"),
        "sanity": (paramsal.CascadingRandomization(model, stages=(1, 2), k=5), "first-two"),
        "depth-bias": (paramsal.DepthBias(k=5), few),
        "pruning-pot": (paramsal.Pruning(model, ks=(1, 5), ranking="pot", num_resamples=50), few),
    }


@pytest.fixture(scope="module")
def results(run, data):
    model = demo_model()
    two = run.sample_ids("misclassified")[:2]
    return {name: analysis.evaluate(run, data, samples=two if samples == "first-two" else samples)
            for name, (analysis, samples) in analyses(model).items()}


NAMES = list(analyses(None))


@pytest.mark.parametrize("name", NAMES)
def test_every_result_has_the_same_methods(results, name):
    result = results[name]
    assert isinstance(result, Result)
    assert isinstance(result.table, pd.DataFrame) and len(result.table)
    assert isinstance(result.summary, pd.DataFrame) and len(result.summary)
    assert isinstance(result.config, dict) and result.config["run"]
    from matplotlib.figure import Figure

    assert isinstance(result.plot(), Figure)
    page = result._repr_html_()
    assert "<table" in page and "<img src='data:image/png;base64," in page


@pytest.mark.parametrize("name", NAMES)
def test_every_result_round_trips_through_save(results, name, tmp_path):
    result = results[name]
    paths = result.save(tmp_path)
    assert paths["figure"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    back = load_result(tmp_path, result.name)
    assert type(back) is type(result) and back.name == result.name
    pd.testing.assert_frame_equal(back.table, result.table, check_dtype=False)
    pd.testing.assert_frame_equal(back.summary, result.summary, check_dtype=False)
    assert sorted(back.arrays) == sorted(result.arrays)
    for key, values in result.arrays.items():
        np.testing.assert_array_equal(back.arrays[key], values)


def test_every_analysis_is_exported_from_paramsal():
    for name in ("Neighbors", "Pruning", "FineTune", "InputSaliency", "Masking", "CascadingRandomization",
                 "SaliencyProfiles", "DepthBias", "Compare", "compare", "write_report", "load_result"):
        assert getattr(paramsal, name) is getattr(paramsal.analyses, name)


MODEL_ANALYSES = ["pruning", "finetune", "attribution", "masking", "sanity"]


@pytest.mark.parametrize("name", MODEL_ANALYSES)
def test_every_analysis_checks_the_weights(run, data, name):
    other = demo_model(pretrained=False)
    analysis, _ = analyses(other)[name]
    with pytest.raises(InputError, match="weights differ.*allow_other_weights=True"):
        analysis.evaluate(run, data, samples=run.sample_ids("misclassified")[:2])
    analysis.allow_other_weights = True
    analysis.evaluate(run, data, samples=run.sample_ids("misclassified")[:2])


@pytest.mark.parametrize("name", MODEL_ANALYSES)
def test_every_analysis_checks_the_data(run, data, name):
    images = torch.stack([data[i][0] for i in range(len(data))])
    labels = torch.tensor([data[i][1] for i in range(len(data))])
    shifted = TensorDataset(images + 0.5, labels)  # the same labels, other images
    analysis, _ = analyses(demo_model())[name]
    with pytest.raises(InputError, match="is not the one .* profiled.*allow_other_data=True"):
        analysis.evaluate(run, shifted, samples=run.sample_ids("misclassified")[:2])


def test_analyses_rebuild_the_model_and_data_from_the_run(tmp_path):
    run = paramsal.profile_dataset(demo_model(), Subset(demo_dataset("test"), range(120)), tmp_path / "run",
                                   batch_size=60, progress=False, source={"model": "demo", "data": "demo:test",
                                                                          "limit": 120})
    result = paramsal.Pruning(ks=(1,), num_resamples=20).evaluate(run)  # the demo specs, built in
    assert len(result.table)


def test_importing_and_drawing_leave_the_users_backend(run, data, tmp_path):
    """A user's backend survives importing every module and drawing every figure (in a fresh process)."""
    script = textwrap.dedent(f"""
        import importlib, pkgutil, sys
        import matplotlib
        matplotlib.use("svg")
        import paramsal
        for module in pkgutil.walk_packages(paramsal.__path__, "paramsal."):
            if not module.name.endswith("__main__"):
                importlib.import_module(module.name)
        sys.path.insert(0, {str(__file__.rsplit('/', 1)[0])!r})
        from test_contract import analyses
        from paramsal.zoo import demo_model
        from torch.utils.data import Subset
        from paramsal.zoo import demo_dataset
        run = paramsal.open_run({str(run.path)!r})
        data = Subset(demo_dataset("test"), range(0, 3000, {3000 // SAMPLES}))
        two = run.sample_ids("misclassified")[:2]
        for name, (analysis, samples) in analyses(demo_model()).items():
            result = analysis.evaluate(run, data, samples=two if samples == "first-two" else samples)
            result.plot()
            result.save({str(tmp_path)!r})
            result._repr_html_()
        paramsal.write_report(run, {str(tmp_path / "report")!r}, model=demo_model(), data=data, queries=1, k=2,
                              explain=1)
        import matplotlib.pyplot as plt
        print(matplotlib.get_backend(), plt.get_fignums())
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "svg []"
