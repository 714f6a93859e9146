"""The bulk job: a whole data set through the engine into a run directory, on one device or many ranks
(:func:`profile_dataset`): loading, devices, torchrun ranks, fingerprints, and the loop that feeds the Profiler and
the writers."""

from paramsal.jobs.bulk import profile_dataset

__all__ = ["profile_dataset"]
