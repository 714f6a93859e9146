"""Statistics and scores of profiles: streaming mean and standard deviation (Welford/Chan), reference sets, POT tails,
and the unit scores of a run's samples (z-score or POT) computed from its stored parts."""

from paramsal.ranking.stats import SaliencyStats, load_reference_stats

__all__ = ["SaliencyStats", "load_reference_stats"]
