"""``paramsal explain | mask | sanity``: input-space saliency of a run's samples, masking its pixels, its sanity check.

Each command evaluates one analysis of :mod:`paramsal.analyses` on the run
and saves its result (Parquet tables, JSON config, NumPy arrays, PNG) under
``RUN/analyses`` or ``--out``. Nothing heavy is imported until a command runs.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Any

from paramsal.cli.parsing import (
    add_output_arguments,
    add_run_argument,
    add_source_arguments,
    analysis_options,
    loaded_source,
    non_negative_int,
    opened_run,
    positive_int,
    positive_int_list,
    printed,
)
from paramsal.errors import InputError
from paramsal.options import ATTRIBUTION_SELECTIONS, MASK_PERCENTS, MASK_VALUES

#: Mistakes that explain and sanity look at when no --sample is given (sanity randomizes every layer for each).
EXPLAINED_MISTAKES = 4
CHECKED_MISTAKES = 2


def mask_value(text: str) -> str | float:
    """An argparse type: "blur", "mean", "zero" or a finite number ("0.5" -> 0.5)."""
    if text in MASK_VALUES:
        return text
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if value != value or value in (float("inf"), float("-inf")):
        raise argparse.ArgumentTypeError(f"expected {', '.join(MASK_VALUES)} or a finite number, got {text!r}")
    return value


def register(sub: argparse._SubParsersAction) -> None:
    explain = sub.add_parser("explain", help="input-space saliency maps of samples (salient vs random units)")
    add_run_argument(explain)
    which = explain.add_mutually_exclusive_group()
    which.add_argument("--sample", type=non_negative_int, action="append",
                       help="sample id in the run's data set (repeatable; `paramsal samples RUN` lists them; default: "
                            f"the first {EXPLAINED_MISTAKES} mistakes of the run's most frequent confusion)")
    which.add_argument("--image", help="an image file (read with PIL and --transform) or a .pt/.npy tensor [C, H, W] "
                                       "already in the model's input space")
    explain.add_argument("--label", type=non_negative_int, help="true class of --image")
    _add_explainer_arguments(explain, "which units to boost; the figure always adds the other selection side by side")
    add_source_arguments(explain)
    add_output_arguments(explain, "analyses")
    explain.set_defaults(func=explain_command)

    mask = sub.add_parser("mask", help="mask the salient vs random pixels of misclassified samples (paper 3.4, A.8)")
    add_run_argument(mask)
    mask.add_argument("--samples", type=positive_int, default=50, help="first N misclassified samples (default 50)")
    mask.add_argument("--percents", type=positive_int_list, default=list(MASK_PERCENTS),
                      help="comma-separated percentages of pixels to mask (default "
                           f"{','.join(map(str, MASK_PERCENTS))})")
    mask.add_argument("--value", type=mask_value, default="blur",
                      help="what masked pixels become: blur (default: a Gaussian-blurred copy of the image), mean "
                           "(the image's per-channel mean), zero, or a number")
    _add_explainer_arguments(mask, None)
    add_source_arguments(mask)
    add_output_arguments(mask, "analyses")
    mask.set_defaults(func=mask_command)

    sanity = sub.add_parser("sanity", help="cascading randomization check of input-space saliency (paper A.10)")
    add_run_argument(sanity)
    sanity.add_argument("--sample", type=non_negative_int, action="append",
                        help="sample id (repeatable; default: the first "
                             f"{CHECKED_MISTAKES} mistakes of the run's most frequent confusion)")
    _add_explainer_arguments(sanity, "which units the maps boost")
    sanity.add_argument("--stages", type=positive_int_list, help="comma-separated numbers of randomized layers "
                                                                 "(default all)")
    add_source_arguments(sanity)
    add_output_arguments(sanity, "analyses")
    sanity.set_defaults(func=sanity_command)


def _add_explainer_arguments(parser: argparse.ArgumentParser, select_help: str | None) -> None:
    """``--k/--boost/--seed/--batch-size`` and, unless ``select_help`` is None, ``--select``."""
    parser.add_argument("--k", type=positive_int, default=10, help="units boosted per sample (default 10)")
    parser.add_argument("--top", dest="k", type=positive_int, default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    parser.add_argument("--boost", type=float, default=100.0, help="factor on the boosted units (default 100)")
    if select_help is not None:
        parser.add_argument("--select", default="salient", choices=ATTRIBUTION_SELECTIONS, help=select_help)
    parser.add_argument("--seed", type=int, default=0, help="seeds the random units (and random pixels)")
    parser.add_argument("--batch-size", type=positive_int, default=8, help="samples per batch (default 8)")


def _samples_or_default(args: argparse.Namespace, run, count: int) -> list[int]:
    """The samples the user named, or the first ``count`` mistakes of the run's most frequent confusion (said)."""
    if args.sample:
        return args.sample
    from paramsal.analyses.sources import most_frequent_confusion
    from paramsal.zoo.specs import class_names, label_text

    confusion = most_frequent_confusion(run)
    names = class_names(run.manifest.source.data or run.manifest.config.data)
    chosen = [int(i) for i in confusion.ids[:count]]
    print(f"no --sample given: the run's most frequent confusion is {label_text(confusion.target, names)} taken "
          f"for {label_text(confusion.pred, names)} ({len(confusion.ids)} samples); looking at sample(s) "
          f"{', '.join(map(str, chosen))}")
    return chosen


def _settings(args: argparse.Namespace, *names: str) -> dict[str, Any]:
    return {name: getattr(args, name) for name in ("k", "boost", "seed", "batch_size", *names)}


def _saved(result, out) -> None:
    paths = result.save(out)
    print("wrote " + ", ".join(str(path) for path in paths.values()))


def explain_command(args: argparse.Namespace) -> int:
    """``paramsal explain``: maps of run samples (``--sample``) or of an image file (``--image``)."""
    import torch

    from paramsal.analyses.input_saliency import InputSaliency

    run, out = opened_run(args)
    settings = {**_settings(args, "select"), **analysis_options(args)}
    if args.image is not None:
        if args.label is None:
            raise InputError("--image needs --label (the true class)")
        model = loaded_source(args, run, parts=("model",))["model"]
        recorded = run.manifest.source.transform
        image = _read_image(args.image, args.transform or (recorded if isinstance(recorded, str) else "imagenet"))
        explainer = InputSaliency.for_run(model, run, **settings)
        name = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(args.image).stem)[:60] or "image"
        result = explainer.explain(image[None], torch.tensor([args.label]), names=[name], run=run)
    else:
        samples = _samples_or_default(args, run, EXPLAINED_MISTAKES)
        source = loaded_source(args, run)
        result = InputSaliency(source["model"], **settings).evaluate(run, source["data"], samples=samples)
    print(printed(result.summary, shares=("top10_share", "top10_share_std")))
    _saved(result, out)
    return 0


def mask_command(args: argparse.Namespace) -> int:
    """``paramsal mask``: masks salient vs random pixels of the first misclassified samples, prints the summary."""
    from paramsal.analyses.masking import Masking, confidence_raised

    run, out = opened_run(args)
    ids = run.sample_ids(only="misclassified")[:args.samples]
    if not len(ids):
        raise InputError(f"{run.path} has no misclassified samples to mask")
    source = loaded_source(args, run)
    masking = Masking(source["model"], percents=args.percents, value=args.value, **_settings(args),
                      **analysis_options(args))
    result = masking.evaluate(run, source["data"], samples=ids)
    print(printed(result.summary, shares=("units_drop", "median_units_drop")))
    if 5 in args.percents:
        raised = confidence_raised(result.table)
        print(f"\n{len(raised)} of {len(ids)} samples gain >= 25 points of true-class confidence when their top 5% "
              f"salient pixels are masked (A.8): {list(map(int, raised))}")
    _saved(result, out)
    return 0


def sanity_command(args: argparse.Namespace) -> int:
    """``paramsal sanity``: prints the mean correlation per stage and saves the result."""
    from paramsal.analyses.cascading_randomization import CascadingRandomization

    run, out = opened_run(args)
    samples = _samples_or_default(args, run, CHECKED_MISTAKES)
    source = loaded_source(args, run)
    check = CascadingRandomization(source["model"], stages=args.stages, **_settings(args, "select"),
                                   **analysis_options(args))
    result = check.evaluate(run, source["data"], samples=samples)
    for stage, layer, value in zip(result.summary["stage"], result.summary["layer"], result.summary["spearman"]):
        print(f"{int(stage):3d} layers randomized (down to {layer}): spearman {value:+.3f}")
    _saved(result, out)
    return 0


def _read_image(path: str, transform: str):
    """One image ``[C, H, W]`` (float32) from a .pt or .npy tensor file or a picture PIL reads."""
    import torch

    from paramsal._io import load_tensor_file

    if not Path(path).is_file():
        raise InputError(f"image file {path} does not exist")
    if path.endswith(".pt"):
        image = load_tensor_file(path, "an image tensor file")
    elif path.endswith(".npy"):
        image = _read_npy(path)
    else:
        from paramsal.zoo.specs import image_transform

        image = image_transform(transform)(_read_picture(path))
    if not isinstance(image, torch.Tensor) or image.dim() != 3:
        raise InputError(f"{path} must hold one image [C, H, W], got "
                         f"{tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__}")
    return image.float()


def _read_npy(path: str):
    import numpy as np
    import torch

    try:
        return torch.from_numpy(np.load(path, allow_pickle=False))  # no objects from the file
    except (ValueError, OSError, EOFError) as exc:
        raise InputError(f"image file {path} could not be read as a .npy array ({exc})") from exc


def _read_picture(path: str):
    """The PIL image in ``path``, grayscale kept one-channel (for models like the demo's), anything else RGB."""
    from PIL import Image, UnidentifiedImageError

    try:
        picture = Image.open(path)
        picture.load()  # Image.open reads only the header: a truncated file fails here, not in the transform
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:  # PIL raises SyntaxError for bad headers
        raise InputError(f"image file {path} could not be read as an image ({exc}); give a PNG/JPEG picture, "
                         "or a .pt/.npy tensor [C, H, W]") from exc
    return picture if picture.mode in ("L", "RGB") else picture.convert("RGB")
