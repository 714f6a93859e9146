"""What the analyses' commands share: rebuilding a run's model and data from its manifest."""

from __future__ import annotations

import argparse

import torch
from torch import nn
from torch.utils.data import Dataset, Subset

from paramsal.engine.rundir import Run
from paramsal.errors import InputError
from paramsal.specs import TRANSFORMS, load_data, load_model


def positive_int_list(text: str) -> list[int]:
    """An argparse type: "1,5,25" -> [1, 5, 25], all >= 1."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from exc
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def add_source_arguments(parser: argparse.ArgumentParser) -> None:
    """``--model/--weights/--num-classes/--data/--transform/--device``: overrides of the run's own specs."""
    parser.add_argument("--model", help="model spec (default: the one the run was profiled with)")
    parser.add_argument("--weights", help="state dict file for the model (default: the run's)")
    parser.add_argument("--num-classes", type=int, help="classes of a torchvision model (default: the run's)")
    parser.add_argument("--data", help="data spec (default: the run's)")
    parser.add_argument("--transform", choices=TRANSFORMS, help="image transform for imagefolder data")
    parser.add_argument("--device", help="cpu, cuda, ... (default: CUDA when available)")


_NO_OVERRIDES = argparse.Namespace(model=None, weights=None, num_classes=None, data=None, transform=None, device=None)


def load_source(run: Run, args: argparse.Namespace | None = None) -> tuple[nn.Module, Dataset, torch.device]:
    """The model (on its device, eval mode) and data set a run was profiled with, or the overrides in ``args``.

    Sample ids index the returned data set, as they index the profiled one.
    """
    args = args or _NO_OVERRIDES
    source = {**run.manifest.get("config", {}), **{k: v for k, v in run.manifest.get("source", {}).items()
                                                    if v is not None}}
    model_spec = args.model or source.get("model")
    data_spec = args.data or source.get("data")
    if not model_spec or not data_spec:
        raise InputError(f"{run.path} does not record how to load its model and data "
                         "(it was not made by `paramsal profile`): pass --model and --data")
    weights = args.weights or (source.get("weights") if not args.model else None)
    model = load_model(model_spec, weights, args.num_classes or source.get("num_classes"))
    data = load_data(data_spec, args.transform or source.get("transform") or "imagenet")
    if source.get("limit") and not args.data:
        data = Subset(data, range(min(int(source["limit"]), len(data))))
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return model.to(device), data, device
