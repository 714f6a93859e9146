"""``paramsal profile | merge | stats | verify | demo``: making a run directory, and looking at one."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from paramsal.cli.parsing import add_option_flags, given_options, positive_int
from paramsal.config import JobOptions, ProfileOptions
from paramsal.errors import InputError
from paramsal.options import DECODERS, ROW_SELECTIONS, TRANSFORMS

#: The options of ``paramsal profile`` that are the command line's own: what loads the model and data, and the
#: switches that set a :class:`~paramsal.config.JobOptions` field in other words (--restart, --quiet).
CLI_ONLY = ("--model", "--gguf", "--weights", "--num-classes", "--data", "--transform", "--decode", "--out",
            "--limit", "--restart", "--quiet")


def register(sub: argparse._SubParsersAction) -> None:
    profile = sub.add_parser("profile", help="profile a whole data set into a run directory (resumable)",
                             description="Profiles every sample of a data set into a run directory; run it again "
                                         "to resume. Its options are paramsal.ProfileOptions and "
                                         "paramsal.JobOptions, as profile_dataset() takes them in Python.")
    profile.add_argument("--model", required=True,
                         help="demo | usps-mnist | minilm-trec | smollm2-135m | torchvision:NAME | timm:NAME | "
                              "hf:DIR | gguf:FILE | module.path:factory | FILE.py:factory (a factory takes no "
                              "arguments and returns an nn.Module)")
    profile.add_argument("--gguf", metavar="NAME",
                         help="with --model hf:DIR: the GGUF file NAME in DIR (the same as --model gguf:DIR/NAME)")
    profile.add_argument("--weights", help="state dict file for the model (loaded with weights_only=True)")
    profile.add_argument("--num-classes", type=positive_int,
                         help="classes of a torchvision model (default: its own)")
    profile.add_argument("--data", required=True,
                         help="demo[:SPLIT] | usps-mnist[:SPLIT] | imagefolder:DIR | qa:FILE.jsonl (questions "
                              "to a chat model) | module.path:factory | "
                              "FILE.py:factory (returns a map-style Dataset of (input, label)), each optionally "
                              "+noise:STD or +blur:SIGMA (a shifted copy, paramsal.zoo.shifts)")
    profile.add_argument("--transform", default="imagenet", choices=TRANSFORMS,
                         help="image transform for imagefolder data")
    profile.add_argument("--decode", default="torchvision", choices=DECODERS,
                         help="image decoder for imagefolder data: torchvision (default: torchvision.io, twice "
                              "PIL's rate per core) or pil")
    profile.add_argument("--out", required=True, metavar="DIR", help="run directory")
    profile.add_argument("--limit", type=positive_int, default=None, help="profile only the first N samples")
    profile.add_argument("--restart", action="store_true",
                         help="start over instead of resuming, replacing the run in --out (never a folder that is "
                              "not a run)")
    profile.add_argument("--quiet", action="store_true", help="no progress bar")
    options = add_option_flags(profile, ProfileOptions) + add_option_flags(profile, JobOptions)
    profile.set_defaults(func=profile_command, options=options)

    merge = sub.add_parser("merge", help="join run directories that each profiled some parts of one run")
    merge.add_argument("runs", nargs="+", help="run directories of the same model, data and config")
    merge.add_argument("--out", required=True, metavar="DIR", help="the merged run directory (new or empty)")
    merge.set_defaults(func=merge_command)

    stats = sub.add_parser("stats", help="summarize a run directory, with the mean standardized saliency of its "
                                         "misclassified and of its correct samples (the paper's claim (a))")
    stats.add_argument("run")
    stats.set_defaults(func=stats_command)

    samples = sub.add_parser("samples", help="list a run's samples (ids, target and prediction, class names where "
                                             "the data set has them): the ids that explain, sanity, prune ... take")
    samples.add_argument("run")
    samples.add_argument("--only", choices=ROW_SELECTIONS, default="misclassified",
                         help="which samples (default misclassified)")
    samples.add_argument("--limit", type=positive_int, help="list at most N (default all)")
    samples.set_defaults(func=samples_command)

    verify = sub.add_parser("verify", help="check every file of a run directory against its manifest")
    verify.add_argument("run")
    verify.set_defaults(func=verify_command)

    demo = sub.add_parser("demo", help="profile the embedded demo model on its held-out split, run every "
                                       "analysis, write the report")
    demo.add_argument("--out", default="runs/demo", metavar="DIR", help="run directory (default runs/demo)")
    demo.add_argument("--quiet", action="store_true")
    demo.set_defaults(func=demo_command)


def profile_command(args: argparse.Namespace) -> int:
    """One process, or every rank of ``torchrun --nproc-per-node N -m paramsal profile ...`` (same arguments)."""
    if getattr(args, "deterministic", False):  # cuBLAS reads it once, at its first use: before anything uses CUDA
        from paramsal.jobs.hardware import CUBLAS_DETERMINISTIC

        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_DETERMINISTIC)
    from paramsal.engine.devices import resolve_device
    from paramsal.jobs.bulk import profile_dataset
    from paramsal.zoo.specs import first_samples, load_data, load_model

    given = given_options(args, args.options)
    given["device"] = resolve_device(given.get("device"))  # before the model and data load: a wrong one fails now
    args.model = gguf_spec(args.model, args.gguf)
    model = load_model(args.model, args.weights, args.num_classes)
    data = first_samples(load_data(args.data, args.transform, args.decode, model), args.limit)
    given.setdefault("task", _default_task(model, args.data))
    given["overwrite"] = given.get("overwrite", False) or args.restart
    run = profile_dataset(model, data, args.out, resume=not args.restart, progress=not args.quiet,
                          model_name=args.model, data_name=args.data, source=_source(args), **given)
    print(run.summary())
    return 0


def _default_task(model: Any, data: str) -> str:
    """The model's own head's task (an hf:DIR or gguf:FILE model), and "answer" for a causal LM on qa: questions."""
    task = getattr(model, "task", "classification")
    return "answer" if task == "causal-lm" and data.startswith("qa:") else task


def gguf_spec(model: str, name: str | None) -> str:
    """The model spec of ``--model hf:DIR --gguf NAME``: ``gguf:DIR/NAME`` (``model`` itself without ``--gguf``)."""
    if name is None:
        return model
    if not model.startswith("hf:"):
        raise InputError(f"--gguf {name} names a GGUF file in an hf:DIR folder, but --model is {model!r}; pass "
                         f"--model hf:DIR --gguf {name}, or --model gguf:FILE")
    return f"gguf:{Path(model[3:]) / name}"


def _source(args: argparse.Namespace) -> dict:
    """The specs that rebuild this job's model and data, for the manifest (paths made absolute)."""
    data = _absolute(args.data, ("imagefolder:", "qa:"))
    model = _absolute(args.model, ("hf:", "gguf:"))
    return {"model": model, "weights": args.weights and os.path.abspath(args.weights),
            "num_classes": args.num_classes, "data": data, "transform": args.transform, "decode": args.decode,
            "limit": args.limit}


def _absolute(spec: str, kinds: tuple[str, ...]) -> str:
    """``spec`` with its path made absolute where it is one of ``kinds`` (a path after ``KIND:``), so that an analysis
    run from another folder finds it."""
    kind, _, path = spec.partition(":")
    return f"{kind}:{os.path.abspath(path)}" if f"{kind}:" in kinds else spec


def merge_command(args: argparse.Namespace) -> int:
    from paramsal.rundir.merge import merge_runs

    run = merge_runs(args.runs, args.out)
    print(run.summary())
    return 0


def stats_command(args: argparse.Namespace) -> int:
    from paramsal.analyses.profiles import group_means
    from paramsal.rundir.run import open_run

    run = open_run(args.run)
    print(run.summary())
    if not run.parts:
        return 0
    means, stats = group_means(run), run.stats
    shown = [f"{name} {((means[name][0] - stats.mean) / stats.std).mean():+.4f} (n={means[name][1]})"
             for name in ("misclassified", "correct") if means[name][1]]
    print(f"saliency   {', '.join(shown)}: the mean standardized saliency of a group's samples over every unit")
    return 0


def samples_command(args: argparse.Namespace) -> int:
    """``paramsal samples RUN --only misclassified``: one line per sample, with class names where known."""
    from paramsal.rundir.run import open_run
    from paramsal.zoo.specs import class_names, label_text

    run = open_run(args.run)
    table = run.table()
    rows = table.filter(run.selected(table, args.only)).to_pandas()
    names = class_names(run.manifest.source.data or run.manifest.config.data)

    print(f"{len(rows)} {args.only} sample(s) of {run.num_samples} in {run.path}")
    shown = rows if args.limit is None else rows.head(args.limit)
    if len(shown):
        listing = shown.assign(target=shown["target"].map(lambda v: label_text(v, names)),
                               pred=shown["pred"].map(lambda v: label_text(v, names)),
                               target_prob=100 * shown["target_prob"], pred_prob=100 * shown["pred_prob"])
        columns = ["sample_id", "target", "pred", "target_prob", "pred_prob"]
        if args.only == "nonfinite":
            columns.append("nonfinite_param")
        print(listing[columns].rename(columns={"target_prob": "target_%", "pred_prob": "pred_%"})
              .to_string(index=False, float_format=lambda v: f"{v:.1f}"))
    return 0


def verify_command(args: argparse.Namespace) -> int:
    from paramsal.rundir.integrity import verify_run
    from paramsal.rundir.run import open_run

    problems = verify_run(args.run)
    if not problems:
        run = open_run(args.run)
        state = "complete" if run.complete else f"unfinished, {run.num_samples} of {run.manifest.num_samples}"
        print(f"{run.path}: sound ({len(run.parts)} parts, {run.num_samples} samples, {state}); every file's size, "
              "sha256, rows and ids match the manifest")
        return 0
    for problem in problems:
        print(f"paramsal: error: {problem}", file=sys.stderr)
    print(f"paramsal: {len(problems)} problem(s) in {args.run}", file=sys.stderr)
    return 2


def demo_command(args: argparse.Namespace) -> int:
    """The embedded default end to end: profile the held-out split, run every analysis, write the report."""
    from paramsal.analyses import DepthBias, FineTune, Neighbors, Pruning, write_report
    from paramsal.jobs.bulk import profile_dataset
    from paramsal.zoo.specs import load_data, load_model

    model, data = load_model("demo"), load_data("demo:test")
    run = profile_dataset(model, data, args.out, batch_size=64, features=True, overwrite=True,
                          progress=not args.quiet, model_name="demo", data_name="demo:test",
                          source={"model": "demo", "data": "demo:test"})
    print(run.summary())
    print(f"mean standardized saliency: misclassified {run.profiles(only='misclassified').mean():+.4f}, "
          f"correct {run.profiles(only='correct').mean():+.4f}")
    sharing = Neighbors(k=10).evaluate(run).summary.set_index("space")["pair_sharing"]
    print(f"neighbours sharing the (true, predicted) pair: saliency space {100 * sharing['saliency']:.1f}%, "
          f"feature space {100 * sharing['features']:.1f}%, chance {100 * sharing['chance']:.1f}%")
    analyses = run.path / "analyses"
    print("pruning salient / random / least filters of each mistake ...", flush=True)
    Pruning(model, progress=not args.quiet).evaluate(run, data).save(analyses)
    print("one-step fine-tuning ...", flush=True)
    FineTune(model, progress=not args.quiet).evaluate(run, data).save(analyses)
    depth = DepthBias().evaluate(run)
    depth.save(analyses)
    shares = depth.summary.set_index("ranking")["deep_share"]
    print(f"top-10 filters of mistakes in the deepest third of layers: z-score {100 * shares['zscore']:.1f}%, POT "
          f"{100 * shares['pot']:.1f}%, all filters {100 * depth.summary['uniform_deep_share'].iloc[0]:.1f}%")
    report = write_report(run, model=model, data=data)
    print(f"\nThe run is in {run.path}/ (profiles/part-*.parquet, stats.parquet, units.parquet, manifest.json),")
    print(f"the analyses in {analyses}/, the report in {report}: open it in a browser.")
    print(f"Next: `paramsal stats {run.path}`, or in Python: "
          f"`paramsal.open_run({str(run.path)!r}).profiles(only='misclassified')`")
    return 0
