"""The curves shared by pruning and fine-tuning: defaults on any model, percent printouts, figures, saved files."""

from __future__ import annotations

import re
import sys
import types

import matplotlib
import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn
from torch.utils.data import Subset

import paramsal
import paramsal.cli
from paramsal.analyses import Pruning
from paramsal.analyses.base import load_result
from paramsal.analyses.curves import format_summary
from paramsal.analyses.finetune import FineTuneResult
from paramsal.analyses.pruning import PruningResult
from paramsal.zoo import demo_dataset

MODULE = "curves_test_specs"


class TwoConvs(nn.Module):
    """32 + 64 = 96 filters: fewer units than the default ks' largest."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, stride=2)
        self.conv2 = nn.Conv2d(32, 64, 3, stride=2)
        self.head = nn.Linear(64, 10)

    def forward(self, x):
        return self.head(torch.relu(self.conv2(torch.relu(self.conv1(x)))).mean((2, 3)))


def two_convs() -> nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(1)
        return TwoConvs().eval()


def first_samples():
    return Subset(demo_dataset("test"), range(80))


sys.modules[MODULE] = types.SimpleNamespace(two_convs=two_convs, first_samples=first_samples)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return paramsal.profile_dataset(two_convs(), first_samples(), tmp_path_factory.mktemp("run"), batch_size=40,
                                    progress=False, model_name=f"{MODULE}:two_convs",
                                    data_name=f"{MODULE}:first_samples")


def _notes(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("paramsal: warning:")]


def test_default_ks_run_on_a_model_of_96_units(run, tmp_path, capsys):
    assert run.num_units == 96 and len(run.sample_ids("misclassified")) > 11
    common = ["--trust-run-specs", "--device", "cpu", "--quiet", "--resamples", "50"]

    assert paramsal.cli.main(["prune", str(run.path), *common, "--out", str(tmp_path / "prune")]) == 0
    captured = capsys.readouterr()
    notes = _notes(captured.err)
    assert notes == [], captured.err  # the default grid is cut to the run's size without a warning (issue 22)
    summary = pd.read_parquet(tmp_path / "prune" / "pruning-summary.parquet")
    assert sorted(set(summary.k)) == [1, 2, 5, 10, 20, 30, 50]
    assert "% corrected" in captured.out

    assert paramsal.cli.main(["finetune", str(run.path), *common, "--out", str(tmp_path / "finetune")]) == 0
    captured = capsys.readouterr()
    notes = _notes(captured.err)
    assert notes == [], captured.err
    summary = pd.read_parquet(tmp_path / "finetune" / "finetune-lr0.001-summary.parquet")
    assert list(summary.selection) == ["salient"] * 4 + ["random"] * 4 + ["least"] * 4 + ["all"]
    assert list(summary.k) == [1, 5, 25, 75] * 3 + [0]
    # the shares are printed as percent, unsigned: 100 x the summary's fractions
    lines = {tuple(line.split()[:2]): line for line in captured.out.splitlines()
             if line.split()[:1] in (["salient"], ["random"], ["least"], ["all"])}
    for row in summary.itertuples():
        line = lines[(row.selection, "-" if row.selection == "all" else str(row.k))]
        assert f"{100 * row.corrected:.2f} [" in line and f"{100 * row.neighbors_corrected:.2f} [" in line, line
        assert f"{row.neighbors_delta_true:+.4f}" in line


def test_percent_in_both_printouts():
    keys = pd.DataFrame({"selection": ["salient", "all"], "k": [5, 0], "n": [40, 40], "skipped": [2, 0]})
    finetune = FineTuneResult(pd.DataFrame(), keys.assign(
        corrected=[0.45, 0.5], corrected_low=[0.4, 0.42], corrected_high=[0.5, 0.6],
        neighbors_corrected=[0.125, 0.2], neighbors_corrected_low=[0.1, 0.1], neighbors_corrected_high=[0.2, 0.3],
        neighbors_delta_true=[0.01, 0.02], neighbors_delta_true_low=[0.0, 0.01],
        neighbors_delta_true_high=[0.02, 0.03]), {"lr": 0.001, "neighbors": 10})
    text = format_summary(finetune)
    lines = text.splitlines()
    assert "lr=0.001" in lines[0] and "n=40" in lines[0] and "% corrected" in lines[1] and "skipped" in lines[1]
    assert re.search(r"salient\s+5\s+2\s+45\.00 \[\s*40\.00,\s*50\.00\]\s+12\.50 \[\s*10\.00,\s*20\.00\]\s+"
                     r"\+0\.0100", lines[2]), lines[2]
    assert re.search(r"all\s+-\s+0\s+50\.00 \[", lines[3]), lines[3]
    pruning = PruningResult(pd.DataFrame(), keys.drop(columns="skipped").assign(
        **{f"{m}{s}": [0.1, 0.1] for m in ("delta_incorrect", "delta_true") for s in ("", "_low", "_high")},
        pct_corrected=[45.0, 50.0], pct_corrected_low=[40.0, 42.0], pct_corrected_high=[50.0, 60.0]))
    assert re.search(r"45\.00 \[\s*40\.00,\s*50\.00\]", format_summary(pruning).splitlines()[2])


def test_figure_without_pyplot_into_given_axes_and_saved_files_read_back(run, tmp_path):
    from matplotlib.figure import Figure

    backend = matplotlib.get_backend()
    result = Pruning(ks=(1, 4, 96), batch_size=16, num_resamples=30,
                              trust_run_specs=True).evaluate(run)
    mine = Figure()
    axes = mine.subplots(1, 3)
    assert result.plot(axes) is mine
    assert [ax.get_xlabel() for ax in axes] == ["k (units turned off)"] * 3
    assert [len(ax.get_lines()) for ax in axes][0] >= 3  # a line per selection
    figure = result.plot()
    assert len(figure.axes) == 3 and figure.get_suptitle().startswith("pruning")
    assert matplotlib.get_backend() == backend
    paths = result.save(tmp_path)
    again = load_result(tmp_path, result.name)
    assert type(again) is PruningResult and result.name == "pruning"
    pd.testing.assert_frame_equal(again.summary, result.summary)
    pd.testing.assert_frame_equal(again.table, result.table)
    assert again.config["ks"] == [1, 4, 96] and paths["figure"].read_bytes()[:4] == b"\x89PNG"
    np.testing.assert_allclose(result.metric_table("pct_corrected").loc[96].to_numpy(),
                               result.summary.set_index("k").loc[96, "pct_corrected"].to_numpy())
