"""``paramsal bench``: the backends against a plain forward+backward, the loop and the peers, in one run."""

from __future__ import annotations

import argparse
import dataclasses

from paramsal.cli.parsing import positive_int
from paramsal.options import DATASET_CASES, DEVICES, UNIT_SCHEMES


def register(sub: argparse._SubParsersAction) -> None:
    bench = sub.add_parser("bench", help="time the backends against a plain forward+backward and the loop")
    bench.add_argument("--case", nargs="+", default=["resnet18-cifar"],
                       help="cases of paramsal.bench.harness.CASES: resnet18-cifar (default), small-cnn, "
                            "resnet50-imagenet, convnext-tiny, vit-small, efficientnet-b0, bert-small, smollm2")
    bench.add_argument("--methods", default="plain,loop,hooks,vmap",
                       help="comma-separated: plain,loop,hooks,vmap,opacus,backpack; also vmap-whole "
                            "(vmap over the whole batch at once) and hooks-torch (hooks without the fused "
                            "GPU kernel)")
    bench.add_argument("--batch", type=positive_int, default=None, help="batch size (default: the case's)")
    bench.add_argument("--units", choices=UNIT_SCHEMES, default=None, help="unit scheme (default: the case's)")
    bench.add_argument("--device", default=None, help=f"{DEVICES} (default: cuda when there is one)")
    bench.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16", "float64"])
    bench.add_argument("--repeats", type=positive_int, default=3)
    bench.add_argument("--threads", type=positive_int, default=None)
    bench.add_argument("--peers", action="store_true", help="add the installed peers (Opacus, BackPACK)")
    bench.add_argument("--save", help="also write the results (with device, versions, date) to this file: "
                                      "JSON if it ends in .json, else Parquet")
    bench.add_argument("--dataset", nargs="?", const="demo", default=None, choices=DATASET_CASES,
                       help="instead: profile_dataset end to end vs the Profiler alone on the same batches, on the "
                            "demo data (the default) or on resnet50-rows (26,560 units per row, a cheap model)")
    bench.add_argument("--scale", action="store_true",
                       help="instead: build a run with ResNet-50's 26,560 units (a model cheap per sample) and "
                            "report profiling time, bytes on disk, read rates and neighbours' time and memory")
    bench.add_argument("--samples", type=positive_int, default=None,
                       help="--scale: samples (default 50,000); --dataset resnet50-rows: samples (default 8,192)")
    bench.add_argument("--out", default=None, metavar="DIR",
                       help="--scale: where the run is built (default: a folder under /tmp)")
    bench.set_defaults(func=bench_command)


def bench_command(args: argparse.Namespace) -> int:
    import torch

    from paramsal.bench.harness import CASES, available_peers, dataset_overhead, records, run, save_records, table
    from paramsal.engine.devices import resolve_device
    from paramsal.errors import check_choice

    torch.set_num_threads(args.threads or torch.get_num_threads())
    if args.scale:
        import tempfile

        from paramsal.bench.scale import scale_report

        print(scale_report(args.samples or 50_000, args.out or tempfile.mkdtemp(prefix="paramsal-scale-")))
        return 0
    if args.dataset:
        print(dataset_overhead(args.batch or (256 if args.dataset == "resnet50-rows" else 64), args.repeats,
                               case=args.dataset, samples=args.samples or 8192))
        return 0
    for name in args.case:
        check_choice("bench case", name, CASES)
    methods = tuple(args.methods.split(",")) + (tuple(available_peers()) if args.peers else ())
    results = []
    device = str(resolve_device(args.device))
    for name in args.case:
        case = dataclasses.replace(CASES[name], device=device, dtype=getattr(torch, args.dtype))
        if args.batch:
            case = dataclasses.replace(case, batch=args.batch)
        if args.units:
            case = dataclasses.replace(case, units=args.units)
        timings = run(case, methods, args.repeats)
        results.extend(records(timings))
        print(table(timings))
        print()
    if args.save:
        save_records(results, args.save)
        print(f"results written to {args.save}")
    return 0
