"""Which units an analysis acts on: a sample's most salient, least salient, or random units."""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from paramsal.errors import InputError, check_choice
from paramsal.options import RANKINGS, UNIT_SELECTIONS
from paramsal.ranking.scoring import reference_set, reference_tails
from paramsal.ranking.tails import Tails
from paramsal.rundir.run import Run

__all__ = ["UNIT_SELECTIONS", "run_tails", "select_units", "unit_scores"]


def unit_scores(run: Run, sample_ids: np.ndarray, ranking: str = "zscore",
                reference: str | os.PathLike | Run = "all") -> np.ndarray:
    """``[n, F]`` the scores by which the units of samples ``sample_ids`` are ranked, rows in the order given.

    Args:
        run: the run.
        sample_ids: ``[n]`` sorted, distinct sample ids of the run.
        ranking: "zscore", the standardized profile ``(s - mu) / sigma`` (the
            paper), or "pot", the peaks-over-threshold tail score (:meth:`Run.scores`).
        reference: the samples the scores are taken against (:mod:`paramsal.ranking.scoring`).
    """
    check_choice("ranking", ranking, RANKINGS)
    return run.scores(ranking, only=np.asarray(sample_ids, dtype=np.int64), reference=reference)


def run_tails(run: Run, reference: str | os.PathLike | Run = "all") -> Tails:
    """The POT tails a run's units are scored with against ``reference`` (fitted once, stored in the run)."""
    return reference_tails(reference_set(run, reference))


def select_units(profiles: np.ndarray, k: int, selection: str, seed: int = 0,
                 sample_ids: Sequence[int] | np.ndarray | None = None) -> np.ndarray:
    """Each sample's k units, in order: the first j columns are the choice for k = j.

    Args:
        profiles: ``[n, F]`` standardized saliency profiles (or other unit scores, larger = more salient).
        k: units per sample, ``1 <= k <= F``.
        selection: "salient" (largest standardized saliency first), "least"
            (smallest first) or "random" (uniform without replacement over all
            F units; sample i's draw is seeded by ``(seed, sample_ids[i])``, so
            it does not depend on which other samples are analysed).
        seed: seed of the random draws.
        sample_ids: ``[n]`` ids that seed the draws (default ``0..n-1``).

    Returns:
        ``[n, k]`` int64 unit ids; equal saliencies keep unit order.
    """
    profiles = np.asarray(profiles)
    if profiles.ndim != 2:
        raise InputError(f"profiles must be [n, F], got shape {profiles.shape}")
    n, num_units = profiles.shape
    check_choice("unit selection", selection, UNIT_SELECTIONS)
    if not 1 <= k <= num_units:
        raise InputError(f"k={k} is outside 1..{num_units} (the run has {num_units} units)")
    if selection == "salient":
        return np.argsort(-profiles, axis=1, kind="stable")[:, :k]
    if selection == "least":
        return np.argsort(profiles, axis=1, kind="stable")[:, :k]
    if selection == "random":
        ids = np.arange(n) if sample_ids is None else np.asarray(sample_ids)
        if len(ids) != n:
            raise InputError(f"sample_ids has {len(ids)} entries for {n} profiles")
        draws = [np.random.default_rng([seed, int(i)]).permutation(num_units)[:k] for i in ids]
        return np.stack(draws).astype(np.int64) if n else np.zeros((0, k), np.int64)
    raise AssertionError(selection)  # check_choice took every other
