"""What the analyses' commands share: rebuilding a run's model and data from its manifest, and summary tables."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset, Subset

from paramsal.engine.dataset import model_fingerprint
from paramsal.engine.rundir import Run
from paramsal.engine.units import UnitIndex, UnitsSpec, units_of
from paramsal.errors import InputError
from paramsal.specs import TRANSFORMS, load_data, load_model

if TYPE_CHECKING:
    import pandas as pd


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


def run_units(run: Run, model: nn.Module, units: UnitsSpec | UnitIndex | None = None,
              check_model: bool = True) -> UnitIndex:
    """The model's units, checked to be the run's (and the model's weights to be the profiled ones).

    Raises:
        InputError: naming what differs, since every analysis would otherwise
            act on the wrong filters without a sign.
    """
    config = run.manifest.get("config", {})
    units = units if units is not None else config.get("units", "filters")
    index = units if isinstance(units, UnitIndex) else units_of(model, units)
    if index.fingerprint() != run.manifest.get("units_fingerprint"):
        raise InputError(f"the units of this model ({index.scheme}, {len(index)} units) do not match the run "
                         f"{run.path} ({config.get('units')}, {run.num_units} units): is it the model the "
                         "run profiled?")
    if check_model and model_fingerprint(model) != run.manifest.get("model_fingerprint"):
        raise InputError(f"the model's weights differ from those the run {run.path} profiled (model "
                         f"{config.get('model')!r}); load the same weights, or pass check_model=False")
    return index


def chosen_samples(run: Run, samples: str | Sequence[int] | np.ndarray,
                   purpose: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(ids, targets, preds)`` of "misclassified" or the given sample ids, in sample-id order."""
    table = run.table()
    ids = table.column("sample_id").to_numpy()
    if isinstance(samples, str):
        if samples != "misclassified":
            raise InputError(f"samples={samples!r}: expected 'misclassified' or sample ids")
        keep = ~table.column("correct").to_numpy(zero_copy_only=False)
    else:
        wanted = np.asarray(samples, dtype=np.int64)
        missing = np.setdiff1d(wanted, ids)
        if len(missing):
            raise InputError(f"sample ids {missing[:5].tolist()} are not in the run {run.path}")
        keep = np.isin(ids, wanted)
    if not keep.any():
        raise InputError(f"the run {run.path} has no {samples if isinstance(samples, str) else 'selected'} "
                         f"samples to {purpose}")
    order = np.argsort(ids[keep], kind="stable")
    return (ids[keep][order], table.column("target").to_numpy()[keep][order],
            table.column("pred").to_numpy()[keep][order])


def run_inputs(data: Dataset, ids: np.ndarray, targets: np.ndarray) -> torch.Tensor:
    """``[n, ...]`` the inputs of samples ``ids``, whose labels in ``data`` must be the run's ``targets``."""
    inputs, labels = zip(*(data[int(i)] for i in ids))
    labels = np.array([int(y) for y in labels])
    wrong = np.flatnonzero(labels != targets)
    if len(wrong):
        raise InputError(f"the data set does not match the run: sample {int(ids[wrong[0]])} has class "
                         f"{labels[wrong[0]]} in the data set and {targets[wrong[0]]} in the run")
    return torch.stack([torch.as_tensor(x) for x in inputs])


def model_device(model: nn.Module) -> torch.device:
    param = next(iter(model.parameters()), None)
    return param.device if param is not None else torch.device("cpu")


def ci_table(frame: pd.DataFrame, metrics: Sequence[str], percent: Sequence[str] = ()) -> list[str]:
    """Aligned lines for a bootstrap summary: a header, then one line per (selection, k).

    Each metric reads ``mean [low, high]`` from the columns ``m``, ``m_low`` and
    ``m_high``; the metrics in ``percent`` are shown unsigned with two decimals.
    The "all" selection has no k and shows "-".
    """
    lines = [f"{'selection':<9} {'k':>4}  " + "  ".join(f"{m:>27}" for m in metrics)]
    for _, row in frame.iterrows():
        k = "-" if row["selection"] == "all" else str(row["k"])
        cells = [_ci_cell(row[m], row[m + "_low"], row[m + "_high"], m in percent) for m in metrics]
        lines.append(f"{row['selection']:<9} {k:>4}  " + "  ".join(f"{c:>27}" for c in cells))
    return lines


def _ci_cell(mean: float, low: float, high: float, percent: bool) -> str:
    if percent:
        return f"{mean:9.2f} [{low:7.2f}, {high:7.2f}]"
    return f"{mean:+9.4f} [{low:+7.4f}, {high:+7.4f}]"
