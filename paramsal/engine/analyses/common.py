"""What the analyses' commands share: opening a run, rebuilding its model and data from its manifest, checking
that they are the run's, writing outputs, and summary tables.

A run directory is data: :func:`load_source` rebuilds only the built-in model
and data specs a manifest records (``demo``, ``torchvision:NAME``,
``imagefolder:DIR``); a ``module.path:factory`` spec found there is imported
and called only when the caller opts in (``--trust-run-specs``,
``trust_run_specs=True``), since anyone who can write a run directory could
otherwise run code on the machine of whoever analyses it.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset, Subset

from paramsal.engine.dataset import data_fingerprint, model_fingerprint
from paramsal.engine.devices import EXPECTED, resolve_device
from paramsal.engine.rundir import Run, open_run
from paramsal.engine.units import UnitIndex, UnitsSpec, units_of
from paramsal.errors import InputError
from paramsal.specs import BUILTIN_SPEC_NAMES, TRANSFORMS, is_builtin_spec, load_data, load_model

if TYPE_CHECKING:
    import pandas as pd


# ----------------------------------------------------------------------------------------------- argparse types


def positive_int_list(text: str) -> list[int]:
    """An argparse type: "1,5,25" -> [1, 5, 25], all >= 1."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from exc
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _int_at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type: an integer ``>= minimum``, refused with a message that says so."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {value}")
        return value

    parse.__name__ = f"int_at_least_{minimum}"  # argparse names the type in some messages
    return parse


#: argparse types: "5" -> 5, refusing values below 1 (counts, sizes) or below 0 (worker processes).
positive_int = _int_at_least(1)
non_negative_int = _int_at_least(0)


# ----------------------------------------------------------------------------------------------- opening a run


def add_partial_argument(parser: argparse.ArgumentParser) -> None:
    """``--allow-partial``: analyse an unfinished run (see :func:`open_analysis_run`)."""
    parser.add_argument("--allow-partial", action="store_true",
                        help="analyse an unfinished run (a profile job that stopped part-way) with the samples "
                             "written so far")


def open_analysis_run(args: argparse.Namespace) -> Run:
    """The run ``args.run`` of an analysis command, refused while unfinished unless ``args.allow_partial``.

    An unfinished run's statistics and sample set are those of the samples
    written so far; an analysis of it would silently describe another data set.
    """
    run = open_run(args.run)
    if not run.complete and not getattr(args, "allow_partial", False):
        raise InputError(f"{run.path} is unfinished ({run.num_samples} of {run.manifest.get('num_samples', '?')} "
                         "samples); finish it by running the same `paramsal profile` command again, or pass "
                         "--allow-partial")
    return run


def output_folder(folder: str | os.PathLike, option: str = "--out DIR") -> Path:
    """``folder``, created if needed and checked to be writable before an analysis writes into it.

    Args:
        folder: where the analysis writes.
        option: how the user chooses another place, for the message.

    Raises:
        InputError: naming the folder and ``option`` when it cannot be created or written.
    """
    folder = Path(folder)
    probe = folder / f".paramsal-write-test-{os.getpid()}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise InputError(f"cannot write to {folder} ({exc.strerror or type(exc).__name__}): the directory is not "
                         f"writable; pass {option} to write somewhere else") from exc
    return folder


# ----------------------------------------------------------------------------------------------- model and data


def add_source_arguments(parser: argparse.ArgumentParser) -> None:
    """Overrides of the run's own specs (``--model/--weights/--num-classes/--data/--transform/--device``) and the
    checks that the model and data are the run's (``--trust-run-specs/--allow-other-weights/--allow-other-data``).
    """
    parser.add_argument("--model", help="model spec (default: the one the run was profiled with)")
    parser.add_argument("--weights", help="state dict file for the model (default: the run's)")
    parser.add_argument("--num-classes", type=positive_int,
                        help="classes of a torchvision model (default: the run's)")
    parser.add_argument("--data", help="data spec (default: the run's)")
    parser.add_argument("--transform", choices=TRANSFORMS, help="image transform for imagefolder data")
    parser.add_argument("--device", help=f"{EXPECTED} (default: CUDA when available)")
    parser.add_argument("--trust-run-specs", action="store_true",
                        help="import and call the code (module.path:factory specs) named in the run's manifest to "
                             "rebuild its model or data; use it only for runs you made yourself")
    parser.add_argument("--allow-other-weights", action="store_true",
                        help="analyse a model whose weights differ from those the run profiled")
    parser.add_argument("--allow-other-data", action="store_true",
                        help="analyse a data set whose fingerprint differs from the one the run profiled")


_NO_OVERRIDES = argparse.Namespace(model=None, weights=None, num_classes=None, data=None, transform=None, device=None)


def _positive_or_none(value: Any) -> bool:
    return value is None or (isinstance(value, int) and not isinstance(value, bool) and value >= 1)


def _string_or_none(value: Any) -> bool:
    return value is None or isinstance(value, str)


#: The fields of a manifest's ``source`` that :func:`load_source` reads: (check, what it must be, override flag).
SOURCE_FIELDS: dict[str, tuple[Callable[[Any], bool], str, str | None]] = {
    "model": (_string_or_none, "a spec string", "--model"),
    "data": (_string_or_none, "a spec string", "--data"),
    "weights": (_string_or_none, "a file path or null", "--weights"),
    "num_classes": (_positive_or_none, "a positive integer or null", "--num-classes"),
    "transform": (lambda v: v is None or v in TRANSFORMS, f"one of {', '.join(TRANSFORMS)} or null", "--transform"),
    "limit": (_positive_or_none, "a positive integer or null", None),
}


def recorded_source(run: Run, overridden: Sequence[str] = ()) -> dict[str, Any]:
    """The specs a run records for rebuilding its model and data, each field checked to be plain data.

    ``source`` is what ``paramsal profile`` records; ``config`` gives the
    model and data of runs without one (their descriptions, which may be specs).

    Args:
        run: the run.
        overridden: fields the caller replaces, which are neither read nor checked.

    Raises:
        InputError: naming the first field of the wrong type or value.
    """
    config, source = run.manifest.get("config", {}), run.manifest.get("source") or {}
    if not isinstance(source, dict) or not isinstance(config, dict):
        raise InputError(f"{run.path}/manifest.json: 'source' and 'config' must be objects; the run directory is "
                         "damaged or was edited by hand")
    recorded = {}
    for key, (check, expected, flag) in SOURCE_FIELDS.items():
        if key in overridden:
            continue
        value = source.get(key)
        if value is None and key in ("model", "data"):
            value = config.get(key)
        if not check(value):
            way_out = f"; pass {flag} to replace it" if flag else ""
            raise InputError(f"{run.path}/manifest.json: source.{key} is {value!r}, not {expected}; the run "
                             f"directory is damaged or was edited by hand{way_out}")
        recorded[key] = value
    return recorded


def _check_callable_spec(run: Run, what: str, spec: str, trusted: bool) -> None:
    """Refuses a manifest's spec that would import and call code, unless the caller trusts the run."""
    if trusted or is_builtin_spec(spec, what):
        return
    raise InputError(f"{run.path} names the {what} spec {spec!r}, which was not imported or called: a run directory "
                     f"is data, and only built-in specs ({BUILTIN_SPEC_NAMES[what]}) are rebuilt from it; pass "
                     f"--{what} SPEC to load the {what} yourself, or --trust-run-specs if you made this run "
                     "yourself")


def load_source(run: Run, args: argparse.Namespace | None = None, *, trust_run_specs: bool = False,
                allow_other_data: bool = False) -> tuple[nn.Module, Dataset, torch.device]:
    """The model (on its device, eval mode) and data set a run was profiled with, or the overrides in ``args``.

    Sample ids index the returned data set, as they index the profiled one:
    the run's recorded ``limit`` is applied to overriding data too, and the
    data set's fingerprint must be the run's.

    Args:
        run: the run.
        args: parsed command-line options (see :func:`add_source_arguments`);
            None rebuilds everything from the run.
        trust_run_specs: also rebuild ``module.path:factory`` specs the
            manifest names, importing and calling them (``--trust-run-specs``).
            Specs in ``args`` are the caller's own and are always used.
        allow_other_data: accept a data set whose fingerprint differs from the
            run's (``--allow-other-data``).

    Raises:
        InputError: for a spec or field of the manifest that is refused, or
            data that is not the run's.
    """
    args = args or _NO_OVERRIDES
    trusted = trust_run_specs or getattr(args, "trust_run_specs", False)
    overridden = [key for key in SOURCE_FIELDS if getattr(args, key, None) is not None]
    if args.model is not None:
        overridden.append("weights")  # the run's weights belong to the run's model
    source = recorded_source(run, overridden)
    model_spec = args.model or source.get("model")
    data_spec = args.data or source.get("data")
    if not model_spec or not data_spec:
        raise InputError(f"{run.path} does not record how to load its model and data "
                         "(it was not made by `paramsal profile`): pass --model and --data")
    for what, spec in (("model", args.model), ("data", args.data)):
        if spec is None:
            _check_callable_spec(run, what, source[what], trusted)
    device = resolve_device(args.device)
    model = load_model(model_spec, args.weights or source.get("weights"),
                       args.num_classes or source.get("num_classes"))
    data = load_data(data_spec, args.transform or source.get("transform") or "imagenet")
    if source.get("limit"):
        data = Subset(data, range(min(int(source["limit"]), len(data))))
    if not (allow_other_data or getattr(args, "allow_other_data", False)):
        check_run_data(run, data, data_spec)
    return model.to(device), data, device


def check_run_data(run: Run, data: Dataset, spec: str) -> None:
    """Refuses a data set whose fingerprint is not the one the run recorded (sample ids would point elsewhere)."""
    recorded = run.manifest.get("data_fingerprint")
    if recorded is None:
        return  # nothing recorded to compare with
    found = data_fingerprint(data)
    if found != recorded:
        raise InputError(f"the data {spec!r} (fingerprint {found}) is not the data set {run.path} profiled "
                         f"(fingerprint {recorded}), so its sample ids would name other samples; pass the run's own "
                         "data, or --allow-other-data (allow_other_data=True in Python) to use it anyway")


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
                         f"{config.get('model')!r}); load the same weights, or pass --allow-other-weights "
                         "(check_model=False in Python)")
    return index


def chosen_samples(run: Run, samples: str | Sequence[int] | np.ndarray,
                   purpose: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(ids, targets, preds)`` of "misclassified" or the given sample ids, in sample-id order."""
    table = run.table()
    ids = table.column("sample_id").to_numpy()
    if isinstance(samples, str):
        if samples != "misclassified":
            raise InputError(f"samples={samples!r}: expected 'misclassified' or sample ids")
        keep = run.selected(table, "misclassified")
    else:
        wanted = np.asarray(samples, dtype=np.int64)
        _check_in_run(run, wanted, ids)
        keep = np.isin(ids, wanted)
    if not keep.any():
        raise InputError(f"the run {run.path} has no {samples if isinstance(samples, str) else 'selected'} "
                         f"samples to {purpose}")
    order = np.argsort(ids[keep], kind="stable")
    return (ids[keep][order], table.column("target").to_numpy()[keep][order],
            table.column("pred").to_numpy()[keep][order])


def recorded_targets(run: Run, ids: Sequence[int] | np.ndarray) -> np.ndarray:
    """``[n]`` the classes the run recorded for samples ``ids``, in the order given."""
    ids = np.asarray(ids, dtype=np.int64)
    table = run.table()
    all_ids = table.column("sample_id").to_numpy()
    _check_in_run(run, ids, all_ids)
    order = np.argsort(all_ids)
    return table.column("target").to_numpy()[order][np.searchsorted(all_ids[order], ids)]


def _check_in_run(run: Run, wanted: np.ndarray, ids: np.ndarray) -> None:
    missing = np.setdiff1d(wanted, ids)
    if len(missing):
        raise InputError(f"sample ids {missing[:5].tolist()} are not in the run {run.path}")


def run_inputs(data: Dataset, ids: np.ndarray, targets: np.ndarray) -> torch.Tensor:
    """``[n, ...]`` the inputs of samples ``ids``, whose labels in ``data`` must be the run's ``targets``."""
    outside = [int(i) for i in ids if not 0 <= int(i) < len(data)]
    if outside:
        raise InputError(f"sample ids {outside[:5]} are outside the data set's 0..{len(data) - 1}: it is not the "
                         "data set the run profiled")
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
