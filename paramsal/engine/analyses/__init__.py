"""Analyses that read a run directory: neighbours, pruning and perturbation, plots."""
