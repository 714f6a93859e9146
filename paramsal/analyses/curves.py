"""Curves of a measure against k, one per unit selection: what pruning, perturbation and fine-tuning share.

Pruning (paper Figure 3), perturbation (A.5) and one-step fine-tuning
(Figure 6) all measure, for every chosen sample, what editing k of its units
(its most salient, k random, or its least salient ones) does, for a grid of
k. Their results share one shape, :class:`CurvesResult`:

* ``table``: one row per (sample, selection, k), the per-sample measures;
* ``summary``: one row per (selection, k): ``n`` samples, then for each
  metric its mean and ``<metric>_low`` / ``<metric>_high``, the bounds of a
  percentile bootstrap interval, paired over samples (one resampling of the
  samples serves every selection and k, so the curves are compared on the
  same resamples);
* ``metric_table(metric)``: one metric as a k x selection frame;
* ``plot()``: one panel per metric against k, a line and CI band per
  selection (fine-tuning's "all", which has no k, a horizontal line);
* :func:`format_summary`: the summary as aligned text.

Shares of samples (how many were corrected) are printed and drawn as
percent by both analyses; in the tables they keep their metric's own scale
(pruning's ``pct_corrected`` is a percent, fine-tuning's ``corrected`` a
fraction, as each paper figure gives it).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pandas as pd
from torch import nn
from tqdm.auto import tqdm

from paramsal.analyses.base import Analysis, Prepared, Result
from paramsal.analyses.bootstrap import bootstrap_mean_ci
from paramsal.analyses.selection import select_units, unit_scores
from paramsal.errors import InputError, check_choice, check_integer
from paramsal.jobs.distributed import current_ranks
from paramsal.kernels.chunks import chunk_slices
from paramsal.options import FINETUNE_SELECTIONS, RANKINGS, UNIT_SELECTIONS
from paramsal.ranking.scoring import check_reference
from paramsal.rundir.run import Run

__all__ = ["CurvesAnalysis", "CurvesResult", "Metric", "OneStepResult", "append_columns", "ci_table", "format_summary",
           "sorted_rows", "summarize"]


@dataclass(frozen=True)
class Metric:
    """One summary measure of a curves result.

    Attributes:
        column: the per-sample column of ``table`` it averages.
        label: the axis label of its panel.
        scale: summary value = mean of ``column`` times ``scale``.
        share: a share of samples (a mean of booleans): printed and drawn as percent.
        heading: its header in the text summary (default: the metric's name).
    """

    column: str
    label: str
    scale: float = 1.0
    share: bool = False
    heading: str | None = None

    def shown(self, value: Any) -> Any:
        """The summary value as printed and drawn: percent for shares."""
        return value * (100.0 / self.scale) if self.share else value


class CurvesResult(Result):
    """Measures against k per unit selection (see the module docstring); subclasses name their metrics."""

    kind: ClassVar[str] = "curves"
    title: ClassVar[str] = "curves"
    metrics: ClassVar[Mapping[str, Metric]] = {}
    #: The selections in the order of lines, legends and tables.
    selections: ClassVar[tuple[str, ...]] = UNIT_SELECTIONS
    x_label: ClassVar[str] = "k (units)"

    def metric_table(self, metric: str | None = None) -> pd.DataFrame:
        """One metric (default: the first) as a k x selection frame of means; "all" is repeated on every row."""
        metric = metric or next(iter(self.metrics))
        check_choice("metric", metric, self.metrics)
        frame = self.summary
        per_k = frame[frame["selection"] != "all"].pivot(index="k", columns="selection", values=metric)
        columns = [s for s in self.selections if s in per_k.columns]
        per_k = per_k[columns] if columns else pd.DataFrame(index=pd.Index(self.config.get("ks", []), name="k"))
        full = frame[frame["selection"] == "all"]
        if len(full):
            per_k["all"] = float(full[metric].iloc[0])
        return per_k

    def headline(self) -> str:
        """One line saying what was measured: the figure's title and the text summary's first line."""
        return f"{self.title}: {self._samples_phrase()}"

    def _samples_phrase(self) -> str:
        n = int(self.summary["n"].max()) if len(self.summary) else 0
        level = float(self.config.get("level", 0.95))
        return f"n={n} {self.config.get('samples', 'misclassified')} samples, {level:.0%} bootstrap CI"

    def _draw(self, figure: Any, axes: list[Any]) -> None:
        frame = self.summary
        present = [s for s in self.selections if s in set(frame["selection"])]
        ks = sorted(int(k) for k in frame.loc[frame["selection"] != "all", "k"].unique())
        for ax, (name, metric) in zip(axes, self.metrics.items()):
            for color, selection in enumerate(self.selections):
                if selection not in present:
                    continue
                part = frame[frame["selection"] == selection].sort_values("k")
                mean, low, high = (metric.shown(part[c].to_numpy(float)) for c in (name, f"{name}_low",
                                                                                     f"{name}_high"))
                if selection == "all":
                    ax.axhline(mean[0], color="black", linestyle="--", linewidth=1, label="all parameters")
                    ax.axhspan(low[0], high[0], color="black", alpha=0.08, linewidth=0)
                    continue
                ax.plot(part["k"], mean, marker="o", ms=3, color=f"C{color}", label=selection)
                ax.fill_between(part["k"], low, high, color=f"C{color}", alpha=0.2, linewidth=0)
            if ks:
                ax.set_xscale("log")
                ax.set_xticks(ks, labels=[str(k) for k in ks])
                ax.minorticks_off()
            ax.set_xlabel(self.x_label)
            ax.set_ylabel(metric.label)
            if not metric.share:
                ax.axhline(0, color="grey", linewidth=0.6)
        axes[0].legend(title="selection", fontsize=8)
        if not figure.get_suptitle():  # a figure of the caller's keeps its own title
            figure.suptitle(self.headline(), fontsize=10)


class OneStepResult(CurvesResult):
    """Curves of one-step fine-tuning (a classifier's or a chat LLM's): its selections include "all"."""

    kind: ClassVar[str] = "one-step"
    title: ClassVar[str] = "one-step fine-tuning"
    selections: ClassVar[tuple[str, ...]] = FINETUNE_SELECTIONS
    #: What each step is taken on, in the headline.
    per: ClassVar[str] = "sample"

    def headline(self) -> str:
        return (f"one SGD step (lr={self.config.get('lr')}) per {self.per}, {self.config.get('neighbors')} "
                f"neighbours each: {self._samples_phrase()}")


# ------------------------------------------------------------------------------------------------ summaries


def summarize(table: pd.DataFrame, metrics: Mapping[str, Metric], keys: Sequence[tuple[str, int]],
              num_resamples: int, level: float, seed: int, counts: Sequence[str] = ()) -> pd.DataFrame:
    """Per (selection, k): samples, counts of flags, metric means and bootstrap intervals paired over samples.

    Args:
        table: per-sample rows with ``sample_id``, ``selection``, ``k`` and the metrics' columns;
            every sample has a row for every key.
        metrics: the metrics, by summary name.
        keys: the (selection, k) pairs, in the summary's order.
        num_resamples, level: of the bootstrap.
        seed: metric i is resampled with seed ``seed + i``.
        counts: boolean columns of ``table`` summed per key (e.g. "skipped").
    """
    keys = list(keys)
    out: dict[str, Any] = {"selection": [s for s, _ in keys], "k": [int(k) for _, k in keys],
                           "n": [int(table["sample_id"].nunique())] * len(keys)}
    grouped = table.groupby(["selection", "k"])
    for column in counts:
        sums = grouped[column].sum()
        out[column] = [int(sums.get(key, 0)) for key in keys]
    for i, (name, metric) in enumerate(metrics.items()):
        wide = table.pivot(index="sample_id", columns=["selection", "k"], values=metric.column)
        values = wide[keys].to_numpy(dtype=np.float64) * metric.scale
        ci = bootstrap_mean_ci(values, num_resamples, level, seed=seed + i)
        out[name], out[f"{name}_low"], out[f"{name}_high"] = ci.mean, ci.low, ci.high
    return pd.DataFrame(out)


def format_summary(result: CurvesResult) -> str:
    """The summary as aligned text: the headline, then one line per (selection, k), each metric mean [low, high]."""
    counts = [c for c in ("skipped",) if c in result.summary.columns]
    return "\n".join([result.headline(), *ci_table(result.summary, result.metrics, counts)])


def ci_table(frame: pd.DataFrame, metrics: Mapping[str, Metric], counts: Sequence[str] = ()) -> list[str]:
    """Aligned lines for a bootstrap summary: a header, then one line per (selection, k).

    Each metric reads ``mean [low, high]`` from the columns ``m``, ``m_low``
    and ``m_high``; shares are shown as unsigned percents with two decimals,
    other metrics signed with four. The "all" selection has no k and shows "-".
    """
    head = [f"{c:>8}" for c in counts] + [f"{m.heading or name:>27}" for name, m in metrics.items()]
    lines = [f"{'selection':<9} {'k':>4}  " + "  ".join(head)]
    for _, row in frame.iterrows():
        k = "-" if row["selection"] == "all" else str(row["k"])
        cells = [f"{int(row[c]):>8}" for c in counts]
        for name, m in metrics.items():
            mean, low, high = (m.shown(row[name + suffix]) for suffix in ("", "_low", "_high"))
            cells.append(f"{_ci_cell(mean, low, high, m.share):>27}")
        lines.append(f"{row['selection']:<9} {k:>4}  " + "  ".join(cells))
    return lines


def _ci_cell(mean: float, low: float, high: float, percent: bool) -> str:
    if percent:
        return f"{mean:9.2f} [{low:7.2f}, {high:7.2f}]"
    return f"{mean:+9.4f} [{low:+7.4f}, {high:+7.4f}]"


def append_columns(columns: dict[str, list[np.ndarray]], values: Mapping[str, Any]) -> None:
    """Adds one batch's per-sample columns to those gathered so far (see :func:`sorted_rows`)."""
    for name, value in values.items():
        columns.setdefault(name, []).append(np.asarray(value))


def sorted_rows(gathered: Mapping[str, Sequence[np.ndarray]], selections: Sequence[str],
                columns: Sequence[str]) -> pd.DataFrame:
    """The gathered batches as one table in (selection order, k, sample_id) order, whatever the batching, with
    ``columns`` in order."""
    frame = pd.DataFrame({name: np.concatenate(parts) for name, parts in gathered.items()})
    order = frame["selection"].map({s: i for i, s in enumerate(selections)})
    frame = frame.assign(_order=order).sort_values(["_order", "k", "sample_id"], kind="stable")
    return frame[list(columns)].reset_index(drop=True)


# ------------------------------------------------------------------------------------- the shared settings


class CurvesAnalysis(Analysis):
    """The settings pruning and fine-tuning share: ks, selections, ranking, seed, batches, bootstrap.

    Args:
        model: the network the run profiled, or None (see :class:`~paramsal.analyses.base.Analysis`,
            whose other keywords come as ``**common``).
        ks: numbers of units to edit; those above the run's unit count are
            left out (with one note).
        select: selections among :attr:`selection_choices` (or a comma-separated string).
        ranking: how units are ranked: "zscore" (the standardized profile, the paper) or "pot"
            (the peaks-over-threshold tail score, :meth:`Run.scores <paramsal.rundir.run.Run.scores>`).
        reference: the samples the ranking scores against: "all" (the paper), "correct", "class" or another
            run (:mod:`paramsal.ranking.scoring`).
        seed: seeds the random units, any noise, and the bootstrap (>= 0).
        batch_size: samples processed together.
        num_resamples: bootstrap resamples.
        level: confidence level of the intervals.
        units: the run's units when they are not one of the named schemes.
    """

    selection_choices: ClassVar[tuple[str, ...]] = UNIT_SELECTIONS

    def __init__(self, model: nn.Module | None, *, ks: Sequence[int], select: Sequence[str] | str, ranking: str,
                 seed: int, batch_size: int, num_resamples: int, level: float, units: Any,
                 reference: str | os.PathLike | Run = "all", **common: Any):
        super().__init__(model, **common)
        if isinstance(select, str):
            select = [s.strip() for s in select.split(",") if s.strip()]
        unknown = [s for s in select if s not in self.selection_choices]
        if unknown or not select:
            raise InputError(f"unknown selection(s) {unknown or list(select)}; expected some of "
                             f"{', '.join(self.selection_choices)}")
        ks = list(ks)
        if (any(isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1 for k in ks)
                or (not ks and any(s != "all" for s in select))):
            raise InputError(f"ks must be positive integers, got {ks}")
        self.ks = tuple(sorted({int(k) for k in ks}))
        self.select = tuple(s for s in self.selection_choices if s in select)
        check_choice("ranking", ranking, RANKINGS)
        self.ranking = ranking
        self.reference = check_reference(reference)
        self.seed = check_integer("seed", seed, least=0)
        self.batch_size = check_integer("batch_size", batch_size)
        self.num_resamples = check_integer("num_resamples", num_resamples)
        if not 0 < level < 1:
            raise InputError(f"level must be between 0 and 1, got {level}")
        self.level = float(level)
        self.units = units

    def _chosen_units(self, prepared: Prepared, k: int, selections: Sequence[str]) -> dict[str, np.ndarray]:
        """``{selection: [n, k]}`` each chosen sample's units, the first j columns being its choice for k = j."""
        scores = unit_scores(prepared.run, prepared.ids, self.ranking, self.reference)
        return {s: select_units(scores, k, s, self.seed, prepared.ids) for s in dict.fromkeys(selections)}

    def _ranking_parts(self) -> list[str]:
        """The result's name parts that tell its ranking and reference from the paper's (z-score against all)."""
        parts = [] if self.ranking == "zscore" else [self.ranking]
        return parts + ([] if self.reference == "all" else [f"ref-{Path(self.reference).name}"])

    def _batches(self, n: int, desc: str) -> Iterator[slice]:
        """The rows of ``n`` chosen samples, :attr:`batch_size` at a time, with a progress bar if asked for.

        Under ``torchrun`` each rank gets a contiguous share of the batches
        (every measure is seeded by sample, not by batch, so the share does
        not change a number); :meth:`_rows` then gathers every rank's rows.
        """
        ranks = current_ranks()
        batches = ranks.share(list(chunk_slices(n, self.batch_size)))
        return tqdm(batches, desc=desc, unit="batch", disable=not (self.progress and ranks.is_main))

    def _rows(self, gathered: Mapping[str, Sequence[np.ndarray]], selections: Sequence[str],
              columns: Sequence[str]) -> pd.DataFrame:
        """:func:`sorted_rows` of the batches of every rank (see :meth:`_batches`)."""
        return sorted_rows(current_ranks().gather_columns({k: list(v) for k, v in gathered.items()}), selections,
                           columns)

    def _summarize(self, table: pd.DataFrame, metrics: Mapping[str, Metric], keys: Sequence[tuple[str, int]],
                   counts: Sequence[str] = ()) -> pd.DataFrame:
        return summarize(table, metrics, keys, self.num_resamples, self.level, self.seed, counts)

    def _facts(self, prepared: Prepared, samples: Any, ks: Sequence[int]) -> dict[str, Any]:
        """What every curves result records besides the settings."""
        units = self.units if self.units is None or isinstance(self.units, str) else \
            getattr(self.units, "scheme", repr(self.units))
        return {"ks": list(ks), "ks_dropped": [k for k in self.ks if k not in ks], "units": units,
                "samples": samples if isinstance(samples, str) else ("misclassified" if samples is None
                                                                    else "selected"),
                "num_samples": len(prepared.ids), "num_units": len(prepared.index)}
