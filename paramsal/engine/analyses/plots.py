"""The paper's profile figures, drawn from a run directory.

* :func:`plot_mean_profile` (paper, Figure 1): the raw saliency profile
  averaged over all samples, units sorted by decreasing saliency within each
  layer, layers left to right with equal widths (a layer of 64 units takes
  as much room as one of 2,048).
* :func:`plot_correct_vs_incorrect` (paper, Figure 2): the standardized
  profile averaged over correctly classified and over misclassified samples,
  in the same layout.

Both read the run one part at a time (means are accumulated in float64), write
a PNG when given a path (matplotlib's Agg renderer, no display), and return
the plotted numbers as a :class:`LayerProfile`.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from paramsal._io import atomic_path
from paramsal.engine.analyses.common import open_analysis_run, output_folder
from paramsal.engine.rundir import Run, open_run
from paramsal.errors import InputError

FIGURES_DIR = "figures"
MEAN_PROFILE_PNG = "mean-profile.png"
CORRECT_VS_INCORRECT_PNG = "correct-vs-incorrect.png"


@dataclass(frozen=True)
class LayerProfile:
    """The numbers behind a per-layer profile figure.

    Points run left to right: layer by layer (in increasing ``units.layer``),
    and within a layer by decreasing value of each series.

    Attributes:
        x: ``[F]`` horizontal position; layer number j (counting from 0, left
            to right) spans ``[j, j + 1)``, its n units at ``j + (i + 0.5) / n``.
        layer: ``[F]`` the ``units.layer`` of each point.
        layers: ``[L]`` the distinct layers, left to right.
        values: series name -> ``[F]`` values, sorted descending within each layer.
        unit_ids: series name -> ``[F]`` the unit shown at each point of that series
            (each series is sorted on its own, so the units differ between series).
        counts: series name -> number of samples averaged.
        path: the PNG written, or None.
    """

    x: np.ndarray
    layer: np.ndarray
    layers: np.ndarray
    values: dict[str, np.ndarray]
    unit_ids: dict[str, np.ndarray]
    counts: dict[str, int]
    path: Path | None = None


def group_means(run: Run) -> dict[str, tuple[np.ndarray, int]]:
    """Raw profile means ``[F]`` (float64) and sample counts of all, correct and misclassified samples.

    Sums are accumulated part by part, so the whole profile matrix is never in memory.

    Returns:
        ``{"all": (mean, n), "correct": (mean, n), "misclassified": (mean, n)}``;
        a mean is NaN where its group is empty.
    """
    sums = {name: np.zeros(run.num_units) for name in ("all", "correct", "misclassified")}
    counts = dict.fromkeys(sums, 0)
    for table in run.iter_parts(["correct", "nonfinite", "profile"]):
        finite = ~table.column("nonfinite").to_numpy(zero_copy_only=False)
        profiles = table.column("profile").combine_chunks()
        values = profiles.flatten().to_numpy().reshape(len(profiles), -1).astype(np.float64)
        correct = table.column("correct").to_numpy(zero_copy_only=False)
        for name, rows in (("all", finite), ("correct", correct & finite), ("misclassified", ~correct & finite)):
            sums[name] += values[rows].sum(axis=0)
            counts[name] += len(values[rows])
    with np.errstate(invalid="ignore", divide="ignore"):
        return {name: (sums[name] / counts[name], counts[name]) for name in sums}


def layer_layout(layer_of_unit: np.ndarray, series: dict[str, np.ndarray]
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Orders units layer by layer, each series descending within a layer.

    Args:
        layer_of_unit: ``[F]`` ``units.layer`` of each unit.
        series: name -> ``[F]`` value of each unit.

    Returns:
        ``(x [F], layer [F], layers [L], values, unit_ids)`` as in :class:`LayerProfile`.
        Equal values keep unit order (stable sort).
    """
    layers = np.unique(layer_of_unit)
    x, layer = [], []
    unit_ids: dict[str, list[np.ndarray]] = {name: [] for name in series}
    for j, value in enumerate(layers):
        members = np.flatnonzero(layer_of_unit == value)
        x.append(j + (np.arange(len(members)) + 0.5) / len(members))
        layer.append(np.full(len(members), value))
        for name, values in series.items():
            unit_ids[name].append(members[np.argsort(-values[members], kind="stable")])
    order = {name: np.concatenate(ids) for name, ids in unit_ids.items()}
    return (np.concatenate(x), np.concatenate(layer), layers,
            {name: series[name][ids] for name, ids in order.items()}, order)


def plot_mean_profile(run: Run | str | os.PathLike, path: str | os.PathLike | None = None, *,
                      log: bool = False) -> LayerProfile:
    """Paper, Figure 1: the mean raw profile, sorted within each layer.

    Args:
        run: a run or its directory.
        path: PNG to write (parent directories are made); None: only compute.
        log: logarithmic y axis (raw saliency can span decades between layers).

    Returns:
        The plotted numbers; series ``"mean"``: the raw profile
        ``mean |dL/dθ|`` of each unit averaged over every sample of the run.
    """
    run = run if isinstance(run, Run) else open_run(run)
    means = group_means(run)
    mean, count = means["all"]
    if count == 0:
        raise InputError(f"{run.path} has no samples to average")
    data = _layer_profile(run, {"mean": mean}, {"mean": count})
    if path is None:
        return data
    fig, ax = _layer_axes(data)
    ax.plot(data.x, data.values["mean"], color="tab:blue", linewidth=1.2)
    if log:
        ax.set_yscale("log")
    ax.set_ylabel("mean raw saliency  mean |dL/dθ| per filter")
    ax.set_title(f"Mean saliency profile over {count:,} samples (filters sorted within each layer)")
    return _saved(data, fig, path)


def plot_correct_vs_incorrect(run: Run | str | os.PathLike, path: str | os.PathLike | None = None) -> LayerProfile:
    """Paper, Figure 2: mean standardized profile of correct vs misclassified samples.

    The mean of standardized profiles equals the standardized mean of raw
    profiles, ``(mean(s) - μ) / σ``, with the run's own statistics.

    Args:
        run: a run or its directory.
        path: PNG to write (parent directories are made); None: only compute.

    Returns:
        The plotted numbers; series ``"correct"`` and ``"misclassified"``,
        each sorted within each layer on its own.
    """
    run = run if isinstance(run, Run) else open_run(run)
    means = group_means(run)
    empty = [name for name in ("correct", "misclassified") if means[name][1] == 0]
    if empty:
        raise InputError(f"{run.path} has no {' and no '.join(empty)} samples to compare")
    stats = run.stats
    series = {name: (means[name][0] - stats.mean) / stats.std for name in ("correct", "misclassified")}
    data = _layer_profile(run, series, {name: means[name][1] for name in series})
    if path is None:
        return data
    fig, ax = _layer_axes(data)
    ax.axhline(0.0, color="0.3", linewidth=0.8)
    for name, color in (("misclassified", "tab:red"), ("correct", "tab:blue")):
        ax.plot(data.x, data.values[name], color=color, linewidth=1.2,
                label=f"{name} ({data.counts[name]:,} samples)")
    ax.legend(loc="best")
    ax.set_ylabel("mean standardized saliency (s - μ) / σ")
    ax.set_title("Standardized saliency profile: correct vs misclassified samples (sorted within each layer)")
    return _saved(data, fig, path)


def _layer_profile(run: Run, series: dict[str, np.ndarray], counts: dict[str, int]) -> LayerProfile:
    layer_of_unit = run.units.column("layer").to_numpy()
    x, layer, layers, values, unit_ids = layer_layout(layer_of_unit, series)
    return LayerProfile(x, layer, layers, values, unit_ids, counts)


def _layer_axes(data: LayerProfile):
    """A wide figure with alternate layers shaded and layer numbers under their centres."""
    from matplotlib.figure import Figure  # a bare Figure renders with Agg: no pyplot state, no display

    fig = Figure(figsize=(11, 4.2), layout="constrained")
    ax = fig.subplots()
    for j in range(0, len(data.layers), 2):
        ax.axvspan(j, j + 1, color="0.92", linewidth=0)
    every = max(1, int(np.ceil(len(data.layers) / 30)))  # at most ~30 labels, however deep the model
    ticks = np.arange(0, len(data.layers), every)
    ax.set_xticks(ticks + 0.5, [str(data.layers[t]) for t in ticks])
    ax.set_xlim(0, len(data.layers))
    ax.set_xlabel("layer (equal width per layer; filters sorted by decreasing saliency within a layer)")
    ax.margins(y=0.03)
    return fig, ax


def _saved(data: LayerProfile, fig, path: str | os.PathLike) -> LayerProfile:
    path = Path(path)
    output_folder(path.parent)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=150)
    return LayerProfile(data.x, data.layer, data.layers, data.values, data.unit_ids, data.counts, path)


# ---------------------------------------------------------------------------
# Command line (wired into ``paramsal`` by cli.py)


def add_plots_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``paramsal plots``."""
    parser.add_argument("run", help="run directory")
    parser.add_argument("--out", default=None, help="folder for the PNGs (default RUN/figures)")
    parser.add_argument("--log", action="store_true", help="logarithmic y axis for the mean raw profile")


def run_plots_command(args: argparse.Namespace) -> int:
    """``paramsal plots``: writes the paper's Figures 1 and 2 for a run."""
    run = open_analysis_run(args)
    folder = output_folder(args.out or run.path / FIGURES_DIR)
    mean = plot_mean_profile(run, folder / MEAN_PROFILE_PNG, log=args.log)
    print(f"wrote {mean.path} (Figure 1: mean raw profile, {len(mean.layers)} layers, {len(mean.x)} units)")
    if run.accuracy in (0.0, 1.0):
        print("no Figure 2: it needs both correct and misclassified samples")
        return 0
    versus = plot_correct_vs_incorrect(run, folder / CORRECT_VS_INCORRECT_PNG)
    wrong, right = versus.values["misclassified"].mean(), versus.values["correct"].mean()
    print(f"wrote {versus.path} (Figure 2: mean standardized saliency, misclassified {wrong:+.3f}, "
          f"correct {right:+.3f})")
    return 0
