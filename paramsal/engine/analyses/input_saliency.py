"""Input-space saliency from parameter saliency (the paper's section 2.2, 3.4 and appendix A.8).

Which pixels make a sample's most salient filters salient? Boost the chosen
filters' entries of the sample's standardized profile ``ŝ`` (a target profile
``s'_F``, held constant) and ask which input pixels move ``ŝ`` toward it:

    M_F = |∇_x D_C(ŝ(x, y), s'_F)|,   D_C(a, b) = 1 - cos(a, b).

``ŝ`` depends on ``x`` through the per-sample parameter gradient, so ``M_F``
is a gradient of a gradient (double backward). :class:`InputSaliency` does it
for a whole batch with ``torch.func`` (``vmap`` over samples of ``grad`` with
respect to ``x`` of a function that itself takes ``grad`` with respect to the
parameters), or one sample at a time with ``autograd.grad(create_graph=True)``
(``backend="loop"``, the slow reference).

The rest of this module turns the gradient into the paper's picture
(:func:`visual_map`, :func:`plot_explanations`) and runs the masking
experiments (:class:`Masking`): hide the top p% salient pixels and measure how
the confidences and the chosen filters' saliency change.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from paramsal.engine.analyses.common import (add_source_arguments, load_source, open_analysis_run, output_folder,
                                             positive_int_list, recorded_targets, run_inputs, run_units)
from paramsal.engine.analyses.selection import select_units
from paramsal.engine.profile import check_batch, eval_mode, profile_batch
from paramsal.engine.units import UnitIndex, UnitsSpec, units_of
from paramsal.errors import InputError, check_choice
from paramsal.kernels.reduce import reduce_grad
from paramsal._io import load_tensor_file
from paramsal.kernels.stats import SaliencyStats
from paramsal.specs import image_transform

SELECTIONS = ("salient", "random")
BACKENDS = ("vmap", "loop")
DEFAULT_PERCENTS = (1, 5, 10, 20)
PIXEL_CHOICES = ("salient", "random")


# ----------------------------------------------------------------------------------------------- unit choice


def choose_units(z: torch.Tensor | np.ndarray, top: int, select: str = "salient", seed: int = 0,
                 sample_ids: Sequence[int] | np.ndarray | None = None) -> torch.Tensor:
    """The units F each sample's target profile boosts.

    Args:
        z: ``[N, F]`` standardized profiles.
        top: units per sample, ``1 <= top <= F``.
        select: "salient" (largest ``ŝ`` first, ties in unit order) or
            "random" (uniform without replacement; sample i's draw is seeded
            by ``(seed, sample_ids[i])``, so it does not depend on the batch).
        seed: seed of the random choice.
        sample_ids: ``[N]`` ids seeding the random draws (default positions 0..N-1).

    Returns:
        ``[N, top]`` int64 unit ids.
    """
    check_choice("select", select, SELECTIONS)
    z = torch.as_tensor(z).detach().cpu()
    return torch.as_tensor(select_units(z.numpy(), top, select, seed, sample_ids), dtype=torch.long)


def boosted_profile(z: torch.Tensor, unit_ids: torch.Tensor, boost: float) -> torch.Tensor:
    """``s'_F``: a detached copy of ``z [N, F]`` with the units ``unit_ids [N, k]`` multiplied by ``boost``."""
    target = z.detach().clone()
    rows = torch.arange(len(z), device=z.device)[:, None]
    target[rows, unit_ids.to(z.device)] *= boost
    return target


def cosine_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``1 - cos(a, b)`` along the last dim."""
    return 1.0 - F.cosine_similarity(a, b, dim=-1)


# ----------------------------------------------------------------------------------------------- the gradient


class InputSaliency:
    """Input-space saliency ``M_F = |∇_x D_C(ŝ(x, y), s'_F)|``, configured once, called per batch.

    ``ŝ(x, y)`` is the standardized profile of *that sample's own* loss
    (cross-entropy with its label ``y``): raw ``s = mean |∂L/∂θ|`` over each
    unit, then ``(s - μ) / σ`` with ``stats`` (a reference set's, kept fixed).
    ``s'_F`` is ``ŝ`` with the entries of the units F multiplied by ``boost``
    and held constant. The model is evaluated in eval mode (BatchNorm on
    running statistics) and its flags are restored; no hook is used and
    ``.grad`` is never touched.

    Args:
        model: the classifier.
        stats: statistics that standardize the profiles (e.g. ``run.stats``).
        top: size of F (paper: 10).
        boost: factor on the chosen entries (paper: 100).
        select: "salient" (F = the top units of ``ŝ``) or "random" (k random
            units, the paper's comparison).
        seed: seed of the random choice.
        units: the partition, as for :func:`paramsal.units_of` (default
            "filters"); must have ``stats.num_units`` units.
        aggregation: "mean_abs" (paper) or "abs_mean"; default the statistics'.
        backend: "vmap" (batched, ``torch.func``) or "loop" (one sample at a
            time with ``autograd.grad(create_graph=True)``, the reference).
        chunk_size: samples per vmap chunk (bounds memory: each sample holds a
            parameter-sized gradient and its graph).

    Example:
        >>> explainer = InputSaliency(model, run.stats, top=10, boost=100.0)
        >>> maps = explainer.attribute(images, labels)        # [N, C, H, W], >= 0
    """

    @classmethod
    def for_run(cls, model: nn.Module, run, *, check_model: bool = True, **options) -> InputSaliency:
        """An explainer with a run's statistics, units and aggregation (``options``: top, boost, select, seed...).

        Raises:
            InputError: when the model's units are not the run's, or (unless
                ``check_model=False``) its weights are not the profiled ones:
                the run's statistics would standardize another model's profiles.
        """
        index = run_units(run, model, options.pop("units", None), check_model)
        return cls(model, run.stats, units=index, aggregation=run.manifest.get("aggregation"), **options)

    def __init__(self, model: nn.Module, stats: SaliencyStats, *, top: int = 10, boost: float = 100.0,
                 select: str = "salient", seed: int = 0, units: UnitsSpec | UnitIndex = "filters",
                 aggregation: str | None = None, backend: str = "vmap", chunk_size: int | None = 8):
        check_choice("select", select, SELECTIONS)
        check_choice("backend", backend, BACKENDS)
        if chunk_size is not None and chunk_size < 1:
            raise InputError(f"chunk_size must be >= 1, got {chunk_size}")
        self.model = model
        self.index = units if isinstance(units, UnitIndex) else units_of(model, units)
        if len(self.index) != stats.num_units:
            raise InputError(f"the statistics have {stats.num_units} units but units={self.index.scheme!r} gives "
                             f"{len(self.index)} for {type(model).__name__}: use the run's model and units")
        if not 1 <= top <= len(self.index):
            raise InputError(f"top={top} is outside 1..{len(self.index)}")
        self.stats = stats
        self.top, self.boost, self.select, self.seed = top, float(boost), select, seed
        self.aggregation = aggregation or stats.aggregation or "mean_abs"
        self.backend, self.chunk_size = backend, chunk_size

    def profiles(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Standardized profiles ``ŝ`` ``[N, F]`` of ``inputs [N, ...]`` with labels ``targets [N]``."""
        raw = profile_batch(self.model, inputs, targets, units=self.index, aggregation=self.aggregation)
        return self._standardizer(raw.dtype, raw.device)(raw)

    def choose(self, inputs: torch.Tensor, targets: torch.Tensor,
               sample_ids: Sequence[int] | np.ndarray | None = None) -> torch.Tensor:
        """The units F ``[N, top]`` this explainer boosts for each sample (see :func:`choose_units`)."""
        return choose_units(self.profiles(inputs, targets), self.top, self.select, self.seed, sample_ids)

    def attribute(self, inputs: torch.Tensor, targets: torch.Tensor, *, unit_ids: torch.Tensor | None = None,
                  sample_ids: Sequence[int] | np.ndarray | None = None) -> torch.Tensor:
        """Input-space saliency of a batch.

        Args:
            inputs: ``[N, ...]``, e.g. images ``[N, C, H, W]``, in the space the model takes
                (normalized images).
            targets: ``[N]`` class indices; each sample's loss uses its own (the true label).
            unit_ids: ``[N, k]`` the units F to boost; default chosen by ``select``.
            sample_ids: ``[N]`` ids seeding a random choice (default positions).

        Returns:
            ``[N, ...]`` like ``inputs``: ``|∂ D_C(ŝ(x), s'_F) / ∂x|`` (detached, the model's dtype).
        """
        inputs, targets = self._checked(inputs, targets)
        with eval_mode(self.model):
            z = self.profiles(inputs, targets)
            if unit_ids is None:
                unit_ids = choose_units(z, self.top, self.select, self.seed, sample_ids)
            elif tuple(unit_ids.shape[:1]) != (len(inputs),) or unit_ids.dim() != 2:
                raise InputError(f"unit_ids of shape {tuple(unit_ids.shape)} do not fit {len(inputs)} samples: "
                                 "expected [N, k]")
            target = boosted_profile(z, torch.as_tensor(unit_ids), self.boost)
            run = _attribute_vmap if self.backend == "vmap" else _attribute_loop
            gradient = run(self.model, self.index, self._standardizer(inputs.dtype, inputs.device),
                           self.aggregation, inputs, targets, target, self.chunk_size)
        return gradient.abs().detach()

    def _standardizer(self, dtype: torch.dtype, device: torch.device) -> Callable[[torch.Tensor], torch.Tensor]:
        # np.array copies: the statistics' arrays may be read-only views of a Parquet file.
        mean = torch.as_tensor(np.array(self.stats.mean), dtype=dtype, device=device)
        std = torch.as_tensor(np.array(self.stats.std), dtype=dtype, device=device)
        return lambda s: (s - mean) / std

    def _checked(self, inputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        check_batch(inputs, targets, class_indices=True)
        if inputs.dim() < 2:  # a gradient w.r.t. each sample's input needs a sample dim and a feature dim
            raise InputError(f"inputs must be a batch [N, ...] of non-scalar samples, got shape {tuple(inputs.shape)}")
        param = next(iter(self.model.parameters()))
        return inputs.to(param.device, param.dtype), targets.to(param.device)


def _unit_profile(grads: Sequence[torch.Tensor], index: UnitIndex, aggregation: str) -> torch.Tensor:
    """One sample's raw profile ``[F]`` from its parameter gradients (one per unit group, unbatched)."""
    return torch.cat([reduce_grad(g[None], group, aggregation)[0] for g, group in zip(grads, index)])


def _attribute_vmap(model: nn.Module, index: UnitIndex, standardize, aggregation: str, inputs: torch.Tensor,
                    targets: torch.Tensor, target: torch.Tensor, chunk_size: int | None) -> torch.Tensor:
    names = index.param_names
    # Only the unit parameters are differentiated; the others enter as constants.
    params = {name: p.detach() for name, p in model.named_parameters()}
    buffers = dict(model.named_buffers())

    def distance(x: torch.Tensor, y: torch.Tensor, goal: torch.Tensor) -> torch.Tensor:
        def sample_loss(unit_params: dict[str, torch.Tensor]) -> torch.Tensor:
            logits = functional_call(model, ({**params, **unit_params}, buffers), (x[None],))
            return F.cross_entropy(logits, y[None])

        grads = grad(sample_loss)({name: params[name] for name in names})
        z = standardize(_unit_profile([grads[name] for name in names], index, aggregation))
        return cosine_distance(z, goal)

    return vmap(grad(distance), chunk_size=chunk_size)(inputs, targets, target)


def _attribute_loop(model: nn.Module, index: UnitIndex, standardize, aggregation: str, inputs: torch.Tensor,
                    targets: torch.Tensor, target: torch.Tensor, chunk_size: int | None) -> torch.Tensor:
    params = [model.get_parameter(name) for name in index.param_names]
    rows = []
    with torch.enable_grad():
        for n in range(len(inputs)):
            x = inputs[n:n + 1].detach().requires_grad_(True)
            loss = F.cross_entropy(model(x), targets[n:n + 1])
            grads = torch.autograd.grad(loss, params, create_graph=True)
            z = standardize(_unit_profile(grads, index, aggregation))
            rows.append(torch.autograd.grad(cosine_distance(z, target[n]), x)[0][0])
    return torch.stack(rows)


# ----------------------------------------------------------------------------------------------- the picture


def channel_max(attribution: torch.Tensor) -> torch.Tensor:
    """``[..., C, H, W] -> [..., H, W]``: the absolute gradient's maximum over channels."""
    if attribution.dim() < 3:
        raise InputError(f"expected an attribution [C, H, W] or [N, C, H, W], got {tuple(attribution.shape)}")
    return attribution.abs().amax(dim=-3)


def gaussian_kernel(size: int = 3, sigma: float = 1.0) -> torch.Tensor:
    """A normalized ``[size, size]`` Gaussian kernel (float64)."""
    offsets = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    line = torch.exp(-0.5 * (offsets / sigma) ** 2)
    kernel = torch.outer(line, line)
    return kernel / kernel.sum()


def visual_map(attribution: torch.Tensor, low: float = 90.0, high: float = 99.0, blur: int = 3,
               sigma: float = 1.0) -> torch.Tensor:
    """The paper's picture of an input-space saliency map.

    Absolute gradient, maximum over channels, then clipped between its own
    ``low``-th and ``high``-th percentiles (values below the low one become
    0, above the high one 1, linear in between), then a ``blur x blur``
    Gaussian blur (reflected borders). Percentiles are taken per sample.

    Args:
        attribution: ``[C, H, W]`` or ``[N, C, H, W]`` (e.g. from :meth:`InputSaliency.attribute`).

    Returns:
        ``[H, W]`` or ``[N, H, W]`` float32 in ``[0, 1]``.
    """
    if not 0 <= low < high <= 100:
        raise InputError(f"percentiles must satisfy 0 <= low < high <= 100, got low={low}, high={high}")
    single = attribution.dim() == 3
    maps = channel_max(attribution.detach().cpu().double())
    maps = maps[None] if single else maps
    flat = maps.flatten(1)
    lo = torch.quantile(flat, low / 100, dim=1)[:, None, None]
    hi = torch.quantile(flat, high / 100, dim=1)[:, None, None]
    # A map whose two percentiles coincide (e.g. all zeros) has no spread to show: it stays 0 below hi.
    scaled = ((maps - lo) / (hi - lo).clamp_min(1e-300)).clamp(0, 1)
    if blur > 1:
        padded = F.pad(scaled[:, None], [blur // 2] * 4, mode="reflect")
        scaled = F.conv2d(padded, gaussian_kernel(blur, sigma)[None, None])[:, 0]
    scaled = scaled.float()
    return scaled[0] if single else scaled


def displayable(image: torch.Tensor) -> np.ndarray:
    """An image ``[C, H, W]`` in any normalization, min-max scaled to ``[0, 1]`` as ``[H, W]`` or ``[H, W, 3]``."""
    image = image.detach().cpu().double()
    image = (image - image.min()) / (image.max() - image.min()).clamp_min(1e-12)
    if image.shape[0] == 1:
        return image[0].numpy()
    return image[:3].permute(1, 2, 0).numpy()


def plot_explanations(images: torch.Tensor, maps: torch.Tensor, path: str | os.PathLike | None = None, *,
                      random_maps: torch.Tensor | None = None, titles: Sequence[str] | None = None,
                      alpha: float = 0.5):
    """One row per sample: image, map and overlay (and the random-units map and overlay, if given).

    Args:
        images: ``[N, C, H, W]`` the inputs (any normalization; shown min-max scaled).
        maps: ``[N, H, W]`` visual maps (:func:`visual_map`) for the salient units.
        path: PNG to write (matplotlib Agg); None returns the figure only.
        random_maps: ``[N, H, W]`` the same for random units, shown side by side.
        titles: one label per row (e.g. "id 17: cat -> dog").
        alpha: opacity of the heatmap over the image.

    Returns:
        The matplotlib figure.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if len(images) != len(maps) or (random_maps is not None and len(random_maps) != len(images)):
        raise InputError(f"{len(images)} images but {len(maps)} maps"
                         + ("" if random_maps is None else f" and {len(random_maps)} random maps"))
    columns = [("image", None, False), ("salient units", maps, False), ("overlay", maps, True)]
    if random_maps is not None:
        columns += [("random units", random_maps, False), ("overlay (random)", random_maps, True)]
    fig, axes = plt.subplots(len(images), len(columns), figsize=(2.2 * len(columns), 2.2 * len(images)),
                             squeeze=False)
    for row, image in enumerate(images):
        shown = displayable(image)
        cmap = "gray" if shown.ndim == 2 else None
        for col, (name, source, overlay) in enumerate(columns):
            ax = axes[row, col]
            if source is None or overlay:
                ax.imshow(shown, cmap=cmap)
            if source is not None:
                ax.imshow(source[row].cpu().numpy(), cmap="jet", vmin=0, vmax=1, alpha=alpha if overlay else 1.0)
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(name, fontsize=9)
        if titles is not None:
            axes[row, 0].set_ylabel(titles[row], fontsize=8)
    fig.tight_layout()
    if path is not None:
        output_folder(Path(path).parent)
        fig.savefig(path, dpi=100)
        plt.close(fig)
    return fig


# ----------------------------------------------------------------------------------------------- masking


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


def mask_pixels(inputs: torch.Tensor, pixels: torch.Tensor, value: float = 0.0) -> torch.Tensor:
    """A copy of ``inputs [N, C, H, W]`` with the flat pixels ``pixels [N, k]`` set to ``value`` in every channel."""
    n, _, h, w = inputs.shape
    keep = torch.ones(n, h * w, dtype=torch.bool, device=inputs.device)
    keep[torch.arange(n, device=inputs.device)[:, None], pixels.to(inputs.device)] = False
    keep = keep.view(n, 1, h, w)
    return torch.where(keep, inputs, torch.as_tensor(value, dtype=inputs.dtype, device=inputs.device))


class Masking:
    """Masking experiments (paper 3.4, A.8): hide the top p% salient pixels, measure what changes.

    For each sample and each p, the ``round(p% * H*W)`` pixels with the
    largest channel-max input-space saliency (:func:`channel_max` of
    :meth:`InputSaliency.attribute`, before any clipping or blur, so ranks
    have no ties from clipping) are set, in all channels, to ``value`` —
    by default 0, which for inputs normalized per channel with the data's
    mean and std is the data set's mean pixel value (a neutral grey, not
    black). With ``compare_random=True`` the same number of random pixels is
    masked too (``pixels="random"`` rows).

    Measured on the masked input: the confidence (softmax) of the true class
    and of the originally predicted class, the new prediction, and the
    saliency of the originally chosen units F — **raw** saliency
    ``mean_{k in F} s_k`` (of the loss with the true label), since the
    standardized value has no meaningful zero to drop towards;
    ``units_drop = 1 - after / before`` (the paper saw about 0.8). The
    standardized means are reported too.

    Args:
        explainer: the configured :class:`InputSaliency` (its model, stats, units, top, boost, select).
        percents: the p values (default 1, 5, 10, 20).
        value: what masked pixels are set to.
        compare_random: also mask random pixels of the same count.
        seed: seeds the random pixels.
    """

    def __init__(self, explainer: InputSaliency, percents: Sequence[float] = DEFAULT_PERCENTS, *,
                 value: float = 0.0, compare_random: bool = True, seed: int = 0):
        if not percents:
            raise InputError("percents is empty: give at least one p in (0, 100]")
        for p in percents:
            pixel_count(p, 1)
        self.explainer, self.percents, self.value = explainer, tuple(percents), float(value)
        self.compare_random, self.seed = compare_random, seed

    def evaluate(self, inputs: torch.Tensor, targets: torch.Tensor,
                 sample_ids: Sequence[int] | np.ndarray | None = None) -> pa.Table:
        """One row per (sample, pixels, p).

        Args:
            inputs: ``[N, C, H, W]``.
            targets: ``[N]`` true classes.
            sample_ids: ``[N]`` ids for the table (and seeds); default positions.

        Returns:
            Columns sample_id, target, pred, pixels ("salient"/"random"), percent,
            num_pixels, true_before, true_after, pred_before, pred_after (confidence
            in the originally predicted class), new_pred, units_raw_before,
            units_raw_after, units_drop, units_z_before, units_z_after.
        """
        if inputs.dim() != 4:
            raise InputError(f"masking needs images [N, C, H, W], got {tuple(inputs.shape)}")
        ex = self.explainer
        inputs, targets = ex._checked(inputs, targets)
        ids = np.arange(len(inputs)) if sample_ids is None else np.asarray(sample_ids)
        unit_ids = ex.choose(inputs, targets, ids)
        scores = channel_max(ex.attribute(inputs, targets, unit_ids=unit_ids))
        base = self._measure(inputs, targets, unit_ids)
        pred = base["probs"].argmax(1)
        columns: dict[str, list] = {}
        num_pixels = scores[0].numel()
        for kind in PIXEL_CHOICES if self.compare_random else PIXEL_CHOICES[:1]:
            for p in self.percents:
                count = pixel_count(p, num_pixels)
                chosen = (top_pixels(scores, count) if kind == "salient"
                          else random_pixels(len(inputs), num_pixels, count, self.seed, ids))
                after = self._measure(mask_pixels(inputs, chosen, self.value), targets, unit_ids)
                _extend(columns, _rows(ids, targets, pred, kind, p, count, base, after))
        return pa.table(columns)

    def _measure(self, inputs: torch.Tensor, targets: torch.Tensor, unit_ids: torch.Tensor) -> dict[str, np.ndarray]:
        ex = self.explainer
        with eval_mode(ex.model), torch.no_grad():
            probs = torch.softmax(ex.model(inputs).double(), dim=1).cpu().numpy()
        raw = profile_batch(ex.model, inputs, targets, units=ex.index, aggregation=ex.aggregation)
        z = ex._standardizer(torch.float64, raw.device)(raw.double())
        rows = torch.arange(len(inputs))[:, None]
        return {"probs": probs, "raw": raw.double()[rows, unit_ids].mean(1).cpu().numpy(),
                "z": z[rows, unit_ids].mean(1).cpu().numpy()}


def _rows(ids: np.ndarray, targets: torch.Tensor, pred: np.ndarray, kind: str, percent: float, count: int,
          base: dict[str, np.ndarray], after: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    n = len(ids)
    rows = np.arange(n)
    y = targets.cpu().numpy()
    return {
        "sample_id": ids.astype(np.int64), "target": y.astype(np.int64), "pred": pred.astype(np.int64),
        "pixels": np.full(n, kind), "percent": np.full(n, float(percent)), "num_pixels": np.full(n, count),
        "true_before": base["probs"][rows, y], "true_after": after["probs"][rows, y],
        "pred_before": base["probs"][rows, pred], "pred_after": after["probs"][rows, pred],
        "new_pred": after["probs"].argmax(1).astype(np.int64),
        "units_raw_before": base["raw"], "units_raw_after": after["raw"],
        "units_drop": 1.0 - after["raw"] / base["raw"],
        "units_z_before": base["z"], "units_z_after": after["z"],
    }


def _extend(columns: dict[str, list], values: dict[str, np.ndarray]) -> None:
    for name, value in values.items():
        columns.setdefault(name, []).extend(value.tolist())


def confidence_raised(table: pa.Table, percent: float = 5, min_gain: float = 0.25) -> np.ndarray:
    """Sample ids whose true-class confidence rises by at least ``min_gain`` when the top ``percent`` % salient
    pixels are masked (appendix A.8: 5 % and 25 percentage points)."""
    frame = table.to_pandas()
    rows = frame[(frame["pixels"] == "salient") & (frame["percent"] == float(percent))]
    if rows.empty:
        raise InputError(f"the table has no salient-pixel rows with percent={percent}")
    return rows.loc[rows["true_after"] - rows["true_before"] >= min_gain, "sample_id"].to_numpy()


def summarize_masking(table: pa.Table) -> pa.Table:
    """Per (pixels, percent): samples, mean units_drop, mean Δ true / Δ predicted-class confidence, % flipped."""
    frame = table.to_pandas()
    frame["delta_true"] = frame["true_after"] - frame["true_before"]
    frame["delta_pred"] = frame["pred_after"] - frame["pred_before"]
    frame["changed"] = frame["new_pred"] != frame["pred"]
    summary = frame.groupby(["pixels", "percent"], sort=True).agg(
        n=("sample_id", "size"), units_drop=("units_drop", "mean"), median_units_drop=("units_drop", "median"),
        delta_true=("delta_true", "mean"), delta_pred=("delta_pred", "mean"),
        pct_pred_changed=("changed", "mean")).reset_index()
    summary["pct_pred_changed"] *= 100
    return pa.Table.from_pandas(summary, preserve_index=False)


# ----------------------------------------------------------------------------------------------- command line


def add_explainer_arguments(parser: argparse.ArgumentParser, select_help: str | None) -> None:
    """``--top/--boost/--seed`` and, unless ``select_help`` is None, ``--select``: how the explainer is configured."""
    parser.add_argument("--top", type=int, default=10, help="units boosted (default 10)")
    parser.add_argument("--boost", type=float, default=100.0, help="factor on the boosted units (default 100)")
    if select_help is not None:
        parser.add_argument("--select", default="salient", choices=SELECTIONS, help=select_help)
    parser.add_argument("--seed", type=int, default=0, help="seeds the random units (and random pixels)")


def add_explain_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of ``paramsal explain RUN ...``."""
    parser.add_argument("run", help="run directory made by `paramsal profile` (gives model, data and statistics)")
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--sample", type=int, action="append", help="sample id in the run's data set (repeatable)")
    which.add_argument("--image", help="an image file (read with PIL and --transform) or a .pt/.npy tensor [C, H, W] "
                                       "already in the model's input space")
    parser.add_argument("--label", type=int, help="true class of --image")
    add_explainer_arguments(parser, "which units to boost; the figure always adds random units side by side")
    add_source_arguments(parser)
    parser.add_argument("--out", help="output directory (default RUN/figures)")


def run_explain_command(args: argparse.Namespace) -> int:
    """``paramsal explain``: writes one PNG with image, map and overlay for each sample (salient vs random units)."""
    run = open_analysis_run(args)
    out = output_folder(args.out or run.path / "figures")
    model, data, device = load_source(run, args)
    inputs, targets, ids, names = load_inputs(run, data, args)
    maps = {}
    for select in (args.select, "random" if args.select == "salient" else "salient"):
        explainer = InputSaliency.for_run(model, run, top=args.top, boost=args.boost, select=select, seed=args.seed,
                                          check_model=not args.allow_other_weights)
        maps[select] = visual_map(explainer.attribute(inputs, targets, sample_ids=ids).cpu())
    with eval_mode(model), torch.no_grad():
        preds = model(inputs.to(device)).argmax(1).cpu().tolist()
    titles = [f"{name}: {int(y)} -> {p}" for name, y, p in zip(names, targets.tolist(), preds)]
    path = out / f"explain-{'-'.join(names)[:80]}.png"
    plot_explanations(inputs, maps[args.select], path, titles=titles,
                      random_maps=maps["random" if args.select == "salient" else "salient"])
    print(f"wrote {path}")
    return 0


def add_mask_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of ``paramsal mask RUN ...``."""
    parser.add_argument("run", help="run directory made by `paramsal profile`")
    parser.add_argument("--samples", type=int, default=50, help="first N misclassified samples (default 50)")
    parser.add_argument("--percents", type=positive_int_list, default=list(DEFAULT_PERCENTS),
                        help="comma-separated percentages of pixels to mask (default 1,5,10,20)")
    add_explainer_arguments(parser, None)
    add_source_arguments(parser)
    parser.add_argument("--out", help="output directory (default RUN/analyses)")


def run_mask_command(args: argparse.Namespace) -> int:
    """``paramsal mask``: masks salient vs random pixels of misclassified samples, prints and writes the tables."""
    import pyarrow.parquet as pq

    from paramsal._io import atomic_path

    run = open_analysis_run(args)
    out = output_folder(args.out or run.path / "analyses")
    model, data, device = load_source(run, args)
    args.sample = run.sample_ids(only="misclassified")[:args.samples]
    if not len(args.sample):
        raise InputError(f"{run.path} has no misclassified samples to mask")
    inputs, targets, ids, _ = load_inputs(run, data, args)
    explainer = InputSaliency.for_run(model, run, top=args.top, boost=args.boost,
                                      check_model=not args.allow_other_weights)
    table = Masking(explainer, args.percents, seed=args.seed).evaluate(inputs.to(device), targets.to(device), ids)
    summary = summarize_masking(table)
    for name, content in (("masking.parquet", table), ("masking-summary.parquet", summary)):
        with atomic_path(out / name) as tmp:
            pq.write_table(content, tmp)
    print(summary.to_pandas().to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    raised = confidence_raised(table) if 5 in args.percents else []
    print(f"\n{len(raised)} of {len(ids)} samples gain >= 25 points of true-class confidence when their top 5% "
          f"salient pixels are masked (A.8): {list(map(int, raised))}")
    print(f"wrote {out / 'masking.parquet'}, {out / 'masking-summary.parquet'}")
    return 0


def load_inputs(run, data, args: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor, np.ndarray, list[str]]:
    """The samples the command names: ``--sample`` ids of the run, or ``--image`` with ``--label``.

    A run's samples are read from ``data`` and their labels checked against the
    classes the run recorded, so that another data set cannot pass for the run's.
    """
    if getattr(args, "image", None) is not None:
        if args.label is None:
            raise InputError("--image needs --label (the true class)")
        image = _read_image(args.image, args.transform or "imagenet")
        return image[None], torch.tensor([args.label]), np.array([0]), [Path(args.image).stem]
    ids = np.asarray(args.sample, dtype=np.int64)
    targets = recorded_targets(run, ids)
    inputs = run_inputs(data, ids, targets)
    return inputs, torch.as_tensor(targets, dtype=torch.long), ids, [f"id{int(i)}" for i in ids]


def _read_image(path: str, transform: str) -> torch.Tensor:
    if not Path(path).is_file():
        raise InputError(f"image file {path} does not exist")
    if path.endswith(".pt"):
        image = load_tensor_file(path, "an image tensor file")
    elif path.endswith(".npy"):
        image = _read_npy(path)
    else:
        image = image_transform(transform)(_read_picture(path))
    if not isinstance(image, torch.Tensor) or image.dim() != 3:
        raise InputError(f"{path} must hold one image [C, H, W], got "
                         f"{tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__}")
    return image.float()


def _read_npy(path: str) -> torch.Tensor:
    try:
        return torch.from_numpy(np.load(path))  # allow_pickle stays False: no objects from the file
    except (ValueError, OSError, EOFError) as exc:
        raise InputError(f"image file {path} could not be read as a .npy array ({exc})") from exc


def _read_picture(path: str):
    """The PIL image in ``path``, grayscale kept one-channel (for models like the demo's), anything else RGB."""
    from PIL import Image, UnidentifiedImageError

    try:
        picture = Image.open(path)
        picture.load()  # Image.open reads only the header: a truncated file fails here, not in the transform
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:  # PIL raises SyntaxError for bad headers
        raise InputError(f"image file {path} could not be read as an image ({exc}); give a PNG/JPEG picture, "
                         "or a .pt/.npy tensor [C, H, W]") from exc
    return picture if picture.mode in ("L", "RGB") else picture.convert("RGB")


__all__ = ["InputSaliency", "Masking", "boosted_profile", "channel_max", "choose_units", "confidence_raised",
           "cosine_distance", "mask_pixels", "pixel_count", "plot_explanations", "random_pixels",
           "summarize_masking", "top_pixels", "visual_map"]
