"""The batched profiling engine: units, backends and the profiling entry points, and the run directory."""

from paramsal.engine.backends import BatchResult
from paramsal.engine.dataset import profile_dataset
from paramsal.engine.integrity import verify_run
from paramsal.engine.profile import ParamsalWarning, Profiler, cross_entropy_per_sample, profile_batch
from paramsal.engine.rundir import Run, open_run
from paramsal.engine.units import UnitGroup, UnitIndex, units_of

__all__ = ["BatchResult", "ParamsalWarning", "Profiler", "Run", "UnitGroup", "UnitIndex", "cross_entropy_per_sample",
           "open_run", "profile_batch", "profile_dataset", "units_of", "verify_run"]
