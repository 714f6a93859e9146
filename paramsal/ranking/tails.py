"""Peaks-over-threshold tails of each unit's saliency, and the tail scores that rank units by them.

The paper ranks a sample's units by z-score, which reads a unit's saliency as
if it were normal. Wang & Sato ("Understanding Parameter Saliency via Extreme
Value Theory", 2023) rank by how improbable the saliency is in the unit's own
upper tail instead. Per unit, over a reference set of ``n`` raw saliencies:

* the threshold ``t`` is their exact 0.9 quantile (numpy's default, linear
  interpolation between order statistics);
* the ``m`` exceedances ``y = s - t > 0`` are fitted with a generalized Pareto
  distribution (shape ``xi``, scale ``beta``, location 0) by maximum
  likelihood (:func:`fit_gpd`);
* a saliency ``s > t`` has tail probability ``p = (m / n) * GPD.sf(s - t)``;
  one at or below ``t`` the share of reference values at or above it, read
  from :data:`BULK_LEVELS` stored quantiles (linear between them);
* the score is ``-log10 p``: 0 for the unit's typical values, 1 at the
  threshold, more for rarer ones.

Documented fallbacks, so that a score is never NaN or infinite:

* a unit with fewer than :data:`MIN_EXCEEDANCES` exceedances is not fitted;
  above its threshold it gets the empirical ``p = (1 + #{exceedances >= s}) / (n + 1)``;
* a constant unit (every reference value equal) scores 0: it carries no
  information about what is abnormal, as the z-score's ``std`` guard makes
  such a unit's z-score the raw difference, next to nothing;
* beyond the end point of a fitted tail with ``xi < 0`` (probability 0) the
  score is :data:`MAX_SCORE`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from paramsal._arrow import fixed_size_list, list_values
from paramsal.errors import InputError

#: The threshold's quantile level.
THRESHOLD_LEVEL = 0.9
#: Fewer exceedances than this are not fitted (the empirical tail serves instead).
MIN_EXCEEDANCES = 10
#: Quantile levels stored per unit for scores at or below the threshold (the last is the threshold).
BULK_LEVELS = np.round(np.linspace(0.0, THRESHOLD_LEVEL, 91), 12)
#: The score of a probability 0 (beyond a fitted tail's end point): -log10 of the smallest normal float64.
MAX_SCORE = float(-np.log10(np.finfo(np.float64).tiny))
#: Fitted shapes are kept at or above -1: below it the likelihood grows without bound toward the largest value.
MIN_SHAPE = -1.0

# Points u = theta * max(y) at which the profile likelihood is scanned before the golden-section refinement.
_GRID = np.concatenate([-1.0 + np.logspace(-6, np.log10(0.5), 10), -np.logspace(np.log10(0.3), -5, 10), [0.0],
                        np.logspace(-5, 5, 31), np.logspace(6, 30, 13)])  # heavy tails: max(y) decades above beta
_GOLDEN = (np.sqrt(5.0) - 1.0) / 2.0
_REFINE_STEPS = 48
# The per-unit fields of :class:`Tails` beside ``groups``: one number per (group, unit), then the stored lists.
_SCALARS = ("count", "threshold", "exceedances", "fitted", "xi", "beta")
_FIELDS = (*_SCALARS, "bulk", "top")
# Values scored at once: the empirical tail compares each with up to 9 stored exceedances.
_CHUNK_ELEMENTS = 1 << 20


def gpd_loglik(exceedances: np.ndarray, counts: np.ndarray, theta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The GPD log-likelihood maximized over the shape for a fixed ``theta = xi / beta``, per unit.

    For fixed ``theta`` the likelihood's best shape is ``xi = mean(log1p(theta y))``
    (Grimshaw 1993), which leaves a function of ``theta`` alone:
    ``-m (log(xi / theta) + 1 + xi)``; at ``theta = 0`` the exponential's ``-m (log mean(y) + 1)``.

    Args:
        exceedances: ``[r, U]`` each unit's exceedances in its column, padded with zeros
            (``log1p(theta * 0) = 0``, so padding adds nothing).
        counts: ``[U]`` exceedances per unit (>= 1).
        theta: ``[U]`` with ``theta * max(y) > -1``.

    Returns:
        ``(loglik [U], xi [U])``; the log-likelihood is ``-inf`` where ``xi`` would fall below :data:`MIN_SHAPE`.
    """
    with np.errstate(divide="ignore", invalid="ignore"):
        xi = np.log1p(theta * exceedances).sum(0) / counts
        scale = np.where(theta == 0, exceedances.sum(0) / counts, xi / np.where(theta == 0, 1.0, theta))
        loglik = -counts * (np.log(scale) + 1.0 + np.where(theta == 0, 0.0, xi))
    return np.where((xi >= MIN_SHAPE) & np.isfinite(loglik), loglik, -np.inf), np.where(theta == 0, 0.0, xi)


def fit_gpd(exceedances: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Maximum-likelihood GPD fits (location 0) of many units' exceedances at once.

    The profile likelihood :func:`gpd_loglik` is scanned on a fixed grid of
    ``u = theta * max(y)`` and refined by golden-section search between the
    best point's neighbours, every unit at once.

    Args:
        exceedances: ``[r, U]`` positive exceedances, each unit's ``counts[k]`` in its column, the rest zeros.
        counts: ``[U]`` exceedances per unit (>= 1).

    Returns:
        ``(xi [U], beta [U], loglik [U])``, float64, ``xi >= MIN_SHAPE``.
    """
    y = np.asarray(exceedances, np.float64)
    counts = np.asarray(counts, np.float64)
    if y.ndim != 2 or counts.shape != (y.shape[1],) or (counts < 1).any() or (y < 0).any():
        raise InputError(f"exceedances must be [r, U] non-negative with counts [U] >= 1, got {y.shape} and "
                         f"{counts.shape}")
    top = y.max(0)
    top = np.where(top > 0, top, 1.0)

    def loglik(position: np.ndarray) -> np.ndarray:
        return gpd_loglik(y, counts, np.interp(position, np.arange(len(_GRID)), _GRID) / top)[0]

    scanned = np.stack([loglik(np.full(len(counts), float(i))) for i in range(len(_GRID))])
    best = scanned.argmax(0)
    columns = np.arange(len(best))
    position = _golden_section(loglik, np.maximum(best - 1, 0).astype(np.float64),
                               np.minimum(best + 1, len(_GRID) - 1).astype(np.float64))
    # the refinement may only improve on the grid's best point
    position = np.where(loglik(position) >= scanned[best, columns], position, best.astype(np.float64))
    theta = np.interp(position, np.arange(len(_GRID)), _GRID) / top
    best_loglik, xi = gpd_loglik(y, counts, theta)
    beta = np.where(theta == 0, y.sum(0) / counts, xi / np.where(theta == 0, 1.0, theta))
    return xi, beta, best_loglik


def _golden_section(f, low: np.ndarray, high: np.ndarray) -> np.ndarray:
    """Maximizers of ``f`` on ``[low, high]``, elementwise, by :data:`_REFINE_STEPS` golden-section steps."""
    left, right = high - _GOLDEN * (high - low), low + _GOLDEN * (high - low)
    at_left, at_right = f(left), f(right)
    for _ in range(_REFINE_STEPS):
        keep_left = at_left >= at_right  # the maximum lies in [low, right]; otherwise in [left, high]
        low, high = np.where(keep_left, low, left), np.where(keep_left, right, high)
        new = np.where(keep_left, high - _GOLDEN * (high - low), low + _GOLDEN * (high - low))
        at_new = f(new)
        left, right, at_left, at_right = (np.where(keep_left, new, right), np.where(keep_left, left, new),
                                          np.where(keep_left, at_new, at_right), np.where(keep_left, at_left, at_new))
    return np.where(at_left >= at_right, left, right)


@dataclass(frozen=True)
class Tails:
    """The fitted tails of ``F`` units in ``G`` reference groups (one group, or one per class).

    Attributes:
        groups: ``[G]`` the groups' labels (the class, or -1 for a whole reference set).
        count: ``[G, F]`` reference values per unit.
        threshold: ``[G, F]`` the exact :data:`THRESHOLD_LEVEL` quantile.
        exceedances: ``[G, F]`` reference values above the threshold.
        fitted: ``[G, F]`` whether a GPD was fitted (at least :data:`MIN_EXCEEDANCES` exceedances).
        xi, beta: ``[G, F]`` the fitted shape and scale (0 where not fitted).
        bulk: ``[G, F, L]`` quantiles at :data:`BULK_LEVELS`.
        top: ``[G, F, MIN_EXCEEDANCES - 1]`` an unfitted unit's exceedances (``-inf`` padding).
    """

    groups: np.ndarray
    count: np.ndarray
    threshold: np.ndarray
    exceedances: np.ndarray
    fitted: np.ndarray
    xi: np.ndarray
    beta: np.ndarray
    bulk: np.ndarray
    top: np.ndarray

    @property
    def num_units(self) -> int:
        return int(self.threshold.shape[1])

    def score(self, values: np.ndarray, group_rows: np.ndarray | None = None,
              unit_columns: np.ndarray | None = None) -> np.ndarray:
        """Tail scores ``-log10 p`` (float32) of raw saliencies.

        Args:
            values: ``[n, f]`` raw profiles.
            group_rows: ``[n]`` each row's group (an index into :attr:`groups`); default group 0.
            unit_columns: ``[f]`` the units the columns are (default all ``F``).
        """
        values = np.asarray(values)
        columns = np.arange(self.num_units) if unit_columns is None else np.asarray(unit_columns)
        if values.ndim != 2 or values.shape[1] != len(columns):
            raise InputError(f"values of shape {values.shape} do not fit tails of {len(columns)} units")
        rows = np.zeros(len(values), np.int64) if group_rows is None else np.asarray(group_rows, np.int64)
        out = np.empty(values.shape, np.float32)
        chunk = max(1, _CHUNK_ELEMENTS // max(len(columns), 1))
        for group in np.unique(rows):
            here = np.flatnonzero(rows == group)
            for start in range(0, len(here), chunk):
                taken = here[start:start + chunk]
                out[taken] = _scores(self, int(group), columns, values[taken].astype(np.float64))
        return out

    def to_arrow(self) -> pa.Table:
        """One row per (group, unit)."""
        num_groups, num_units = self.threshold.shape
        flat = {name: getattr(self, name).reshape(-1) for name in _SCALARS}
        return pa.table({
            "group": np.repeat(self.groups, num_units), "unit_id": np.tile(np.arange(num_units), num_groups),
            **flat,
            "bulk": fixed_size_list(self.bulk.reshape(num_groups * num_units, -1)),
            "top": fixed_size_list(self.top.reshape(num_groups * num_units, -1)),
        })

    @classmethod
    def from_arrow(cls, table: pa.Table) -> Tails:
        groups = np.unique(table.column("group").to_numpy())
        num_units = table.num_rows // max(len(groups), 1)
        shaped = {name: table.column(name).to_numpy(zero_copy_only=False).reshape(len(groups), num_units)
                  for name in _SCALARS}
        lists = {name: list_values(table.column(name)).reshape(len(groups), num_units, -1)
                 for name in ("bulk", "top")}
        return cls(groups=groups, **shaped, **lists)


def fit_tails(values: np.ndarray) -> Tails:
    """The tails of one reference set's units (one group, labelled -1).

    Args:
        values: ``[n, U]`` raw saliencies of the reference samples, ``n >= 1``.
    """
    values = np.asarray(values)
    if values.ndim != 2 or len(values) == 0:
        raise InputError(f"tails need reference values [n >= 1, U], got shape {values.shape}")
    n, num_units = values.shape
    ordered = np.sort(values.astype(np.float64), axis=0)
    bulk = _quantiles(ordered, BULK_LEVELS)  # [L, U]
    threshold = _quantiles(ordered, np.array([THRESHOLD_LEVEL]))[0]
    above = ordered > threshold
    exceedances = above.sum(0)
    depth = int(exceedances.max(initial=0))
    tail = np.maximum(ordered[n - depth:] - threshold, 0.0)  # the non-exceedances among them become padding zeros
    fitted = exceedances >= MIN_EXCEEDANCES
    xi, beta = np.zeros(num_units), np.zeros(num_units)
    if fitted.any():
        xi[fitted], beta[fitted], _ = fit_gpd(tail[:, fitted], exceedances[fitted])
    width = MIN_EXCEEDANCES - 1
    top = np.full((num_units, width), -np.inf)
    last = ordered[max(n - width, 0):][::-1].T  # [U, <= width], largest first
    top[:, :last.shape[1]] = np.where(above[max(n - width, 0):][::-1].T & ~fitted[:, None], last, -np.inf)
    return Tails(groups=np.array([-1]), count=np.full((1, num_units), n, np.int64), threshold=threshold[None],
                 exceedances=exceedances[None].astype(np.int64), fitted=fitted[None], xi=xi[None], beta=beta[None],
                 bulk=bulk.T[None].astype(np.float32), top=top[None].astype(np.float32))


def stack_tails(parts: list[Tails], groups: np.ndarray) -> Tails:
    """One :class:`Tails` of several groups (each part one group, all of the same units), labelled ``groups``."""
    return Tails(groups=np.asarray(groups, np.int64),
                 **{name: np.concatenate([getattr(p, name) for p in parts]) for name in _FIELDS})


def join_units(parts: list[Tails]) -> Tails:
    """One :class:`Tails` of the same groups over the units of ``parts`` in turn (blocks of units fitted apart)."""
    return Tails(groups=parts[0].groups,
                 **{name: np.concatenate([getattr(p, name) for p in parts], axis=1) for name in _FIELDS})


def _quantiles(ordered: np.ndarray, levels: np.ndarray) -> np.ndarray:
    """``[len(levels), U]`` numpy's default ("linear") quantiles of sorted columns."""
    position = levels * (len(ordered) - 1)
    below = np.floor(position).astype(np.int64)
    above = np.minimum(below + 1, len(ordered) - 1)
    weight = (position - below)[:, None]
    low, high = ordered[below], ordered[above]
    return np.where(weight >= 0.5, high - (high - low) * (1 - weight), low + (high - low) * weight)


def _scores(tails: Tails, group: int, columns: np.ndarray, values: np.ndarray) -> np.ndarray:
    """``[n, f]`` float32 scores of one group's rows."""
    threshold = tails.threshold[group, columns]
    bulk = tails.bulk[group, columns].astype(np.float64)  # [f, L]
    count = tails.count[group, columns].astype(np.float64)
    constant = (bulk[:, 0] == threshold) & (tails.exceedances[group, columns] == 0)
    share = _share_at_or_above(bulk, values)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        score = -np.log10(share)
        xi, beta = tails.xi[group, columns], tails.beta[group, columns]
        excess = values - threshold
        ratio = np.log1p(xi * excess / beta)
        log_sf = np.where(xi == 0, -excess / beta, -ratio / np.where(xi == 0, 1.0, xi))
        rate = tails.exceedances[group, columns] / count
        fitted_score = -(np.log10(rate) + log_sf / np.log(10.0))
        fitted_score = np.where(np.isnan(ratio) | np.isinf(ratio) | (fitted_score > MAX_SCORE), MAX_SCORE,
                                fitted_score)
        tops = tails.top[group, columns].astype(np.float64)  # [f, w]
        rarer = (tops[None, :, :] >= values[:, :, None]).sum(2)
        empirical = -np.log10((1.0 + rarer) / (count + 1.0))
    beyond = excess > 0
    score = np.where(beyond, np.where(tails.fitted[group, columns], fitted_score, empirical), score)
    return np.where(constant, 0.0, np.maximum(score, 0.0)).astype(np.float32)


def _share_at_or_above(bulk: np.ndarray, values: np.ndarray) -> np.ndarray:
    """``[n, f]`` the reference share at or above each value, linear between the stored quantiles ``bulk [f, L]``.

    1 at or below the smallest quantile; values above the last (the threshold) are scored by the tail instead.
    """
    num_levels = bulk.shape[1]
    # c = how many quantiles lie strictly below the value, by a vectorized binary search
    low = np.zeros(values.shape, np.int64)
    high = np.full(values.shape, num_levels, np.int64)
    units = np.arange(values.shape[1])
    for _ in range(int(np.ceil(np.log2(num_levels + 1)))):
        middle = (low + high) // 2
        below = bulk[units, np.minimum(middle, num_levels - 1)] < values
        searching = low < high
        low = np.where(searching & below, middle + 1, low)
        high = np.where(searching & ~below, middle, high)
    inside = np.clip(low, 1, num_levels - 1)
    left, right = bulk[units, inside - 1], bulk[units, inside]
    with np.errstate(divide="ignore", invalid="ignore"):
        fraction = np.clip((values - left) / (right - left), 0.0, 1.0)
    level = BULK_LEVELS[inside - 1] + fraction * (BULK_LEVELS[inside] - BULK_LEVELS[inside - 1])
    return np.where(low == 0, 1.0, 1.0 - np.where(low >= num_levels, BULK_LEVELS[-1], level))


