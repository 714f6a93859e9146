"""Compute: a batch of samples in, a batch of raw saliency profiles out (units, the hooks backend's plan and session,
the loop/vmap/hooks backends, tasks and losses, precision, the Profiler). No files, no pyarrow: the run directory is
:mod:`paramsal.rundir`, the bulk job :mod:`paramsal.jobs`."""

from paramsal.engine.backends import BatchResult
from paramsal.engine.functional import cross_entropy_per_sample, per_sample_gradients
from paramsal.engine.profile import Profiler, profile_batch
from paramsal.engine.units import UnitGroup, UnitIndex, units_of

__all__ = ["BatchResult", "Profiler", "UnitGroup", "UnitIndex", "cross_entropy_per_sample", "per_sample_gradients",
           "profile_batch", "units_of"]
