"""``paramsal neighbors | plots | depth-bias | report``: analyses of a run that need no model or data of their own."""

from __future__ import annotations

import argparse

from paramsal.cli.parsing import (
    add_output_arguments,
    add_run_argument,
    add_source_arguments,
    analysis_options,
    choice_list,
    opened_run,
    positive_int,
)
from paramsal.options import DEVICES, POOLS, PRECISIONS, REFERENCES, SAMPLE_SELECTIONS, SPACES


def register(sub: argparse._SubParsersAction) -> None:
    neighbors = sub.add_parser("neighbors", help="k nearest neighbours in saliency vs feature space (paper 3.2)")
    add_run_argument(neighbors)
    neighbors.add_argument("--k", type=positive_int, default=10, help="neighbours per query (default 10)")
    neighbors.add_argument("--layers", default=None,
                           help="saliency space: a range A:B of layers (e.g. 0:10 shallow, 10: deep) or a list 1,2,3")
    neighbors.add_argument("--among", default="misclassified", choices=POOLS,
                           help="the candidates (default: misclassified, as in the paper)")
    neighbors.add_argument("--samples", default="misclassified", choices=SAMPLE_SELECTIONS,
                           help="the queries (default: misclassified)")
    neighbors.add_argument("--spaces", type=choice_list(SPACES), default=list(SPACES),
                           help="comma-separated spaces: saliency,features (default both; features when recorded)")
    neighbors.add_argument("--budget-mb", type=positive_int, default=256,
                           help="memory for the blocks of queries and candidates, in MiB (default 256): bounds the "
                                "search's memory whatever the number of samples; more means fewer passes over the run")
    neighbors.add_argument("--block-size", type=positive_int, default=None,
                           help="rows per block of queries and of candidates, instead of what --budget-mb allows")
    neighbors.add_argument("--precision", default="float32", choices=PRECISIONS,
                           help="products: float32 screening with float64 ranking (default) or float64 throughout; "
                                "both give the exact float64 neighbours")
    neighbors.add_argument("--device", help=f"where the float32 screening products run: {DEVICES} (default: CUDA "
                                            "when available); the neighbours are the same")
    add_output_arguments(neighbors, "analyses")
    neighbors.set_defaults(func=neighbors_command)

    plots = sub.add_parser("plots", help="the paper's Figures 1-2 of a run")
    add_run_argument(plots)
    plots.add_argument("--log", action="store_true", help="logarithmic y axis for the mean raw profile")
    add_output_arguments(plots, "analyses")
    plots.set_defaults(func=plots_command)

    depth = sub.add_parser("depth-bias", help="which layers the z-score and POT rankings put the top units of "
                                              "mistakes in (Wang & Sato 2023)")
    add_run_argument(depth)
    depth.add_argument("--k", type=positive_int, default=10, help="top units per sample (default 10)")
    depth.add_argument("--samples", default="misclassified", choices=SAMPLE_SELECTIONS,
                       help="the samples whose top units are counted (default: misclassified)")
    depth.add_argument("--reference", default="all", metavar="all|correct|class|RUN",
                       help="the samples both rankings score against (default all)")
    add_output_arguments(depth, "analyses")
    depth.set_defaults(func=depth_bias_command)

    tails = sub.add_parser("tails", help="fit the POT tails of a complete run once and store them in it (the POT "
                                         "ranking then reads them instead of fitting them again)")
    tails.add_argument("run", help="run directory made by `paramsal profile`")
    tails.add_argument("--reference", default="all", choices=REFERENCES,
                       help="the samples the tails are fitted on (default all)")
    tails.add_argument("--budget-mb", type=positive_int, default=256,
                       help="memory for the reference values of a block of units, in MiB (default 256)")
    tails.set_defaults(func=tails_command)

    report = sub.add_parser("report", help="a static HTML report of a run (RUN/report/index.html)")
    add_run_argument(report)
    report.add_argument("--queries", type=positive_int, default=4,
                        help="most frequent confusions shown in the neighbour galleries; of an answer run, wrong "
                             "answers shown with their neighbours (default 4)")
    report.add_argument("--k", type=positive_int, default=5,
                        help="neighbours per query in the galleries (an answer run's tables) (default 5)")
    report.add_argument("--explain", type=int, default=4,
                        help="mistakes shown with input saliency (default 4; none of an answer run)")
    add_source_arguments(report)
    report.add_argument("--out", metavar="DIR", help="report folder (default RUN/report)")
    report.set_defaults(func=report_command, quiet=True)


def neighbors_command(args: argparse.Namespace) -> int:
    """Writes the neighbours of both spaces and prints the pair-sharing rates (and an answer run's label-sharing
    rates beside them, where its questions carry labels)."""
    from paramsal.analyses.neighbors import Neighbors, parse_layers
    from paramsal.analyses.sharing import CLASS_PAIR

    run, out = opened_run(args)
    result = Neighbors(k=args.k, layers=parse_layers(args.layers), among=args.among, spaces=args.spaces,
                       precision=args.precision, block_size=args.block_size, budget_mb=args.budget_mb,
                       **analysis_options(args)).evaluate(run, samples=args.samples)
    summary = result.summary.set_index("space")
    print(f"neighbours  {run.path}: k={args.k}, among {args.among} ({int(summary['pool'].iloc[0])} samples), "
          f"layers {result.config['layers']} (saliency space)")
    queries = int(summary["queries"].iloc[0])
    pair, labels = result.config.get("pair", CLASS_PAIR), "label_sharing" in summary
    mistakes = "wrong answers" if run.task == "answer" else "misclassified queries"
    print(f"% of neighbours sharing the query's {pair} pair{' | its label' if labels else ''}, {queries} "
          f"{mistakes}:")

    def rates(space: str) -> str:
        shares = [summary.loc[space, "pair_sharing"], *([summary.loc[space, "label_sharing"]] if labels else [])]
        return " | ".join(f"{100 * share:5.1f}%" for share in shares)

    for space, label in (("saliency", "saliency space"), ("features", "feature space")):
        if space in summary.index:
            print(f"  {label:<16} {rates(space)}")
        elif space in args.spaces:
            print(f"  {label:<16}     -  (the run has no features: profile with --features)")
    print(f"  {'chance':<16} {rates('chance')}  (random neighbours from the same pool)")
    paths = result.save(out)
    print(f"wrote {paths['table']} ({len(result.table)} rows: space, query_id, rank, neighbor_id, similarity)")
    return 0


def plots_command(args: argparse.Namespace) -> int:
    """Writes Figures 1-2 (one PNG) and the per-unit and per-layer means."""
    from paramsal.analyses.profiles import SaliencyProfiles

    run, out = opened_run(args)
    result = SaliencyProfiles(log=args.log, **analysis_options(args)).evaluate(run)
    paths = result.save(out)
    counts = result.config["counts"]
    print(f"wrote {paths['figure']} (Figure 1: mean raw profile, {len(result.summary)} layers, "
          f"{len(result.table)} units)")
    if counts["correct"] and counts["misclassified"]:
        print(f"Figure 2: mean standardized saliency, misclassified {result.table['z_misclassified'].mean():+.3f}, "
              f"correct {result.table['z_correct'].mean():+.3f}")
    else:
        print("no Figure 2: it needs both correct and misclassified samples")
    return 0


def depth_bias_command(args: argparse.Namespace) -> int:
    """Prints, per ranking, how deep the top units of the chosen samples lie; writes the table and the figure."""
    from paramsal.analyses.depth_bias import DepthBias

    run, out = opened_run(args)
    result = DepthBias(k=args.k, reference=args.reference, **analysis_options(args)).evaluate(run, samples=args.samples)
    print(f"top-{args.k} units of {result.config['num_samples']} {args.samples} samples of {run.path}, "
          f"against {args.reference}:")
    for row in result.summary.itertuples():
        print(f"  {row.ranking:<7} mean depth {row.mean_depth:.3f}, in the deepest third of layers "
              f"{100 * row.deep_share:.1f}%   (all units: {row.uniform_mean_depth:.3f}, "
              f"{100 * row.uniform_deep_share:.1f}%)")
    paths = result.save(out)
    print(f"wrote {paths['figure']} and {paths['table']}")
    return 0


def tails_command(args: argparse.Namespace) -> int:
    """Fits and stores the tails (the one step that writes them), then says where."""
    from paramsal.rundir.run import open_run
    from paramsal.rundir.tails import store_tails

    run = open_run(args.run)
    tails = store_tails(run, args.reference, args.budget_mb)
    fitted = int(tails.fitted.sum())
    print(f"stored the POT tails of {run.num_units} units ({fitted} with a fitted GPD) against {args.reference} in "
          f"{run.path}/tails/{args.reference}.parquet")
    return 0


def report_command(args: argparse.Namespace) -> int:
    from paramsal.analyses.report import write_report
    from paramsal.analyses.sources import open_for_analysis
    from paramsal.cli.parsing import loaded_source

    run = open_for_analysis(args.run, args.allow_partial)
    # An answer run's report reads the run alone: its model and data are not rebuilt.
    source = {"model": None, "data": None} if run.task == "answer" else loaded_source(args, run)
    options = analysis_options(args)
    options.pop("progress")
    path = write_report(run, args.out, model=source["model"], data=source["data"], queries=args.queries, k=args.k,
                        explain=args.explain, **options)
    print(f"wrote {path}")
    return 0
