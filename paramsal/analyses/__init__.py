"""The analyses of a run directory, each configured once and applied with one verb (:mod:`paramsal.analyses.base`)::

    result = paramsal.Pruning(ks=(1, 5, 10)).evaluate(run)     # data and model rebuilt from the run
    result.table, result.summary                               # pandas
    result.plot()                                              # a matplotlib Figure
    result.save("out/")                                        # Parquet, JSON and PNG

* :class:`Neighbors`: nearest neighbours in saliency vs feature space (paper 3.2);
* :class:`Pruning`: turning salient units off, or perturbing them (3.1, A.5);
* :class:`FineTune`: one gradient step on a mistake's salient units (3.3);
* :class:`InputSaliency`: which pixels make the salient units salient (2.2);
* :class:`Masking`: masking the salient pixels (3.4, A.8);
* :class:`CascadingRandomization`: the sanity check of input saliency (A.10);
* :class:`SaliencyProfiles`: the paper's Figures 1-2;
* :class:`DepthBias`: which layers each ranking (z-score, POT) puts the top units of mistakes in;
* :class:`Compare` (:func:`compare`): which units move from one run to another (a data shift, a checkpoint);
  the one analysis of two runs, ``evaluate(run_a, run_b)``;
* :func:`write_report`: a static HTML page of a run and every result saved with it.

A module here defines one analysis and its result; :mod:`~paramsal.analyses.curves`
holds what pruning and fine-tuning share, :mod:`~paramsal.analyses.sources`
how an analysis finds the run's model, data and samples."""

from __future__ import annotations

from typing import TYPE_CHECKING

from paramsal._lazy import lazy_getattr

#: Public name -> the module that defines it (imported on first use).
_LAZY = {
    "Analysis": "base", "Result": "base", "load_result": "base",
    "Neighbors": "neighbors", "Pruning": "pruning", "FineTune": "finetune", "InputSaliency": "input_saliency",
    "Masking": "masking", "CascadingRandomization": "cascading_randomization", "DepthBias": "depth_bias",
    "SaliencyProfiles": "profiles", "write_report": "report",
    "Compare": "comparison", "compare": "comparison",
}

__all__ = ["Analysis", "CascadingRandomization", "DepthBias", "FineTune", "InputSaliency", "Masking", "Neighbors",
           "Pruning", "Result", "SaliencyProfiles", "load_result", "write_report", "Compare", "compare"]

if TYPE_CHECKING:
    from paramsal.analyses.base import Analysis, Result, load_result
    from paramsal.analyses.cascading_randomization import CascadingRandomization
    from paramsal.analyses.comparison import Compare, compare
    from paramsal.analyses.depth_bias import DepthBias
    from paramsal.analyses.finetune import FineTune
    from paramsal.analyses.input_saliency import InputSaliency
    from paramsal.analyses.masking import Masking
    from paramsal.analyses.neighbors import Neighbors
    from paramsal.analyses.profiles import SaliencyProfiles
    from paramsal.analyses.pruning import Pruning
    from paramsal.analyses.report import write_report


__getattr__ = lazy_getattr(__name__, _LAZY)


def __dir__() -> list[str]:
    return __all__
