"""``paramsal compare RUN_A RUN_B``: which units' saliency moved from one run to another (a shift, a checkpoint)."""

from __future__ import annotations

import argparse
from typing import Any

from paramsal.cli.parsing import non_negative_int, positive_int


def register(sub: argparse._SubParsersAction) -> None:
    compare = sub.add_parser("compare", help="compare two runs unit by unit: which filters move under a data shift "
                                             "or a change of model")
    compare.add_argument("run_a", help="the reference run (d is in its standard deviations)")
    compare.add_argument("run_b", help="the other run: same architecture, units and aggregation")
    compare.add_argument("--only", default=None, choices=("correct", "misclassified"),
                         help="compare these samples of each run (default: every sample with finite numbers)")
    compare.add_argument("--resamples", type=positive_int, default=1000,
                         help="bootstrap resamples of each run (default 1000)")
    compare.add_argument("--level", type=float, default=0.95, help="confidence level of the intervals (default 0.95)")
    compare.add_argument("--fdr", type=float, default=0.05,
                         help="a moved unit's Benjamini-Hochberg q-value is below this (default 0.05)")
    compare.add_argument("--seed", type=non_negative_int, default=0, help="seeds the resampling (default 0)")
    compare.add_argument("--top", type=positive_int, default=10, help="top movers printed and drawn (default 10)")
    compare.add_argument("--budget-mb", type=positive_int, default=256,
                         help="memory for the blocks of units, in MiB (default 256); more means fewer passes")
    compare.add_argument("--allow-partial", action="store_true",
                         help="compare unfinished runs with the samples written so far")
    compare.add_argument("--out", metavar="DIR", help="output directory (default RUN_B/analyses)")
    compare.set_defaults(func=compare_command)


def compare_command(args: argparse.Namespace) -> int:
    """Prints the per-layer summary and the top movers, and saves the result (tables, config, figure)."""
    from paramsal.analyses.comparison import Compare
    from paramsal.analyses.sources import open_for_analysis
    from paramsal.rundir.published import owned_folder

    run_a, run_b = (open_for_analysis(run, args.allow_partial) for run in (args.run_a, args.run_b))
    out = owned_folder(args.out or run_b.path / "analyses", "out")  # before the work: a run may be read-only
    result = Compare(args.only, num_resamples=args.resamples, level=args.level, seed=args.seed, fdr=args.fdr,
                     top=args.top, budget_mb=args.budget_mb, allow_partial=args.allow_partial).evaluate(run_a, run_b)
    config = result.config
    print(f"A  {run_a.path}  ({config['samples_a']} samples, data {config['data_a']}, model {config['model_a']})")
    print(f"B  {run_b.path}  ({config['samples_b']} samples, data {config['data_b']}, model {config['model_b']})")
    print(f"d = (mean_B - mean_A) / std_A per unit, {args.resamples} resamples; {config['rule']}")
    print(_layers_text(result.summary, args.level))
    movers = result.top(args.top)
    if len(movers):
        print(f"top {len(movers)} movers (largest |d| among the moved units):")
    else:
        movers = result.top(args.top, moved_only=False)
        print(f"no unit moved; the {len(movers)} largest |d|:")
    print(_units_text(movers))
    print(f"moved {config['moved']} of {len(result.table)} units in {config['seconds']:.1f} s "
          f"({config['passes']} pass(es) over each run)")
    paths = result.save(out)
    print(f"wrote {paths['table']} (one row per unit), {paths['summary'].name}, {paths['figure'].name}")
    return 0


def _layers_text(summary: Any, level: float) -> str:
    interval = f"[{level:.0%} interval]"
    lines = [f"{'layer':>5}  {'module':<32} {'units':>5}  {'mean d':>7} {interval:<16} {'moved':>7}  largest |d|"]
    for row in summary.itertuples():
        lines.append(f"{row.layer:>5}  {row.module:<32} {row.units:>5}  {row.mean_d:+7.3f} "
                     f"[{row.mean_d_low:+.3f}, {row.mean_d_high:+.3f}] {row.moved:>3}/{row.units:<3}  "
                     f"unit {row.top_unit} ({row.top_d:+.3f})")
    return "\n".join(lines)


def _units_text(units: Any) -> str:
    lines = [f"{'unit':>6}  {'module':<32} {'channel':>7}  {'d':>7} {'interval':<16} {'auc':>5}  {'q':>8}  moved"]
    for row in units.itertuples():
        lines.append(f"{row.unit_id:>6}  {row.module:<32} {row.channel:>7}  {row.d:+7.3f} "
                     f"[{row.d_low:+.3f}, {row.d_high:+.3f}] {row.auc:5.3f}  {row.q:8.2e}  "
                     f"{'yes' if row.moved else 'no'}")
    return "\n".join(lines)
