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

import argparse
import copy
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from paramsal.engine.analyses.common import add_source_arguments, load_source, open_analysis_run, output_folder
from paramsal.engine.analyses.input_saliency import InputSaliency, add_explainer_arguments, channel_max, load_inputs
from paramsal.errors import InputError


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


@dataclass(frozen=True)
class SanityResult:
    """Correlations of the input-space saliency maps after each randomization stage with the original.

    Attributes:
        layers: randomizable layers, in model order (stage j re-initialized the last j).
        stages: ``[S]`` number of randomized layers of each stage.
        correlations: ``[N, S]`` Spearman correlation per sample and stage.
        sample_ids: ``[N]``.
    """

    layers: list[str]
    stages: np.ndarray
    correlations: np.ndarray
    sample_ids: np.ndarray

    @property
    def mean(self) -> np.ndarray:
        """``[S]`` mean correlation over samples (NaNs, from constant maps, ignored)."""
        return np.nanmean(self.correlations, axis=0)

    def plot(self, path: str | os.PathLike | None = None):
        """Mean (and per-sample) correlation vs number of randomized layers; writes a PNG if ``path``."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 3.5))
        for row in self.correlations:
            ax.plot(self.stages, row, color="0.8", linewidth=0.8)
        ax.plot(self.stages, self.mean, marker="o", color="C0", label=f"mean over {len(self.correlations)} samples")
        ax.axhline(0, color="k", linewidth=0.5)
        ax.set_xlabel("layers randomized (from the top)")
        ax.set_ylabel("Spearman correlation with original map")
        ax.set_ylim(-0.2, 1.02)
        ax.legend(loc="upper right", fontsize=8)
        fig.tight_layout()
        if path is not None:
            output_folder(Path(path).parent)
            fig.savefig(path, dpi=100)
            plt.close(fig)
        return fig


class CascadingRandomization:
    """The cascading randomization test of an :class:`InputSaliency` configuration.

    Stage j re-initializes (each module's own ``reset_parameters()``, which for
    BatchNorm also resets the running statistics) the last j layers of
    :func:`randomizable_layers`, cumulatively, on one deep copy; the caller's
    model is untouched. Every stage reruns the whole method — profile,
    choice of the top units, boosted target, gradient — with the *original*
    statistics. Maps are compared as channel-max absolute gradients
    (:func:`channel_max`), before percentile clipping, whose many ties would
    blunt a rank correlation.

    Args:
        explainer: the configuration to test (model, stats, top, boost, select, units).
        stages: numbers of randomized layers to evaluate (default every 1..L).
        seed: seeds the re-initialization (the global RNG is restored afterwards).
    """

    def __init__(self, explainer: InputSaliency, stages: Sequence[int] | None = None, seed: int = 0):
        self.explainer = explainer
        self.layers = randomizable_layers(explainer.model)
        total = len(self.layers)
        self.stages = sorted(set(stages)) if stages is not None else list(range(1, total + 1))
        bad = [s for s in self.stages if not 1 <= s <= total]
        if bad or not self.stages:
            raise InputError(f"stages {bad or '[]'} are outside 1..{total} ({total} randomizable layers)")
        self.seed = seed

    def evaluate(self, inputs: torch.Tensor, targets: torch.Tensor,
                 sample_ids: Sequence[int] | np.ndarray | None = None) -> SanityResult:
        """Correlations ``[N, S]`` for ``inputs [N, C, H, W]`` with true classes ``targets [N]``."""
        ids = np.arange(len(inputs)) if sample_ids is None else np.asarray(sample_ids)
        original = self._maps(self.explainer, inputs, targets, ids)
        randomized = copy.deepcopy(self.explainer.model)
        columns = []
        done = 0
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            for stage in self.stages:
                for name in reversed(self.layers[len(self.layers) - stage:len(self.layers) - done]):
                    randomized.get_submodule(name).reset_parameters()
                done = stage
                maps = self._maps(self._like(randomized), inputs, targets, ids)
                columns.append([spearman(a, b) for a, b in zip(original, maps)])
        return SanityResult(list(self.layers), np.asarray(self.stages), np.asarray(columns).T.reshape(len(ids), -1),
                            ids)

    def _like(self, model: nn.Module) -> InputSaliency:
        ex = self.explainer
        return InputSaliency(model, ex.stats, top=ex.top, boost=ex.boost, select=ex.select, seed=ex.seed,
                             units=ex.index, aggregation=ex.aggregation, backend=ex.backend, chunk_size=ex.chunk_size)

    @staticmethod
    def _maps(explainer: InputSaliency, inputs: torch.Tensor, targets: torch.Tensor,
              ids: np.ndarray) -> np.ndarray:
        maps = channel_max(explainer.attribute(inputs, targets, sample_ids=ids))
        return maps.flatten(1).double().cpu().numpy()


# ----------------------------------------------------------------------------------------------- command line


def add_sanity_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of ``paramsal sanity RUN --sample ID ...``."""
    parser.add_argument("run", help="run directory made by `paramsal profile`")
    parser.add_argument("--sample", type=int, action="append", required=True, help="sample id (repeatable)")
    add_explainer_arguments(parser, "which units the maps boost")
    parser.add_argument("--stages", help="comma-separated numbers of randomized layers (default all)")
    add_source_arguments(parser)
    parser.add_argument("--out", help="output directory (default RUN/figures)")


def run_sanity_command(args: argparse.Namespace) -> int:
    """``paramsal sanity``: prints the mean correlation per stage and writes the plot."""
    run = open_analysis_run(args)
    out = output_folder(args.out or run.path / "figures")
    model, data, _ = load_source(run, args)
    inputs, targets, ids, _ = load_inputs(run, data, args)
    explainer = InputSaliency.for_run(model, run, top=args.top, boost=args.boost, select=args.select,
                                      seed=args.seed, check_model=not args.allow_other_weights)
    stages = [int(s) for s in args.stages.split(",")] if args.stages else None
    result = CascadingRandomization(explainer, stages, seed=args.seed).evaluate(inputs, targets, ids)
    for stage, value in zip(result.stages, result.mean):
        print(f"{stage:3d} layers randomized (down to {result.layers[-stage]}): spearman {value:+.3f}")
    path = out / "sanity-randomization.png"
    result.plot(path)
    print(f"wrote {path}")
    return 0
