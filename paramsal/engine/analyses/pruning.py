"""Pruning and perturbation curves (the paper's section 3.1, Figure 3, and appendix A.5).

If a sample's most salient units are really the ones responsible for its
mistake, turning them off should lower the confidence in the wrong class,
raise the true class's, and correct some mistakes, more than turning off k
random units, which in turn should do more than turning off the k least
salient ones. :class:`Pruning` measures this for every misclassified sample
of a run and every k of a grid:

* ``mode="zero"`` turns the units off: the filter's output channel and, where
  a BatchNorm follows, the BatchNorm's output channel are set to 0, so the
  next layer receives a zero channel (see :mod:`.masks` for exactly what that
  is equivalent to zeroing);
* ``mode="noise"`` adds Gaussian noise of standard deviation ``noise_std``
  (default 0.001) to the chosen filters' weights instead.

Each (selection, k) is one batched forward pass per batch of samples, every
sample with its own units, and never a copy of the model.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch import nn
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from paramsal._io import atomic_path
from paramsal.engine.analyses.bootstrap import bootstrap_mean_ci
from paramsal.engine.analyses.common import (add_source_arguments, chosen_samples, ci_table, load_source, model_device,
                                             open_analysis_run, output_folder, positive_int_list, run_inputs,
                                             run_units)
from paramsal.engine.analyses.selection import UNIT_SELECTIONS, select_units
from paramsal.engine.analyses.masks import UnitEditor, gaussian_deltas, unit_mask
from paramsal.engine.profile import eval_mode
from paramsal.engine.rundir import Run
from paramsal.engine.units import UnitIndex, UnitsSpec
from paramsal.errors import InputError, check_choice

SELECTIONS = UNIT_SELECTIONS
MODES = ("zero", "noise")
DEFAULT_KS = (1, 2, 5, 10, 20, 30, 50, 100)

#: Summary columns: metric name -> (column of the per-sample table, scale, axis label).
METRICS = {
    "delta_incorrect": ("delta_incorrect", 1.0, "Δ incorrect-class confidence"),
    "delta_true": ("delta_true", 1.0, "Δ true-class confidence"),
    "pct_corrected": ("corrected", 100.0, "% samples corrected"),
}


@dataclass(frozen=True)
class PruningResult:
    """What :meth:`Pruning.evaluate` measured.

    Attributes:
        rows: one row per (sample, selection, k): sample_id, target, pred (the
            incorrect class, as profiled), selection, k, incorrect_before,
            incorrect_after (softmax probability of ``pred``), true_before,
            true_after (of ``target``), delta_incorrect, delta_true, new_pred,
            corrected (``new_pred == target``).
        summary: one row per (selection, k): n, and for each metric of
            :data:`METRICS` its mean with the bounds ``<metric>_low`` and
            ``<metric>_high`` of a bootstrap confidence interval.
        mode: "zero" (pruning) or "noise" (perturbation).
        config: the settings used (ks, selections, seed, noise_std, ...) and
            ``pred_changed``, the samples whose unedited prediction here
            differs from the run's (near ties on another device; 0 normally).
    """

    rows: pa.Table
    summary: pa.Table
    mode: str
    config: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        """The files' stem: "pruning" or "perturbation"."""
        return "pruning" if self.mode == "zero" else "perturbation"

    def save(self, directory: str | Path) -> dict[str, Path]:
        """Writes ``<name>.parquet``, ``<name>-summary.parquet`` and ``<name>.png`` into ``directory``."""
        directory = output_folder(directory)
        paths = {"rows": directory / f"{self.name}.parquet",
                 "summary": directory / f"{self.name}-summary.parquet",
                 "figure": directory / f"{self.name}.png"}
        for key in ("rows", "summary"):
            with atomic_path(paths[key]) as tmp:
                pq.write_table(getattr(self, key), tmp)
        self.plot(paths["figure"])
        return paths

    def plot(self, path: str | Path | None = None):
        """The paper's Figure 3: one panel per metric against k, a line and CI band per selection.

        Returns:
            The matplotlib figure (also written to ``path`` when given).
        """
        import matplotlib

        if path is not None:
            matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        summary = self.summary.to_pandas()
        fig, axes = plt.subplots(1, len(METRICS), figsize=(4.2 * len(METRICS), 3.6), constrained_layout=True)
        for ax, (metric, (_, _, label)) in zip(axes, METRICS.items()):
            for selection, part in summary.groupby("selection", sort=False):
                part = part.sort_values("k")
                line, = ax.plot(part["k"], part[metric], marker="o", ms=3, label=selection)
                ax.fill_between(part["k"], part[f"{metric}_low"], part[f"{metric}_high"],
                                color=line.get_color(), alpha=0.2, linewidth=0)
            ax.set_xscale("log")
            ax.set_xticks(sorted(summary["k"].unique()), labels=[str(k) for k in sorted(summary["k"].unique())])
            ax.minorticks_off()
            ax.set_xlabel("k (units " + ("turned off" if self.mode == "zero" else "perturbed") + ")")
            ax.set_ylabel(label)
            ax.axhline(0, color="grey", linewidth=0.6)
        axes[0].legend(title="selection")
        level = self.config.get("level", 0.95)
        fig.suptitle(f"{self.name} of misclassified samples (n={int(summary['n'].max())}, "
                     f"{level:.0%} bootstrap CI)")
        if path is not None:
            with atomic_path(Path(path)) as tmp:
                fig.savefig(tmp, format="png", dpi=120)
            plt.close(fig)
        return fig

    def table(self, metric: str = "delta_incorrect") -> pd.DataFrame:
        """One metric as a k x selection frame of means (e.g. to check the ordering)."""
        check_choice("metric", metric, METRICS)
        frame = self.summary.to_pandas()
        return frame.pivot(index="k", columns="selection", values=metric)[
            [s for s in SELECTIONS if s in set(frame["selection"])]]


class Pruning:
    """Pruning (or perturbation) curves of misclassified samples, configured once, evaluated on a run.

    ``Pruning(model, ks=(1, 5, 10)).evaluate(run, dataset)`` turns off, for
    every misclassified sample of ``run``, its top-k salient units, k random
    units and its k least salient units, and reports how the confidences
    change. The model runs in eval mode (flags restored afterwards), without
    gradients, on the device of its parameters.

    Args:
        model: the network the run profiled.
        ks: the numbers of units to turn off.
        select: selections among "salient", "random", "least".
        mode: "zero" (turn units off) or "noise" (add ``N(0, noise_std**2)``
            noise to the chosen filters' weights; paper A.5's N(0, 0.001) is
            read as a standard deviation, as ``torch.normal(0, 0.001)`` takes it).
        noise_std: standard deviation of the noise.
        seed: seeds the random selection, the noise and the bootstrap.
        batch_size: samples per forward pass.
        num_resamples: bootstrap resamples.
        level: confidence level of the intervals.
        units: the run's units when they are not one of the named schemes.
        check_model: refuse a model whose weights differ from the run's.
        progress: show a progress bar over the batches.
    """

    def __init__(self, model: nn.Module, *, ks: Sequence[int] = DEFAULT_KS, select: Sequence[str] = SELECTIONS,
                 mode: str = "zero", noise_std: float = 1e-3, seed: int = 0, batch_size: int = 64,
                 num_resamples: int = 1000, level: float = 0.95, units: UnitsSpec | UnitIndex | None = None,
                 check_model: bool = True, progress: bool = False):
        if isinstance(select, str):
            select = [s.strip() for s in select.split(",") if s.strip()]
        self.ks = tuple(sorted({int(k) for k in ks}))
        if not self.ks or self.ks[0] < 1:
            raise InputError(f"ks must be positive integers, got {list(ks)}")
        unknown = [s for s in select if s not in SELECTIONS]
        if unknown or not select:
            raise InputError(f"unknown selection(s) {unknown}; expected some of {', '.join(SELECTIONS)}")
        check_choice("mode", mode, MODES)
        if batch_size < 1 or noise_std < 0:
            raise InputError(f"batch_size must be >= 1 and noise_std >= 0, got {batch_size}, {noise_std}")
        self.model = model
        self.select = tuple(dict.fromkeys(select))
        self.mode = mode
        self.noise_std = float(noise_std)
        self.seed = int(seed)
        self.batch_size = int(batch_size)
        self.num_resamples = int(num_resamples)
        self.level = float(level)
        self.units = units
        self.check_model = check_model
        self.progress = progress

    def evaluate(self, run: Run, data: Dataset,
                 samples: str | Sequence[int] | np.ndarray = "misclassified") -> PruningResult:
        """Measures every (sample, selection, k).

        Args:
            run: a finished run of this model on ``data``.
            data: the data set the run profiled, ``data[sample_id] = (input, class)``.
            samples: "misclassified" (the paper), or sample ids.

        Returns:
            The per-sample rows and the bootstrap summary.
        """
        index = self._check_run(run)
        ids, targets, preds = chosen_samples(run, samples, "prune")
        profiles = run.profiles(only=ids)
        if self.ks[-1] > len(index):
            raise InputError(f"k={self.ks[-1]} exceeds the run's {len(index)} units")
        chosen = {s: select_units(profiles, self.ks[-1], s, self.seed, ids) for s in self.select}
        device = model_device(self.model)
        columns: dict[str, list[np.ndarray]] = {}
        pred_changed = 0
        starts = range(0, len(ids), self.batch_size)
        with eval_mode(self.model), torch.no_grad():
            editor = None
            for start in tqdm(starts, desc="pruning" if self.mode == "zero" else "perturbation", unit="batch", disable=not self.progress):
                rows = slice(start, start + self.batch_size)
                inputs = run_inputs(data, ids[rows], targets[rows]).to(device)
                if editor is None:
                    editor = UnitEditor.locate(self.model, inputs[:1], index)
                base = _probabilities(self.model(inputs))
                pred_changed += int((base.argmax(1) != preds[rows]).sum())
                for selection in self.select:
                    for k in self.ks:
                        after = self._edited(editor, inputs, chosen[selection][rows, :k], ids[rows], selection, k)
                        _append(columns, _measure(ids[rows], targets[rows], preds[rows], selection, k, base, after))
        rows_table = pa.table({name: np.concatenate(parts) for name, parts in columns.items()})
        # Recomputed predictions may differ from the profiled ones on near ties (another device);
        # the incorrect class stays the profiled prediction, and the count is reported.
        return PruningResult(rows=rows_table, summary=self.summarize(rows_table), mode=self.mode,
                             config=self._config(run) | {"pred_changed": pred_changed})

    def summarize(self, rows: pa.Table) -> pa.Table:
        """Per (selection, k): sample count, metric means and bootstrap intervals (paired over samples)."""
        frame = rows.to_pandas()
        keys = [(s, k) for s in self.select for k in self.ks]
        out: dict[str, list] = {"selection": [s for s, _ in keys], "k": [k for _, k in keys]}
        wide = {}
        for metric, (column, scale, _) in METRICS.items():
            table = frame.pivot(index="sample_id", columns=["selection", "k"], values=column)
            wide[metric] = table[keys].to_numpy(dtype=np.float64) * scale
        out["n"] = [len(frame["sample_id"].unique())] * len(keys)
        for i, (metric, values) in enumerate(wide.items()):
            ci = bootstrap_mean_ci(values, self.num_resamples, self.level, seed=self.seed + i)
            out[metric], out[f"{metric}_low"], out[f"{metric}_high"] = ci.mean, ci.low, ci.high
        return pa.table(out)

    def _edited(self, editor: UnitEditor, inputs: torch.Tensor, unit_ids: np.ndarray, sample_ids: np.ndarray,
                selection: str, k: int) -> np.ndarray:
        """Class probabilities ``[n, C]`` of the batch with each sample's ``unit_ids`` edited."""
        if self.mode == "zero":
            with editor.switched_off(unit_mask(unit_ids, len(editor.index))):
                return _probabilities(self.model(inputs))
        weight = next(iter(self.model.parameters()))
        seeds = [_noise_seed(self.seed, int(i), selection, k) for i in sample_ids]
        deltas = gaussian_deltas(editor.index, unit_ids, self.noise_std, seeds, dtype=weight.dtype,
                                 device=weight.device)
        with editor.perturbed(deltas):
            return _probabilities(self.model(inputs))

    def _check_run(self, run: Run) -> UnitIndex:
        return run_units(run, self.model, self.units, self.check_model)

    def _config(self, run: Run) -> dict:
        return {"run": str(run.path), "ks": list(self.ks), "select": list(self.select), "mode": self.mode,
                "noise_std": self.noise_std, "seed": self.seed, "num_resamples": self.num_resamples,
                "level": self.level}


def _probabilities(logits: torch.Tensor) -> np.ndarray:
    return torch.softmax(logits.double(), dim=1).cpu().numpy()


def _noise_seed(seed: int, sample_id: int, selection: str, k: int) -> int:
    # Every (sample, selection, k) has its own noise, reproducible whatever the batching.
    sequence = np.random.SeedSequence([seed, sample_id, SELECTIONS.index(selection), k])
    return int(sequence.generate_state(1, np.uint64)[0] >> 1)


def _measure(ids: np.ndarray, targets: np.ndarray, preds: np.ndarray, selection: str, k: int,
             base: np.ndarray, after: np.ndarray) -> dict[str, np.ndarray]:
    rows = np.arange(len(ids))
    new_pred = after.argmax(1)
    return {
        "sample_id": ids, "target": targets, "pred": preds,
        "selection": np.full(len(ids), selection), "k": np.full(len(ids), k, dtype=np.int64),
        "incorrect_before": base[rows, preds], "incorrect_after": after[rows, preds],
        "true_before": base[rows, targets], "true_after": after[rows, targets],
        "delta_incorrect": after[rows, preds] - base[rows, preds],
        "delta_true": after[rows, targets] - base[rows, targets],
        "new_pred": new_pred, "corrected": new_pred == targets,
    }


def _append(columns: dict[str, list[np.ndarray]], values: dict[str, np.ndarray]) -> None:
    for name, value in values.items():
        columns.setdefault(name, []).append(value)


# ----------------------------------------------------------------------------------------------- command line


def add_prune_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of ``paramsal prune RUN ...``."""
    parser.add_argument("run", help="run directory made by `paramsal profile`")
    parser.add_argument("--ks", type=positive_int_list, default=list(DEFAULT_KS),
                        help="comma-separated numbers of units to turn off (default 1,2,5,10,20,30,50,100)")
    parser.add_argument("--select", default=",".join(SELECTIONS),
                        help="comma-separated selections: salient,random,least (default all three)")
    parser.add_argument("--mode", default="zero", choices=MODES,
                        help="zero: turn the units off (pruning, paper 3.1); noise: add N(0, std^2) noise to "
                             "their weights (perturbation, paper A.5)")
    parser.add_argument("--noise-std", type=float, default=1e-3, help="noise standard deviation (default 0.001)")
    parser.add_argument("--seed", type=int, default=0, help="seeds random units, noise and bootstrap")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples (default 1000)")
    add_source_arguments(parser)
    parser.add_argument("--out", help="output directory (default RUN/analyses)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def run_prune_command(args: argparse.Namespace) -> int:
    """``paramsal prune``: loads the run's model and data, writes the tables and the figure, prints the summary."""
    run = open_analysis_run(args)
    out = output_folder(args.out or run.path / "analyses")  # before the work, not after
    model, data, _ = load_source(run, args)
    pruning = Pruning(model, ks=args.ks, select=[s.strip() for s in args.select.split(",") if s.strip()],
                      mode=args.mode, noise_std=args.noise_std, seed=args.seed, batch_size=args.batch_size,
                      num_resamples=args.resamples, check_model=not args.allow_other_weights,
                      progress=not args.quiet)
    started = time.perf_counter()
    result = pruning.evaluate(run, data)
    elapsed = time.perf_counter() - started
    paths = result.save(out)
    print(format_summary(result))
    samples = int(result.summary.column("n").to_numpy().max())
    print(f"\n{samples} samples x {len(pruning.ks)} k x {len(pruning.select)} selections in {elapsed:.1f} s")
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


def format_summary(result: PruningResult) -> str:
    """The summary as aligned text: one line per (selection, k), each metric as mean [low, high]."""
    return "\n".join(ci_table(result.summary.to_pandas(), METRICS, percent=("pct_corrected",)))
