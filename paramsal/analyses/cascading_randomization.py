"""Sanity check of input-space saliency by cascading model randomization (paper A.10, after Adebayo et al.).

A saliency method that explains the *model* must change when the model's
parameters are destroyed. Starting from the output, the layers of a deep copy
of the model are re-initialized one more at a time (the last layer, then the
last two, ...), the input-space saliency map is recomputed with the same
configuration and the *original* run's statistics, and its Spearman rank
correlation with the original map is reported per stage. A method that passes
shows correlations that fall towards 0 as more layers are randomized.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from paramsal._typing import MapDataset
from paramsal.analyses.base import Analysis, Result, result_config
from paramsal.analyses.input_saliency import InputSaliency
from paramsal.analyses.pictures import channel_max
from paramsal.analyses.selection import run_tails
from paramsal.analyses.sources import Samples
from paramsal.errors import InputError
from paramsal.kernels.chunks import chunk_slices
from paramsal.rundir.run import Run


def rank_data(values: np.ndarray) -> np.ndarray:
    """Ranks ``1..n`` of a 1-D array, ties given their average rank (as ``scipy.stats.rankdata``)."""
    values = np.asarray(values).ravel()
    order = np.argsort(values, kind="mergesort")
    inverse = np.empty(len(values), dtype=np.int64)
    inverse[order] = np.arange(len(values))
    ordered = values[order]
    starts = np.r_[True, ordered[1:] != ordered[:-1]]
    dense = np.cumsum(starts)[inverse]
    bounds = np.r_[np.flatnonzero(starts), len(values)]
    # A tie group spanning sorted positions [a, b) gets the mean of ranks a+1..b.
    return 0.5 * (bounds[dense] + bounds[dense - 1] + 1)


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation of two equally long arrays (NaN when either is constant)."""
    ra, rb = rank_data(a), rank_data(b)
    if len(ra) != len(rb):
        raise InputError(f"spearman needs arrays of equal size, got {len(ra)} and {len(rb)}")
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denominator = np.sqrt((ra * ra).sum() * (rb * rb).sum())
    return float((ra * rb).sum() / denominator) if denominator > 0 else float("nan")


def randomizable_layers(model: nn.Module) -> list[str]:
    """Modules that own parameters directly and have ``reset_parameters``, in ``named_modules()`` order.

    For a feed-forward model defined in forward order (torchvision's, the
    demo's), the last entry is the output layer.
    """
    names = [name for name, module in model.named_modules()
             if any(True for _ in module.parameters(recurse=False)) and hasattr(module, "reset_parameters")]
    if not names:
        raise InputError(f"{type(model).__name__} has no module with parameters and reset_parameters()")
    return names


class SanityResult(Result):
    """Correlations of the input-space saliency maps after each randomization stage with the original.

    * ``table``: one row per (sample, stage): sample_id, stage (number of
      layers randomized, from the output), layer (the module name of the
      deepest layer randomized at that stage), spearman (rank correlation of
      the sample's channel-max map with its original one; NaN for a constant map);
    * ``summary``: one row per stage: stage, layer, n, spearman (mean over
      samples, NaNs ignored), spearman_std;
    * ``config["layers"]``: the randomizable layers in model order.
    """

    kind = "sanity"
    title = "Cascading randomization (paper A.10)"

    @property
    def layers(self) -> list[str]:
        """Randomizable layers, in model order (stage j re-initialized the last j)."""
        return list(self.config.get("layers", []))

    @property
    def stages(self) -> np.ndarray:
        """``[S]`` number of randomized layers of each stage."""
        return self.summary["stage"].to_numpy()

    @property
    def sample_ids(self) -> np.ndarray:
        """``[N]`` the samples, in the table's order."""
        return pd.unique(self.table["sample_id"])

    @property
    def correlations(self) -> np.ndarray:
        """``[N, S]`` Spearman correlation per sample and stage."""
        frame = self.table.pivot(index="sample_id", columns="stage", values="spearman")
        return frame.loc[self.sample_ids, self.stages].to_numpy(dtype=np.float64)

    @property
    def mean(self) -> np.ndarray:
        """``[S]`` mean correlation over samples (NaNs, from constant maps, ignored)."""
        return self.summary["spearman"].to_numpy(dtype=np.float64)

    def _figsize(self) -> tuple[float, float]:
        return (max(6.0, 0.5 * len(self.summary) + 2), 4.2)

    def _draw(self, figure: Any, axes: list[Any]) -> None:
        ax = axes[0]
        for row in self.correlations:
            ax.plot(self.stages, row, color="0.8", linewidth=0.8)
        ax.plot(self.stages, self.mean, marker="o", color="C0", label=f"mean over {len(self.sample_ids)} samples")
        ax.axhline(0, color="k", linewidth=0.5)
        ax.set_xticks(self.stages, labels=list(self.summary["layer"]), rotation=60, ha="right", fontsize=7)
        ax.set_xlabel("randomized from the output down to")
        ax.set_ylabel("Spearman correlation with original map")
        ax.set_ylim(-0.2, 1.02)
        ax.legend(loc="upper right", fontsize=8)


class CascadingRandomization(Analysis):
    """The cascading randomization test of input-space saliency (paper A.10, after Adebayo et al.).

    Stage j re-initializes (each module's own ``reset_parameters()``, which for
    BatchNorm also resets the running statistics) the last j layers of
    :func:`randomizable_layers`, cumulatively, on one deep copy; the caller's
    model is untouched. Every stage reruns the whole method (profile, choice
    of the units, boosted target, gradient) with the *original* run's
    statistics. Maps are compared as channel-max absolute gradients
    (:func:`~paramsal.analyses.pictures.channel_max`), before percentile
    clipping, whose many ties would blunt a rank correlation.

    Args:
        model: the network the run profiled (None: rebuilt from the run).
        stages: numbers of randomized layers to evaluate (default every 1..L).
        k: units boosted per sample.
        boost: factor on their entries.
        select: "salient" or "random" units.
        seed: seeds the random units and the re-initialization (the global RNG is restored afterwards).
        ranking: how units are ranked: "zscore" or "pot" (:meth:`Run.scores`).
        batch_size: samples per batch.
        **common: :class:`~paramsal.analyses.base.Analysis`'s keywords.
    """

    purpose = "check"

    def __init__(self, model: nn.Module | None = None, *, stages: Sequence[int] | None = None, k: int = 10,
                 boost: float = 100.0, select: str = "salient", seed: int = 0, ranking: str = "zscore",
                 batch_size: int = 8, **common: Any):
        super().__init__(model, **common)
        self.stages = None if stages is None else sorted({int(s) for s in stages})
        if self.stages is not None and model is None and (not self.stages or self.stages[0] < 1):
            raise InputError(f"stages {[s for s in self.stages if s < 1] or '[]'} are outside 1..L "
                             "(L randomizable layers)")
        self.k, self.boost, self.select, self.seed = int(k), float(boost), select, int(seed)
        self.ranking, self.batch_size = ranking, int(batch_size)
        # The explainer's own checks (k, select, ranking, batch_size), once.
        InputSaliency(k=k, boost=boost, select=select, seed=seed, ranking=ranking, batch_size=batch_size)
        if model is not None:
            self._stages(randomizable_layers(model))

    def evaluate(self, run: Run | str | os.PathLike, data: MapDataset | None = None,
                 samples: Samples = None) -> SanityResult:
        prepared = self.prepare(run, data, samples)
        layers = randomizable_layers(prepared.model)
        stages = self._stages(layers)
        explainer = InputSaliency(prepared.model, stats=prepared.run.stats, k=self.k, boost=self.boost,
                                  select=self.select, ranking=self.ranking, seed=self.seed, units=prepared.index,
                                  aggregation=prepared.run.manifest.aggregation, batch_size=self.batch_size,
                                  tails=run_tails(prepared.run) if self.ranking == "pot" else None)
        inputs = prepared.inputs()
        targets = torch.as_tensor(prepared.targets)
        ids = prepared.ids
        original = self._maps(explainer, inputs, targets, ids)
        randomized = copy.deepcopy(prepared.model)
        columns: dict[str, list] = {"sample_id": [], "stage": [], "layer": [], "spearman": []}
        done = 0
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            for stage in stages:
                for name in reversed(layers[len(layers) - stage:len(layers) - done]):
                    getattr(randomized.get_submodule(name), "reset_parameters")()
                done = stage
                bound = explainer._bound()
                maps = self._maps(explainer._like(randomized, bound.stats, bound.index, bound.aggregation), inputs,
                                  targets, ids)
                columns["sample_id"] += ids.tolist()
                columns["stage"] += [stage] * len(ids)
                columns["layer"] += [layers[-stage]] * len(ids)
                columns["spearman"] += [spearman(a, b) for a, b in zip(original, maps)]
        table = pd.DataFrame(columns)
        summary = table.groupby(["stage", "layer"], sort=True).agg(
            n=("sample_id", "size"), spearman=("spearman", lambda v: np.nanmean(v) if v.notna().any() else np.nan),
            spearman_std=("spearman", "std")).reset_index().sort_values("stage", ignore_index=True)
        config = result_config(prepared.run, self, layers=list(layers), stages=stages)
        return SanityResult(table, summary, config)

    def _stages(self, layers: list[str]) -> list[int]:
        total = len(layers)
        stages = self.stages if self.stages is not None else list(range(1, total + 1))
        bad = [s for s in stages if not 1 <= s <= total]
        if bad or not stages:
            raise InputError(f"stages {bad or '[]'} are outside 1..{total} ({total} randomizable layers)")
        return stages

    def _maps(self, explainer: InputSaliency, inputs: torch.Tensor, targets: torch.Tensor,
              ids: np.ndarray) -> np.ndarray:
        maps = [channel_max(explainer.attribute(inputs[rows], targets[rows], sample_ids=ids[rows]))
                for rows in chunk_slices(len(ids), self.batch_size)]
        return torch.cat(maps).flatten(1).double().cpu().numpy()


__all__ = ["CascadingRandomization", "SanityResult", "randomizable_layers", "rank_data", "spearman"]
