"""The masking experiment (paper 3.4, A.8): hide a sample's most salient pixels and measure what changes.

If the input-space saliency map points at the pixels that make a mistake's
salient units salient, hiding them should lower those units' saliency and
move the confidences more than hiding as many random pixels does.
"""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import torch
import torch.nn.functional as F
from torch import nn

from paramsal._typing import MapDataset
from paramsal.analyses.base import Analysis, Result, result_config
from paramsal.analyses.input_saliency import InputSaliency
from paramsal.analyses.pictures import channel_max, gaussian_kernel
from paramsal.analyses.selection import run_tails
from paramsal.analyses.sources import Samples
from paramsal.engine.profile import eval_mode
from paramsal.errors import InputError, check_choice, check_integer
from paramsal.jobs.distributed import current_ranks
from paramsal.kernels.chunks import chunk_slices
from paramsal.options import MASK_PERCENTS, MASK_VALUES, RANKINGS
from paramsal.rundir.run import Run

#: Which pixels are masked: the most salient ones, or as many random ones (the comparison).
PIXEL_CHOICES = ("salient", "random")
#: The "blur" value's Gaussian standard deviation, as a fraction of the image's longer side (224 px -> 14 px).
BLUR_SIGMA_FRACTION = 1 / 16
#: Summary columns :meth:`MaskingResult.plot` draws against percent, with their axis labels.
PLOTTED = {"units_drop": "drop of the units' raw saliency", "delta_true": "Δ true-class confidence",
           "pct_pred_changed": "% predictions changed"}

MaskValue = str | float


def pixel_count(percent: float, num_pixels: int) -> int:
    """Pixels hidden for ``percent`` % of ``num_pixels``: ``round(percent/100 * num_pixels)``, at least 1."""
    if not 0 < percent <= 100:
        raise InputError(f"mask percent must be in (0, 100], got {percent}")
    return max(1, round(percent / 100 * num_pixels))


def top_pixels(scores: torch.Tensor, count: int) -> torch.Tensor:
    """The ``count`` highest-scoring pixels of each sample, ``[N, H, W] -> [N, count]`` flat indices."""
    return torch.topk(scores.flatten(1), count, dim=1).indices


def random_pixels(num_samples: int, num_pixels: int, count: int, seed: int = 0,
                  sample_ids: Sequence[int] | np.ndarray | None = None) -> torch.Tensor:
    """``[N, count]`` random flat pixel indices, sample i's seeded by ``(seed, sample_ids[i])``."""
    ids = np.arange(num_samples) if sample_ids is None else np.asarray(sample_ids)
    draws = [np.random.default_rng([seed, int(i), 1]).permutation(num_pixels)[:count] for i in ids]
    return torch.as_tensor(np.stack(draws), dtype=torch.long)


def mask_pixels(inputs: torch.Tensor, pixels: torch.Tensor, value: float | torch.Tensor = 0.0) -> torch.Tensor:
    """A copy of ``inputs [N, C, H, W]`` with the flat pixels ``pixels [N, k]`` replaced in every channel.

    Args:
        value: what the masked pixels become: a number, or a tensor broadcastable
            to ``inputs`` (e.g. :func:`mask_fill`'s blurred copy ``[N, C, H, W]`` or means ``[N, C, 1, 1]``).
    """
    n, _, h, w = inputs.shape
    keep = torch.ones(n, h * w, dtype=torch.bool, device=inputs.device)
    keep[torch.arange(n, device=inputs.device)[:, None], pixels.to(inputs.device)] = False
    keep = keep.view(n, 1, h, w)
    return torch.where(keep, inputs, torch.as_tensor(value, dtype=inputs.dtype, device=inputs.device))


def blurred(inputs: torch.Tensor, sigma: float | None = None) -> torch.Tensor:
    """A Gaussian-blurred copy of images ``[N, C, H, W]``, each channel on its own (borders replicated).

    Args:
        sigma: standard deviation in pixels; default ``max(H, W) * BLUR_SIGMA_FRACTION``, at least 1.
    """
    sigma = sigma or max(1.0, max(inputs.shape[-2:]) * BLUR_SIGMA_FRACTION)
    size = 2 * math.ceil(3 * sigma) + 1
    channels = inputs.shape[1]
    kernel = gaussian_kernel(size, sigma).to(inputs.device, inputs.dtype)[None, None].repeat(channels, 1, 1, 1)
    padded = F.pad(inputs, [size // 2] * 4, mode="replicate")
    return F.conv2d(padded, kernel, groups=channels)


def mask_fill(inputs: torch.Tensor, value: MaskValue) -> torch.Tensor:
    """What the masked pixels of ``inputs [N, C, H, W]`` become, broadcastable to ``inputs``.

    Args:
        value: "blur" (a Gaussian-blurred copy of each image, :func:`blurred`),
            "mean" (each image's per-channel mean), "zero", or a number.
    """
    if value == "blur":
        return blurred(inputs)
    if value == "mean":
        return inputs.mean(dim=(-2, -1), keepdim=True)
    return torch.as_tensor(0.0 if value == "zero" else float(value), dtype=inputs.dtype, device=inputs.device)


def check_mask_value(value: Any) -> MaskValue:
    """``value`` if it is one of :data:`MASK_VALUES` or a finite number (as float), else an InputError."""
    if isinstance(value, str) and value in MASK_VALUES:
        return value
    if isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    raise InputError(f"unknown mask value {value!r}; expected one of {', '.join(MASK_VALUES)} or a finite number")


def summarize_masking(table: pd.DataFrame | pa.Table) -> pd.DataFrame:
    """Per (pixels, percent): n, mean and median units_drop, mean Δ true / Δ predicted-class confidence,
    % of predictions changed."""
    frame = table.to_pandas() if isinstance(table, pa.Table) else table.copy()
    frame["delta_true"] = frame["true_after"] - frame["true_before"]
    frame["delta_pred"] = frame["pred_after"] - frame["pred_before"]
    frame["changed"] = frame["new_pred"] != frame["pred"]
    summary = frame.groupby(["pixels", "percent"], sort=True).agg(
        n=("sample_id", "size"), units_drop=("units_drop", "mean"), median_units_drop=("units_drop", "median"),
        delta_true=("delta_true", "mean"), delta_pred=("delta_pred", "mean"),
        pct_pred_changed=("changed", "mean")).reset_index()
    summary["pct_pred_changed"] *= 100
    return summary


def confidence_raised(table: pd.DataFrame | pa.Table, percent: float = 5, min_gain: float = 0.25) -> np.ndarray:
    """Sample ids whose true-class confidence rises by at least ``min_gain`` when the top ``percent`` % salient
    pixels are masked (appendix A.8: 5 % and 25 percentage points)."""
    frame = table.to_pandas() if isinstance(table, pa.Table) else table
    rows = frame[(frame["pixels"] == "salient") & (frame["percent"] == float(percent))]
    if rows.empty:
        raise InputError(f"the table has no salient-pixel rows with percent={percent}")
    return rows.loc[rows["true_after"] - rows["true_before"] >= min_gain, "sample_id"].to_numpy()


class MaskingResult(Result):
    """What :meth:`Masking.evaluate` measured.

    * ``table``: one row per (sample, pixels, percent): sample_id, target,
      pred (unmasked prediction, recomputed), pixels ("salient"/"random"),
      percent, num_pixels, true_before, true_after (softmax of the true
      class), pred_before, pred_after (of the unmasked prediction), new_pred,
      units_raw_before, units_raw_after (mean raw saliency of the chosen
      units F), units_drop (``1 - after / before``), units_z_before,
      units_z_after (the standardized means);
    * ``summary``: :func:`summarize_masking` of the table.
    """

    kind = "masking"
    title = "Masking the salient pixels (paper 3.4, A.8)"
    panels = len(PLOTTED)

    def _draw(self, figure: Any, axes: list[Any]) -> None:
        for ax, (column, label) in zip(axes, PLOTTED.items()):
            for pixels, part in self.summary.groupby("pixels", sort=False):
                part = part.sort_values("percent")
                ax.plot(part["percent"], part[column], marker="o", ms=3, label=f"{pixels} pixels")
            ax.axhline(0, color="grey", linewidth=0.6)
            ax.set_xlabel("% of pixels masked")
            ax.set_ylabel(label)
        axes[0].legend()
        value = self.config.get("value", "blur")
        n = int(self.summary["n"].max()) if len(self.summary) else 0
        figure.suptitle(f"masking (value {value}) of {n} samples")


class Masking(Analysis):
    """Masking experiments (paper 3.4, A.8): hide the top p% salient pixels, measure what changes.

    For each chosen sample (default the run's misclassified ones) and each
    p, the ``round(p% * H*W)`` pixels with the largest channel-max
    input-space saliency (of the sample's top ``k`` salient units boosted
    ``boost`` times, before any clipping or blur, so ranks have no ties
    from clipping) are replaced, in all channels, by ``value``; as many
    random pixels are masked too (``pixels="random"`` rows).

    ``value`` is what a masked pixel becomes:

    * "blur" (default): that pixel of a Gaussian-blurred copy of the image
      (σ = 1/16 of its longer side), a common neutral choice: it removes
      the pixel's detail, not the image's overall colour;
    * "mean": the image's mean in each channel;
    * "zero", or any number. 0 is not neutral for most data: it is the mean
      pixel only for inputs standardized per channel, and on the demo's
      silhouettes masking even a random 5% of a mistake's pixels with 0
      changes about half of the predictions (blur: about one in seven).

    Measured on the masked input: the confidence (softmax) of the true class
    and of the originally predicted class, the new prediction, and the
    saliency of the originally chosen units F, **raw** (``mean_{k in F}
    s_k`` of the loss with the true label), since the standardized value
    has no meaningful zero to drop towards; ``units_drop = 1 - after /
    before`` (the paper saw about 0.8). The standardized means are reported too.

    Args:
        model: the network the run profiled (None: rebuilt from the run).
        percents: the p values.
        value: "blur", "mean", "zero" or a number.
        k: units F per sample.
        boost: factor on their entries of the boosted profile.
        seed: seeds the random pixels.
        ranking: how units are ranked: "zscore" or "pot" (:meth:`Run.scores`).
        batch_size: samples per batch.
        **common: :class:`~paramsal.analyses.base.Analysis`'s keywords.
    """

    purpose = "mask"

    def __init__(self, model: nn.Module | None = None, *, percents: Sequence[float] = MASK_PERCENTS,
                 value: MaskValue = "blur", k: int = 10, boost: float = 100.0, seed: int = 0,
                 ranking: str = "zscore", batch_size: int = 8, **common: Any):
        super().__init__(model, **common)
        if not len(percents):
            raise InputError("percents is empty: give at least one p in (0, 100]")
        for p in percents:
            pixel_count(p, 1)
        check_choice("ranking", ranking, RANKINGS)
        self.percents = tuple(float(p) for p in percents)
        self.value = check_mask_value(value)
        self.k, self.boost, self.seed, self.ranking = check_integer("k", k), float(boost), int(seed), ranking
        self.batch_size = check_integer("batch_size", batch_size)

    def masked(self, inputs: torch.Tensor, pixels: torch.Tensor) -> torch.Tensor:
        """``inputs [N, C, H, W]`` with the flat pixels ``pixels [N, count]`` replaced by this analysis's ``value``."""
        return mask_pixels(inputs, pixels, mask_fill(inputs, self.value))

    def evaluate(self, run: Run | str | os.PathLike, data: MapDataset | None = None,
                 samples: Samples = None) -> MaskingResult:
        prepared = self.prepare(run, data, samples)
        explainer = InputSaliency(prepared.model, stats=prepared.run.stats, k=self.k, boost=self.boost,
                                  ranking=self.ranking, seed=self.seed, units=prepared.index,
                                  aggregation=prepared.run.manifest.aggregation, batch_size=self.batch_size,
                                  tails=run_tails(prepared.run) if self.ranking == "pot" else None)
        columns: dict[str, list] = {}
        ranks = current_ranks()  # under torchrun, each rank masks a contiguous share of the batches
        for rows in ranks.share(list(chunk_slices(len(prepared.ids), self.batch_size))):
            inputs = prepared.inputs(rows)
            if inputs.dim() != 4:
                raise InputError(f"masking needs images [N, C, H, W], got {tuple(inputs.shape)}")
            self._batch(explainer, inputs, torch.as_tensor(prepared.targets[rows]), prepared.ids[rows], columns)
        table = pd.DataFrame(ranks.gather_columns(columns))
        parts = [] if self.value == "blur" else [f"{self.value:g}" if isinstance(self.value, float) else self.value]
        config = result_config(prepared.run, self, name_parts=parts)
        return MaskingResult(table, summarize_masking(table), config)

    def _batch(self, ex: InputSaliency, inputs: torch.Tensor, targets: torch.Tensor, ids: np.ndarray,
               columns: dict[str, list]) -> None:
        inputs, targets = ex._checked(inputs, targets)
        unit_ids = ex.choose(inputs, targets, ids)
        scores = channel_max(ex.attribute(inputs, targets, unit_ids=unit_ids))
        base = self._measure(ex, inputs, targets, unit_ids)
        pred = base["probs"].argmax(1)
        num_pixels = scores[0].numel()
        for kind in PIXEL_CHOICES:
            for p in self.percents:
                count = pixel_count(p, num_pixels)
                chosen = (top_pixels(scores, count) if kind == "salient"
                          else random_pixels(len(inputs), num_pixels, count, self.seed, ids))
                after = self._measure(ex, self.masked(inputs, chosen), targets, unit_ids)
                for name, value in _rows(ids, targets, pred, kind, p, count, base, after).items():
                    columns.setdefault(name, []).extend(value.tolist())

    @staticmethod
    def _measure(ex: InputSaliency, inputs: torch.Tensor, targets: torch.Tensor,
                 unit_ids: torch.Tensor) -> dict[str, np.ndarray]:
        bound = ex._bound()
        with eval_mode(bound.model), torch.no_grad():
            probs = torch.softmax(bound.model(inputs).double(), dim=1).cpu().numpy()
        raw = ex.raw_profiles(inputs, targets).double()
        z = bound.stats.standardize(raw)
        rows = torch.arange(len(inputs), device=raw.device)[:, None]
        unit_ids = unit_ids.to(raw.device)
        return {"probs": probs, "raw": raw[rows, unit_ids].mean(1).cpu().numpy(),
                "z": z[rows, unit_ids].mean(1).cpu().numpy()}


def _rows(ids: np.ndarray, targets: torch.Tensor, pred: np.ndarray, kind: str, percent: float, count: int,
          base: dict[str, np.ndarray], after: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    n = len(ids)
    rows = np.arange(n)
    y = targets.cpu().numpy()
    return {
        "sample_id": np.asarray(ids, dtype=np.int64), "target": y.astype(np.int64), "pred": pred.astype(np.int64),
        "pixels": np.full(n, kind), "percent": np.full(n, float(percent)), "num_pixels": np.full(n, count),
        "true_before": base["probs"][rows, y], "true_after": after["probs"][rows, y],
        "pred_before": base["probs"][rows, pred], "pred_after": after["probs"][rows, pred],
        "new_pred": after["probs"].argmax(1).astype(np.int64),
        "units_raw_before": base["raw"], "units_raw_after": after["raw"],
        "units_drop": 1.0 - after["raw"] / base["raw"],
        "units_z_before": base["z"], "units_z_after": after["z"],
    }


__all__ = ["Masking", "MaskingResult", "blurred", "check_mask_value", "confidence_raised", "mask_fill",
           "mask_pixels", "pixel_count", "random_pixels", "summarize_masking", "top_pixels"]
