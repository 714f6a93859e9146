"""The ``paramsal`` command.

Every mistake of the user's (a bad option, a missing file, a run that is not
the model's) ends as one line ``paramsal: error: ...`` on stderr and exit code
2; ``--debug`` (or ``PARAMSAL_DEBUG=1``) prints the traceback above it. Any
other exception is a bug in paramsal and keeps its traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import traceback
import warnings
from collections.abc import Sequence
from typing import NoReturn

from paramsal.errors import InputError, ParamsalError

#: Set to 1 to print the traceback of every error, as ``--debug`` does.
DEBUG_ENV = "PARAMSAL_DEBUG"


class UsageError(InputError):
    """An option argparse refused (a bad choice, a wrong type, a missing argument)."""


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line, reported like every other error of the command.

    argparse prints the whole usage block before its message; for a command
    with twenty options that buries the one line that says what is wrong.
    """

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see `{self.prog} --help`)")


def _cmd_bench(args: argparse.Namespace) -> int:
    import torch

    from paramsal.bench.harness import CASES, available_peers, records, run, table
    from paramsal.engine.devices import resolve_device

    torch.set_num_threads(args.threads or torch.get_num_threads())
    if args.dataset:
        from paramsal.bench.harness import dataset_overhead

        print(dataset_overhead(args.batch or 64, args.repeats))
        return 0
    methods = tuple(args.methods.split(",")) + (tuple(available_peers()) if args.peers else ())
    results = []
    device = str(resolve_device(args.device))
    for name in args.case:
        case = dataclasses.replace(CASES[name], device=device, dtype=getattr(torch, args.dtype))
        if args.batch:
            case = dataclasses.replace(case, batch=args.batch)
        timings = run(case, methods, args.repeats)
        results.extend(records(timings))
        print(table(timings))
        print()
    if args.save:
        from paramsal.bench.harness import save_records

        save_records(results, args.save)
        print(f"results written to {args.save}")
    return 0


def _cmd_profile(args: argparse.Namespace) -> int:
    from paramsal.engine.dataset import profile_dataset
    from paramsal.engine.devices import resolve_device
    from paramsal.specs import load_data, load_model

    device = resolve_device(args.device)  # before the model and data are loaded: a wrong device fails at once
    model = load_model(args.model, args.weights, args.num_classes)
    data = load_data(args.data, args.transform)
    if args.limit:
        from torch.utils.data import Subset

        data = Subset(data, range(min(args.limit, len(data))))
    run = profile_dataset(model, data, args.out, batch_size=args.batch_size, backend=args.backend,
                          units=args.units, aggregation=args.aggregation, device=device,
                          num_workers=args.num_workers, features=args.features, resume=not args.restart,
                          overwrite=args.overwrite or args.restart, progress=not args.quiet,
                          part_size=args.part_size, repair=args.repair, on_nonfinite=args.on_nonfinite,
                          model_name=args.model, data_name=args.data,
                          source=_source(args))
    print(run.summary())
    return 0


def _source(args: argparse.Namespace) -> dict:
    """The specs that rebuild this job's model and data, for the manifest (paths made absolute)."""
    data = args.data
    if data.startswith("imagefolder:"):
        data = "imagefolder:" + os.path.abspath(data.partition(":")[2])
    return {"model": args.model, "weights": args.weights and os.path.abspath(args.weights),
            "num_classes": args.num_classes, "data": data, "transform": args.transform,
            "limit": args.limit}


def _cmd_verify(args: argparse.Namespace) -> int:
    from paramsal.engine.integrity import verify_run

    problems = verify_run(args.run)
    if not problems:
        from paramsal.engine.rundir import open_run

        run = open_run(args.run)
        state = "complete" if run.complete else f"unfinished, {run.num_samples} of {run.manifest['num_samples']}"
        print(f"{run.path}: sound ({len(run.parts)} parts, {run.num_samples} samples, {state}); every file's size, "
              "sha256, rows and ids match the manifest")
        return 0
    for problem in problems:
        print(f"paramsal: error: {problem}", file=sys.stderr)
    print(f"paramsal: {len(problems)} problem(s) in {args.run}", file=sys.stderr)
    return 2


def _cmd_stats(args: argparse.Namespace) -> int:
    from paramsal.engine.rundir import open_run

    print(open_run(args.run).summary())
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    """The embedded default end to end: profile the held-out split, run every analysis, write the report."""
    from paramsal.engine.analyses.common import load_source
    from paramsal.engine.analyses.finetune import FineTune
    from paramsal.engine.analyses.neighbors import pair_sharing
    from paramsal.engine.analyses.pruning import Pruning
    from paramsal.engine.analyses.report import build_report
    from paramsal.engine.dataset import profile_dataset
    from paramsal.specs import load_data, load_model

    run = profile_dataset(load_model("demo"), load_data("demo:test"), args.out, batch_size=64, features=True,
                          overwrite=True, progress=not args.quiet, model_name="demo", data_name="demo:test",
                          source={"model": "demo", "data": "demo:test"})
    print(run.summary())
    print(f"mean standardized saliency: misclassified {run.profiles(only='misclassified').mean():+.4f}, "
          f"correct {run.profiles(only='correct').mean():+.4f}")
    model, data, _ = load_source(run)
    sharing = pair_sharing(run, k=10)
    print(f"neighbours sharing the (true, predicted) pair: saliency space {sharing['saliency']:.3f}, "
          f"feature space {sharing['features']:.3f}, chance {sharing['chance']:.3f}")
    analyses = run.path / "analyses"
    print("pruning salient / random / least filters of each mistake ...", flush=True)
    Pruning(model, progress=not args.quiet).evaluate(run, data).save(analyses)
    print("one-step fine-tuning ...", flush=True)
    FineTune(model, progress=not args.quiet).run(run, data).save(analyses)
    report = build_report(run, model=model, data=data)
    print(f"\nThe run is in {run.path}/ (profiles/part-*.parquet, stats.parquet, units.parquet, manifest.json),")
    print(f"the analyses in {analyses}/, the report in {report}: open it in a browser.")
    print(f"Next: `paramsal stats {run.path}`, or in Python: "
          f"`paramsal.open_run({str(run.path)!r}).profiles(only='misclassified')`")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from paramsal.engine.analyses.common import add_partial_argument, non_negative_int, positive_int

    parser = OneLineParser(prog="paramsal", description="Parameter-space saliency, a batch at a time.")
    _add_debug_argument(parser, default=False)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)

    bench = sub.add_parser("bench", help="time the backends against a plain forward+backward and the loop")
    bench.add_argument("--case", nargs="+", default=["resnet18-cifar"],
                       choices=["resnet18-cifar", "small-cnn", "resnet50-imagenet"])
    bench.add_argument("--methods", default="plain,loop,hooks,vmap",
                       help="comma-separated: plain,loop,hooks,vmap,opacus,backpack; also vmap-whole "
                            "(vmap over the whole batch at once) and hooks-torch (hooks without the fused "
                            "GPU kernel)")
    bench.add_argument("--batch", type=positive_int, default=None, help="batch size (default: the case's)")
    bench.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda when there is one)")
    bench.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16", "float64"])
    bench.add_argument("--repeats", type=int, default=3)
    bench.add_argument("--threads", type=int, default=None)
    bench.add_argument("--peers", action="store_true", help="add the installed peers (Opacus, BackPACK)")
    bench.add_argument("--save", help="also write the results (with device, versions, date) to this file: "
                                      "JSON if it ends in .json, else Parquet")
    bench.add_argument("--dataset", action="store_true",
                       help="instead: profile_dataset end to end on the demo data vs the engine alone")
    bench.set_defaults(func=_cmd_bench)

    profile = sub.add_parser("profile", help="profile a whole data set into a run directory (resumable)")
    profile.add_argument("--model", required=True, help="demo | torchvision:NAME | module.path:factory")
    profile.add_argument("--weights", help="state dict file for the model (loaded with weights_only=True)")
    profile.add_argument("--num-classes", type=positive_int,
                         help="classes of a torchvision model (default: its own)")
    profile.add_argument("--data", required=True, help="demo[:SPLIT] | imagefolder:DIR | module.path:factory")
    profile.add_argument("--transform", default="imagenet", choices=["imagenet", "inception", "tensor"],
                         help="image transform for imagefolder data")
    profile.add_argument("--out", required=True, help="run directory")
    profile.add_argument("--batch-size", type=positive_int, default=64)
    profile.add_argument("--backend", default="auto", choices=["auto", "hooks", "vmap", "loop"])
    profile.add_argument("--units", default="filters", choices=["filters", "conv", "conv+linear", "linear-columns"])
    profile.add_argument("--aggregation", default="mean_abs", choices=["mean_abs", "abs_mean"])
    profile.add_argument("--device", help="cpu, cuda or cuda:N (default: CUDA when available)")
    profile.add_argument("--num-workers", type=non_negative_int, default=0, help="DataLoader worker processes")
    profile.add_argument("--features", action="store_true", help="also record penultimate features")
    profile.add_argument("--part-size", type=positive_int, default=None, help="rows per Parquet part")
    profile.add_argument("--limit", type=positive_int, default=None, help="profile only the first N samples")
    profile.add_argument("--overwrite", action="store_true", help="replace a run made with other model/data/units")
    profile.add_argument("--restart", action="store_true", help="start over instead of resuming")
    profile.add_argument("--repair", action="store_true",
                         help="check every finished part's checksum, rows and ids, and profile the damaged or "
                              "missing ones again (files no manifest lists are removed)")
    profile.add_argument("--on-nonfinite", default="skip", choices=["skip", "fail"],
                         help="a sample whose loss or gradient is NaN/inf: skip (default: flag its row, leave it "
                              "out of the statistics, list it at the end) or fail (stop, naming its index)")
    profile.add_argument("--quiet", action="store_true", help="no progress bar")
    profile.set_defaults(func=_cmd_profile)

    stats = sub.add_parser("stats", help="summarize a run directory")
    stats.add_argument("run")
    stats.set_defaults(func=_cmd_stats)

    verify = sub.add_parser("verify", help="check every file of a run directory against its manifest")
    verify.add_argument("run")
    verify.set_defaults(func=_cmd_verify)

    from paramsal.engine.analyses import finetune, input_saliency, neighbors, plots, pruning, report, sanity

    analyses = [
        ("neighbors", "k nearest neighbours in saliency vs feature space (paper 3.2)",
         neighbors.add_neighbors_arguments, neighbors.run_neighbors_command),
        ("prune", "pruning / perturbation curves of misclassified samples (paper 3.1, A.5)",
         pruning.add_prune_arguments, pruning.run_prune_command),
        ("finetune", "one-step fine-tuning of salient filters (paper 3.3, Fig. 6)",
         finetune.add_finetune_arguments, finetune.run_finetune_command),
        ("explain", "input-space saliency maps of samples, salient vs random units (paper 2.2)",
         input_saliency.add_explain_arguments, input_saliency.run_explain_command),
        ("mask", "mask the top salient vs random pixels of mistakes (paper 3.4, A.8)",
         input_saliency.add_mask_arguments, input_saliency.run_mask_command),
        ("sanity", "cascading-randomization sanity check of input-space saliency (A.10)",
         sanity.add_sanity_arguments, sanity.run_sanity_command),
        ("plots", "the paper's Figures 1-2 (PNG) under RUN/figures",
         plots.add_plots_arguments, plots.run_plots_command),
        ("report", "a static HTML report of a run (RUN/report/index.html)",
         report.add_report_arguments, report.run_report_command),
    ]
    for name, help_text, add_arguments, command in analyses:
        analysis = sub.add_parser(name, help=help_text)
        add_arguments(analysis)
        add_partial_argument(analysis)
        analysis.set_defaults(func=command)

    demo = sub.add_parser("demo", help="profile the embedded demo model on its held-out split")
    demo.add_argument("--out", default="runs/demo")
    demo.add_argument("--quiet", action="store_true")
    demo.set_defaults(func=_cmd_demo)
    for command in sub.choices.values():
        # Accepted after the command too (`paramsal prune RUN --debug`); SUPPRESS keeps a
        # `paramsal --debug prune RUN` from being reset to False by the command's default.
        _add_debug_argument(command, default=argparse.SUPPRESS)
    return parser


def _add_debug_argument(parser: argparse.ArgumentParser, default: object) -> None:
    parser.add_argument("--debug", action="store_true", default=default,
                        help=f"print the traceback of an error before its one-line message (or set {DEBUG_ENV}=1)")


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the command line ``argv`` (default ``sys.argv[1:]``) and returns the exit code.

    Returns:
        The command's code (0), or 2 after printing ``paramsal: error: <message>``
        for a :class:`ParamsalError`; other exceptions propagate with their traceback.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    args = None
    try:
        args = build_parser().parse_args(argv)
        with warnings.catch_warnings():
            warnings.showwarning = _show_warning
            return args.func(args)
    except ParamsalError as exc:
        # Before parsing finished (a usage error) only the raw words tell whether --debug was asked for.
        debug = getattr(args, "debug", False) if args is not None else "--debug" in argv
        if debug or os.environ.get(DEBUG_ENV, "") not in ("", "0"):
            traceback.print_exception(exc, file=sys.stderr)
        print(f"paramsal: error: {_one_line(str(exc))}", file=sys.stderr)
        return 2


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """paramsal's own warnings (a fallback, a skipped sample) read as the command's notes; others as usual."""
    from paramsal.engine.profile import ParamsalWarning

    if issubclass(category, ParamsalWarning):
        print(f"paramsal: warning: {message}", file=sys.stderr)
    else:
        print(warnings.formatwarning(message, category, filename, lineno, line), end="", file=file or sys.stderr)


def _one_line(message: str) -> str:
    """The message on one line: some errors carry a library's multi-line text (torch, pyarrow)."""
    return " ".join(part.strip() for part in message.splitlines() if part.strip())


if __name__ == "__main__":
    sys.exit(main())
