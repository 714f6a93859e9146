"""Mean ``|G|`` per row of per-sample gradient products ``G[n] = A[n] @ B[n]^T`` formed a tile at a time and
reduced at once: the torch path of layers whose gradients are cheap to form but costly to write out (few positions
per sample, narrow filters), shared by convolutions (patches) and Linear layers (tokens)."""

from __future__ import annotations

import torch

from paramsal.kernels.chunks import chunk_slices, memory_budget

#: Elements of one gradient tile (4 MiB of float32) and its width in weight
#: columns, for the CPU: tiles of several samples per batched matmul beat
#: tiles sized to fit L2 (one sample each), whose many small products leave the
#: cores idle (chosen with ``paramsal bench --case resnet18-cifar``).
TILE_ELEMENTS = 2**20
TILE_COLUMNS = 256


def tile_abs_means(columns: torch.Tensor, grad_out: torch.Tensor) -> torch.Tensor:
    """``[b, g, R]`` mean over j of ``|G[n, g, r, j]|``, ``G[n, g] = grad_out[n, g] @ columns[n, g]^T``, formed one
    tile of samples x columns at a time.

    With few positions L, each element of ``G`` costs only L multiply-adds,
    so writing all of ``G`` out and reading it back would cost more than
    computing it; each tile is reduced right after its batched matmul
    instead. Tiles span several samples so that the batched matmul splits its
    work by sample rather than inside one small product.

    Args:
        columns: ``[b, g, J, L]`` (a group's patch rows, or a Linear layer's inputs), any strides.
        grad_out: ``[b, g, R, L]`` the output gradients at the same positions.
    """
    b, g, width = columns.shape[:3]
    rows = grad_out.shape[2]
    samples, cols = tile_shape(memory_budget(columns) if columns.is_cuda else None, g, rows, width)
    sums = grad_out.new_zeros(b, g, rows)
    for s in chunk_slices(b, samples):
        grad_tile = grad_out[s]
        for patch_tile in columns[s].split(cols, dim=2):
            sums[s] += torch.matmul(grad_tile, patch_tile.transpose(2, 3)).abs_().sum(-1)
    return sums / width


def tile_shape(budget: int | None, groups: int, rows: int, width: int) -> tuple[int, int]:
    """``(samples, columns)`` per tile of :func:`tile_abs_means`.

    Args:
        budget: elements a tile may hold on a GPU (the reducer share of
            :func:`~paramsal.kernels.chunks.memory_budget`), None on a CPU.

    On a CPU a tile fits the caches (:data:`TILE_ELEMENTS`, :data:`TILE_COLUMNS`).
    On a GPU it takes every column and as many samples as the budget allows:
    each tile is a kernel launch or more, and ResNet-50's layers at batch 256
    would otherwise take thousands of small products where a few large ones do.
    """
    if budget is None:
        cols = min(width, TILE_COLUMNS)
        return max(1, TILE_ELEMENTS // (groups * rows * cols)), cols
    return max(1, budget // (groups * rows * width)), width
