"""Where an analysis gets its model, data and samples, and the checks that they are the run's.

A run directory is data: :func:`load_source` rebuilds only the built-in model
and data specs a manifest records (``demo``, ``torchvision:NAME``,
``demo:SPLIT``, ``imagefolder:DIR``); a ``module.path:factory`` spec found
there is imported and called only when the caller opts in
(``trust_run_specs=True``, ``--trust-run-specs``), since anyone who can write
a run directory could otherwise run code on the machine of whoever analyses it.

Whatever their origin, the model must have the run's units and (unless
allowed otherwise) its weights, and the data the run's fingerprint and labels:
an analysis of other weights or other images would describe something else
under the run's name.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from paramsal._typing import MapDataset, Rows
from paramsal.engine.devices import resolve_device
from paramsal.engine.tasks import is_sequence_task, sample_labels
from paramsal.engine.units import UnitIndex, UnitsSpec, units_of
from paramsal.errors import InputError
from paramsal.jobs.fingerprints import data_fingerprint, model_fingerprint
from paramsal.options import DECODERS, SAMPLE_SELECTIONS, TRANSFORMS, UNRECORDED_DECODE
from paramsal.rundir.run import Run, open_run
from paramsal.zoo.specs import BUILTIN_SPEC_NAMES, first_samples, is_builtin_spec, load_data, load_model

#: What ``samples=`` takes: "misclassified" (the default), "correct", or sample ids of the run.
Samples = Rows


@dataclass(frozen=True)
class SourceOverrides:
    """What a caller puts in place of a run's recorded specs (the command line's ``--model``, ``--data``, ...).

    A spec given here is the caller's own and is always loaded; ``weights``
    without ``model`` reloads the run's model with other weights.
    """

    model: str | None = None
    weights: str | None = None
    num_classes: int | None = None
    data: str | None = None
    transform: str | None = None
    decode: str | None = None


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
    "decode": (lambda v: v is None or v in DECODERS, f"one of {', '.join(DECODERS)} or null", "--decode"),
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
    config, source = run.manifest.config, run.manifest.source
    recorded = {}
    for key, (check, expected, flag) in SOURCE_FIELDS.items():
        if key in overridden:
            continue
        value = getattr(source, key)
        if value is None and key in ("model", "data"):
            value = getattr(config, key)
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
    problem = (f"{run.path} names the {what} spec {spec!r}, which was not imported or called: a run directory is "
               f"data, and only built-in specs ({BUILTIN_SPEC_NAMES[what]}) are rebuilt from it")
    given = "the analysis its model (Pruning(model))" if what == "model" else "evaluate() its data (data=...)"
    raise InputError(f"{problem}; give {given}, or pass trust_run_specs=True if you made this run yourself",
                     command_line=f"{problem}; pass --{what} SPEC to load the {what} yourself, or "
                                  "--trust-run-specs if you made this run yourself")


def load_source(run: Run, overrides: SourceOverrides | None = None, *, trust_run_specs: bool = False,
                device: str | torch.device | None = None,
                parts: Sequence[str] = ("model", "data")) -> dict[str, Any]:
    """The model (in eval mode, on ``device``) and data set a run was profiled with, or the overrides.

    Sample ids index the returned data set, as they index the profiled one:
    the run's recorded ``limit`` is applied to overriding data too.

    Args:
        run: the run.
        overrides: specs that replace the recorded ones.
        trust_run_specs: also rebuild ``module.path:factory`` specs the
            manifest names, importing and calling them.
        device: where the model goes (default CUDA when available).
        parts: which of "model" and "data" to load.

    Returns:
        ``{"model": nn.Module, "data": MapDataset}`` for the parts asked for.

    Raises:
        InputError: for a spec or field of the manifest that is refused.
    """
    overrides = overrides or SourceOverrides()
    overridden = [key for key in SOURCE_FIELDS if getattr(overrides, key, None) is not None]
    if overrides.model is not None:
        overridden.append("weights")  # the run's weights belong to the run's model
    source = recorded_source(run, overridden)
    specs = {"model": overrides.model or source.get("model"), "data": overrides.data or source.get("data")}
    unknown = [what for what in parts if not specs[what]]
    if unknown:
        raise InputError(f"{run.path} does not record how to load its {' and '.join(unknown)} (it was not made by "
                         f"`paramsal profile`): pass " + " and ".join(f"--{w} ({w}=)" for w in unknown))
    loaded: dict[str, Any] = {}
    known = {what: str(specs[what]) for what in parts}
    for what in parts:
        if getattr(overrides, what) is None:
            _check_callable_spec(run, what, known[what], trust_run_specs)
    if "model" in parts:
        model = load_model(known["model"], overrides.weights or source.get("weights"),
                           overrides.num_classes or source.get("num_classes"))
        loaded["model"] = model.to(resolve_device(device))
    if "data" in parts:
        tokenizing = loaded.get("model")
        if tokenizing is None and known["data"].startswith("qa:") and specs["model"]:
            # qa: questions are tokenized by the model's tokenizer: the model comes along where it was not asked for
            _check_callable_spec(run, "model", str(specs["model"]), trust_run_specs)
            tokenizing = load_model(str(specs["model"]))
        data = load_data(known["data"], overrides.transform or source.get("transform") or "imagenet",
                         overrides.decode or source.get("decode") or UNRECORDED_DECODE, tokenizing)
        loaded["data"] = first_samples(data, source.get("limit"))
    return loaded


def check_run_data(run: Run, data: MapDataset) -> None:
    """Refuses a data set whose fingerprint is not the one the run recorded (sample ids would point elsewhere)."""
    recorded = run.manifest.data_fingerprint
    found = data_fingerprint(data)
    if found != recorded:
        raise InputError(f"the data set ({type(data).__name__}, fingerprint {found}) is not the one {run.path} "
                         f"profiled (fingerprint {recorded}), so its sample ids would name other samples; pass the "
                         "run's own data, or allow_other_data=True to use it anyway")


def run_units(run: Run, model: nn.Module, units: UnitsSpec | UnitIndex | None = None,
              check_weights: bool = True, tasks: Sequence[str] = ("classification",)) -> UnitIndex:
    """The model's units, checked to be the run's (and the model's weights to be the profiled ones).

    Args:
        tasks: the tasks of the runs the analysis takes (it runs the model again and reads its outputs as theirs).

    Raises:
        InputError: naming what differs, since every analysis would otherwise
            act on the wrong filters without a sign.
    """
    config = run.manifest.config
    task = config.task
    if task not in tasks:
        raise InputError(f"{run.path} profiled a {task!r} model: this analysis evaluates the model again and takes "
                         f"{' and '.join(map(repr, tasks))} runs only (pruning and fine-tuning also take 'answer' "
                         "runs); neighbours, statistics and the comparisons of runs take any run")
    units = units if units is not None else config.units or "filters"
    index = units if isinstance(units, UnitIndex) else units_of(model, units)
    if index.fingerprint() != run.manifest.units_fingerprint:
        raise InputError(f"the units of this model ({index.scheme}, {len(index)} units) do not match the run "
                         f"{run.path} ({config.units}, {run.num_units} units): is it the model the "
                         "run profiled?")
    if check_weights and model_fingerprint(model) != run.manifest.model_fingerprint:
        raise InputError(f"the model's weights differ from those the run {run.path} profiled (model "
                         f"{config.model!r}); load the same weights, or pass allow_other_weights=True")
    return index


def open_for_analysis(run: Run | str | os.PathLike, allow_partial: bool = False) -> Run:
    """The run, refused while unfinished unless ``allow_partial``.

    An unfinished run's statistics and sample set are those of the samples
    written so far; an analysis of it would silently describe another data set.
    """
    run = run if isinstance(run, Run) else open_run(run)
    if not run.parts:
        empty = (f"{run.path} holds no finished part yet (0 of {run.manifest.num_samples} samples): there is "
                 "nothing to analyse")
        raise InputError(f"{empty}; continue it by calling profile_dataset again with the same arguments (it "
                         "resumes)",
                         command_line=f"{empty}; continue it by running the same `paramsal profile` command again "
                                      "(it resumes)")
    if not run.complete and not allow_partial:
        unfinished = f"{run.path} is unfinished ({run.num_samples} of {run.manifest.num_samples} samples)"
        raise InputError(f"{unfinished}; finish it by calling profile_dataset again with the same arguments (it "
                         "resumes), or pass allow_partial=True",
                         command_line=f"{unfinished}; finish it by running the same `paramsal profile` command "
                                      "again, or pass --allow-partial")
    return run


def data_class_names(data: Any) -> list[str] | None:
    """The class names a data set carries (``.classes``, as torchvision's and the demo's; through a ``Subset``), by
    label, or None."""
    while not hasattr(data, "classes") and hasattr(data, "dataset"):
        data = data.dataset
    names = getattr(data, "classes", None)
    if isinstance(names, (list, tuple)) and names and all(isinstance(n, str) for n in names):
        return list(names)
    return None


@dataclass(frozen=True)
class Confusion:
    """The mistakes of one (target, prediction) pair of a run."""

    target: int
    pred: int
    ids: np.ndarray  # the sample ids of every such mistake, ascending


def most_frequent_confusion(run: Run) -> Confusion:
    """The (target, prediction) pair a run gets wrong most often (ties: the lowest target, then prediction): where
    an explanation of its mistakes starts when the user names no sample.

    Raises:
        InputError: the run has no misclassified sample.
    """
    table = run.table()
    keep = run.selected(table, "misclassified")
    if not keep.any():
        raise InputError(f"the run {run.path} has no misclassified samples: name the samples to look at")
    ids, targets, preds = (table.column(name).to_numpy()[keep] for name in ("sample_id", "target", "pred"))
    pairs, counts = np.unique(np.stack([targets, preds], axis=1), axis=0, return_counts=True)
    target, pred = (int(v) for v in pairs[np.argmax(counts)])  # np.unique sorts the pairs: argmax takes the first
    return Confusion(target, pred, np.sort(ids[(targets == target) & (preds == pred)]))


def chosen_samples(run: Run, samples: Samples, purpose: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(ids, targets, preds)`` of a selection ("misclassified" by default, "correct") or sample ids, by id."""
    table = run.table()
    ids = table.column("sample_id").to_numpy()
    samples = "misclassified" if samples is None else samples
    if isinstance(samples, str):
        if samples not in SAMPLE_SELECTIONS:
            raise InputError(f"samples={samples!r}: expected {', '.join(map(repr, SAMPLE_SELECTIONS))} or sample ids")
        keep = run.selected(table, samples)
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


def run_inputs(data: MapDataset, ids: np.ndarray, targets: np.ndarray) -> torch.Tensor:
    """``[n, ...]`` the inputs of samples ``ids``, whose labels in ``data`` must be the run's ``targets``."""
    return run_samples(data, ids, targets, "classification")[0]


def run_samples(data: MapDataset, ids: np.ndarray, targets: np.ndarray, task: str) -> tuple[torch.Tensor,
                                                                                           torch.Tensor]:
    """``([n, ...], [n, ...])`` the inputs and labels of samples ``ids``, whose labels in ``data`` must be what the
    run recorded as ``targets`` (for a sequence task, the first labelled token's: :func:`sample_labels`)."""
    size = len(data)
    outside = [int(i) for i in ids if not 0 <= int(i) < size]
    if outside:
        raise InputError(f"sample ids {outside[:5]} are outside the data set's 0..{size - 1}: it is not the "
                         "data set the run profiled")
    inputs, labels = zip(*(data[int(i)] for i in ids))
    stacked = torch.stack([torch.as_tensor(y) for y in labels])
    found = sample_labels(stacked, task).numpy() if is_sequence_task(task) else np.array([int(y) for y in labels])
    wrong = np.flatnonzero(found != targets)
    if len(wrong):
        raise InputError(f"the data set does not match the run: sample {int(ids[wrong[0]])} has class "
                         f"{found[wrong[0]]} in the data set and {targets[wrong[0]]} in the run")
    return torch.stack([torch.as_tensor(x) for x in inputs]), stacked

