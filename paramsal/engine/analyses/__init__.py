"""Analyses that read a run directory: neighbours, pruning and perturbation, one-step fine-tuning,
input-space saliency (with masking and the randomization sanity check), plots and the HTML report.

Each is an object configured once and called with a run (and its data set), or a function of a run::

    from paramsal.engine.analyses import Neighbors, Pruning, FineTune, InputSaliency
"""

from paramsal.engine.analyses.finetune import FineTune
from paramsal.engine.analyses.input_saliency import InputSaliency, Masking
from paramsal.engine.analyses.neighbors import Neighbors, pair_sharing
from paramsal.engine.analyses.plots import plot_correct_vs_incorrect, plot_mean_profile
from paramsal.engine.analyses.pruning import Pruning
from paramsal.engine.analyses.report import build_report
from paramsal.engine.analyses.sanity import CascadingRandomization

__all__ = ["CascadingRandomization", "FineTune", "InputSaliency", "Masking", "Neighbors", "Pruning", "build_report",
           "pair_sharing", "plot_correct_vs_incorrect", "plot_mean_profile"]
