"""``paramsal prune | finetune``: the curves of editing each mistake's salient, random or least salient units."""

from __future__ import annotations

import argparse
import time

from paramsal.cli.parsing import (
    add_output_arguments,
    add_run_argument,
    add_source_arguments,
    analysis_options,
    choice_list,
    loaded_source,
    opened_run,
    positive_int,
    positive_int_list,
)
from paramsal.options import FINETUNE_KS, FINETUNE_SELECTIONS, PRUNING_KS, PRUNING_MODES, RANKINGS, UNIT_SELECTIONS


def register(sub: argparse._SubParsersAction) -> None:
    prune = sub.add_parser("prune", help="turn off (or perturb) each mistake's salient / random / least salient "
                                         "units and measure the confidences (paper 3.1, A.5)")
    add_run_argument(prune)
    _add_grid(prune, PRUNING_KS, UNIT_SELECTIONS, "units to turn off")
    prune.add_argument("--mode", default="zero", choices=PRUNING_MODES,
                       help="zero: turn the units off (pruning, paper 3.1); noise: add N(0, std^2) noise to "
                            "their weights (perturbation, paper A.5)")
    prune.add_argument("--noise-std", type=float, default=1e-3, help="noise standard deviation (default 0.001)")
    _add_common(prune, batch_size=64, batch_help="samples per forward pass")
    prune.set_defaults(func=prune_command)

    finetune = sub.add_parser("finetune", help="one SGD step on each mistake's salient / random / least salient "
                                               "filters or all parameters; is it corrected? (paper 3.3)")
    add_run_argument(finetune)
    _add_grid(finetune, FINETUNE_KS, FINETUNE_SELECTIONS, "filters to update")
    finetune.add_argument("--lr", type=float, default=1e-3, help="learning rate of the one SGD step (default 0.001)")
    finetune.add_argument("--neighbors", type=positive_int, default=10,
                          help="saliency-space neighbours per sample, among the misclassified (default 10)")
    _add_common(finetune, batch_size=16, batch_help="samples whose updates are evaluated together")
    finetune.set_defaults(func=finetune_command)


def _add_grid(parser: argparse.ArgumentParser, ks: tuple[int, ...], selections: tuple[str, ...], edited: str) -> None:
    """``--ks`` and ``--select``: the (selection, k) grid a curves command measures."""
    parser.add_argument("--ks", type=positive_int_list, default=list(ks),
                        help=f"comma-separated numbers of {edited} (default {','.join(map(str, ks))}; those above "
                             "the run's unit count are left out)")
    parser.add_argument("--select", type=choice_list(selections), default=list(selections),
                        help=f"comma-separated selections: {','.join(selections)} (default all of them)")


def _add_common(parser: argparse.ArgumentParser, batch_size: int, batch_help: str) -> None:
    parser.add_argument("--ranking", default="zscore", choices=RANKINGS,
                        help="how a sample's units are ranked: zscore (default: the standardized profile, the "
                             "paper) or pot (the peaks-over-threshold tail score; tails fitted once, stored in RUN)")
    parser.add_argument("--reference", default="all", metavar="all|correct|class|RUN",
                        help="the samples the ranking scores against: all (default), the correctly classified, "
                             "each sample's own class, or another run directory of the same model and units")
    parser.add_argument("--seed", type=int, default=0, help="seeds the random units, any noise and the bootstrap")
    parser.add_argument("--batch-size", type=positive_int, default=batch_size,
                        help=f"{batch_help} (default {batch_size})")
    parser.add_argument("--resamples", type=positive_int, default=1000, help="bootstrap resamples (default 1000)")
    add_source_arguments(parser)
    add_output_arguments(parser, "analyses")


def prune_command(args: argparse.Namespace) -> int:
    """Loads the run's model and data, writes the tables, config and figure, prints the summary."""
    from paramsal.analyses.pruning import Pruning

    run, out = opened_run(args)
    source = loaded_source(args, run)
    started = time.perf_counter()
    result = Pruning(source["model"], ks=args.ks, select=args.select, mode=args.mode, noise_std=args.noise_std,
                     ranking=args.ranking, reference=args.reference, seed=args.seed, batch_size=args.batch_size,
                     num_resamples=args.resamples,
                     **analysis_options(args)).evaluate(run, source["data"])
    elapsed = time.perf_counter() - started
    config = result.config
    return _finish(result, out, f"{config['num_samples']} samples x {len(config['ks'])} k x "
                                f"{len(config['select'])} selections in {elapsed:.1f} s")


def finetune_command(args: argparse.Namespace) -> int:
    """Loads the run's model and data, writes the tables, config and figure, prints the summary."""
    from paramsal.analyses.finetune import FineTune

    run, out = opened_run(args)
    source = loaded_source(args, run)
    started = time.perf_counter()
    result = FineTune(source["model"], ks=args.ks, select=args.select, lr=args.lr, neighbors=args.neighbors,
                      ranking=args.ranking, reference=args.reference, seed=args.seed, batch_size=args.batch_size,
                      num_resamples=args.resamples, **analysis_options(args)).evaluate(run, source["data"])
    elapsed = time.perf_counter() - started
    samples, steps = result.config["num_samples"], len(result.summary)
    updates = samples * steps
    return _finish(result, out, f"{samples} samples x {steps} (selection, k) = {updates} one-step updates, each "
                                f"evaluated on the sample and {result.config['neighbors']} neighbours, in "
                                f"{elapsed:.1f} s ({updates / max(elapsed, 1e-9):.1f} updates/s)")


def _finish(result, out, timing: str) -> int:
    """Saves the result into ``out`` and prints its summary, the timing line and the files written."""
    from paramsal.analyses.curves import format_summary

    paths = result.save(out)
    print(format_summary(result))
    print("\n" + timing)
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0
