"""Comparing two runs unit by unit: which filters change when the data shifts or the model changes.

Two runs of one architecture with the same units (a validation set and a
shifted copy of it, or one data set under two checkpoints) are compared on
their raw saliency profiles. Per unit k, with A the reference run:

* ``d_k = (mean_B - mean_A) / std_A``: how far B's mean saliency moved, in
  A's standard deviations (n-1; a deviation <= 1e-14 counts as 1, as in the
  run's own statistics), with a percentile bootstrap interval (A's and B's
  samples resampled independently, seeded; :mod:`paramsal.analyses.twosample`);
* ``AUC_k = P(s_B > s_A) + P(s_B = s_A) / 2`` (Mann-Whitney U / (n_A n_B)),
  its two-sided p-value and Benjamini-Hochberg q-value over all units.

**A unit has moved when its q-value is below** ``fdr`` **(0.05) and its
interval of d excludes 0**: the rank test guards the false discovery rate
over thousands of units, the interval says the mean moved, and in which
direction. Per layer, the summary gives the mean d with its bootstrap
interval, the share of units moved and the unit of largest |d|.

```python
result = Compare(num_resamples=1000).evaluate("runs/val", "runs/val-noisy")   # or compare(a, b)
result.table        # unit_id, param, module, layer, channel, mean_a, std_a, mean_b, d, d_low, d_high, auc, p, q, moved
result.summary      # layer, module, units, mean_d, mean_d_low, mean_d_high, moved, moved_share, top_unit, top_d
result.top(10)      # the moved units of largest |d|
```

Memory is set by ``budget_mb``, not by the runs' size: units are taken in
blocks, and for each block both runs are read once, keeping that block's
columns (``4 (n_A + n_B)`` bytes a unit) and its ``[resamples, units]``
bootstrap sums; the bootstrap multiplies counts of 128 rows at a time with
the rows. Time grows as resamples x samples x units.
"""

from __future__ import annotations

import os
import re
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import pandas as pd

from paramsal.analyses.base import Result
from paramsal.analyses.sources import open_for_analysis
from paramsal.analyses.twosample import (
    RESAMPLE_CHUNK,
    ResampleCounts,
    bh_qvalues,
    bootstrap_shifts,
    mann_whitney,
    percentile_interval,
    unit_moments,
)
from paramsal.errors import InputError, ParamsalWarning, check_integer
from paramsal.ranking.scoring import units_difference
from paramsal.rundir.run import Run

#: What ``only=`` takes: None (every sample with finite numbers), a named selection, or sample ids.
Only = str | Sequence[int] | np.ndarray | None
#: The named selections a comparison accepts (the same one applies to both runs).
COMPARE_SELECTIONS = ("correct", "misclassified")


@dataclass(repr=False)
class CompareResult(Result):
    """Per-unit shifts between two runs (:attr:`table`) and their per-layer summary (:attr:`summary`).

    See the module docstring for the columns and the rule for ``moved``.
    """

    kind: ClassVar[str] = "compare"
    panels: ClassVar[int] = 2
    title: ClassVar[str] = "Units whose saliency moved from run A to run B"

    def top(self, k: int = 10, moved_only: bool = True) -> pd.DataFrame:
        """The ``k`` units of largest |d| (rows of :attr:`table`, largest first; equal |d| by unit id).

        Args:
            k: how many.
            moved_only: among the moved units only (the default), else among all.
        """
        rows = self.table[self.table["moved"]] if moved_only else self.table
        order = np.lexsort((rows["unit_id"].to_numpy(), -rows["d"].abs().to_numpy()))
        return rows.iloc[order[:k]].reset_index(drop=True)

    def _figsize(self) -> tuple[float, float]:
        return (11.0, 4.2)

    def _draw(self, figure: Any, axes: list[Any]) -> None:
        self._draw_layers(axes[0])
        self._draw_top(axes[1])
        figure.suptitle(f"A {self.config.get('data_a')}  vs  B {self.config.get('data_b')}", fontsize=9)

    def _draw_layers(self, ax: Any) -> None:
        """Every unit's d (grey, moved ones red) and each layer's mean d with its interval (black)."""
        summary, table = self.summary, self.table
        position = {layer: i for i, layer in enumerate(summary["layer"])}
        x = table["layer"].map(position).to_numpy() + np.random.default_rng(0).uniform(-0.3, 0.3, len(table))
        moved = table["moved"].to_numpy()
        ax.scatter(x[~moved], table["d"][~moved], s=4, color="0.7", linewidths=0, label="unit")
        ax.scatter(x[moved], table["d"][moved], s=4, color="tab:red", linewidths=0, label="unit, moved")
        mean = summary["mean_d"].to_numpy()
        _intervals(ax, np.arange(len(summary)), mean, summary["mean_d_low"], summary["mean_d_high"], "black",
                   vertical=True, label="layer mean")
        ax.axhline(0, color="0.4", linewidth=0.6)
        ax.set_xticks(np.arange(len(summary)), [str(layer) for layer in summary["layer"]], fontsize=7)
        ax.set_xlabel("layer")
        ax.set_ylabel("d = (mean B - mean A) / std A")
        ax.legend(fontsize=7, loc="best")

    def _draw_top(self, ax: Any) -> None:
        """The units of largest |d| with their intervals (moved ones red)."""
        top = self.top(int(self.config.get("top", 10)), moved_only=False)[::-1]
        y = np.arange(len(top))
        colors = np.where(top["moved"], "tab:red", "0.5")
        _intervals(ax, y, top["d"].to_numpy(), top["d_low"], top["d_high"], colors, vertical=False)
        ax.set_yticks(y, [f"{m}[{c}]" for m, c in zip(top["module"], top["channel"])], fontsize=7)
        ax.axvline(0, color="0.4", linewidth=0.6)
        ax.set_xlabel(f"d with its {self.config.get('level', 0.95):.0%} interval")
        ax.set_title(f"largest |d| ({int(self.table['moved'].sum())} of {len(self.table)} units moved)", fontsize=9)


class Compare:
    """Settings of a comparison of two runs; :meth:`evaluate` applies them to a pair.

    It has the analyses' shape (configure once, one verb, a :class:`Result`)
    but takes two runs and nothing else: no model or data is loaded.

    Args:
        only: the samples compared, the same selection in both runs: None
            (every sample with finite numbers), "correct", "misclassified", or
            sample ids (for runs whose ids name corresponding samples, like a
            data set and its shifted copy).
        num_resamples: bootstrap resamples of each run.
        level: confidence level of the intervals.
        seed: seeds the resampling (same seed, same intervals).
        fdr: the false discovery rate a moved unit's q-value must be below.
        top: units the figure shows in its panel of largest |d|.
        budget_mb: MiB the blocks of columns and bootstrap sums may hold
            (default 256); more means fewer passes over the runs.
        block_units: units per block instead of what ``budget_mb`` allows
            (the numbers do not depend on the blocks).
        allow_partial: compare unfinished runs (their samples so far).
    """

    def __init__(self, only: Only = None, *, num_resamples: int = 1000, level: float = 0.95, seed: int = 0,
                 fdr: float = 0.05, top: int = 10, budget_mb: int = 256, block_units: int | None = None,
                 allow_partial: bool = False):
        if isinstance(only, str) and only not in COMPARE_SELECTIONS:
            raise InputError(f"only={only!r}: expected None, {' or '.join(map(repr, COMPARE_SELECTIONS))}, "
                             "or sample ids")
        for name, value in (("level", level), ("fdr", fdr)):
            if not 0 < value < 1:
                raise InputError(f"{name}={value!r}: expected a number between 0 and 1")
        self.only = only if only is None or isinstance(only, str) else np.unique(np.asarray(only, np.int64))
        self.num_resamples = check_integer("num_resamples", num_resamples)
        self.level, self.fdr = float(level), float(fdr)
        self.seed = check_integer("seed", seed, least=0)
        self.top = check_integer("top", top)
        self.budget_mb = check_integer("budget_mb", budget_mb)
        self.block_units = None if block_units is None else check_integer("block_units", block_units)
        self.allow_partial = allow_partial

    def __repr__(self) -> str:
        settings = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if v is not None and v is not False)
        return f"Compare({settings})"

    def evaluate(self, run_a: Run | str | os.PathLike, run_b: Run | str | os.PathLike) -> CompareResult:
        """Compares run B with run A, the reference, unit by unit.

        Args:
            run_a: the reference run (or its directory): d is in its standard deviations.
            run_b: the other run, with the same units and aggregation.

        Raises:
            InputError: for unfinished runs (unless ``allow_partial``), runs
                whose units or aggregation differ, or a selection that leaves
                fewer than 2 samples of either run.
        """
        started = time.perf_counter()
        a, b = (open_for_analysis(run, self.allow_partial) for run in (run_a, run_b))
        units = comparable_units(a, b)
        n_a, n_b = (_selected_count(run, self.only, label) for run, label in ((a, "A"), (b, "B")))
        plan = plan_blocks(n_a, n_b, len(units), units["layer"].nunique(), self.num_resamples, self.budget_mb,
                           self.block_units)
        stats = self._unit_statistics(a, b, units, n_a, n_b, plan)
        table = _unit_table(units, stats, self.fdr)
        summary = _layer_summary(table, stats.pop("layer_resamples"), self.level)
        # The result belongs to B (saved in B's analyses, shown in B's report): it says how B moved from A.
        config = {"run": str(a.path), "run_b": str(b.path), "run_id": b.identity, "run_a_id": a.identity,
                  **self._settings(),
                  **_run_facts(a, b), "samples_a": n_a, "samples_b": n_b, "units_per_block": plan.units,
                  "passes": plan.passes, "moved": int(table["moved"].sum()),
                  "rule": f"moved: q < {self.fdr:g} and the {self.level:.0%} interval of d excludes 0",
                  "seconds": round(time.perf_counter() - started, 3), "name_parts": self._name_parts(a)}
        return CompareResult(table, summary, config)

    def _unit_statistics(self, a: Run, b: Run, units: pd.DataFrame, n_a: int, n_b: int,
                         plan: BlockPlan) -> dict[str, np.ndarray]:
        """Every per-unit column, and the layers' resampled mean d ``[R, L]``, a block of units at a time."""
        counts_a = ResampleCounts(n_a, self.num_resamples, self.seed, stream=0)
        counts_b = ResampleCounts(n_b, self.num_resamples, self.seed, stream=1)
        layers, layer_of = np.unique(units["layer"].to_numpy(), return_inverse=True)
        names = ("mean_a", "std_a", "mean_b", "d", "d_low", "d_high", "auc", "p")
        columns = {name: np.empty(len(units)) for name in names}
        layer_sums = np.zeros((self.num_resamples, len(layers)))
        for start in range(0, len(units), plan.units):
            cols = slice(start, min(start + plan.units, len(units)))
            xa, xb = (_columns(run, self.only, cols, n, plan.read_rows) for run, n in ((a, n_a), (b, n_b)))
            (mean_a, std_a), (mean_b, _) = unit_moments(xa), unit_moments(xb)
            resampled = bootstrap_shifts(xa, xb, mean_a, counts_a, counts_b)
            low, high = percentile_interval(resampled, self.level)
            ranks = mann_whitney(xa, xb)
            block = dict(mean_a=mean_a, std_a=std_a, mean_b=mean_b, d=(mean_b - mean_a) / std_a, d_low=low,
                         d_high=high, auc=ranks.auc, p=ranks.p)
            for name in names:
                columns[name][cols] = block[name]
            layer_sums += resampled @ (layer_of[cols, None] == np.arange(len(layers))).astype(np.float64)
            del xa, xb, resampled  # before the next block is read, so that two blocks are never held
        columns["layer_resamples"] = layer_sums / np.bincount(layer_of, minlength=len(layers))
        return columns

    def _settings(self) -> dict[str, Any]:
        settings = dict(vars(self))
        if isinstance(self.only, np.ndarray):
            settings["only"] = self.only.tolist()
        return settings

    def _name_parts(self, a: Run) -> list[str]:
        """The file stem beyond "compare": the reference run's folder name, and the selection if any."""
        parts = ["vs-" + re.sub(r"[^A-Za-z0-9._-]+", "_", a.path.resolve().name)]
        if self.only is not None:
            parts.append(self.only if isinstance(self.only, str) else "ids")
        return parts


def compare(a: Run | str | os.PathLike, b: Run | str | os.PathLike, **settings: Any) -> CompareResult:
    """``Compare(**settings).evaluate(a, b)``: which units of run ``b`` moved from the reference run ``a``."""
    return Compare(**settings).evaluate(a, b)


def comparable_units(a: Run, b: Run) -> pd.DataFrame:
    """The two runs' shared units table (unit_id, param, module, layer, channel, size), a row per profile column.

    Raises:
        InputError: when the units or the aggregation differ, naming the
            first difference and the fix; a difference of model (other
            weights, another name) is only noted, since comparing two
            checkpoints is a purpose of the comparison.
    """
    units = a.units.to_pandas()  # rows in profile column order, i.e. by unit id
    difference = units_difference(a, b)
    if difference:
        raise InputError(f"the runs {a.path} (A) and {b.path} (B) have different units: {difference}; compare two "
                         "runs of the same architecture profiled with the same --units")
    aggregation = [run.manifest.aggregation for run in (a, b)]
    if aggregation[0] != aggregation[1]:
        raise InputError(f"run A ({a.path}) aggregated its profiles with {aggregation[0]!r} and run B ({b.path}) "
                         f"with {aggregation[1]!r}; profile both with the same --aggregation")
    facts = _run_facts(a, b)
    if not facts["same_weights"] or facts["model_a"] != facts["model_b"]:
        warnings.warn(f"the runs profiled different models (A: {facts['model_a']}, weights "
                      f"{a.manifest.model_fingerprint}; B: {facts['model_b']}, weights "
                      f"{b.manifest.model_fingerprint}): the shifts measure the change of model as well",
                      ParamsalWarning, stacklevel=3)
    return units


def _run_facts(a: Run, b: Run) -> dict[str, Any]:
    """What the result records of the two runs: their model and data specs, and whether they agree."""
    config_a, config_b = a.manifest.config, b.manifest.config
    return {"model_a": config_a.model, "model_b": config_b.model, "data_a": config_a.data, "data_b": config_b.data,
            "same_weights": a.manifest.model_fingerprint == b.manifest.model_fingerprint,
            "same_data": a.manifest.data_fingerprint == b.manifest.data_fingerprint}


def _selected_count(run: Run, only: Only, label: str, least: int = 2) -> int:
    """How many samples ``only`` selects in ``run``, refused below ``least`` (a standard deviation needs 2)."""
    count = len(run.sample_ids(only))
    if count < least:
        chosen = "every finite sample" if only is None else repr(only) if isinstance(only, str) else "the sample ids"
        raise InputError(f"only={chosen} selects {count} samples of run {label} ({run.path}); the comparison needs "
                         f"at least {least}: choose another selection (--only)")
    return count


def _columns(run: Run, only: Only, cols: slice, n: int, rows: int) -> np.ndarray:
    """``[n, u]`` the raw profiles of the ``n`` selected samples, units ``cols`` only, read ``rows`` rows at a time."""
    columns = np.empty((n, cols.stop - cols.start), np.float32)
    filled = 0
    for _, profiles in run.iter_profiles(rows, only=only, standardized=False):
        columns[filled:filled + len(profiles)] = profiles[:, cols]
        filled += len(profiles)
    return columns


def _intervals(ax: Any, at: np.ndarray, estimate: np.ndarray, low: Any, high: Any, color: Any, *, vertical: bool,
               label: str | None = None) -> None:
    """Each estimate as a dot and its bootstrap interval as a line from ``low`` to ``high``: a percentile interval
    need not contain its estimate (few resamples, a skewed statistic), which error bars cannot draw."""
    (ax.vlines if vertical else ax.hlines)(at, np.asarray(low), np.asarray(high), colors=color, linewidth=1)
    ax.scatter(*((at, estimate) if vertical else (estimate, at)), s=9, color=color, zorder=3, label=label)


@dataclass(frozen=True)
class BlockPlan:
    """How a comparison walks the runs within its budget.

    Attributes:
        units: units per block (each block reads both runs once).
        read_rows: rows per block read from a run (all of its units).
        passes: blocks of units, i.e. reads of each run.
        bytes: the memory the plan is estimated to hold at its peak.
    """

    units: int
    read_rows: int
    passes: int
    bytes: int


def plan_blocks(n_a: int, n_b: int, num_units: int, num_layers: int, num_resamples: int, budget_mb: int,
                block_units: int | None = None) -> BlockPlan:
    """The largest blocks whose estimated memory fits ``budget_mb``.

    Per unit of a block: its columns (4 bytes a sample), a chunk of its
    centred rows and squares, and its ``[R]`` bootstrap sums, shifts and the
    quantiles' sorted copy. Besides: a chunk of counts (``[R, 128]`` and its
    draws), the rows being read (a block and the reader's batch, all units),
    the layers' resampled sums and a column being ranked.

    Raises:
        InputError: when the budget cannot hold one unit beside the fixed part.
    """
    budget = budget_mb << 20
    read_rows = int(max(1, min(max(n_a, n_b), budget // 8 // (4 * num_units))))
    fixed = 40 * num_resamples * RESAMPLE_CHUNK + 2 * 4 * read_rows * num_units + 16 * num_resamples * num_layers \
        + 24 * (n_a + n_b)
    per_unit = 4 * (n_a + n_b) + 24 * RESAMPLE_CHUNK + 48 * num_resamples + 8 * num_layers
    if block_units is None:
        if budget < fixed + per_unit:
            need = -(-(fixed + per_unit) // (1 << 20))
            raise InputError(f"budget_mb={budget_mb} cannot hold one unit of {n_a} + {n_b} samples with "
                             f"{num_resamples} resamples (about {need} MiB needed): raise --budget-mb or lower "
                             "--resamples")
        block_units = (budget - fixed) // per_unit
    units = int(min(block_units, num_units))
    return BlockPlan(units, read_rows, -(-num_units // units), fixed + per_unit * units)


def _unit_table(units: pd.DataFrame, stats: dict[str, np.ndarray], fdr: float) -> pd.DataFrame:
    table = units[["unit_id", "param", "module", "layer", "channel"]].copy()
    for name in ("mean_a", "std_a", "mean_b", "d", "d_low", "d_high", "auc", "p"):
        table[name] = stats[name]
    table["q"] = bh_qvalues(stats["p"])
    table["moved"] = (table["q"] < fdr) & ((table["d_low"] > 0) | (table["d_high"] < 0))
    return table


def _layer_summary(table: pd.DataFrame, layer_resamples: np.ndarray, level: float) -> pd.DataFrame:
    """One row per layer: its mean d with the interval of its resampled means, moved units, largest |d|."""
    low, high = percentile_interval(layer_resamples, level)
    rows = []
    for j, (layer, group) in enumerate(table.groupby("layer", sort=True)):
        largest = group.loc[group["d"].abs().idxmax()]
        rows.append({"layer": layer, "module": group["module"].iloc[0], "units": len(group),
                     "mean_d": group["d"].mean(), "mean_d_low": low[j], "mean_d_high": high[j],
                     "moved": int(group["moved"].sum()), "moved_share": group["moved"].mean(),
                     "top_unit": int(largest["unit_id"]), "top_d": float(largest["d"])})
    return pd.DataFrame(rows)
