"""Per-sample reductions for ``F.embedding`` (``nn.Embedding``): a sample's gradient lives in the rows it looked up.

Sample n's gradient of the table ``[V, D]`` is its output gradients added
into the rows of its tokens (a token used twice adds twice, before ``|.|``),
zero in every other row and in ``padding_idx``'s. Row units are formed from
the looked-up rows alone, so the ``[B, V, D]`` gradient is never built;
other partitions (and a table shared with another call, such as a tied LM
head) take the whole gradient.

Served calls: no ``max_norm`` (it rewrites the table during the forward
pass) and no ``scale_grad_by_freq`` (it scales by counts over the batch).
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from paramsal.kernels.chunks import chunk_slices
from paramsal.kernels.reduce import Aggregation, ParamUnits, reduce_grad

_SIGNATURE = inspect.signature(F.embedding)
#: Samples whose whole table gradients are formed at once in the dense path.
_CHUNK = 8


@dataclass(frozen=True)
class EmbeddingCall:
    """One served lookup: the table's size and the row that gets no gradient."""

    rows: int
    width: int
    padding_idx: int | None


def embedding_call(args: tuple, kwargs: dict[str, Any]
                   ) -> tuple[EmbeddingCall, torch.Tensor, dict[str, torch.Tensor | None]]:
    """Parses ``embedding(input, weight, padding_idx, max_norm, ...)``; no roles for a call it cannot serve."""
    bound = _SIGNATURE.bind(*args, **kwargs)
    bound.apply_defaults()
    given = bound.arguments
    weight, padding = given["weight"], given["padding_idx"]
    if padding is not None and padding < 0:
        padding += weight.shape[0]
    served = given["max_norm"] is None and not given["scale_grad_by_freq"] and given["input"].dim() >= 1
    return (EmbeddingCall(weight.shape[0], weight.shape[1], padding), given["input"],
            {"weight": weight} if served else {})


def embedding_widened(args: tuple, kwargs: dict[str, Any], batch: int) -> tuple[tuple, dict[str, Any]]:
    """A lookup of ids ``[1, *]`` in a batch of ``batch`` samples (position ids shared by every sample) as a lookup
    of ``[batch, *]`` copies: the same rows, broadcast alike, with each sample's output gradient apart."""
    bound = _SIGNATURE.bind(*args, **kwargs)
    ids = bound.arguments["input"]
    if not isinstance(ids, torch.Tensor) or ids.dim() < 2 or ids.shape[0] != 1 or batch == 1:
        return args, kwargs
    bound.arguments["input"] = ids.expand(batch, *ids.shape[1:])
    return bound.args, bound.kwargs


def embedding_grad_sample(call: EmbeddingCall, activations: torch.Tensor, backprops: torch.Tensor,
                          attr: str) -> torch.Tensor:
    """Each sample's whole gradient of the table, ``[B, V, D]``."""
    ids, grads = _flat(call, activations, backprops)
    out = grads.new_zeros(len(ids), call.rows, call.width)
    out.scatter_add_(1, ids[..., None].expand(-1, -1, call.width), grads)
    if call.padding_idx is not None:
        out[:, call.padding_idx] = 0
    return out


def reduce_embedding(call: EmbeddingCall, activations: torch.Tensor, backprops: torch.Tensor,
                     groups: Sequence[ParamUnits], aggregation: Aggregation,
                     chunk_size: int | None = None) -> list[torch.Tensor]:
    """Per-sample, per-unit saliency of the table: ``[B, units]`` per group.

    Args:
        activations: the token ids ``[B, *]``.
        backprops: the gradient w.r.t. the looked-up vectors ``[B, *, D]``.
    """
    out = []
    for group in groups:
        if group.partition == "rows":
            out.append(_row_units(call, activations, backprops, aggregation))
            continue
        parts = [reduce_grad(embedding_grad_sample(call, activations[rows], backprops[rows], group.attr), group,
                             aggregation) for rows in chunk_slices(len(activations), chunk_size or _CHUNK)]
        out.append(torch.cat(parts))
    return out


def _row_units(call: EmbeddingCall, activations: torch.Tensor, backprops: torch.Tensor,
               aggregation: Aggregation) -> torch.Tensor:
    """``[B, V]``: each (sample, looked-up row) summed once, then reduced over the row's D entries."""
    ids, grads = _flat(call, activations, backprops)
    batch = len(ids)
    keys = (torch.arange(batch, device=ids.device)[:, None] * call.rows + ids).reshape(-1)
    present, where = torch.unique(keys, return_inverse=True)
    sums = grads.new_zeros(len(present), call.width).index_add_(0, where, grads.reshape(-1, call.width))
    values = sums.abs().mean(1) if aggregation == "mean_abs" else sums.mean(1).abs()
    units = grads.new_zeros(batch * call.rows).index_copy_(0, present, values).reshape(batch, call.rows)
    if call.padding_idx is not None:
        units[:, call.padding_idx] = 0
    return units


def _flat(call: EmbeddingCall, activations: torch.Tensor, backprops: torch.Tensor
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids [B, T], grads [B, T, D])``: every lookup of a sample in one dim."""
    batch = len(activations)
    return activations.reshape(batch, -1).long(), backprops.reshape(batch, -1, call.width)
