"""Where in the network each ranking puts a mistake's top units: the depth-bias diagnostic of Wang & Sato (2023).

Their argument: the z-score treats every unit's saliency as normal, but deep
layers' saliencies have heavier tails, so z-scores place the top units of a
mistake disproportionately in deep layers; the POT tail score measures every
unit on its own tail. :class:`DepthBias` counts, over the chosen samples
(the misclassified ones by default), which layers hold each sample's top-k
units under each ranking, next to the layers' share of all units (what a
uniform draw would give).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import pandas as pd

from paramsal.analyses.base import Analysis, Result, result_config
from paramsal.analyses.selection import select_units, unit_scores
from paramsal.analyses.sources import Samples, chosen_samples, open_for_analysis
from paramsal.errors import InputError, check_integer
from paramsal.options import RANKINGS
from paramsal.ranking.scoring import check_reference
from paramsal.rundir.run import Run


@dataclass(repr=False)
class DepthBiasResult(Result):
    """``table``: one row per (ranking, layer): ranking, layer, module, depth (the layer's position, 0 = first,
    1 = last), units, unit_share (its share of all units), top_share (its share of the chosen samples' top-k
    units), ratio (top_share / unit_share). ``summary``: per ranking: samples, k, mean_depth of the top-k units,
    deep_share (share in the deepest third of layers), and the same two for a uniform draw of units."""

    kind: ClassVar[str] = "depth-bias"
    title: ClassVar[str] = "Depth bias: where each ranking puts the top-k units of mistakes"

    def _figsize(self) -> tuple[float, float]:
        return 8.0, 3.8

    def _draw(self, figure: Any, axes: list[Any]) -> None:
        ax = axes[0]
        rankings = list(dict.fromkeys(self.table["ranking"]))
        width = 0.8 / max(len(rankings), 1)
        first = self.table[self.table["ranking"] == rankings[0]]
        positions = np.arange(len(first))
        for i, ranking in enumerate(rankings):
            rows = self.table[self.table["ranking"] == ranking]
            ax.bar(positions + (i - (len(rankings) - 1) / 2) * width, rows["top_share"], width, label=ranking)
        shares = first["unit_share"].to_numpy()
        ax.step(np.append(positions, positions[-1] + 1) - 0.5, np.append(shares, shares[-1]), where="post",
                color="0.2", linewidth=1.0, linestyle="--", label="share of units")
        ax.set_xticks(positions, [str(m) for m in first["module"]], rotation=90, fontsize=6)
        ax.set_ylabel(f"share of top-{self.config['k']} units")
        ax.set_title(f"top-{self.config['k']} units of {self.config['num_samples']:,} {self.config['samples']} "
                     "samples, by layer (shallow to deep)", fontsize=9)
        ax.legend(fontsize=8)


class DepthBias(Analysis):
    """The layers of each chosen sample's top-k units under each ranking (from the run alone).

    Args:
        k: top units per sample (10, as the paper boosts).
        rankings: the rankings compared (default every one: "zscore" and "pot").
        reference: the samples the rankings score against ("all", "correct", "class" or a run).
        **common: see :class:`~paramsal.analyses.base.Analysis` (no model and no data are read).
    """

    purpose = "rank the units of"

    def __init__(self, *, k: int = 10, rankings: Sequence[str] = RANKINGS, reference: str | os.PathLike | Run = "all",
                 **common: Any):
        super().__init__(**common)
        unknown = [r for r in rankings if r not in RANKINGS]
        if unknown or not rankings:
            raise InputError(f"unknown ranking(s) {unknown or list(rankings)}; expected some of {', '.join(RANKINGS)}")
        self.k, self.rankings, self.reference = check_integer("k", k), tuple(rankings), check_reference(reference)

    def evaluate(self, run: Run | str | os.PathLike, data: Any = None, samples: Samples = None) -> DepthBiasResult:
        run = open_for_analysis(run, self.allow_partial)
        ids, _, _ = chosen_samples(run, samples, self.purpose)
        units = run.units.to_pandas()
        layers = np.unique(units["layer"])
        depth = np.searchsorted(layers, units["layer"].to_numpy()) / max(len(layers) - 1, 1)
        unit_share = units.groupby("layer").size().reindex(layers).to_numpy() / len(units)
        modules = units.groupby("layer")["module"].first().reindex(layers).to_numpy()
        rows, summary = [], []
        for ranking in self.rankings:
            top = select_units(unit_scores(run, ids, ranking, self.reference), self.k, "salient", 0, ids).ravel()
            chosen_layers = units["layer"].to_numpy()[top]
            top_share = np.array([(chosen_layers == layer).mean() for layer in layers])
            rows.append(pd.DataFrame({"ranking": ranking, "layer": layers, "module": modules,
                                      "depth": np.arange(len(layers)) / max(len(layers) - 1, 1), "units":
                                      (unit_share * len(units)).round().astype(int), "unit_share": unit_share,
                                      "top_share": top_share, "ratio": top_share / unit_share}))
            summary.append({"ranking": ranking, "samples": len(ids), "k": self.k, "mean_depth": depth[top].mean(),
                            "deep_share": (depth[top] > 2 / 3).mean(), "uniform_mean_depth": depth.mean(),
                            "uniform_deep_share": (depth > 2 / 3).mean()})
        samples_name = samples if isinstance(samples, str) else ("misclassified" if samples is None else "selected")
        return DepthBiasResult(pd.concat(rows, ignore_index=True), pd.DataFrame(summary),
                               result_config(run, self, samples=samples_name, num_samples=len(ids),
                                             name_parts=[] if self.reference == "all" else
                                             [f"ref-{os.path.basename(self.reference)}"]))
