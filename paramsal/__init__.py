"""paramsal: parameter-space saliency maps, a batch at a time.

Which parameters are responsible for a model's mistakes? For each sample,
paramsal computes the gradient of that sample's own loss with respect to every
parameter, reduces it to one number per filter, and standardizes it with
statistics over a reference set (Levin et al., "Where do Models go Wrong?
Parameter-Space Saliency Maps for Explainability").
"""

from paramsal.engine import (BatchResult, Profiler, Run, UnitIndex, open_run, profile_batch, profile_dataset,
                             units_of)
from paramsal.errors import (InputError, NonFiniteError, ParamsalError, RunMismatchError,
                             UnsupportedModuleError)
from paramsal.kernels.stats import SaliencyStats, load_reference_stats

__version__ = "0.1.0"

__all__ = ["BatchResult", "InputError", "NonFiniteError", "ParamsalError", "Profiler", "Run", "RunMismatchError",
           "SaliencyStats", "UnitIndex", "UnsupportedModuleError", "load_reference_stats", "open_run",
           "profile_batch", "profile_dataset", "units_of"]
