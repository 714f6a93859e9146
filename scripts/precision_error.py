"""How far bf16/fp16 profiles are from float32 ones: prints a Markdown table (CPU, a few minutes on 2 cores).

    python scripts/precision_error.py                      # the test networks and the demo model
    python scripts/precision_error.py --fp16-scales 1,65536 # fp16 rows with other loss scales too

For each model, the same batch is profiled with ``precision="float32"`` and
with each reduced precision (same backend), and per sample:

* relative error: ``max_k |p_low - p_fp32| / max_k |p_fp32|`` (median and max over samples);
* Spearman rank correlation of the units (median and min over samples);
* top-10 agreement: the fraction of the float32 top-10 units that are also
  in the low-precision top-10 (mean and min over samples);
* non-finite: samples whose low-precision profile or loss is not finite
  (left out of the statistics).

Models: the networks of ``tests/nets.py`` (random weights, BatchNorm
statistics warmed as in the tests, 64 random inputs each) and the embedded
demo model on the first 256 samples of ``demo:test``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from scipy.stats import rankdata

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from nets import SMALL_CASES, TORCHVISION_CASES, batch, build  # noqa: E402

from paramsal import Profiler  # noqa: E402
from paramsal.engine import functional  # noqa: E402
from paramsal.zoo.specs import first_samples, load_data, load_model  # noqa: E402

TOP_K = 10
COLUMNS = ("model", "units", "samples", "precision", "rel. err median", "rel. err max", "Spearman median",
           "Spearman min", "top-10 mean", "top-10 min", "non-finite")


def compare(low: torch.Tensor, high: torch.Tensor) -> dict[str, float]:
    """The per-sample statistics of ``low [N, F]`` against ``high [N, F]`` (finite rows of ``low`` only)."""
    finite = torch.isfinite(low).all(1)
    low, high = low[finite].double(), high[finite].double()
    scale = high.abs().amax(1).clamp_min(torch.finfo(torch.float64).tiny)
    err = ((low - high).abs().amax(1) / scale).numpy()
    ranks_low, ranks_high = rankdata(low.numpy(), axis=1), rankdata(high.numpy(), axis=1)
    rho = np.array([np.corrcoef(a, b)[0, 1] for a, b in zip(ranks_low, ranks_high)])
    k = min(TOP_K, high.shape[1])
    top_low, top_high = low.topk(k, 1).indices, high.topk(k, 1).indices
    overlap = np.array([len(set(a.tolist()) & set(b.tolist())) / k for a, b in zip(top_low, top_high)])
    return {"rel. err median": float(np.median(err)), "rel. err max": float(err.max()),
            "Spearman median": float(np.median(rho)), "Spearman min": float(rho.min()),
            "top-10 mean": float(overlap.mean()), "top-10 min": float(overlap.min()),
            "non-finite": int((~finite).sum())}


def rows_for(name: str, make, inputs: torch.Tensor, targets: torch.Tensor, units: str, backend: str,
             precisions: list[tuple[str, float | None]]) -> list[dict]:
    want = Profiler(make(), units=units, backend=backend)(inputs, targets).profiles
    rows = []
    for precision, scale in precisions:
        saved = functional.FP16_LOSS_SCALE
        if scale is not None:
            functional.FP16_LOSS_SCALE = scale
        try:
            result = Profiler(make(), units=units, backend=backend, precision=precision)(inputs, targets,
                                                                                        check_finite=False)
        finally:
            functional.FP16_LOSS_SCALE = saved
        label = precision if scale is None else f"{precision} (scale {scale:g})"
        rows.append({"model": name, "units": units, "samples": len(inputs), "precision": label,
                     **compare(result.profiles, want)})
    return rows


def demo_batch(limit: int) -> tuple[torch.Tensor, torch.Tensor]:
    data = first_samples(load_data("demo:test"), limit)
    samples = [data[i] for i in range(len(data))]
    return torch.stack([x for x, _ in samples]), torch.tensor([int(y) for _, y in samples])


#: How each statistic is written: errors in scientific notation, correlations and overlaps to 4 and 3 places.
FORMATS = {"rel. err": "{:.1e}", "Spearman": "{:.4f}", "top-10": "{:.3f}"}


def table(rows: list[dict]) -> str:
    def cell(column: str, value) -> str:
        form = next((f for prefix, f in FORMATS.items() if column.startswith(prefix)), "{}")
        return form.format(value)

    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(cell(c, row[c]) for c in COLUMNS) + " |" for row in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="hooks", help="backend of every profile (default hooks)")
    parser.add_argument("--samples", type=int, default=64, help="random inputs per test network (default 64)")
    parser.add_argument("--demo-samples", type=int, default=256, help="first samples of demo:test (default 256)")
    parser.add_argument("--no-fp16", action="store_true", help="bf16 only")
    parser.add_argument("--fp16-scales", default="", help="comma-separated extra fp16 loss scales to compare")
    parser.add_argument("--torchvision", action="store_true", help="also resnet18, mobilenet_v3_small, densenet")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    precisions: list[tuple[str, float | None]] = [("bf16", None)]
    if not args.no_fp16:
        precisions.append(("fp16", None))
        precisions += [("fp16", float(s)) for s in args.fp16_scales.split(",") if s]

    rows = []
    for case in SMALL_CASES + (TORCHVISION_CASES if args.torchvision else []):
        x, y = batch(case, args.samples, torch.float32)
        rows += rows_for(case.name, lambda case=case: build(case, torch.float32), x, y, case.units, args.backend,
                         precisions)
        print(f"{case.name} done", file=sys.stderr)
    x, y = demo_batch(args.demo_samples)
    rows += rows_for("demo (demo:test)", lambda: load_model("demo"), x, y, "filters", args.backend, precisions)
    print(f"backend {args.backend}, torch {torch.__version__}, {torch.get_num_threads()} CPU threads; "
          f"fp16 loss scale {functional.FP16_LOSS_SCALE:g}\n")
    print(table(rows))


if __name__ == "__main__":
    main()
