"""The one contract every analysis follows: configure once, ``evaluate(run, data=None, samples=None) -> Result``.

An analysis is an object holding its settings (``Pruning(ks=(1, 5, 10))``);
:meth:`Analysis.evaluate` applies them to a run and returns a :class:`Result`:

* ``result.table``: pandas, one row per measured item (sample, or sample and setting);
* ``result.summary``: pandas, the aggregate the paper reports;
* ``result.config``: the settings and facts of the evaluation (a dict of plain data);
* ``result.plot(ax=None)``: a matplotlib ``Figure`` (never through pyplot, so
  the user's backend and pyplot's state are left alone);
* ``result.save(directory)``: Parquet tables, a JSON config and a PNG, all
  written atomically; :func:`load_result` reads them back;
* in a notebook, the result shows itself (``_repr_html_``): the summary and the figure.

The checks that the run, model and data belong together live here too
(:meth:`Analysis.prepare`), so that every analysis makes them the same way.

One analysis takes two runs and so has a contract of its own:
:class:`~paramsal.analyses.comparison.Compare` is configured the same way but
is applied as ``evaluate(run_a, run_b) -> CompareResult``, loads no model or
data, and its result is a :class:`Result` like every other.
"""

from __future__ import annotations

import base64
import html
import importlib
import io
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch import nn

from paramsal._typing import MapDataset
from paramsal.analyses.sources import (
    Samples,
    check_run_data,
    chosen_samples,
    load_source,
    open_for_analysis,
    run_samples,
    run_units,
)
from paramsal.engine.units import UnitIndex, UnitsSpec
from paramsal.errors import InputError, ParamsalError, ParamsalWarning
from paramsal.jobs.distributed import is_main_process
from paramsal.rundir.ownership import MANIFEST, is_regular
from paramsal.rundir.published import RESULT_FORMAT, is_plain, owned_folder, publish, read_record, records_in
from paramsal.rundir.run import Run

#: Saved results are read in this format and the one before it (which recorded no files and no run identity).
RESULT_FORMATS = (RESULT_FORMAT, "paramsal-result/1")

_RESULTS: dict[str, type[Result]] = {}


@dataclass
class Result:
    """What an analysis measured (see the module docstring for the contract).

    Subclasses set ``kind`` (the file stem) and draw in :meth:`_draw`; they
    may carry named arrays (``arrays``, saved as ``.npy`` files) for what does
    not fit a table, such as maps.
    """

    kind: ClassVar[str] = "result"
    #: Panels :meth:`plot` draws (``ax`` may then be a sequence of as many axes).
    panels: ClassVar[int] = 1
    title: ClassVar[str] = "result"

    table: pd.DataFrame
    summary: pd.DataFrame
    config: dict[str, Any] = field(default_factory=dict)
    arrays: dict[str, np.ndarray] = field(default_factory=dict, repr=False)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        _RESULTS[cls.kind] = cls

    @property
    def name(self) -> str:
        """The files' stem: the kind, and the options that tell two evaluations of one run apart."""
        return self.kind + "".join(f"-{part}" for part in self.config.get("name_parts", ()))

    def plot(self, ax: Any = None) -> Any:
        """The analysis's figure.

        Args:
            ax: an axes to draw into (a sequence of :attr:`panels` axes for a
                figure of several panels); None makes a new figure.

        Returns:
            The matplotlib ``Figure``.
        """
        if ax is None:
            from matplotlib.figure import Figure  # a bare Figure: no pyplot state, no backend change

            figure = Figure(figsize=self._figsize(), layout="constrained")
            axes: list[Any] = list(figure.subplots(*self._grid(), squeeze=False).ravel())
        else:
            axes = list(ax) if isinstance(ax, (list, tuple, np.ndarray)) else [ax]
            if len(axes) != self.panels:
                raise InputError(f"{type(self).__name__}.plot draws {self.panels} panel(s); got {len(axes)} axes")
            figure = axes[0].figure
        self._draw(figure, list(axes))
        return figure

    def save(self, directory: str | os.PathLike) -> dict[str, Path]:
        """Writes ``NAME.parquet`` (table), ``NAME-summary.parquet``, ``NAME.png``, one ``NAME-ARRAY.npy`` per array,
        then ``NAME.json`` (config, run identity, every file's size and sha256) into ``directory``; returns the paths
        by role.

        The JSON record is written last and lists the others, so that a save
        stopped part-way (a kill) never reads as a result: :func:`load_result`
        refuses files that are not the ones their record lists.

        Raises:
            InputError: ``directory`` is a non-empty folder that is neither a
                run's own nor one holding saved results.
        """
        def table(frame: pd.DataFrame) -> Any:
            return lambda tmp: pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), tmp)

        def array(values: np.ndarray) -> Any:
            def write(tmp: Path) -> None:
                with open(tmp, "wb") as file:
                    np.save(file, values, allow_pickle=False)
            return write

        record = f"{self.name}.json"
        roles = {"table": (f"{self.name}.parquet", table(self.table)),
                 "summary": (f"{self.name}-summary.parquet", table(self.summary)),
                 **{key: (f"{self.name}-{key}.npy", array(values)) for key, values in self.arrays.items()},
                 "figure": (f"{self.name}.png", lambda tmp: self.plot().savefig(tmp, format="png", dpi=120))}
        paths = {role: Path(directory) / name for role, (name, _) in roles.items()} | \
            {"config": Path(directory) / record}
        if is_main_process():  # under torchrun every rank holds the result; rank 0 alone writes it
            publish(owned_folder(directory, "directory"), record, dict(roles.values()),
                    {"format": RESULT_FORMAT, "kind": self.kind, "arrays": sorted(self.arrays), "config": self.config})
        return paths

    def _repr_html_(self) -> str:
        shown = {k: v for k, v in self.config.items() if k not in ("run", "run_id", "name_parts") and _short(v)}
        settings = ", ".join(f"{k}={v}" for k, v in shown.items())
        buffer = io.BytesIO()
        self.plot().savefig(buffer, format="png", dpi=80)
        image = base64.b64encode(buffer.getvalue()).decode()
        return (f"<div><h4>{html.escape(self.title)}</h4><p><small>{html.escape(settings)}</small></p>"
                + self.summary.to_html(index=False, max_rows=30, float_format=lambda v: f"{v:.4g}", border=0)
                + f"<img src='data:image/png;base64,{image}' style='max-width:100%'></div>")

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({self.name!r}: {len(self.table)} rows, summary "
                f"{self.summary.shape[0]} x {self.summary.shape[1]})")

    def _grid(self) -> tuple[int, int]:
        """Rows and columns of the panels (side by side unless a subclass stacks them)."""
        return 1, self.panels

    def _figsize(self) -> tuple[float, float]:
        rows, cols = self._grid()
        return (4.4 * cols, 3.6 * rows)

    def _draw(self, figure: Any, axes: list[Any]) -> None:
        raise NotImplementedError


def load_result(directory: str | os.PathLike, name: str, run: Run | None = None) -> Result:
    """Reads a result written by :meth:`Result.save` (tables, config and arrays; the figure is redrawn).

    Args:
        directory: the folder it was saved to.
        name: its file stem (``result.name``, e.g. "pruning").
        run: the run it must have been computed from; by default, when
            ``directory`` is a run's own folder (``RUN/analyses``), that run.

    Raises:
        InputError: when the files are missing, are not a saved result, are
            not the files its record lists (a save that was stopped), or were
            computed from another run than ``run``.
    """
    folder = Path(directory)
    record = read_record(folder, f"{name}.json", RESULT_FORMATS)
    config, arrays = record.get("config"), record.get("arrays", [])
    if record.get("kind") not in _known_results() or not isinstance(config, dict) or \
            not isinstance(arrays, list) or not all(is_plain(f"{name}-{key}.npy") for key in arrays):
        raise InputError(f"{folder / name}.json is not a saved paramsal result (kind, config and arrays in the form "
                         f"paramsal writes them)")
    run = run if run is not None else _run_of(folder)
    if run is not None:
        if "run_id" not in config:
            raise InputError(f"{folder / name}.json was saved by an older paramsal, which did not record the run it "
                             f"was computed from: evaluate the analysis again on {run.path}")
        if config["run_id"] != run.identity:
            raise InputError(f"{folder / name}.json was computed from another run than {run.path} (the run was made "
                             "again or replaced since): evaluate the analysis again on this run")
    try:
        values = {key: np.load(folder / f"{name}-{key}.npy", allow_pickle=False) for key in arrays}
        table, summary = (pq.read_table(folder / f"{name}{suffix}.parquet").to_pandas() for suffix in ("", "-summary"))
    except (OSError, ValueError, pa.ArrowException) as exc:
        raise InputError(f"{folder / name}: the files of the saved result cannot be read ({exc})") from exc
    return _known_results()[record["kind"]](table, summary, config, values)


def find_results(directory: str | os.PathLike, run: Run | None = None) -> tuple[list[Result], list[str]]:
    """Every result saved in ``directory`` that belongs to ``run`` (see :func:`load_result`), by name; and, for each
    one left out (another run's, or a save that was stopped), why."""
    folder = Path(directory)
    found, skipped = [], []
    for record in records_in(folder, RESULT_FORMATS):
        try:
            found.append(load_result(folder, record.removesuffix(".json"), run))
        except InputError as exc:
            skipped.append(str(exc))
    return found, skipped


def _run_of(folder: Path) -> Run | None:
    """The run whose own folder ``folder`` is, or None."""
    if not is_regular(folder.parent / MANIFEST):
        return None
    try:
        return Run(folder.parent)
    except ParamsalError:
        return None


def _known_results() -> dict[str, type[Result]]:
    """Every result kind, by name. A kind is registered when its module is imported; the package's index
    (:mod:`paramsal.analyses`) names every module that defines one, so importing those finds them all."""
    index = importlib.import_module("paramsal.analyses")
    for module in sorted(set(index._LAZY.values())):
        importlib.import_module(f"paramsal.analyses.{module}")
    return _RESULTS


def _short(value: Any) -> bool:
    return isinstance(value, (int, float, str, bool)) and len(str(value)) <= 40


@dataclass(frozen=True)
class Prepared:
    """What :meth:`Analysis.evaluate` works on, checked to belong together.

    Attributes:
        run: the run (finished, unless the analysis allows partial runs).
        model: the run's model (eval mode is the analysis's business).
        index: the model's units, the run's.
        data: the run's data set, ``data[sample_id] = (input, class)``.
        ids, targets, preds: ``[n]`` the chosen samples, by id, with the
            classes and predictions the run recorded.
        task: the run's task.
    """

    run: Run
    model: nn.Module
    index: UnitIndex
    data: MapDataset
    ids: np.ndarray
    targets: np.ndarray
    preds: np.ndarray
    task: str = "classification"

    def inputs(self, rows: slice | np.ndarray = slice(None)) -> torch.Tensor:
        """``[m, ...]`` the inputs of ``ids[rows]`` on the model's device (their labels checked against the run's)."""
        return self.batch(rows)[0]

    def batch(self, rows: slice | np.ndarray = slice(None)) -> tuple[torch.Tensor, torch.Tensor]:
        """``(inputs, labels)`` of ``ids[rows]`` on the model's device (the labels checked against the run's)."""
        inputs, labels = run_samples(self.data, self.ids[rows], self.targets[rows], self.task)
        param = next(iter(self.model.parameters()))
        inputs = inputs.to(param.device)
        return (inputs.to(param.dtype) if inputs.is_floating_point() else inputs), labels.to(param.device)


class Analysis:
    """Settings of one analysis; :meth:`evaluate` applies them to a run.

    Every analysis takes the same keyword arguments for where its model and
    data come from and how strictly they are checked.

    Args:
        model: the network the run profiled; None rebuilds it from the run's
            manifest (built-in specs only, unless ``trust_run_specs``).
        allow_partial: analyse an unfinished run (its samples so far).
        allow_other_weights: accept a model whose weights differ from the run's.
        allow_other_data: accept a data set whose fingerprint differs from the run's.
        trust_run_specs: rebuild a ``module.path:factory`` spec the manifest
            names, importing and calling it (only for runs you made).
        device: where a rebuilt model goes (default CUDA when available).
        progress: show progress bars.
    """

    #: The verb of messages ("no misclassified samples to prune").
    purpose: ClassVar[str] = "analyse"
    #: The analysis's default grid of k, if it has one (:meth:`usable_ks`).
    default_ks: ClassVar[tuple[int, ...]] = ()
    #: The tasks of the runs it takes (:func:`~paramsal.analyses.sources.run_units`).
    tasks: ClassVar[tuple[str, ...]] = ("classification",)

    def __init__(self, model: nn.Module | None = None, *, allow_partial: bool = False,
                 allow_other_weights: bool = False, allow_other_data: bool = False, trust_run_specs: bool = False,
                 device: str | torch.device | None = None, progress: bool = False):
        self.model = model
        self.allow_partial = allow_partial
        self.allow_other_weights = allow_other_weights
        self.allow_other_data = allow_other_data
        self.trust_run_specs = trust_run_specs
        self.device = device
        self.progress = progress

    def evaluate(self, run: Run | str | os.PathLike, data: MapDataset | None = None, samples: Samples = None) -> Result:
        """Applies the analysis to ``run``.

        Args:
            run: a finished run (or its directory).
            data: the data set the run profiled; None rebuilds it from the run's manifest.
            samples: "misclassified" (the default, as in the paper), "correct", or sample ids.
        """
        raise NotImplementedError

    def prepare(self, run: Run | str | os.PathLike, data: MapDataset | None = None, samples: Samples = None, *,
                units: UnitsSpec | UnitIndex | None = None) -> Prepared:
        """The run, its model and units, its data and the chosen samples, each checked against the run.

        Analyses of the run alone (neighbours, profiles) open it with
        :func:`~paramsal.analyses.sources.open_for_analysis` instead.
        """
        run = open_for_analysis(run, self.allow_partial)
        missing = [what for what, given in (("model", self.model), ("data", data)) if given is None]
        rebuilt = load_source(run, trust_run_specs=self.trust_run_specs, device=self.device,
                              parts=missing) if missing else {}
        model = self.model if self.model is not None else rebuilt["model"]
        data = data if data is not None else rebuilt["data"]
        index = run_units(run, model, units, check_weights=not self.allow_other_weights, tasks=self.tasks)
        if not self.allow_other_data:
            check_run_data(run, data)
        ids, targets, preds = chosen_samples(run, samples, self.purpose)
        return Prepared(run, model, index, data, ids, targets, preds, run.task)

    def usable_ks(self, ks: Sequence[int], num_units: int) -> tuple[int, ...]:
        """``ks`` without the values above the run's unit count, with one note when the user's own are dropped (a
        default grid, made for large networks, is cut to a small one's size without a word)."""
        kept = tuple(k for k in ks if k <= num_units)
        if not kept:
            raise InputError(f"every k of {list(ks)} exceeds the run's {num_units} units; choose ks <= {num_units}")
        if len(kept) < len(ks) and not set(ks) <= set(self.default_ks):
            dropped = [k for k in ks if k > num_units]
            warnings.warn(f"{type(self).__name__}: k={dropped} exceed the run's {num_units} units and are left out",
                          ParamsalWarning, stacklevel=3)
        return kept

    def __repr__(self) -> str:
        settings = ", ".join(f"{k}={v!r}" for k, v in vars(self).items()
                             if k != "model" and not k.startswith("_") and v is not None and v is not False)
        return f"{type(self).__name__}({settings})"


def result_config(run: Run | None, analysis: Analysis, **facts: Any) -> dict[str, Any]:
    """The config a result records: the run (None for tensors given directly), the analysis's settings, and facts
    of the evaluation."""
    settings = {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(analysis).items()
                if k not in ("model", "device", "progress") and not k.startswith("_")}
    return {"run": str(run.path) if run is not None else None, "run_id": run.identity if run is not None else None,
            **settings, **facts}
