"""Nearest neighbours in saliency space (the paper's section 3.2).

Samples whose mistakes come from the same parameters should have similar
saliency profiles. :class:`Neighbors` finds, for each query sample, its k
nearest samples by cosine similarity of standardized profiles (and, as the
baseline, of penultimate features), exactly (:mod:`paramsal.analyses.knn`:
blocked products over the run read in blocks, memory set by ``budget_mb``,
not by the number of samples). Its summary is the
paper's: how often the neighbours of a misclassified sample share its (true,
predicted) class pair, in each space, against chance.

A run of task "answer" (questions to a chat LLM, :mod:`paramsal.zoo.qa`) has
no classes: its ``target`` and ``pred`` are the answer's first token. There
the pair is (reference, answer): the reference answer and the model's greedy
answer, both as :func:`~paramsal.zoo.qa.normalized` text, shared in either
order as a class pair is ("3" answered "4" shares the pair of "4" answered
"3": the same two answers confused); the queries are the wrong answers. Where
the questions carry labels (error categories), the summary also says how often
a neighbour has the query's label (``label_sharing``; a question without one
shares it with no one).

```python
result = Neighbors(k=10, among="misclassified").evaluate(run)
result.table       # space, query_id, rank, neighbor_id, similarity
result.summary     # space ("saliency", "features", "chance"), pair_sharing, [label_sharing], queries, pool, k
```
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import pandas as pd
import torch

from paramsal.analyses.base import Analysis, Result, result_config
from paramsal.analyses.knn import Layers, Search, checked_k
from paramsal.analyses.sharing import ANSWER_PAIR, CLASS_PAIR, sharing_summary
from paramsal.analyses.sources import Samples, chosen_samples, open_for_analysis
from paramsal.engine.devices import resolve_device
from paramsal.errors import InputError, check_choice, check_integer
from paramsal.jobs.distributed import current_ranks, rank_device
from paramsal.options import POOLS, PRECISIONS, SPACES
from paramsal.rundir.run import Run

#: The summary's sharing rates, with the hatching the figure draws them in.
RATES = {"pair_sharing": None, "label_sharing": "//"}


@dataclass(repr=False)
class NeighborsResult(Result):
    """The neighbours of each query in each space (:attr:`table`) and the pair-sharing rates (:attr:`summary`).

    ``table``: space, query_id, rank (1 = nearest), neighbor_id, similarity
    (cosine, float64, exact in either ``precision``; equal similarities rank
    the smaller sample id first). ``summary``: one row per space and one for
    chance (random neighbours from the same pool, a query never its own):
    space, pair_sharing (the share of the neighbours of misclassified queries
    whose (true, predicted) pair is the query's, in either order; an answer
    run's (reference, answer) pair, ``config["pair"]``), label_sharing (an
    answer run whose questions carry labels only: the share of those
    neighbours whose label is the query's; a query without a label shares
    none), queries (misclassified ones), pool, k.
    """

    kind: ClassVar[str] = "neighbors"
    title: ClassVar[str] = "Nearest neighbours sharing the (true, predicted) class pair (paper 3.2)"

    def neighbor_ids(self, space: str = "saliency") -> np.ndarray:
        """``[Q, k]`` each query's neighbours in ``space``, queries in table order."""
        rows = self.table[self.table["space"] == space]
        return rows["neighbor_id"].to_numpy().reshape(-1, int(self.config["k"]))

    def _draw(self, figure: Any, axes: list[Any]) -> None:
        ax = axes[0]
        colors = {"saliency": "tab:red", "features": "tab:blue", "chance": "0.6"}
        spaces = self.summary["space"].tolist()
        rates = [column for column in RATES if column in self.summary]
        width = 0.8 / len(rates)
        for n, column in enumerate(rates):  # the label bars hatched, beside the pair bars
            xs = np.arange(len(spaces)) + (n - (len(rates) - 1) / 2) * width
            ax.bar(xs, self.summary[column], width, color=[colors.get(space, "0.3") for space in spaces],
                   hatch=RATES[column], edgecolor="white")
            for x, value in zip(xs, self.summary[column]):
                ax.text(x, value, f"{value:.3f}", ha="center", va="bottom", fontsize=8)
        ax.set_xticks(range(len(spaces)), spaces)
        pair = f"the {self.config.get('pair', CLASS_PAIR)} pair"
        if len(rates) == 1:
            ax.set_ylabel(f"neighbours sharing {pair}")
        else:
            from matplotlib.patches import Patch

            ax.set_ylabel("share of neighbours")
            ax.legend(handles=[Patch(facecolor="0.75", edgecolor="white", hatch=RATES[column], label=text)
                               for column, text in zip(rates, (f"sharing {pair}", "sharing the label"))],
                      fontsize=8)
        ax.set_ylim(0, 1)
        ax.set_title(f"k={self.config['k']}, among {self.config['among']}, layers {self.config['layers']}",
                     fontsize=9)


class Neighbors(Analysis):
    """Exact cosine k-nearest neighbours of a run's samples, in saliency space and in feature space.

    Args:
        k: neighbours per query; less than the number of candidates.
        layers: saliency space only: keep the units of these layers, e.g.
            ``slice(0, 10)`` for shallow layers, ``slice(10, None)`` for deep
            ones (a slice over the distinct layers, or a list of
            ``units.layer`` values).
        among: the candidates: "misclassified" samples (the paper) or "all".
        spaces: "saliency" (standardized profiles, the run's own statistics)
            and/or "features" (the run's penultimate features, raw: the
            baseline); "features" is left out for a run profiled without
            features, unless it is the only space asked for (then an error).
        precision: how the products are taken; both rank exactly as a
            float64 computation (unit rows in float64, equal similarities by
            sample id). "float32" (the default, faster where few candidates
            are near a query's k-th): float32 products screen the candidates,
            with a rigorous bound on their error, and float64 products rank
            those that may be among the k best (or a query's whole row, where
            many are: near-duplicate correct samples). "float64": float64
            products throughout.
        block_size: queries and candidates per block, instead of the rows
            ``budget_mb`` allows; memory then peaks at about
            ``block_size * (48 * f + 32 * block_size)`` bytes.
        budget_mb: MiB the blocks may hold (default 256): the queries are
            read in blocks, and for each the candidates stream from the run in
            blocks, so memory is set by this, not by the number of samples
            (besides the per-sample table and the results, a few dozen bytes a
            sample); a larger budget means fewer passes over the run.
        **common: see :class:`~paramsal.analyses.base.Analysis` (the run alone is read: no model, no data);
            ``device`` is where the float32 screening products run: a CUDA GPU
            (the default when there is one; each ``torchrun`` rank its own),
            in full float32, or "cpu" (numpy). The neighbours are the same.

    ``evaluate(run, samples=...)`` takes the queries: "misclassified" (the
    default), "correct", or sample ids (in or out of the pool; a query is never
    its own neighbour, though a duplicate of it may be).

    A run of task "answer" takes the same settings: its misclassified samples
    are its wrong answers, the shared pair is (reference, answer) and, where
    its questions carry labels, the summary adds ``label_sharing`` (see
    :class:`NeighborsResult`).
    """

    purpose: ClassVar[str] = "find neighbours of"

    def __init__(self, k: int = 10, *, layers: Layers = None, among: str = "misclassified",
                 spaces: Sequence[str] = SPACES, precision: str = "float32", block_size: int | None = None,
                 budget_mb: int = 256, **common: Any):
        super().__init__(**common)
        for name, value, choices in [("among", among, POOLS), ("precision", precision, PRECISIONS),
                                     *(("space", space, SPACES) for space in spaces)]:
            check_choice(f"{name}=", value, choices)
        if not spaces:
            raise InputError(f"spaces=(): expected some of {', '.join(SPACES)}")
        if layers is not None and "saliency" not in spaces:
            raise InputError("layers applies to space='saliency' only (features have no layers)")
        checked_k(k, k + 1, among)
        if block_size is not None and (not isinstance(block_size, (int, np.integer)) or block_size < 1):
            raise InputError(f"block_size={block_size!r}: expected a positive integer")
        self.k, self.layers, self.among, self.spaces = int(k), layers, among, tuple(dict.fromkeys(spaces))
        self.precision = precision
        self.block_size = None if block_size is None else int(block_size)
        self.budget_mb = check_integer("budget_mb", budget_mb)

    def evaluate(self, run: Run | str | os.PathLike, data: Any = None, samples: Samples = None) -> NeighborsResult:
        run = open_for_analysis(run, self.allow_partial)
        spaces = self._spaces(run)
        queries = _query_ids(run, samples)
        screen_on = _screening_device(self.device)
        tables, pool = [], np.zeros(0, np.int64)
        for space in spaces:
            search = Search(run, space, self.layers if space == "saliency" else None, self.among, self.precision,
                            self.block_size, self.budget_mb, screen_on)
            index, similarity = _query_across_ranks(search, queries, self.k)
            pool = search.pool_ids
            tables.append(pd.DataFrame({
                "space": space, "query_id": np.repeat(queries, self.k),
                "rank": np.tile(np.arange(1, self.k + 1, dtype=np.int32), len(queries)),
                "neighbor_id": pool[index].reshape(-1), "similarity": np.clip(similarity, -1.0, 1.0).reshape(-1)}))
        table = pd.concat(tables, ignore_index=True)
        answers = {"pair": ANSWER_PAIR} if run.task == "answer" else {}
        config = result_config(run, self, layers=_describe_layers(self.layers), pool_size=len(pool),
                               metric="cosine", name_parts=_name_parts(self.layers, self.among), **answers)
        return NeighborsResult(table, sharing_summary(run, table, queries, pool, self.k), config)

    def _spaces(self, run: Run) -> tuple[str, ...]:
        if run.manifest.features:
            return self.spaces
        if self.spaces == ("features",):
            raise InputError(f"{run.path} has no features for space='features': profile it with "
                             "features=True")
        return tuple(s for s in self.spaces if s != "features")


def _screening_device(device: str | torch.device | None) -> torch.device | None:
    """The GPU :class:`Search` screens on for ``device`` (None: CUDA when available), or None for numpy on the CPU."""
    chosen = rank_device(resolve_device(device), current_ranks())
    return chosen if chosen.type == "cuda" else None


def _query_across_ranks(search: Search, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """:meth:`Search.query`, each rank of a ``torchrun`` job answering a contiguous share of the queries."""
    ranks = current_ranks()
    if ranks.world_size == 1:
        return search.query(queries, k)
    answers = ranks.gather(search.query(np.asarray(ranks.share(queries.tolist()), np.int64), k))
    return np.concatenate([a[0] for a in answers]), np.concatenate([a[1] for a in answers])


def neighbor_ids(run: Run, ids: np.ndarray, k: int, among: str = "misclassified") -> np.ndarray:
    """``[n, k]`` each sample's nearest neighbours in saliency space among ``among`` (itself excluded)."""
    search = Search(run, "saliency", None, among)
    index, _ = search.query(np.asarray(ids, np.int64), k)
    return search.pool_ids[index]


def _query_ids(run: Run, samples: Samples) -> np.ndarray:
    if samples is None or isinstance(samples, str):
        return chosen_samples(run, samples, "find neighbours of")[0]
    queries = np.asarray(samples)
    if queries.ndim != 1 or (len(queries) and not np.issubdtype(queries.dtype, np.integer)):
        raise InputError(f"query ids must be a 1-D list of integer sample ids, got {queries.dtype} "
                         f"of shape {queries.shape}")
    queries = queries.astype(np.int64)
    unknown = np.setdiff1d(queries, run.table().column("sample_id").to_numpy())
    if len(unknown):
        raise InputError(f"query ids {unknown[:10].tolist()}{' ...' if len(unknown) > 10 else ''} are not "
                         f"samples of {run.path} ({run.num_samples} samples)")
    return queries


def _describe_layers(layers: Layers) -> str:
    if layers is None:
        return "all"
    if isinstance(layers, slice):
        return f"{'' if layers.start is None else layers.start}:{'' if layers.stop is None else layers.stop}" + \
            ("" if layers.step is None else f":{layers.step}")
    return ",".join(str(int(layer)) for layer in layers)


def _name_parts(layers: Layers, among: str) -> list[str]:
    """What the file name records beyond "neighbors": the layers and the pool, when not the defaults."""
    parts = []
    if layers is not None:
        parts.append("layers" + _describe_layers(layers).replace(":", "-").replace(",", "."))
    if among != "misclassified":
        parts.append(f"among-{among}")
    return parts


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
