"""Nearest neighbours in saliency space (paper, section 3.2).

Samples whose mistakes come from the same parameters should have similar
saliency profiles. :class:`Neighbors` finds, for each query sample, its k
nearest samples by cosine similarity of standardized profiles (or of
penultimate features, the baseline), exactly, with blocked matrix products so
that memory stays bounded for a full validation set (50,000 x 26,560 profiles
need the candidate matrix, 5.3 GB of float32, plus one block of similarities).
:func:`pair_sharing` gives the paper's summary: how often the neighbours of a
misclassified sample share its (true, predicted) class pair.

```python
nn = Neighbors(run, k=10, among="misclassified")
table = nn.nn()                          # query_id, rank, neighbor_id, similarity
nn.write(table)                          # RUN/analyses/neighbors-saliency.parquet
pair_sharing(run, k=10)                  # {"saliency": ..., "features": ..., "chance": ...}
```
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from paramsal._io import atomic_path
from paramsal.engine.analyses.common import open_analysis_run, output_folder
from paramsal.engine.rundir import Run, open_run
from paramsal.errors import InputError

SPACES = ("saliency", "features")
POOLS = ("all", "misclassified")
PRECISIONS = ("float32", "float64")
ANALYSES_DIR = "analyses"

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


def unit_columns(run: Run, layers: Layers) -> np.ndarray | None:
    """Profile columns ``[f]`` of the units in ``layers``, or None for all units.

    Args:
        run: the run whose ``units.layer`` is used.
        layers: a slice over the run's distinct layers in order (``slice(0, 10)``
            = the first ten layers), or a list of ``units.layer`` values; as in
            :meth:`Run.profiles`.
    """
    if layers is None:
        return None
    layer_of_unit = run.units.column("layer").to_numpy()
    known = np.unique(layer_of_unit)
    if isinstance(layers, slice):
        chosen = known[layers]
    else:
        chosen = np.asarray(list(layers), np.int64)
        unknown = np.setdiff1d(chosen, known)
        if len(unknown):
            raise InputError(f"layers {unknown.tolist()} are not in {run.path} (its layers are "
                             f"{known.min()}..{known.max()})")
    columns = np.flatnonzero(np.isin(layer_of_unit, chosen))
    if len(columns) == 0:
        raise InputError(f"layers={_describe_layers(layers)} selects no units of {run.path} "
                         f"({len(known)} layers, {known.min()}..{known.max()})")
    return columns


def iter_unit_rows(run: Run, column: str, ids: np.ndarray, columns: np.ndarray | None,
                   standardize: bool) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """The vectors of some samples as float64 unit rows, one part at a time.

    Parts holding none of ``ids`` are not read.

    Args:
        run: the run to read.
        column: "profile" or "features".
        ids: ``[n]`` sorted, distinct sample ids, all in the run.
        columns: ``[f]`` profile columns to keep (see :func:`unit_columns`), or None.
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


class Neighbors:
    """Exact cosine k-nearest neighbours of samples of a run.

    Configure once, then call :meth:`nn` with query sample ids. The candidate
    matrix (``n_pool x f`` unit rows) is read on the first call and kept; each
    call then multiplies query blocks by candidate blocks, never holding more
    than ``block_size x block_size`` similarities.

    Args:
        run: a run directory or an opened :class:`Run`.
        k: neighbours per query; less than the number of candidates.
        space: "saliency" (standardized profiles, with the run's own
            statistics) or "features" (the run's penultimate features, raw:
            the feature-space baseline; the run must be profiled with
            ``features=True``).
        layers: saliency space only: keep the units of these layers, e.g.
            ``slice(0, 10)`` for shallow layers, ``slice(10, None)`` for deep
            ones (a slice over the distinct layers, or a list of
            ``units.layer`` values).
        among: candidates: "all" samples or only "misclassified" ones.
        precision: how the candidate matrix is kept. "float32" (half the
            memory): similarities are within about 1e-8 of a float64
            computation, so samples whose similarities to a query differ by
            less (near-duplicates among confidently correct samples) may swap
            ranks. "float64": ranks exactly as a float64 computation.
            Products are taken in float64 either way.
        block_size: queries and candidates per block; besides the candidate
            matrix (``n_pool * f * 4`` bytes in float32), memory peaks at about
            ``block_size * (16 * f + 32 * block_size)`` bytes (1 GiB for
            2048 rows of 26,560 units).

    Example:
        >>> nn = Neighbors(run, k=10, among="misclassified", layers=slice(10, None))
        >>> table = nn.nn()              # every misclassified sample as a query
        >>> nn.write(table)              # RUN/analyses/neighbors-saliency.parquet
    """

    def __init__(self, run: Run | str | os.PathLike, k: int = 10, space: str = "saliency", layers: Layers = None,
                 among: str = "all", block_size: int = 2048, precision: str = "float32"):
        self.run = run if isinstance(run, Run) else open_run(run)
        if space not in SPACES:
            raise InputError(f"space={space!r}: expected one of {', '.join(SPACES)}")
        if among not in POOLS:
            raise InputError(f"among={among!r}: expected one of {', '.join(POOLS)}")
        if space == "features" and not self.run.manifest.get("features"):
            raise InputError(f"{self.run.path} has no features for space='features': profile it with "
                             "features=True (--features)")
        if space == "features" and layers is not None:
            raise InputError("layers applies to space='saliency' only (features have no layers)")
        if precision not in PRECISIONS:
            raise InputError(f"precision={precision!r}: expected one of {', '.join(PRECISIONS)}")
        if not isinstance(block_size, (int, np.integer)) or block_size < 1:
            raise InputError(f"block_size={block_size!r}: expected a positive integer")
        self.space, self.among, self.layers, self.block_size = space, among, layers, int(block_size)
        self.precision = precision
        self._columns = unit_columns(self.run, layers) if space == "saliency" else None
        table = self.run.table()
        self._all_ids = np.sort(table.column("sample_id").to_numpy())
        self.pool_ids = np.sort(self.run.sample_ids(None if among == "all" else "misclassified"))
        self.k = _checked_k(k, len(self.pool_ids), among)
        self._pool: np.ndarray | None = None

    def __repr__(self) -> str:
        return (f"Neighbors({str(self.run.path)!r}, k={self.k}, space={self.space!r}, "
                f"layers={_describe_layers(self.layers)}, among={self.among!r}, pool={len(self.pool_ids)})")

    def nn(self, query_ids: Sequence[int] | np.ndarray | None = None) -> pa.Table:
        """The k nearest neighbours of each query.

        Args:
            query_ids: ``[Q]`` sample ids of the run (any sample, in or out of
                the pool); default: every sample of the pool (every sample,
                or every misclassified one with ``among="misclassified"``),
                in sample-id order.

        Returns:
            ``Q * k`` rows, query by query in the given order: ``query_id``,
            ``rank`` (1 = nearest), ``neighbor_id``, ``similarity`` (cosine,
            float64, of the unit rows as kept in ``precision``). A query is
            never its own neighbour (a duplicate of it may be); equal
            similarities are ranked by smaller sample id. The configuration
            is in the schema metadata (``paramsal.neighbors``).
        """
        queries = self.pool_ids if query_ids is None else self._checked_queries(query_ids)
        pool = self._pool_rows()
        in_pool, position = _positions(self.pool_ids, queries)
        query_rows = pool[position] if in_pool.all() else self._query_rows(queries, in_pool, position)
        exclude = np.where(in_pool, position, -1)
        index, similarity = cosine_top_k(pool, query_rows, self.k, exclude, self.block_size)
        return self._table(queries, self.pool_ids[index], similarity)

    def _pool_rows(self) -> np.ndarray:
        """The candidates ``[n_pool, f]``: unit rows in ``pool_ids`` order, read once."""
        if self._pool is None:
            pool = None
            for positions, rows in self._iter_rows(self.pool_ids):
                if pool is None:
                    pool = np.empty((len(self.pool_ids), rows.shape[1]), self.precision)
                pool[positions] = rows
            self._pool = pool
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

    def write(self, table: pa.Table | None = None, path: str | os.PathLike | None = None) -> Path:
        """Writes a neighbours table (default: :meth:`nn` of the pool) as Parquet, atomically.

        Args:
            table: a table returned by :meth:`nn`.
            path: default ``RUN/analyses/neighbors-{space}.parquet``.

        Returns:
            The path written.
        """
        table = self.nn() if table is None else table
        path = Path(path) if path is not None else self.run.path / ANALYSES_DIR / f"neighbors-{self.space}.parquet"
        output_folder(path.parent, "--out FILE")
        with atomic_path(path) as tmp:
            pq.write_table(table, tmp)
        return path

    def config(self) -> dict[str, Any]:
        return {"run": str(self.run.path), "k": self.k, "space": self.space,
                "layers": _describe_layers(self.layers), "among": self.among,
                "pool_size": len(self.pool_ids), "metric": "cosine", "precision": self.precision,
                "vectors": "standardized profiles (run's statistics)" if self.space == "saliency"
                else "penultimate features (raw)"}

    def _iter_rows(self, ids: np.ndarray) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        column = "profile" if self.space == "saliency" else "features"
        return iter_unit_rows(self.run, column, ids, self._columns, standardize=self.space == "saliency")

    def _checked_queries(self, query_ids: Sequence[int] | np.ndarray) -> np.ndarray:
        queries = np.asarray(query_ids)
        if queries.ndim != 1 or (len(queries) and not np.issubdtype(queries.dtype, np.integer)):
            raise InputError(f"query_ids must be a 1-D list of integer sample ids, got {queries.dtype} "
                             f"of shape {queries.shape}")
        queries = queries.astype(np.int64)
        unknown = np.setdiff1d(queries, self._all_ids)
        if len(unknown):
            raise InputError(f"query ids {unknown[:10].tolist()}{' ...' if len(unknown) > 10 else ''} are not "
                             f"samples of {self.run.path} ({len(self._all_ids)} samples)")
        return queries

    def _table(self, queries: np.ndarray, neighbor_ids: np.ndarray, similarity: np.ndarray) -> pa.Table:
        k = self.k
        table = pa.table({
            "query_id": pa.array(np.repeat(queries, k), pa.int64()),
            "rank": pa.array(np.tile(np.arange(1, k + 1, dtype=np.int32), len(queries)), pa.int32()),
            "neighbor_id": pa.array(neighbor_ids.reshape(-1), pa.int64()),
            "similarity": pa.array(np.clip(similarity, -1.0, 1.0).reshape(-1), pa.float64()),
        })
        return table.replace_schema_metadata({"paramsal.neighbors": json.dumps(self.config())})


def _checked_k(k: int, pool_size: int, among: str) -> int:
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


def _describe_layers(layers: Layers) -> str:
    if layers is None:
        return "all"
    if isinstance(layers, slice):
        return f"{'' if layers.start is None else layers.start}:{'' if layers.stop is None else layers.stop}" + \
            ("" if layers.step is None else f":{layers.step}")
    return ",".join(str(int(layer)) for layer in layers)


# ---------------------------------------------------------------------------
# The paper's summary: shared (true, predicted) pairs


def pair_sharing_rate(run: Run, neighbors: pa.Table) -> float:
    """Fraction of neighbours of misclassified queries that share the query's class pair.

    A neighbour shares the pair of a query with true class t and prediction p
    when its own (true, predicted) pair is (t, p) or (p, t). Queries that are
    correctly classified are ignored; every remaining (query, neighbour) pair
    counts once.

    Args:
        run: the run the table was computed on (for targets and predictions).
        neighbors: a table from :meth:`Neighbors.nn`.

    Returns:
        The fraction in [0, 1].
    """
    target, pred = _classes_by_id(run)
    query = neighbors.column("query_id").to_numpy()
    neighbor = neighbors.column("neighbor_id").to_numpy()
    wrong = target[query] != pred[query]
    if not wrong.any():
        raise InputError("the neighbours table has no misclassified query, so no (true, predicted) pair to share")
    query, neighbor = query[wrong], neighbor[wrong]
    return float(_shares_pair(target, pred, query, neighbor).mean())


def chance_pair_sharing_rate(run: Run, query_ids: np.ndarray, pool_ids: np.ndarray) -> float:
    """The same fraction if each query's neighbours were drawn at random from the pool (itself excluded).

    Args:
        run: the run.
        query_ids: ``[Q]`` misclassified sample ids.
        pool_ids: ``[n]`` candidate sample ids.
    """
    target, pred = _classes_by_id(run)
    num_classes = int(max(target.max(), pred.max())) + 1
    pair_counts = np.zeros((num_classes, num_classes), np.int64)
    np.add.at(pair_counts, (target[pool_ids], pred[pool_ids]), 1)
    t, p = target[query_ids], pred[query_ids]
    sharing = pair_counts[t, p] + np.where(t != p, pair_counts[p, t], 0)
    in_pool = np.isin(query_ids, pool_ids)
    # A query in the pool shares its own pair but is never its own neighbour.
    return float(((sharing - in_pool) / (len(pool_ids) - in_pool)).mean())


def pair_sharing(run: Run | str | os.PathLike, k: int = 10, layers: Layers = None, among: str = "misclassified",
                 spaces: Sequence[str] = SPACES, block_size: int = 2048, precision: str = "float32"
                 ) -> dict[str, Any]:
    """The (true, predicted)-pair sharing rate of misclassified samples' neighbours, per space.

    Every misclassified sample is a query; its k nearest neighbours are taken
    among the pool (``among``) in each space, and the rate of
    :func:`pair_sharing_rate` is reported, with the rate expected of random
    neighbours from the same pool (``chance``).

    Args:
        run: the run (or its directory).
        k: neighbours per query.
        layers: saliency space only, as in :class:`Neighbors`.
        among: the pool, "misclassified" (as in the paper) or "all".
        spaces: which of "saliency", "features" to compute.
        block_size, precision: as in :class:`Neighbors`.

    Returns:
        ``{"k", "among", "layers", "queries", "pool", "chance", and one rate per space}``.
    """
    run = run if isinstance(run, Run) else open_run(run)
    if among not in POOLS:
        raise InputError(f"among={among!r}: expected one of {', '.join(POOLS)}")
    queries = run.sample_ids("misclassified")
    if len(queries) == 0:
        raise InputError(f"{run.path} has no misclassified sample")
    tables = {}
    for space in spaces:
        finder = Neighbors(run, k=k, space=space, layers=layers if space == "saliency" else None, among=among,
                           block_size=block_size, precision=precision)
        tables[space] = finder.nn(queries)
    return _summary(run, k, layers, among, tables)


def _summary(run: Run, k: int, layers: Layers, among: str, tables: dict[str, pa.Table]) -> dict[str, Any]:
    """The rates of neighbours tables (one per space) whose queries include every misclassified sample."""
    queries = run.sample_ids("misclassified")
    pool_ids = np.sort(run.sample_ids(None if among == "all" else "misclassified"))
    result: dict[str, Any] = {"k": k, "among": among, "layers": _describe_layers(layers), "queries": len(queries),
                              "pool": len(pool_ids)}
    result.update({space: pair_sharing_rate(run, table) for space, table in tables.items()})
    result["chance"] = chance_pair_sharing_rate(run, queries, pool_ids)
    return result


def _classes_by_id(run: Run) -> tuple[np.ndarray, np.ndarray]:
    """``target``, ``pred`` indexed by sample id (``-1`` where an id is absent)."""
    table = run.table()
    ids = table.column("sample_id").to_numpy()
    target = np.full(ids.max() + 1 if len(ids) else 0, -1, np.int64)
    pred = target.copy()
    target[ids] = table.column("target").to_numpy()
    pred[ids] = table.column("pred").to_numpy()
    return target, pred


def _shares_pair(target: np.ndarray, pred: np.ndarray, query: np.ndarray, neighbor: np.ndarray) -> np.ndarray:
    same = (target[neighbor] == target[query]) & (pred[neighbor] == pred[query])
    swapped = (target[neighbor] == pred[query]) & (pred[neighbor] == target[query])
    return same | swapped


# ---------------------------------------------------------------------------
# Command line (wired into ``paramsal`` by cli.py)


def parse_layers(text: str | None) -> Layers:
    """``"A:B"`` -> ``slice(A, B)`` (either end may be empty); ``"3,5,7"`` -> ``[3, 5, 7]``."""
    if text is None or text in ("", "all"):
        return None
    try:
        if ":" in text:
            parts = [int(p) if p.strip() else None for p in text.split(":")]
            if len(parts) > 3:
                raise ValueError
            return slice(*parts)
        return [int(p) for p in text.split(",")]
    except ValueError:
        raise InputError(f"--layers {text!r}: expected A:B (a range of layers, either end optional) "
                         "or a comma-separated list of layers") from None


def add_neighbors_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``paramsal neighbors``."""
    parser.add_argument("run", help="run directory")
    parser.add_argument("--k", type=int, default=10, help="neighbours per query (default 10)")
    parser.add_argument("--layers", default=None,
                        help="saliency space: a range A:B of layers (e.g. 0:10 shallow, 10: deep) or a list 1,2,3")
    parser.add_argument("--among", default="misclassified", choices=POOLS,
                        help="candidates and default queries (default: misclassified, as in the paper)")
    parser.add_argument("--space", default="saliency", choices=SPACES, help="the space whose table is written")
    parser.add_argument("--block-size", type=int, default=2048, help="rows per block of the similarity products")
    parser.add_argument("--precision", default="float32", choices=PRECISIONS,
                        help="candidate matrix in memory: float32 (half the memory) or float64 (exact ranks)")
    parser.add_argument("--out", default=None, help="Parquet file (default RUN/analyses/neighbors-SPACE.parquet)")


def run_neighbors_command(args: argparse.Namespace) -> int:
    """``paramsal neighbors``: writes the table of one space, prints the pair-sharing rate of both."""
    run = open_analysis_run(args)
    # Checked before the work, not after it: the default folder is inside the run, which may be read-only.
    output_folder(Path(args.out).parent if args.out else run.path / ANALYSES_DIR, "--out FILE")
    layers = parse_layers(args.layers)
    wrong = run.sample_ids("misclassified")
    if len(wrong) == 0:
        raise InputError(f"{run.path} has no misclassified sample: nothing to explain")
    tables, path = {}, None
    for space in SPACES:
        if space != args.space and space == "features" and not run.manifest.get("features"):
            continue  # the baseline is optional; the requested space is not
        finder = Neighbors(run, k=args.k, space=space, layers=layers if space == "saliency" else None,
                           among=args.among, block_size=args.block_size, precision=args.precision)
        if space == args.space:
            # every pool sample is a query, so the misclassified ones the summary needs are in it
            tables[space] = table = finder.nn()
            path = finder.write(table, args.out)
        else:
            tables[space] = finder.nn(wrong)
    summary = _summary(run, args.k, layers, args.among, tables)
    print(f"neighbours  {run.path}: k={args.k}, among {args.among} ({summary['pool']} samples), "
          f"layers {summary['layers']} (saliency space)")
    print(f"(true, predicted) pair shared with the query, {summary['queries']} misclassified queries:")
    print(f"  saliency space   {summary['saliency']:.4f}")
    print(f"  feature space    {summary['features']:.4f}" if "features" in summary else
          "  feature space    -      (the run has no features: profile with --features)")
    print(f"  chance           {summary['chance']:.4f}   (random neighbours from the same pool)")
    print(f"wrote {path} ({table.num_rows} rows: query_id, rank, neighbor_id, similarity)")
    return 0
