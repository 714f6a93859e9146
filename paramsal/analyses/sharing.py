"""What a query and its nearest neighbours share: the rates of :class:`~paramsal.analyses.neighbors.Neighbors`.

A misclassified query and a neighbour share its (true, predicted) class pair
when the neighbour's pair is the same, in either order (paper 3.2). A run of
task "answer" has no classes: the pair is (reference, answer), both
:func:`~paramsal.zoo.qa.normalized` text, and its questions' labels (error
categories) are shared when equal. Each rate has its chance counterpart,
computed exactly from counts for neighbours drawn at random from the same
pool (a query never its own neighbour). Texts become integer codes, so that
one comparison serves classes, answers and labels.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyarrow as pa

from paramsal.errors import InputError
from paramsal.rundir.run import Run
from paramsal.zoo.qa import normalized

__all__ = ["ANSWER_PAIR", "CLASS_PAIR", "chance_label_sharing_rate", "chance_pair_sharing_rate", "label_sharing_rate",
           "pair_sharing_rate", "sharing_summary"]

#: What the pair of a classification run and of an answer run is made of (``config["pair"]`` of an answer run).
CLASS_PAIR, ANSWER_PAIR = "(true, predicted)", "(reference, answer)"


def pair_sharing_rate(run: Run, neighbors: pa.Table) -> float:
    """Fraction of neighbours of misclassified queries that share the query's class pair.

    A neighbour shares the pair of a query with true class t and prediction p
    when its own (true, predicted) pair is (t, p) or (p, t). Queries that are
    correctly classified are ignored; every remaining (query, neighbour) pair
    counts once. In a run of task "answer" the pair is (reference, answer),
    both :func:`~paramsal.zoo.qa.normalized`, and the queries that count are
    the wrong answers.

    Args:
        run: the run the table was computed on (for targets and predictions).
        neighbors: a table from :meth:`Neighbors.nn`.

    Returns:
        The fraction in [0, 1].
    """
    keys = _shared_keys(run)
    query, neighbor = _ids(neighbors, "query_id"), _ids(neighbors, "neighbor_id")
    if not keys.wrong[query].any():
        raise InputError(f"the neighbours table has no misclassified query, so no {keys.pair} pair to share")
    return _sharing_rate(keys.first, keys.second, keys.wrong, query, neighbor)


def chance_pair_sharing_rate(run: Run, query_ids: np.ndarray, pool_ids: np.ndarray) -> float:
    """The same fraction if each query's neighbours were drawn at random from the pool (itself excluded).

    Args:
        run: the run.
        query_ids: ``[Q]`` misclassified sample ids.
        pool_ids: ``[n]`` candidate sample ids.
    """
    keys = _shared_keys(run)
    return _chance_rate(keys.first, keys.second, np.asarray(query_ids), np.asarray(pool_ids))


def label_sharing_rate(run: Run, neighbors: pa.Table) -> float:
    """Fraction of neighbours of misclassified queries (wrong answers) whose label is the query's.

    A run of task "answer" only, whose questions carry labels: a query without
    one shares it with no neighbour, and a neighbour without one with no query.

    Args:
        run: the answer run the table was computed on.
        neighbors: ``query_id``, ``neighbor_id`` (a :attr:`NeighborsResult.table`).
    """
    keys = _shared_keys(run)
    labels = _labels_of(run, keys)
    query, neighbor = _ids(neighbors, "query_id"), _ids(neighbors, "neighbor_id")
    if not keys.wrong[query].any():
        raise InputError("the neighbours table has no misclassified query, so no label to share")
    return _sharing_rate(*labels, keys.wrong, query, neighbor)


def chance_label_sharing_rate(run: Run, query_ids: np.ndarray, pool_ids: np.ndarray) -> float:
    """:func:`label_sharing_rate` if each query's neighbours were drawn at random from the pool (itself excluded).

    Args:
        run: the answer run.
        query_ids: ``[Q]`` misclassified sample ids.
        pool_ids: ``[n]`` candidate sample ids.
    """
    keys = _shared_keys(run)
    return _chance_rate(*_labels_of(run, keys), np.asarray(query_ids), np.asarray(pool_ids))


def sharing_summary(run: Run, table: pd.DataFrame, queries: np.ndarray, pool_ids: np.ndarray, k: int) -> pd.DataFrame:
    """Pair-sharing (and label-sharing) rates per space over the misclassified queries, and chance for the same
    pool."""
    wrong = np.intersect1d(queries, run.sample_ids("misclassified"))
    keys = _shared_keys(run)
    rates = {"pair_sharing": (keys.first, keys.second)}
    if keys.labels is not None:
        rates["label_sharing"] = (keys.labels, keys.labels)
    rows = []
    for space, part in table.groupby("space", sort=False):
        query, neighbor = part["query_id"].to_numpy(), part["neighbor_id"].to_numpy()
        rows.append({"space": space, **{name: _sharing_rate(first, second, keys.wrong, query, neighbor)
                                        if len(wrong) else np.nan for name, (first, second) in rates.items()}})
    rows.append({"space": "chance", **{name: _chance_rate(first, second, wrong, pool_ids) if len(wrong) else np.nan
                                       for name, (first, second) in rates.items()}})
    frame = pd.DataFrame(rows)
    frame["queries"], frame["pool"], frame["k"] = len(wrong), len(pool_ids), k
    return frame


@dataclass(frozen=True)
class _Keys:
    """What a query and its neighbours may share, as integer codes indexed by sample id (``-1`` where an id is
    absent): the pair ``(first, second)``; ``labels``, each null label a code of its own (so that it equals no
    other sample's), or None where the run has no label; ``wrong``, the queries whose neighbours count."""

    pair: str
    first: np.ndarray
    second: np.ndarray
    wrong: np.ndarray
    labels: np.ndarray | None


def _shared_keys(run: Run) -> _Keys:
    """A classification run's (true, predicted) classes (misclassified: true differs from predicted); an answer
    run's (reference, answer) texts and labels (misclassified: a wrong, finite answer)."""
    if run.task != "answer":
        target, pred = _classes_by_id(run)
        return _Keys(CLASS_PAIR, target, pred, target != pred, None)
    table = run.table()
    ids = table.column("sample_id").to_numpy()
    texts = [[normalized(text) for text in table.column(name).to_pylist()] for name in ("reference", "answer")]
    reference, answer = _by_id(ids, _codes(*texts))
    label_texts = table.column("label").to_pylist()
    labels = _by_id(ids, _codes(label_texts))[0] if any(text is not None for text in label_texts) else None
    wrong = np.zeros(len(reference), bool)
    wrong[run.sample_ids("misclassified")] = True
    return _Keys(ANSWER_PAIR, reference, answer, wrong, labels)


def _labels_of(run: Run, keys: _Keys) -> tuple[np.ndarray, np.ndarray]:
    """The labels as a pair ``(label, label)``: sharing it in either order is having the same label."""
    if keys.labels is None:
        raise InputError(f"{run.path} has no labels to share: only an answer run whose questions carry a "
                         "\"label\" has them")
    return keys.labels, keys.labels


def _codes(*columns: Sequence[str | None]) -> list[np.ndarray]:
    """Each column's texts as integer codes, one code per distinct text across all the columns, and a code of its
    own for each None (it equals nothing else)."""
    codes, _ = pd.factorize(pd.Series([text for column in columns for text in column], dtype=object))
    missing = codes < 0
    codes[missing] = codes.max(initial=-1) + 1 + np.arange(missing.sum())
    return np.split(codes.astype(np.int64), np.cumsum([len(column) for column in columns])[:-1])


def _by_id(ids: np.ndarray, columns: list[np.ndarray]) -> list[np.ndarray]:
    """Each column indexed by sample id instead of by row (``-1`` where an id is absent)."""
    out = []
    for column in columns:
        by_id = np.full(ids.max() + 1 if len(ids) else 0, -1, np.int64)
        by_id[ids] = column
        out.append(by_id)
    return out


def _classes_by_id(run: Run) -> tuple[np.ndarray, np.ndarray]:
    """``target``, ``pred`` indexed by sample id (``-1`` where an id is absent)."""
    table = run.table()
    ids = table.column("sample_id").to_numpy()
    target, pred = _by_id(ids, [table.column("target").to_numpy(), table.column("pred").to_numpy()])
    return target, pred


def _ids(neighbors: pa.Table, column: str) -> np.ndarray:
    return neighbors.column(column).to_numpy()


def _sharing_rate(first: np.ndarray, second: np.ndarray, wrong: np.ndarray, query: np.ndarray,
                  neighbor: np.ndarray) -> float:
    """The share of the (query, neighbour) rows whose query is ``wrong`` that share the query's pair."""
    keep = wrong[query]
    return float(_shares_pair(first, second, query[keep], neighbor[keep]).mean())


def _chance_rate(first: np.ndarray, second: np.ndarray, query_ids: np.ndarray, pool_ids: np.ndarray) -> float:
    """The share of :func:`_sharing_rate` for neighbours drawn at random from the pool, each query excluded: from
    the pool's count of each pair."""
    size = int(max(first.max(), second.max())) + 1
    keys, counts = np.unique(first[pool_ids] * size + second[pool_ids], return_counts=True)
    pair_counts = pd.Series(counts, index=keys)  # only the pairs that occur: codes of texts are many

    def count(pairs: np.ndarray) -> np.ndarray:
        return pair_counts.reindex(pairs, fill_value=0).to_numpy()

    t, p = first[query_ids], second[query_ids]
    sharing = count(t * size + p) + np.where(t != p, count(p * size + t), 0)
    in_pool = np.isin(query_ids, pool_ids)
    # A query in the pool shares its own pair but is never its own neighbour.
    return float(((sharing - in_pool) / (len(pool_ids) - in_pool)).mean())


def _shares_pair(target: np.ndarray, pred: np.ndarray, query: np.ndarray, neighbor: np.ndarray) -> np.ndarray:
    same = (target[neighbor] == target[query]) & (pred[neighbor] == pred[query])
    swapped = (target[neighbor] == pred[query]) & (pred[neighbor] == target[query])
    return same | swapped
