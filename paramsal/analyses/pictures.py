"""The picture of an input-space saliency map (paper 2.2): channel max, percentile clip, blur, overlay.

Drawing uses matplotlib's object API only (``matplotlib.figure.Figure``):
no pyplot and no ``matplotlib.use``, so importing paramsal or drawing a
figure leaves the user's backend, and pyplot's list of open figures, as they are.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from paramsal.errors import InputError


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


def displayable(image: torch.Tensor | np.ndarray) -> np.ndarray:
    """An image ``[C, H, W]`` in any normalization, min-max scaled to ``[0, 1]`` as ``[H, W]`` or ``[H, W, 3]``.

    One channel is shown grey, three or more as RGB (the first three), two as the grey mean of both.
    """
    image = torch.as_tensor(image).detach().cpu().double()
    image = (image - image.min()) / (image.max() - image.min()).clamp_min(1e-12)
    if image.shape[0] < 3:
        return image.mean(0).numpy()
    return image[:3].permute(1, 2, 0).numpy()


def plot_explanations(images: torch.Tensor | np.ndarray, maps: torch.Tensor | np.ndarray,
                      path: str | os.PathLike | None = None, *, other_maps: torch.Tensor | np.ndarray | None = None,
                      titles: Sequence[str] | None = None, names: tuple[str, str] = ("salient units", "random units"),
                      alpha: float = 0.5, axes: Any = None) -> Any:
    """One row per sample: image, map and overlay (and the other selection's map and overlay, if given).

    Args:
        images: ``[N, C, H, W]`` the inputs (any normalization; shown min-max scaled).
        maps: ``[N, H, W]`` visual maps (:func:`visual_map`) of the configured units.
        path: a PNG to write (atomically); None only returns the figure.
        other_maps: ``[N, H, W]`` the same for the other selection, shown side by side.
        titles: one label per row (e.g. "id 17: 3 -> 5").
        names: the column titles of ``maps`` and ``other_maps``.
        alpha: opacity of the heatmap over the image.
        axes: ``[N, columns]`` axes to draw into (3 columns, 5 with ``other_maps``);
            None makes a new figure.

    Returns:
        The matplotlib ``Figure``.
    """
    if len(images) != len(maps) or (other_maps is not None and len(other_maps) != len(images)):
        raise InputError(f"{len(images)} images but {len(maps)} maps"
                         + ("" if other_maps is None else f" and {len(other_maps)} other maps"))
    columns = [("image", None, False), (names[0], maps, False), ("overlay", maps, True)]
    if other_maps is not None:
        columns += [(names[1], other_maps, False), (f"overlay ({names[1]})", other_maps, True)]
    if axes is None:
        from matplotlib.figure import Figure  # a bare Figure: no pyplot state, no backend change

        figure = Figure(figsize=(2.2 * len(columns), 2.2 * max(1, len(images))), layout="constrained")
        grid = figure.subplots(max(1, len(images)), len(columns), squeeze=False)
    else:
        grid = np.asarray(axes, dtype=object).reshape(-1, len(columns)) if np.size(axes) else np.zeros((0, 0))
        if grid.shape != (len(images), len(columns)):
            raise InputError(f"plot_explanations draws {len(images)} x {len(columns)} panels; got "
                             f"{np.size(axes)} axes")
        figure = grid[0, 0].figure
    for row, image in enumerate(images):
        shown = displayable(image)
        cmap = "gray" if shown.ndim == 2 else None
        for col, (name, source, overlay) in enumerate(columns):
            ax = grid[row, col]
            if source is None or overlay:
                ax.imshow(shown, cmap=cmap)
            if source is not None:
                ax.imshow(np.asarray(torch.as_tensor(source[row]).cpu()), cmap="jet", vmin=0, vmax=1,
                          alpha=alpha if overlay else 1.0)
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(name, fontsize=9)
        if titles is not None:
            grid[row, 0].set_ylabel(titles[row], fontsize=8)
    if path is not None:
        from paramsal._io import atomic_path, writable_folder

        writable_folder(Path(path).parent)
        with atomic_path(Path(path)) as tmp:
            figure.savefig(tmp, format="png", dpi=100)
    return figure


__all__ = ["channel_max", "displayable", "gaussian_kernel", "plot_explanations", "visual_map"]
