"""The batched profiling engine: units, backends and the profiling entry points, statistics, the run directory."""

from paramsal.engine.backends import BatchResult
from paramsal.engine.dataset import profile_dataset
from paramsal.engine.functional import cross_entropy_per_sample, per_sample_gradients
from paramsal.engine.integrity import verify_run
from paramsal.engine.profile import Profiler, profile_batch
from paramsal.engine.rundir import Run, open_run
from paramsal.engine.stats import SaliencyStats, load_reference_stats
from paramsal.engine.units import UnitGroup, UnitIndex, units_of

__all__ = ["BatchResult", "Profiler", "Run", "SaliencyStats", "UnitGroup", "UnitIndex", "cross_entropy_per_sample",
           "load_reference_stats", "open_run", "per_sample_gradients", "profile_batch", "profile_dataset",
           "units_of", "verify_run"]
