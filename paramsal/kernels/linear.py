"""Per-sample reductions for Linear layers on 2-D and N-D inputs."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from paramsal.kernels import fused
from paramsal.kernels.chunks import auto_chunk, chunk_slices
from paramsal.kernels.reduce import Aggregation, FullPrecision, ParamUnits, accumulated, reduce_grad
from paramsal.kernels.tiles import tile_abs_means

#: A layer's positions per sample (tokens, pixels) up to which mean ``|G|`` of rows or columns is formed from
#: cache-sized tiles (the convolutions' rule for few output positions) rather than whole per-sample gradients.
#: Chosen with ``paramsal bench --case convnext-tiny`` (its Linear layers see 64, 16, 4 and 1 positions), where
#: tiles made the hooks backend faster and smaller; on the small ViT (65 tokens) they measured the same as whole
#: gradients.
TILED_MAX_TOKENS = 64


@dataclass(frozen=True)
class LinearCall:
    """One ``F.linear`` call, under the attribute name of ``nn.Linear`` the reducer reads."""

    weight: torch.Tensor


class LinearLayer(Protocol):
    """What the linear reducer reads of a layer: a ``nn.Linear`` (its own forward) or a :class:`LinearCall`."""

    @property
    def weight(self) -> torch.Tensor: ...


def linear_call(args: tuple,
                kwargs: dict[str, Any]) -> tuple[LinearCall, torch.Tensor, dict[str, torch.Tensor | None]]:
    """Parses ``linear(input, weight, bias)``: the call, its input, its parameters by role."""
    bound = {**dict(zip(("input", "weight", "bias"), args)), **kwargs}
    return LinearCall(bound["weight"]), bound["input"], {"weight": bound["weight"], "bias": bound.get("bias")}


def linear_grad_sample(layer: LinearLayer, activations: torch.Tensor, backprops: torch.Tensor,
                       attr: str) -> torch.Tensor:
    """Each sample's whole gradient of the layer's ``weight`` ``[b, out, in]`` or ``bias`` ``[b, out]``."""
    gy = _tokens(backprops)
    if attr == "bias":
        return gy.sum(1)
    return torch.bmm(gy.transpose(1, 2), _tokens(activations))


def _tokens(t: torch.Tensor) -> torch.Tensor:
    """``[B, *, F] -> [B, T, F]``: a Linear layer's positions (tokens, pixels) in one dim, a view where it can be."""
    return t.reshape(t.shape[0], -1, t.shape[-1])


def reduce_linear(layer: LinearLayer, activations: torch.Tensor, backprops: torch.Tensor,
                  groups: Sequence[ParamUnits], aggregation: Aggregation,
                  chunk_size: int | None = None) -> list[torch.Tensor]:
    """Per-sample, per-unit saliency of a Linear layer's weight and bias.

    Args:
        layer: a ``nn.Linear`` or the :class:`LinearCall` of a functional use.
        activations: the layer's input ``[B, *, in]``.
        backprops: gradient of the summed per-sample losses w.r.t. the output
            ``[B, *, out]`` (row n: sample n's own loss, samples being independent).
        groups: the units of the layer's parameters.
        aggregation: "mean_abs" or "abs_mean".
        chunk_size: samples per chunk when per-sample weight gradients must be
            formed (N-D inputs, custom partitions); None picks one automatically.

    Returns:
        One ``[B, group.num_units]`` tensor per group, in order.
    """
    batch = activations.shape[0]
    full = FullPrecision(_tokens(activations), _tokens(backprops))  # [B, T, in], [B, T, out]
    tokens = full.captured[0].shape[1]  # a single one makes a rank-one gradient: _outer_reduce, below
    results = []
    for group in groups:
        fast = (group.attr == "weight" and group.partition in ("rows", "columns") and aggregation == "mean_abs"
                and tokens > 1 and fused.wanted(activations))
        units = _fused_reduce(*full.captured, group.partition) if fast else None
        if units is not None:
            results.append(units)
            continue
        x, gy = full.tensors()
        if group.attr == "bias":
            results.append(reduce_grad(gy.sum(1), group, aggregation))
        elif x.shape[1] == 1 and group.partition == "rows":
            results.append(_outer_reduce(gy[:, 0], x[:, 0], aggregation))
        elif x.shape[1] == 1 and group.partition == "columns":
            results.append(_outer_reduce(x[:, 0], gy[:, 0], aggregation))
        elif group.partition in ("rows", "columns") and aggregation == "mean_abs" and x.shape[1] <= TILED_MAX_TOKENS:
            results.append(_tiled_reduce(x, gy, group.partition))
        else:
            chunk = chunk_size or auto_chunk(layer.weight.numel(), batch, x)
            results.append(torch.cat([
                reduce_grad(linear_grad_sample(layer, x[s], gy[s], "weight"), group, aggregation)
                for s in chunk_slices(batch, chunk)
            ]))
    return results


def _outer_reduce(kept: torch.Tensor, reduced: torch.Tensor, aggregation: Aggregation) -> torch.Tensor:
    """Aggregates the rank-1 gradient ``kept[:, u] * reduced[:, i]`` over i without forming it.

    ``mean_i |a_u b_i| = |a_u| mean_i |b_i|`` and ``|mean_i a_u b_i| = |a_u mean_i b_i|``.
    """
    if aggregation == "mean_abs":
        return kept.abs() * reduced.abs().mean(1, keepdim=True)
    return (kept * reduced.mean(1, keepdim=True)).abs()


def _fused_reduce(x: torch.Tensor, gy: torch.Tensor, partition: str) -> torch.Tensor | None:
    """Mean ``|G|`` per row (or column) of ``G[n] = gy[n]^T x[n]`` from the fused kernel (None where it failed).

    ``G[n]`` is the weight gradient of a 1x1 convolution over the T positions,
    so ``[B, T, features]`` is handed over as an ``[B, features, T, 1]`` view;
    columns are the rows of ``G[n]^T = x[n]^T gy[n]``. Its tiles take cuBLAS's
    precision setting, as the layer's own ``F.linear`` does.
    """
    rows, cols = (gy, x) if partition == "rows" else (x, gy)
    return fused.row_abs_means(_as_map(cols), _as_map(rows), fused.Geometry((1, 1)), op="matmul",
                               out_dtype=accumulated(x))


def _tiled_reduce(x: torch.Tensor, gy: torch.Tensor, partition: str) -> torch.Tensor:
    """Mean ``|G|`` per row (or column) from cache-sized tiles of ``G[n] = gy[n]^T x[n]``, each reduced as soon
    as it is formed (:func:`paramsal.kernels.conv.tile_abs_means`, on the layer's own tensors: nothing is copied)."""
    rows, cols = (gy, x) if partition == "rows" else (x, gy)
    return tile_abs_means(cols.transpose(1, 2)[:, None], rows.transpose(1, 2)[:, None])[:, 0]


def _as_map(t: torch.Tensor) -> torch.Tensor:
    """``[B, T, F] -> [B, F, T, 1]``, a view."""
    return t.transpose(1, 2).unsqueeze(-1)
