"""The paper's profile figures (Figures 1 and 2) as an analysis of the run alone.

* Figure 1: the raw saliency profile averaged over all samples, units sorted
  by decreasing saliency within each layer, layers left to right with equal
  widths (a layer of 64 units takes as much room as one of 2,048).
* Figure 2: the standardized profile averaged over correctly classified and
  over misclassified samples, in the same layout.

:class:`SaliencyProfiles` reads the run one part at a time (means are
accumulated in float64); layers are labelled by their module's name.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from paramsal._arrow import list_values
from paramsal.analyses.base import Analysis, Result, result_config
from paramsal.analyses.sources import Samples, open_for_analysis
from paramsal.errors import InputError, check_choice
from paramsal.rundir.run import Run

#: The series of each figure: Figure 1 ("mean"), Figure 2 ("correct" and "misclassified").
FIGURES = {"mean": ("mean",), "correct-vs-incorrect": ("correct", "misclassified")}


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
    """

    x: np.ndarray
    layer: np.ndarray
    layers: np.ndarray
    values: dict[str, np.ndarray]
    unit_ids: dict[str, np.ndarray]
    counts: dict[str, int]


def group_means(run: Run) -> dict[str, tuple[np.ndarray, int]]:
    """Raw profile means ``[F]`` (float64) and sample counts of all, correct and misclassified samples.

    Sums are accumulated part by part, so the whole profile matrix is never
    in memory; samples flagged non-finite are left out.

    Returns:
        ``{"all": (mean, n), "correct": (mean, n), "misclassified": (mean, n)}``;
        a mean is NaN where its group is empty.
    """
    sums = {name: np.zeros(run.num_units) for name in ("all", "correct", "misclassified")}
    counts = dict.fromkeys(sums, 0)
    for table in run.iter_parts(["correct", "nonfinite", "profile"]):
        finite = ~table.column("nonfinite").to_numpy(zero_copy_only=False)
        values = list_values(table.column("profile")).astype(np.float64)
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


@dataclass(repr=False)
class ProfilesResult(Result):
    """Per-unit and per-layer means of a run's profiles, and the paper's Figures 1-2.

    ``table``: one row per unit: unit_id, param, module, layer, mean (raw, all
    samples), mean_correct, mean_misclassified (raw), z_correct,
    z_misclassified (the group's mean standardized profile, i.e. the
    standardized group mean). ``summary``: one row per layer: layer, module,
    units, and the averages of those columns over the layer's units.
    ``config["counts"]``: samples in each group.
    """

    kind: ClassVar[str] = "profiles"
    panels: ClassVar[int] = 2
    title: ClassVar[str] = "Saliency profiles: mean raw profile (Fig. 1), correct vs misclassified (Fig. 2)"

    def layout(self, figure: str = "mean") -> LayerProfile:
        """The numbers of one figure: "mean" (Figure 1) or "correct-vs-incorrect" (Figure 2)."""
        check_choice("figure=", figure, FIGURES)
        series = {"mean": "mean", "correct": "z_correct", "misclassified": "z_misclassified"}
        counts = {"mean": self.config["counts"]["all"], **self.config["counts"]}
        empty = [name for name in FIGURES[figure] if counts[name] == 0]
        if empty:
            raise InputError(f"{self.config['run']} has no {' and no '.join(empty)} samples to compare")
        values = {name: self.table[series[name]].to_numpy() for name in FIGURES[figure]}
        x, layer, layers, sorted_values, unit_ids = layer_layout(self.table["layer"].to_numpy(), values)
        return LayerProfile(x, layer, layers, sorted_values, unit_ids, {name: counts[name] for name in values})

    def _grid(self) -> tuple[int, int]:
        return 2, 1

    def _figsize(self) -> tuple[float, float]:
        return 11.0, 8.4

    def _draw(self, figure: Any, axes: list[Any]) -> None:
        mean = self.layout("mean")
        self._layer_axes(axes[0], mean)
        axes[0].plot(mean.x, mean.values["mean"], color="tab:blue", linewidth=1.2)
        if self.config.get("log"):
            axes[0].set_yscale("log")
        axes[0].set_ylabel("mean raw saliency |dL/dθ|")
        axes[0].set_title(f"Figure 1: mean saliency profile over {mean.counts['mean']:,} samples", fontsize=10)
        counts = self.config["counts"]
        if not (counts["correct"] and counts["misclassified"]):
            axes[1].text(0.5, 0.5, "Figure 2 needs both correct and misclassified samples", ha="center",
                         transform=axes[1].transAxes)
            axes[1].set_axis_off()
            return
        versus = self.layout("correct-vs-incorrect")
        self._layer_axes(axes[1], versus)
        axes[1].axhline(0.0, color="0.3", linewidth=0.8)
        for name, color in (("misclassified", "tab:red"), ("correct", "tab:blue")):
            axes[1].plot(versus.x, versus.values[name], color=color, linewidth=1.2,
                         label=f"{name} ({versus.counts[name]:,} samples)")
        axes[1].legend(loc="best")
        axes[1].set_ylabel("mean standardized saliency (s - μ) / σ")
        axes[1].set_title("Figure 2: standardized profile, correct vs misclassified samples", fontsize=10)

    def _layer_axes(self, ax: Any, data: LayerProfile) -> None:
        """Alternate layers shaded; each layer labelled by its module's name under its centre."""
        for j in range(0, len(data.layers), 2):
            ax.axvspan(j, j + 1, color="0.92", linewidth=0)
        names = self.summary.set_index("layer")["module"]
        every = max(1, int(np.ceil(len(data.layers) / 40)))  # at most ~40 labels, however deep the model
        ticks = np.arange(0, len(data.layers), every)
        ax.set_xticks(ticks + 0.5, [str(names.get(data.layers[t], data.layers[t])) for t in ticks], rotation=90,
                      fontsize=6)
        ax.set_xlim(0, len(data.layers))
        ax.margins(y=0.03)


class SaliencyProfiles(Analysis):
    """The paper's Figures 1-2 and the per-unit means behind them, from the run alone.

    Args:
        log: logarithmic y axis for Figure 1 (raw saliency can span decades between layers).
        **common: see :class:`~paramsal.analyses.base.Analysis` (no model and no data are read).

    ``evaluate(run)`` takes every finite sample; ``samples`` is not used.
    """


    def __init__(self, *, log: bool = False, **common: Any):
        super().__init__(**common)
        self.log = log

    def evaluate(self, run: Run | str | os.PathLike, data: Any = None, samples: Samples = None) -> ProfilesResult:
        run = open_for_analysis(run, self.allow_partial)
        means = group_means(run)
        if means["all"][1] == 0:
            raise InputError(f"{run.path} has no samples to average")
        stats = run.stats
        units = run.units.to_pandas()
        table = units[["unit_id", "param", "module", "layer"]].copy()
        table["mean"] = means["all"][0]
        for name in ("correct", "misclassified"):
            table[f"mean_{name}"] = means[name][0]
            table[f"z_{name}"] = (means[name][0] - stats.mean) / stats.std
        summary = table.groupby("layer", sort=True).agg(
            module=("module", "first"), units=("unit_id", "size"), mean=("mean", "mean"),
            z_correct=("z_correct", "mean"), z_misclassified=("z_misclassified", "mean")).reset_index()
        counts = {name: int(count) for name, (_, count) in means.items()}
        return ProfilesResult(table, summary, result_config(run, self, counts=counts))
