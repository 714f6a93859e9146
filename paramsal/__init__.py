"""paramsal: parameter-space saliency maps, a batch at a time.

Which parameters are responsible for a model's mistakes? For each sample,
paramsal computes the gradient of that sample's own loss with respect to every
parameter, reduces it to one number per filter, and standardizes it with
statistics over a reference set (Levin et al., "Where do Models go Wrong?
Parameter-Space Saliency Maps for Explainability").
"""

from paramsal._version import __version__
from paramsal.engine import (BatchResult, ParamsalWarning, Profiler, Run, UnitIndex, open_run, profile_batch,
                             profile_dataset, units_of, verify_run)
from paramsal.errors import (EngineError, InputError, NonFiniteError, ParamsalError, RunCorruptError, RunLockedError,
                             RunMismatchError, StorageError, UnsupportedModuleError, UnsupportedUseError)
from paramsal.kernels.stats import SaliencyStats, load_reference_stats

__all__ = ["BatchResult", "EngineError", "InputError", "NonFiniteError", "ParamsalError", "ParamsalWarning",
           "Profiler", "Run", "RunCorruptError", "RunLockedError", "RunMismatchError", "SaliencyStats",
           "StorageError", "UnitIndex", "UnsupportedModuleError", "UnsupportedUseError", "__version__",
           "load_reference_stats", "open_run", "profile_batch", "profile_dataset", "units_of", "verify_run"]
