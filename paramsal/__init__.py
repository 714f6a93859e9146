"""paramsal: parameter-space saliency maps, a batch at a time.

Which parameters are responsible for a model's mistakes? For each sample,
paramsal computes the gradient of that sample's own loss with respect to every
parameter, reduces it to one number per filter, and standardizes it with
statistics over a reference set (Levin et al., "Where do Models go Wrong?
Parameter-Space Saliency Maps for Explainability").

The names below are imported when first used, so that ``import paramsal``
(and ``paramsal --help``) does not pay for torch until something needs it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from paramsal._lazy import lazy_getattr
from paramsal._version import __version__
from paramsal.config import JobOptions, ProfileOptions
from paramsal.errors import (
    EngineError,
    InputError,
    NonFiniteError,
    ParamsalError,
    ParamsalWarning,
    RunCorruptError,
    RunLockedError,
    RunMismatchError,
    StorageError,
    UnsupportedModuleError,
    UnsupportedUseError,
)

#: Public name -> the subpackage that defines it.
_LAZY = {
    **dict.fromkeys(["BatchResult", "Profiler", "UnitIndex", "per_sample_gradients", "profile_batch", "units_of"],
                    "engine"),
    **dict.fromkeys(["Run", "open_run", "verify_run"], "rundir"),
    **dict.fromkeys(["SaliencyStats", "load_reference_stats"], "ranking"),
    "profile_dataset": "jobs",
    **dict.fromkeys(["CascadingRandomization", "DepthBias", "FineTune", "InputSaliency", "Masking", "Neighbors",
                     "Pruning", "Result", "SaliencyProfiles", "load_result", "write_report"], "analyses"),
    **dict.fromkeys(["Compare", "compare"], "analyses"),
}

__all__ = ["BatchResult", "CascadingRandomization", "DepthBias", "EngineError", "FineTune", "InputError",
           "InputSaliency", "JobOptions", "Masking", "Neighbors", "NonFiniteError", "ParamsalError", "ParamsalWarning",
           "ProfileOptions", "Profiler", "Pruning", "Result", "Run", "Compare", "compare",
           "RunCorruptError", "RunLockedError", "RunMismatchError", "SaliencyProfiles", "SaliencyStats",
           "StorageError", "UnitIndex", "UnsupportedModuleError", "UnsupportedUseError", "__version__",
           "load_reference_stats", "load_result", "open_run", "per_sample_gradients", "profile_batch",
           "profile_dataset", "units_of", "verify_run", "write_report"]

if TYPE_CHECKING:
    from paramsal.analyses import (
        CascadingRandomization,
        Compare,
        DepthBias,
        FineTune,
        InputSaliency,
        Masking,
        Neighbors,
        Pruning,
        Result,
        SaliencyProfiles,
        compare,
        load_result,
        write_report,
    )
    from paramsal.engine import BatchResult, Profiler, UnitIndex, per_sample_gradients, profile_batch, units_of
    from paramsal.jobs import profile_dataset
    from paramsal.ranking import SaliencyStats, load_reference_stats
    from paramsal.rundir import Run, open_run, verify_run


__getattr__ = lazy_getattr(__name__, _LAZY)


def __dir__() -> list[str]:
    return __all__
