"""Fused CPU kernels (numba): per-sample ``sum |g|`` of a conv weight without writing ``g`` out.

For a layer with few output positions L (the deep layers of a CNN), the
per-sample weight gradient ``G[n] = gy[n] @ P[n]^T`` is as large as the weight
for every sample but cheap to compute (L multiply-adds per element), so a
matmul followed by ``abs().sum()`` spends its time writing and re-reading
``G``. This kernel keeps a block of G's rows in cache, sums their absolute
values at once and never stores G.
"""

from __future__ import annotations

import numba
import numpy as np

#: Rows of G computed together: each loaded patch element is reused this many times.
_ROW_BLOCK = 8


@numba.njit(parallel=True, fastmath=True, cache=True)
def abs_row_sums(backprops: np.ndarray, patches_t: np.ndarray, out: np.ndarray) -> None:  # pragma: no cover
    """``out[n, g, k] = sum_j |sum_l backprops[n, g, k, l] * patches_t[n, g, l, j]|``.

    Args:
        backprops: ``[B, groups, K/groups, L]`` output gradients.
        patches_t: ``[B, groups, L, J]`` transposed im2col patches (J = C/groups * prod(kernel)).
        out: ``[B, groups, K/groups]``, written.
    """
    nb, ng, kg, positions = backprops.shape
    width = patches_t.shape[3]
    blocks = (kg + _ROW_BLOCK - 1) // _ROW_BLOCK
    for task in numba.prange(nb * ng * blocks):
        n = task // (ng * blocks)
        g = (task // blocks) % ng
        k0 = (task % blocks) * _ROW_BLOCK
        rows = min(_ROW_BLOCK, kg - k0)
        acc = np.zeros((_ROW_BLOCK, width), dtype=patches_t.dtype)
        for l in range(positions):
            for r in range(rows):
                a = backprops[n, g, k0 + r, l]
                for j in range(width):
                    acc[r, j] += a * patches_t[n, g, l, j]
        for r in range(rows):
            total = 0.0
            for j in range(width):
                total += abs(acc[r, j])
            out[n, g, k0 + r] = total
