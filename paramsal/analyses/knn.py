"""Exact cosine k-nearest neighbours of a run's samples, streamed: memory set by a budget, not by the number of samples.

:class:`Search` reads its queries from the run a block at a time and, for
each query block, streams the candidates (the pool) from the run in blocks
while keeping each query's running top-k: no ``N x N`` matrix and no
candidate matrix is ever held (:func:`block_rows` sizes the blocks from a
budget). Rows are standardized with the run's statistics (profiles), then
scaled to unit norm, in float64. Both precisions return the float64 answer,
equal similarities ranked by candidate row:

* "float64": float64 products throughout;
* "float32": float32 products of the float32-rounded unit rows screen the
  candidates. A candidate whose float32 similarity lies more than a rigorous
  bound on the float32 error (:func:`screening_margin`) below a lower bound
  of the query's final k-th similarity cannot be among its k best; only the
  others get a float64 product, one pair at a time. Where many pass (nearly
  parallel profiles, whose cosines differ in the 8th digit), a query's row of
  float64 products is cheaper and taken instead, and a query block stops
  screening while screening does not pay, checking again after each block.
  The float32 products are numpy's on the CPU, or torch's on a GPU
  (``screen_on``, full float32: no TF32); either way the float64 products,
  and so the answer, are taken by numpy on the CPU.

:func:`cosine_top_k` is the same float64 top-k for matrices held in memory.

The module is longer than 400 lines because the search, its float32 screen
(numpy or torch) and :func:`cosine_top_k` share one running top-k
(``_Best``, ``_hide``): split apart, those would become public names.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch

from paramsal.engine.devices import resolve_device
from paramsal.errors import EngineError, InputError
from paramsal.kernels.tf32 import full_float32
from paramsal.rundir.reading import Block, iter_vectors
from paramsal.rundir.run import Rows, Run

Layers = slice | Sequence[int] | None

#: Bytes per value held for a block of queries (float64 unit rows, their float32 copy, the rows read), for a
#: block of candidates (the same, plus the reader's batch), and per (query, candidate) pair of a block's products.
QUERY_BYTES, POOL_BYTES, PAIR_BYTES = 16, 32, 32
#: Candidates per block when the budget allows (matrix products are efficient from there); most rows per block.
POOL_ROWS, MAX_ROWS = 128, 8192
#: A row larger than every candidate's: what fills a running top-k that is not full yet.
_NO_ROW = np.iinfo(np.int64).max


def block_rows(budget: int, width: int) -> tuple[int, int]:
    """``(query rows, candidate rows)`` per block for a search of rows of ``width`` values within ``budget`` bytes.

    The candidates' block takes at most a quarter (and 128 rows), the queries'
    the rest: each query block streams the whole pool once, so the larger it
    is, the fewer passes over the run. The reader's own buffers (a few MB)
    come on top.
    """
    pool = max(1, min(POOL_ROWS, budget // (4 * POOL_BYTES * width)))
    queries = (budget - pool * POOL_BYTES * width) // (QUERY_BYTES * width + PAIR_BYTES * pool)
    return max(1, min(MAX_ROWS, queries)), pool


def screening_margin(width: int) -> float:
    """A rigorous bound on ``|float32 product - float64 product|`` of two float64 unit rows of ``width`` values.

    Let ``x, y`` be the float64 unit rows and ``x', y'`` their roundings to
    float32, ``x'_i = x_i (1 + e_i) + t_i`` with ``|e_i| <= u = 2**-24`` and
    ``|t_i| <= 2**-150`` (underflow); ``gamma(n, w) = n w / (1 - n w)``; and
    ``nu = ((1 + v) / (1 - gamma(width + 2, v)))**2``, ``v = 2**-53``, a bound
    on ``|x| |y|`` (the float64 norm and division leave a norm within a few
    ``v`` of 1). Then:

    * rounding the rows: ``|x'.y' - x.y| <= (2u + u**2) sum |x_i y_i| <= (2u + u**2) nu``;
    * float32 accumulation, in any order, with or without FMA (Higham,
      *Accuracy and Stability of Numerical Algorithms*, 2002, eq. 3.5):
      ``|fl32(x'.y') - x'.y'| <= gamma(width, u) sum |x'_i y'_i| <= gamma(width, u) (1 + u)**2 nu``.
      So it holds for any BLAS's float32 products, numpy's on the CPU or
      cuBLAS's on a GPU (split sums, any tiling), as long as every operation
      rounds to float32: not TF32 (a 10-bit significand);
    * the float64 product it stands for, in any order: ``|fl64(x.y) - x.y| <= gamma(width, v) nu``;
    * underflow (the ``t_i``, and float32 values below ``2**-126``, whether
      kept subnormal or flushed to zero as a GPU may): at most
      ``width * 2**-124`` in all; and ``2**-50`` covers the roundings of the
      threshold arithmetic itself, in float64 (similarities are at most about 1).

    The sum of these is returned: about ``width * 6e-8`` (1.6e-3 for 26,560
    units), infinite where ``width * u`` nears 1. It is a worst case: typical
    errors are a hundred times smaller, but only a bound keeps the screening exact.
    """
    u, v = 2.0**-24, 2.0**-53

    def gamma(n: int, unit: float) -> float:
        return n * unit / (1 - n * unit)

    if width * u >= 0.5:
        return float("inf")
    nu = ((1 + v) / (1 - gamma(width + 2, v)))**2
    return (gamma(width, u) * (1 + u)**2 + 2 * u + u * u + gamma(width, v)) * nu + width * 2.0**-124 + 2.0**-50


def _pair_cost(width: int) -> float:
    """The time of one float64 product of a (query, candidate) pair taken alone (a Python-level dot of two rows), in
    products inside a float64 matrix product: about ``1 us + 0.2 ns * width`` against ``0.024 ns * width``
    (OpenBLAS, x86)."""
    return (40_000 + 9 * width) / width


def cosine_top_k(candidates: np.ndarray, queries: np.ndarray, k: int, exclude: np.ndarray | None = None,
                 block_size: int = 2048) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k by dot product of unit rows held in memory (cosine similarity), block by block, in float64.

    Queries and candidates are both cut into blocks of ``block_size`` rows;
    each query block keeps a running top-k while the candidate blocks go by,
    so at most ``block_size x block_size`` similarities exist at any time.
    Products are taken in float64 (one block converted at a time): standardized
    profiles of confidently correct samples are nearly parallel, their cosines
    differ in the 8th digit, and a float32 product (resolution 6e-8 near 1)
    would rank them by rounding noise.

    Args:
        candidates: ``[N, F]`` unit rows (float32 to save memory, or float64).
        queries: ``[Q, F]`` unit rows.
        k: neighbours per query, ``1 <= k <= N`` (``N - 1`` when queries exclude themselves).
        exclude: ``[Q]`` candidate row that each query must not return (itself), or -1.
        block_size: rows per query block and per candidate block.

    Returns:
        ``(index [Q, k] int64, similarity [Q, k] float64)``: candidate rows by
        decreasing similarity; equal similarities are ordered by row, so the
        result is deterministic.
    """
    num_queries, num_candidates = len(queries), len(candidates)
    exclude = np.full(num_queries, -1, np.int64) if exclude is None else np.asarray(exclude, np.int64)
    index = np.empty((num_queries, k), np.int64)
    similarity = np.empty((num_queries, k), np.float64)
    for q0 in range(0, num_queries, block_size):
        q1 = min(q0 + block_size, num_queries)
        best = _Best(q1 - q0, k)
        for c0 in range(0, num_candidates, block_size):
            sim = np.asarray(queries[q0:q1], np.float64) @ np.asarray(candidates[c0:c0 + block_size], np.float64).T
            _hide(sim, exclude[q0:q1] - c0, -np.inf)
            best.merge_products(sim, c0)
        index[q0:q1], similarity[q0:q1] = best.index, best.sim
    return index, similarity


def _hide(values: np.ndarray | torch.Tensor, column: np.ndarray, value: float | bool) -> None:
    """Sets ``values[i, column[i]]`` to ``value`` where that column lies in this block (a query's own row)."""
    rows = np.flatnonzero((column >= 0) & (column < values.shape[1]))
    values[rows, column[rows]] = value


def _top_k_unordered(sim: np.ndarray, k: int) -> np.ndarray:
    """Columns ``[B, k]`` of the k largest entries of each row; ties go to the smaller column."""
    width = sim.shape[1]
    if k >= width:
        return np.broadcast_to(np.arange(width), sim.shape).copy()
    chosen = np.argpartition(sim, width - k, axis=1)[:, width - k:]
    kth = np.take_along_axis(sim, chosen, 1).min(axis=1, keepdims=True)
    # argpartition picks arbitrarily among values equal to the k-th largest; where
    # such a tie straddles the cut, a stable sort of that row picks the smaller columns.
    straddling = np.count_nonzero(sim >= kth, axis=1) > k
    for row in np.flatnonzero(straddling):
        chosen[row] = np.argsort(-sim[row], kind="stable")[:k]
    return chosen


def _keep_best(index: np.ndarray, sim: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k best of each row by (similarity descending, index ascending), in that order."""
    order = np.lexsort((index, -sim), axis=1)[:, :k]
    return np.take_along_axis(index, order, 1), np.take_along_axis(sim, order, 1)


class _Best:
    """Each query's k best candidates so far (rows ``[Q, k]``, similarities ``[Q, k]``), best first."""

    def __init__(self, queries: int, k: int):
        self.k = k
        self.index = np.full((queries, k), _NO_ROW, np.int64)
        self.sim = np.full((queries, k), -np.inf)

    def merge(self, rows: np.ndarray | slice, index: np.ndarray, sim: np.ndarray) -> None:
        """Merges candidates ``index [r, m]`` with similarities ``sim [r, m]`` into the queries ``rows``."""
        self.index[rows], self.sim[rows] = _keep_best(np.concatenate([self.index[rows], index], axis=1),
                                                      np.concatenate([self.sim[rows], sim], axis=1), self.k)

    def merge_products(self, sim: np.ndarray, start: int, rows: np.ndarray | slice = slice(None)) -> None:
        """Merges products ``sim [r, m]`` with the candidates ``start..start+m-1`` into the queries ``rows``."""
        chosen = _top_k_unordered(sim, min(self.k, sim.shape[1]))
        self.merge(rows, chosen + start, np.take_along_axis(sim, chosen, 1))


def _threshold(kth: np.ndarray, lowest: np.ndarray, margin: float) -> np.ndarray:
    """``[q]`` float64: a candidate whose float32 product lies below this cannot be among the query's k best.

    ``floor`` is at most the query's final k-th similarity: ``kth``, the k-th
    of its exact similarities so far, or ``lowest``, the k-th of its float32
    products so far, less the margin. A float32 product more than the margin
    below ``floor`` is below it in float64 too. In float64: ``lowest - margin``
    rounded to float32 could exceed the bound by 2**-25.
    """
    return np.maximum(kth, lowest.astype(np.float64) - margin) - margin


class _Screen:
    """The float32 screen of a block of queries ``[q, f]`` (float64 unit rows), its products taken by numpy.

    It keeps each query's k largest float32 products so far and decides which
    candidates of a block may be among its k best. :class:`_DeviceScreen`
    takes and keeps the products elsewhere but decides in the same
    :meth:`passing`: given equal float32 products, both pass the same pairs.
    """

    def __init__(self, queries: np.ndarray, k: int, margin: float, rows: int):
        self.k, self.margin = k, margin
        self.queries32 = self._to_device(queries.astype(np.float32))
        self.top32 = self._to_device(np.full((len(queries), k), -np.inf, np.float32))
        self.lowest = np.full(len(queries), -np.inf, np.float32)  # on the host: the smallest of each row of top32
        self._rows32 = np.empty((rows, queries.shape[1]), np.float32)

    def passing(self, candidates: np.ndarray, own: np.ndarray, kth: np.ndarray) -> np.ndarray:
        """``[q, m]`` bool: the pairs that may be among the k best (the block's products join the top-k first).

        Args:
            candidates: ``[m, f]`` the candidates' float64 unit rows, at most ``rows``.
            own: ``[q]`` each query's own column in this block (out of ``0..m-1`` if not in it): never passed.
            kth: ``[q]`` each query's k-th exact similarity so far (-inf while fewer are known).
        """
        candidates32 = self._rows32[:len(candidates)]
        np.copyto(candidates32, candidates)
        sim32 = self._products(candidates32)
        _hide(sim32, own, -np.inf)  # a query's product with itself must not raise its floor
        self.lowest = self._keep_largest(sim32)
        passed = self._to_host(sim32 >= self._to_device(_threshold(kth, self.lowest, self.margin))[:, None])
        _hide(passed, own, False)
        return passed

    def _products(self, candidates32: np.ndarray) -> Any:
        return self.queries32 @ candidates32.T

    def _keep_largest(self, sim32: Any) -> np.ndarray:
        """Keeps the k largest of ``top32`` and ``sim32`` in each row; returns their smallest, on the host."""
        pooled = np.concatenate([self.top32, sim32], axis=1)
        self.top32 = np.partition(pooled, pooled.shape[1] - self.k, axis=1)[:, -self.k:]
        return self.top32.min(axis=1)

    def _to_device(self, values: np.ndarray) -> Any:
        return values

    def _to_host(self, values: Any) -> np.ndarray:
        return values


class _DeviceScreen(_Screen):
    """:class:`_Screen` with its float32 products taken by torch on ``device``, in full float32 (no TF32).

    The queries' rows stay on the device for the whole pass over the pool;
    each block of candidates goes there, and only each query's smallest top-k
    product ``[q]`` and the pairs that pass ``[q, m]`` come back.
    """

    def __init__(self, queries: np.ndarray, k: int, margin: float, rows: int, device: torch.device):
        self.device = device
        super().__init__(queries, k, margin, rows)

    def _products(self, candidates32: np.ndarray) -> torch.Tensor:
        with full_float32():  # TF32 rounds to a 10-bit significand: errors far beyond the margin
            return self.queries32 @ self._to_device(candidates32).T

    def _keep_largest(self, sim32: torch.Tensor) -> np.ndarray:
        # Whichever of equal values topk picks, the k largest values are np.partition's.
        self.top32 = torch.topk(torch.cat([self.top32, sim32], dim=1), self.k, dim=1).values
        return self._to_host(self.top32.amin(dim=1))

    def _to_device(self, values: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(values).to(self.device)

    def _to_host(self, values: torch.Tensor) -> np.ndarray:
        return values.cpu().numpy()


class Search:
    """Exact cosine k-NN among the candidates of one space, streamed from the run for each block of queries.

    Args:
        run: the run.
        space: "saliency" (standardized profiles) or "features" (raw penultimate features).
        layers: saliency space only: the layers whose units are kept (see :meth:`Run.unit_columns`).
        among: the candidates, "all" samples or "misclassified" ones.
        precision: "float32": float32 products screen the candidates, float64
            products rank those that may be among the k best; "float64":
            float64 products throughout. Both give the float64 answer.
        block_size: rows per block of queries and of candidates, instead of
            the rows ``budget_mb`` allows.
        budget_mb: MiB the blocks may hold (:func:`block_rows`).
        screen_on: where the float32 products are taken: None for numpy on
            the CPU (fastest there), or a torch device, "cuda" above all (the
            CPU runs the same code, for tests). The answer is the same.
    """

    def __init__(self, run: Run, space: str, layers: Layers, among: str, precision: str = "float32",
                 block_size: int | None = None, budget_mb: int = 256, screen_on: str | torch.device | None = None):
        self.run, self.space, self.among, self.precision = run, space, among, precision
        self.screen_on = None if screen_on is None else resolve_device(screen_on)
        self.columns = run.unit_columns(layers) if space == "saliency" else None
        self._only: Rows = None if among == "all" else "misclassified"
        self.pool_ids = np.sort(run.sample_ids(self._only))
        self.width = self._width()
        self.query_rows, self.pool_rows = ((block_size, block_size) if block_size is not None
                                           else block_rows(budget_mb << 20, max(self.width, 1)))
        self.margin = screening_margin(self.width)
        self._standardizer = None
        if space == "saliency":
            stats = run.stats
            columns = slice(None) if self.columns is None else self.columns
            self._standardizer = stats.mean[columns], stats.std[columns]

    def query(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """``(pool rows [Q, k], similarities [Q, k])`` of each query's nearest candidates, itself excluded.

        Args:
            queries: ``[Q]`` sample ids of the run, in the pool or not, in any
                order, repeats allowed (read once, answered alike).
        """
        k = checked_k(k, len(self.pool_ids), self.among)
        unique, inverse = np.unique(np.asarray(queries, np.int64), return_inverse=True)
        in_pool, position = _positions(self.pool_ids, unique)
        exclude = np.where(in_pool, position, -1)
        index = np.empty((len(unique), k), np.int64)
        similarity = np.empty((len(unique), k), np.float64)
        done = 0
        for ids, raw in self._read(self.query_rows, unique):
            if not np.array_equal(ids, unique[done:done + len(ids)]):
                break
            rows = slice(done, done + len(ids))
            unit = self._unit_rows(ids, raw, np.empty(raw.shape))
            del raw  # a query block at a time: neither the rows read nor the last block's outlive their use
            index[rows], similarity[rows] = self._top_k(unit, exclude[rows], k)
            done += len(ids)
            del unit
        if done != len(unique):
            missing = np.setdiff1d(unique, self.run.table().column("sample_id").to_numpy())
            raise InputError(f"query ids {missing[:10].tolist()} are not samples of {self.run.path}")
        return index[inverse.reshape(-1)], similarity[inverse.reshape(-1)]

    def _top_k(self, queries: np.ndarray, exclude: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """``(rows [q, k], similarities [q, k])``: the k best candidates of a block of queries (float64 unit rows)."""
        best = _Best(len(queries), k)
        screen: _Screen | None = None
        if self.precision == "float32" and self.margin < 0.5:
            screen = (_Screen(queries, k, self.margin, self.pool_rows) if self.screen_on is None
                      else _DeviceScreen(queries, k, self.margin, self.pool_rows, self.screen_on))
        screening = False  # the first block is multiplied in float64: until k products are known, all would pass
        rows64 = np.empty((self.pool_rows, self.width))
        start = 0
        for ids, raw in self._read(self.pool_rows, self._only):
            if not np.array_equal(ids, self.pool_ids[start:start + len(ids)]):
                raise EngineError(f"the candidates read from {self.run.path} are not its pool, in order")
            candidates = self._unit_rows(ids, raw, rows64[:len(ids)])
            own = exclude - start
            if screening:
                assert screen is not None
                screening = self._screened(best, screen, queries, candidates, own, start)
            else:
                sim = queries @ candidates.T
                _hide(sim, own, -np.inf)
                best.merge_products(sim, start)
                if screen is not None:  # would these have passed? a float32 product may lie a margin below sim
                    threshold = _threshold(best.sim[:, -1], screen.lowest, self.margin) - self.margin
                    screening = self._pays(np.count_nonzero(sim >= threshold[:, None], axis=1), sim.shape)
            start += len(ids)
            del raw, candidates
        return best.index, best.sim

    def _screened(self, best: _Best, screen: _Screen, queries: np.ndarray, candidates: np.ndarray, own: np.ndarray,
                  start: int) -> bool:
        """Merges one block of candidates screened by float32 products; returns whether screening the next pays."""
        passed = screen.passing(candidates, own, best.sim[:, -1])
        counts = np.count_nonzero(passed, axis=1)
        pays = self._pays(counts, passed.shape)
        dense = counts * _pair_cost(self.width) > len(candidates)  # these queries' rows of products are cheaper
        if dense.all():
            sim = queries @ candidates.T
            _hide(sim, own, -np.inf)
            best.merge_products(sim, start)
            return pays
        heavy = np.flatnonzero(dense)
        for c0 in range(0, len(heavy), self.pool_rows):
            rows = heavy[c0:c0 + self.pool_rows]
            sim = queries[rows] @ candidates.T  # at most a block's rows gathered at a time
            _hide(sim, own[rows], -np.inf)
            best.merge_products(sim, start, rows)
        light = np.flatnonzero(~dense & (counts > 0))
        if len(light):
            best.merge(light, *_pair_products(queries, candidates, light, passed[light], counts[light], start))
        return pays

    def _pays(self, counts: np.ndarray, shape: tuple[int, ...]) -> bool:
        """Whether screening a block pays, if ``counts [q]`` candidates of each query pass the screen of ``m``."""
        pairs = np.minimum(counts * _pair_cost(self.width), shape[1]).sum()
        return bool(pairs < 0.5 * shape[0] * shape[1])  # a float32 product costs about half a float64 one

    def _unit_rows(self, ids: np.ndarray, raw: np.ndarray, out: np.ndarray) -> np.ndarray:
        """``out [m, f]``: the rows ``raw [m, f]`` standardized (profiles), then scaled to unit norm, in float64.

        Rows of norm 0 stay 0 (similarity 0 to everything).
        """
        if self._standardizer is not None:
            np.subtract(raw, self._standardizer[0], out=out)
            np.divide(out, self._standardizer[1], out=out)
        else:
            np.copyto(out, raw)
        norms = np.sqrt(np.einsum("ij,ij->i", out, out))[:, None]
        if not np.isfinite(norms).all():
            bad = ~np.isfinite(out).all(axis=1)
            if bad.any():
                column = "profile" if self.space == "saliency" else "features"
                raise InputError(f"{column} of samples {ids[bad][:10].tolist()} in {self.run.path} are not finite")
        np.divide(out, norms, out=out, where=norms > 0)
        out[norms[:, 0] == 0] = 0
        return out

    def _read(self, rows: int, only: Rows) -> Iterator[Block]:
        column = "profile" if self.space == "saliency" else "features"
        return iter_vectors(self.run, column, rows, self.columns, only, None)

    def _width(self) -> int:
        """Values per row of this space."""
        if self.space == "saliency":
            return self.run.num_units if self.columns is None else len(self.columns)
        if not self.run.parts:
            return 0
        return pq.read_schema(self.run.path / self.run.parts[0].file).field("features").type.list_size


def _pair_products(queries: np.ndarray, candidates: np.ndarray, rows: np.ndarray, passed: np.ndarray,
                   counts: np.ndarray, start: int) -> tuple[np.ndarray, np.ndarray]:
    """``(candidate rows [r, c], similarities [r, c])`` of the pairs ``passed [r, m]`` of the queries ``rows``, in
    float64, one pair at a time; padded with no row and ``-inf`` to ``c = counts.max()`` per query."""
    pair_row, pair_column = np.nonzero(passed)
    query_of = rows[pair_row]
    sims = np.fromiter((queries[q] @ candidates[c] for q, c in zip(query_of.tolist(), pair_column.tolist())),
                       np.float64, count=len(pair_row))
    slot = np.arange(len(pair_row)) - np.repeat(np.cumsum(counts) - counts, counts)
    index = np.full((len(rows), int(counts.max())), _NO_ROW, np.int64)
    sim = np.full(index.shape, -np.inf)
    index[pair_row, slot] = pair_column + start
    sim[pair_row, slot] = sims
    return index, sim


def checked_k(k: int, pool_size: int, among: str) -> int:
    """``k``, checked to leave a query at least k candidates besides itself."""
    if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or k < 1:
        raise InputError(f"k={k!r}: expected a positive integer")
    if pool_size == 0:
        raise InputError(f"no candidates: the run has no {'' if among == 'all' else 'misclassified '}samples")
    if k >= pool_size:
        raise InputError(f"k={k} is too large: the pool ({among}) has {pool_size} samples, so a query has at most "
                         f"{pool_size - 1} neighbours besides itself")
    return int(k)


def _positions(sorted_ids: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(found [n] bool, position [n])`` of ``ids`` in ``sorted_ids``."""
    if len(sorted_ids) == 0:
        return np.zeros(len(ids), bool), np.zeros(len(ids), np.int64)
    position = np.minimum(np.searchsorted(sorted_ids, ids), len(sorted_ids) - 1)
    return sorted_ids[position] == ids, position
