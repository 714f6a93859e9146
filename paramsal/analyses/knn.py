"""Exact cosine k-nearest neighbours of a run's samples, in blocks: memory bounded by the block size.

:func:`cosine_top_k` multiplies query blocks by candidate blocks and keeps
a running top-k, so that no ``N x N`` matrix is ever held; :class:`Search`
holds one space's candidates (standardized profiles or features, as unit
rows) and answers queries against them.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np

from paramsal.engine.rundir import Run
from paramsal.errors import InputError

Layers = slice | Sequence[int] | None


def unit_rows(values: np.ndarray) -> np.ndarray:
    """Rows ``[n, f]`` scaled to unit norm in float64; rows of norm 0 stay 0 (similarity 0 to everything)."""
    values = np.asarray(values, np.float64)
    norms = np.linalg.norm(values, axis=1, keepdims=True)
    return np.divide(values, norms, out=np.zeros_like(values), where=norms > 0)


def cosine_top_k(candidates: np.ndarray, queries: np.ndarray, k: int, exclude: np.ndarray | None = None,
                 block_size: int = 2048) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k by dot product of unit rows (cosine similarity), block by block.

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
        query_block = np.asarray(queries[q0:q1], np.float64)
        best_index = np.empty((q1 - q0, 0), np.int64)
        best_sim = np.empty((q1 - q0, 0), np.float64)
        for c0 in range(0, num_candidates, block_size):
            c1 = min(c0 + block_size, num_candidates)
            sim = query_block @ np.asarray(candidates[c0:c1], np.float64).T
            _hide_self(sim, exclude[q0:q1] - c0)
            chosen = _top_k_unordered(sim, min(k, c1 - c0))
            best_index, best_sim = _keep_best(np.concatenate([best_index, chosen + c0], axis=1),
                                              np.concatenate([best_sim, np.take_along_axis(sim, chosen, 1)], axis=1),
                                              k)
        index[q0:q1], similarity[q0:q1] = best_index, best_sim
    return index, similarity


def _hide_self(sim: np.ndarray, column: np.ndarray) -> None:
    """Sets ``sim[i, column[i]]`` to -inf where that column lies in this block."""
    rows = np.flatnonzero((column >= 0) & (column < sim.shape[1]))
    sim[rows, column[rows]] = -np.inf


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


def iter_unit_rows(run: Run, column: str, ids: np.ndarray, columns: np.ndarray | None,
                   standardize: bool) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """The vectors of some samples as float64 unit rows, one part at a time.

    Parts holding none of ``ids`` are not read.

    Args:
        run: the run to read.
        column: "profile" or "features".
        ids: ``[n]`` sorted, distinct sample ids, all in the run.
        columns: ``[f]`` profile columns to keep (:meth:`Run.unit_columns`), or None.
        standardize: ``(s - mean) / std`` with the run's statistics first (profiles).

    Yields:
        ``(positions [m], rows [m, f])``: rows of unit norm (0 for a zero
        vector) of the samples ``ids[positions]``.
    """
    if standardize:
        stats = run.stats
        mean, std = stats.mean, stats.std
        if columns is not None:
            mean, std = mean[columns], std[columns]
    for part in run.parts:
        lo, hi = np.searchsorted(ids, [part.start, part.stop])
        if lo == hi:
            continue
        table = run.read_part(part, [column])
        part_ids = table.column("sample_id").to_numpy()
        where = np.searchsorted(ids, part_ids)
        wanted = (where < len(ids)) & (ids[np.minimum(where, len(ids) - 1)] == part_ids)
        vectors = table.column(column).combine_chunks()
        values = vectors.flatten().to_numpy().reshape(len(vectors), -1)[wanted]
        if columns is not None:
            values = values[:, columns]
        values = values.astype(np.float64)
        if standardize:
            values = (values - mean) / std
        _check_finite(values, part_ids[wanted], column, run)
        yield where[wanted], unit_rows(values)


def _check_finite(values: np.ndarray, ids: np.ndarray, column: str, run: Run) -> None:
    bad = ~np.isfinite(values).all(axis=1)
    if bad.any():
        raise InputError(f"{column} of samples {ids[bad][:10].tolist()} in {run.path} are not finite")


class Search:
    """The candidates of one space, read once; queries are multiplied by them block by block.

    Args:
        run: the run.
        space: "saliency" (standardized profiles) or "features" (raw penultimate features).
        layers: saliency space only: the layers whose units are kept (see :meth:`Run.unit_columns`).
        among: the candidates, "all" samples or "misclassified" ones.
        precision: "float32" or "float64", how the candidate matrix is kept.
        block_size: rows per block of the products.
    """

    def __init__(self, run: Run, space: str, layers: Layers, among: str, precision: str, block_size: int):
        self.run, self.space, self.precision, self.block_size = run, space, precision, block_size
        self.columns = run.unit_columns(layers) if space == "saliency" else None
        self.pool_ids = np.sort(run.sample_ids(None if among == "all" else "misclassified"))
        self.among = among
        self._pool: np.ndarray | None = None

    def query(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """``(pool rows [Q, k], similarities [Q, k])`` of each query's nearest candidates, itself excluded."""
        k = checked_k(k, len(self.pool_ids), self.among)
        pool = self._pool_rows()
        in_pool, position = _positions(self.pool_ids, queries)
        query_rows = pool[position] if in_pool.all() else self._query_rows(queries, in_pool, position)
        return cosine_top_k(pool, query_rows, k, np.where(in_pool, position, -1), self.block_size)

    def _pool_rows(self) -> np.ndarray:
        """The candidates ``[n_pool, f]``: unit rows in ``pool_ids`` order, read once."""
        if self._pool is None:
            pool: np.ndarray | None = None
            for positions, rows in self._iter_rows(self.pool_ids):
                if pool is None:
                    pool = np.empty((len(self.pool_ids), rows.shape[1]), self.precision)
                pool[positions] = rows
            self._pool = pool if pool is not None else np.zeros((0, 0), self.precision)
        return self._pool

    def _query_rows(self, queries: np.ndarray, in_pool: np.ndarray, position: np.ndarray) -> np.ndarray:
        """Rows ``[Q, f]`` of the queries: copied from the pool, or read for those outside it."""
        pool = self._pool_rows()
        rows = np.empty((len(queries), pool.shape[1]), pool.dtype)
        rows[in_pool] = pool[position[in_pool]]
        outside = np.unique(queries[~in_pool])
        slot = np.flatnonzero(~in_pool)
        wanted = np.searchsorted(outside, queries[slot])  # a query id may repeat: several slots, one sample
        for positions, unit in self._iter_rows(outside):
            here = np.isin(wanted, positions)
            order = np.argsort(positions)
            rows[slot[here]] = unit[order[np.searchsorted(positions[order], wanted[here])]]
        return rows

    def _iter_rows(self, ids: np.ndarray) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        column = "profile" if self.space == "saliency" else "features"
        return iter_unit_rows(self.run, column, ids, self.columns, standardize=self.space == "saliency")


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
