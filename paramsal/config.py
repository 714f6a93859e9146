"""The options of profiling, declared once: what :class:`paramsal.Profiler`, :func:`paramsal.profile_batch`,
:func:`paramsal.profile_dataset` and ``paramsal profile`` take, each with its one description.

:class:`ProfileOptions` says how each sample is profiled (units, backend,
precision, ...); :class:`JobOptions` how a bulk job runs (batch size, device,
workers, resume, ...). Each field's ``help`` metadata is its documentation, the
command line's ``--help`` text and the docs' options table alike; its ``flag``
metadata, where present, is the option of ``paramsal profile`` that sets it
(``paramsal/cli/profiling.py`` builds those options from here, and a test
checks that every field with a flag has it). Nothing here imports torch:
``paramsal --help`` reads these without it.
"""

from __future__ import annotations

import dataclasses
import numbers
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from paramsal.errors import InputError, check_choice, check_integer
from paramsal.options import (
    AGGREGATIONS,
    BACKENDS,
    COMPUTE_PRECISIONS,
    DEVICES,
    NEXT_TOKEN_TASKS,
    NONFINITE_POLICIES,
    TARGETS,
    TASKS,
    UNIT_SCHEMES,
)


def option(default: Any, help: str, *, flag: str | None = None, kind: str = "text",
           choices: tuple[str, ...] | None = None, metavar: str | None = None) -> Any:
    """A field of an options dataclass with its description and, where the command line sets it, its flag.

    Args:
        default: the Python default (None where the default depends on the model, device or run: ``help`` says).
        help: the one description of the option.
        flag: the ``paramsal profile`` option that sets it, or None where the command line sets it otherwise
            (or not at all).
        kind: how the command line parses it: "text", "choice" (``choices``), "positive" (an integer >= 1),
            "count" (an integer >= 0), "switch" (on when given), "on-off" (``--x``/``--no-x``), "target", "shard".
    """
    return field(default=default, metadata={"help": help, "flag": flag, "kind": kind, "choices": choices,
                                            "metavar": metavar})


@dataclass(frozen=True)
class ProfileOptions:
    """How each sample is profiled (see :class:`paramsal.Profiler` for what the numbers are).

    An options object is configured once and shared; keyword arguments given next to it override its fields:

    >>> import paramsal
    >>> conv = paramsal.ProfileOptions(units="conv", backend="hooks")
    >>> paramsal.profile_batch(model, images, labels, conv).shape
    torch.Size([8, 560])
    >>> paramsal.profile_batch(model, images, labels, conv, units="conv+linear").shape
    torch.Size([8, 570])
    >>> paramsal.ProfileOptions(unit="conv")
    Traceback (most recent call last):
        ...
    TypeError: ...unexpected keyword argument 'unit'...
    """

    units: Any = option("filters", "the units a profile has one number for: a scheme (filters, the paper's: one per "
                        "output channel of every 4-D weight; conv, conv+linear, linear-rows, linear-columns, heads, "
                        "neurons, norm, ...); in Python also a callable or a UnitIndex (paramsal.units_of)",
                        flag="--units", kind="choice", choices=UNIT_SCHEMES)
    backend: str = option("auto", "how per-sample gradients are computed: auto (hooks, falling back to vmap and "
                          "then loop, with a warning, where a use of a parameter would be missed), hooks, vmap, or "
                          "loop (one sample at a time: the reference)", flag="--backend", kind="choice",
                          choices=BACKENDS)
    aggregation: str = option("mean_abs", "mean_abs: the mean |gradient| of a unit (the paper); abs_mean: |mean "
                              "gradient| (the authors' released statistics)", flag="--aggregation", kind="choice",
                              choices=AGGREGATIONS)
    loss: Any = option(None, "loss(outputs, targets) -> [N] per-sample losses; default the task's (cross-entropy "
                       "for classification)")
    chunk_size: int | None = option(None, "samples per chunk of per-sample work (bounds memory); default from the "
                                    "device's memory", flag="--chunk-size", kind="positive")
    features: Any = option(None, "also record each sample's features, for the feature-space baseline: the input of "
                           "the model's last nn.Linear (in Python, a module's name picks another module)",
                           flag="--features", kind="switch")
    precision: str = option("float32", "float32, or bf16/fp16: forward and backward under autocast, reductions and "
                            "statistics in float32/float64 (faster on GPUs; the docs state the error)",
                            flag="--precision", kind="choice", choices=COMPUTE_PRECISIONS)
    channels_last: bool | None = option(None, "the model and 4-D input batches in channels-last memory format "
                                        "(faster convolutions on GPUs); default on for a model on a CUDA device, "
                                        "and a resumed run's own", flag="--channels-last", kind="on-off")
    target: Any = option("label", "the class each sample's loss is taken at: its label (the paper), the model's "
                         "prediction (explains predictions, needs no label; task answer: its greedy answer) or a "
                         "class index",
                         flag="--target", kind="target", metavar="label|predicted|CLASS")
    task: str = option("classification", "what the model is trained for, which gives each sample's loss: "
                       "classification, token-classification, masked-lm, causal-lm, answer "
                       "(paramsal.engine.tasks); the command line's default is an hf:DIR model's own head (answer "
                       "for a causal LM on qa: data)", flag="--task", kind="choice", choices=TASKS)

    def __post_init__(self) -> None:
        for name, choices in (("backend", BACKENDS), ("aggregation", AGGREGATIONS),
                              ("precision", COMPUTE_PRECISIONS), ("task", TASKS)):
            check_choice(name, getattr(self, name), choices)
        if self.chunk_size is not None:
            check_integer("chunk_size", self.chunk_size)
        object.__setattr__(self, "target", _checked_target(self.target))
        defined = self.target == "label" or (self.task == "answer" and self.target == "predicted")
        if self.task in NEXT_TOKEN_TASKS and not defined:
            raise InputError(f"target={self.target!r} is not defined for task={self.task!r} (each position's label is "
                             "the next input id, or the reference answer's); use target='label' (or, for task "
                             "'answer', 'predicted': the loss at the model's own greedy answer)")


def _checked_target(target: Any) -> str | int:
    """``target`` if it is one of :data:`~paramsal.options.TARGETS` or a class index (as an ``int``)."""
    if isinstance(target, str) and target in TARGETS:
        return target
    if isinstance(target, numbers.Integral) and not isinstance(target, bool) and int(target) >= 0:
        return int(target)
    raise InputError(f"target={target!r}: expected {' or '.join(map(repr, TARGETS))} or a class index >= 0")


@dataclass(frozen=True)
class JobOptions:
    """How a bulk job runs (:func:`paramsal.profile_dataset`).

    >>> import paramsal
    >>> job = paramsal.JobOptions(batch_size=128, progress=False)
    >>> run = paramsal.profile_dataset(model, data, "runs/job-options", job=job)
    >>> run.num_samples, run.complete
    (600, True)
    """

    batch_size: int | None = option(None, "samples per batch; default the run's own when resuming, else 256 on a GPU "
                                    "and 64 on the CPU", flag="--batch-size", kind="positive")
    device: Any = option(None, f"{DEVICES}; default CUDA when available (under torchrun each rank's own GPU)",
                         flag="--device")
    num_workers: int | None = option(None, "DataLoader worker processes; default every core but one per rank on a "
                                     "GPU machine, none on the CPU (where they would take the computation's cores)",
                                     flag="--num-workers", kind="count")
    part_size: int | None = option(None, "rows per Parquet part, whole batches; default about 2,048 (fewer where a "
                                   "torchrun rank would get under 8 parts); a resumed run keeps its own",
                                   flag="--part-size", kind="positive")
    resume: bool = option(True, "continue a run found in the folder; False starts over, replacing it")
    overwrite: bool = option(False, "replace a run of another model, data set or units in the folder (when starting "
                             "over: any run); never a folder that is not a run", flag="--overwrite",
                             kind="switch")
    repair: bool = option(False, "check every finished part's checksum, rows and ids, and profile the damaged or "
                          "missing ones again (part files no manifest lists are removed)", flag="--repair",
                          kind="switch")
    on_nonfinite: str = option("skip", "a sample whose loss or gradient is NaN/inf: skip (flag its row, leave it out "
                               "of the statistics, list it at the end) or fail (stop, naming its index)",
                               flag="--on-nonfinite", kind="choice", choices=NONFINITE_POLICIES)
    progress: bool = option(True, "a progress bar (rank 0's share under torchrun)")
    shard: tuple[int, int] | None = option(None, "profile only the i-th of n contiguous shares of the parts (0 <= i < "
                                           "n), for machines without a shared filesystem; `paramsal merge` joins "
                                           "their folders", flag="--shard", kind="shard", metavar="I/N")
    deterministic: bool = option(False, "the same bits from every run on a GPU too: deterministic algorithms only, "
                                 "no cuDNN benchmarking (slower); on the CPU every run gives the same bits either way",
                                 flag="--deterministic", kind="switch")
    model_name: str | None = option(None, "the model's description in the manifest (default its class name)")
    data_name: str | None = option(None, "the data set's description in the manifest (default its class name)")
    source: Mapping[str, Any] | None = option(None, "the specs that load the model and data again (the command "
                                              "line's), stored so that analyses rebuild them from the run alone")

    def __post_init__(self) -> None:
        check_choice("on_nonfinite", self.on_nonfinite, NONFINITE_POLICIES)
        for name, least in (("batch_size", 1), ("num_workers", 0), ("part_size", 1)):
            if getattr(self, name) is not None:
                check_integer(name, getattr(self, name), least)
        if self.shard is not None and not (len(self.shard) == 2 and 0 <= self.shard[0] < self.shard[1]):
            raise InputError(f"shard={self.shard!r}: expected (i, n) with 0 <= i < n")


OptionsClass = type[ProfileOptions] | type[JobOptions]


def fields_of(kind: OptionsClass) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(kind)}


def split_options(given: Mapping[str, Any], *kinds: OptionsClass, where: str) -> list[dict[str, Any]]:
    """``given`` keyword arguments sorted into each options class's fields.

    Raises:
        InputError: for an argument no class has, naming ``where`` and the arguments it takes.
    """
    names = [fields_of(kind) for kind in kinds]
    unknown = [key for key in given if not any(key in n for n in names)]
    if unknown:
        known = sorted(name for n in names for name in n)
        raise InputError(f"{where} has no argument {unknown[0]!r}; its options are {', '.join(known)}")
    return [{key: value for key, value in given.items() if key in n} for n in names]


Options = TypeVar("Options", ProfileOptions, JobOptions)


def configured(kind: type[Options], options: Options | None, overrides: Mapping[str, Any], *, where: str) -> Options:
    """``options`` (default: ``kind()``) with ``overrides`` set: what an entry point taking ``options=None,
    **overrides`` profiles with.

    Raises:
        InputError: ``options`` is not a ``kind``, or an override names no option of it (naming ``where``).
    """
    if options is not None and not isinstance(options, kind):
        raise InputError(f"{where}: options must be a {kind.__name__}, got {type(options).__name__}")
    split_options(overrides, kind, where=where)
    return dataclasses.replace(options or kind(), **overrides)


def options_table(kind: OptionsClass) -> str:
    """The options of ``kind`` as a Markdown table: name, default, command-line flag, description (the docs)."""
    rows = ["| option | default | `paramsal profile` | what it is |", "| --- | --- | --- | --- |"]
    for f in dataclasses.fields(kind):
        flag = f.metadata["flag"]
        rows.append(f"| `{f.name}` | `{f.default!r}` | {f'`{flag}`' if flag else '-'} | {f.metadata['help']} |")
    return "\n".join(rows)


__all__ = ["JobOptions", "ProfileOptions", "configured", "fields_of", "option", "options_table", "split_options"]
