"""The batched profiling engine: units, backends and the profiling entry points."""

from paramsal.engine.backends import BatchResult
from paramsal.engine.profile import Profiler, cross_entropy_per_sample, profile_batch
from paramsal.engine.units import UnitGroup, UnitIndex, units_of

__all__ = ["BatchResult", "Profiler", "UnitGroup", "UnitIndex", "cross_entropy_per_sample", "profile_batch",
           "units_of"]
