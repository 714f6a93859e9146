"""The z-score and POT rankings side by side on one run: pruning and one-step fine-tuning of each mistake's
salient units (the paper's metrics, with 95% bootstrap intervals) and the depth-bias diagnostic.

    python scripts/ranking_comparison.py RUN [--reference all] [--out DIR]

The model and data are rebuilt from the run's built-in specs (``paramsal profile --model demo --data demo:test``).
Prints markdown tables (the README's "Ranking by tails" figures) and saves every result in ``DIR``
(default ``RUN/analyses``).
"""

from __future__ import annotations

import argparse
import time

import paramsal
from paramsal.analyses.sources import load_source
from paramsal.options import RANKINGS


def interval(row, metric: str, digits: int) -> str:
    return f"{row[metric]:.{digits}f} [{row[f'{metric}_low']:.{digits}f}, {row[f'{metric}_high']:.{digits}f}]"


def side_by_side(results: dict, columns: list[tuple[str, str, int]]) -> str:
    """A markdown table: one row per k, per ranking and metric the value with its interval."""
    header = "| k | " + " | ".join(f"{label} ({ranking})" for label, _, _ in columns for ranking in results) + " |"
    lines = [header, "|" + " ---: |" * (1 + len(columns) * len(results))]
    summaries = {ranking: r.summary[r.summary.selection == "salient"].set_index("k") for ranking, r in results.items()}
    for k in next(iter(summaries.values())).index:
        cells = [interval(summaries[ranking].loc[k], metric, digits) for _, metric, digits in columns
                 for ranking in results]
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run")
    parser.add_argument("--reference", default="all")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    run = paramsal.open_run(args.run)
    out = args.out or run.path / "analyses"
    source = load_source(run, device="cpu")
    model, data = source["model"], source["data"]
    pruning, finetune = {}, {}
    for ranking in RANKINGS:
        started = time.perf_counter()
        pruning[ranking] = paramsal.Pruning(model, select="salient", ranking=ranking,
                                            reference=args.reference).evaluate(run, data)
        finetune[ranking] = paramsal.FineTune(model, select="salient", ranking=ranking,
                                              reference=args.reference).evaluate(run, data)
        for result in (pruning[ranking], finetune[ranking]):
            result.save(out)
        print(f"{ranking}: pruning and fine-tuning in {time.perf_counter() - started:.1f} s", flush=True)
    depth = paramsal.DepthBias(reference=args.reference).evaluate(run)
    depth.save(out)
    print(f"\n{run.path}: {pruning['zscore'].config['num_samples']} misclassified samples, reference "
          f"{args.reference}\n\nPruning the k most salient units (paper 3.1):\n")
    print(side_by_side(pruning, [("% corrected", "pct_corrected", 1), ("Δ incorrect conf.", "delta_incorrect", 3)]))
    print("\nOne step on the k most salient units (paper 3.3):\n")
    print(side_by_side(finetune, [("corrected", "corrected", 3), ("neighbours corrected", "neighbors_corrected", 3)]))
    print("\nDepth of the top-10 units (0 = first layer, 1 = last):\n")
    print("| ranking | mean depth | share in the deepest third | all units: mean depth | all units: deepest third |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for row in depth.summary.itertuples():
        print(f"| {row.ranking} | {row.mean_depth:.3f} | {row.deep_share:.3f} | {row.uniform_mean_depth:.3f} | "
              f"{row.uniform_deep_share:.3f} |")


if __name__ == "__main__":
    main()
