"""One-step fine-tuning on a misclassified sample (the paper's section 3.3, Figure 6, appendix B.1).

If a sample's most salient units are really the ones behind its mistake, one
small gradient step on that sample alone, restricted to those units, should
often correct it, about as often as the same step on every parameter, and far
more often than a step of the same size on k random or k least salient units.
And since samples with similar saliency profiles go wrong for similar
reasons, the same step should also correct some of the sample's nearest
neighbours in saliency space.

:class:`FineTune` measures this for every misclassified sample of a run. For
sample n, selection S and k:

* ``g`` = the gradient of **sample n's own cross-entropy loss** with respect
  to the parameters, the model in eval mode (BatchNorm on its running
  statistics, which no step changes);
* the step updates only the whole filter weights (rows of the unit-bearing
  parameters) of the k chosen units: ``θ_u <- θ_u - lr * c * g_u``, plain SGD
  (no momentum, no weight decay). ``c = 1`` for "salient"; for "random" and
  "least", ``c = ||g_salient(k)|| / ||g_S(k)||``, where ``||.||`` is the L2 norm
  of the concatenated weight gradients of all k chosen filters, so that every
  selection takes a step of the same length and only its direction differs
  (paper B.1). "all" steps on every parameter (biases and BatchNorm affine
  parameters included) with ``c = 1``; k does not apply (``k = 0`` in the
  tables);
* the updated model classifies sample n and its nearest neighbours in
  saliency space (cosine, standardized profiles, among the misclassified
  samples, from :class:`~paramsal.engine.analyses.neighbors.Neighbors`).

Nothing is copied per sample: every sample's update is a parameter delta,
and one ``vmap`` of ``functional_call`` over a chunk of samples evaluates
each sample's updated model on its own inputs (the sample and its
neighbours). The per-sample gradients come from ``vmap(grad(...))``.

```python
tune = FineTune(model, ks=(1, 5, 25), select=("salient", "random", "least", "all"), lr=1e-3)
result = tune.run(run, dataset)        # FineTuneResult: rows, summary
result.save(run.path / "analyses")     # finetune.parquet, finetune-summary.parquet, finetune.png
```
"""

from __future__ import annotations

import argparse
import copy
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from paramsal.engine.analyses.common import (add_source_arguments, chosen_samples, ci_table, load_source, model_device,
                                             open_analysis_run, output_folder, positive_int_list, run_inputs,
                                             run_units)
from paramsal.engine.analyses.selection import UNIT_SELECTIONS, select_units
from paramsal._io import atomic_path
from paramsal.engine.analyses.bootstrap import bootstrap_mean_ci
from paramsal.engine.analyses.neighbors import Neighbors
from paramsal.engine.profile import eval_mode
from paramsal.engine.rundir import Run
from paramsal.engine.units import UnitIndex, UnitsSpec
from paramsal.errors import InputError, check_choice

SELECTIONS = ("salient", "random", "least", "all")
DEFAULT_KS = (1, 5, 25, 75, 150, 300)
ALL_K = 0  # the k recorded for "all": every parameter, no unit choice

#: Summary metrics: name -> (column of the per-sample table, axis label).
METRICS = {
    "corrected": ("corrected", "fraction of samples corrected"),
    "neighbors_corrected": ("neighbors_corrected", "fraction of neighbours corrected"),
    "neighbors_delta_true": ("neighbors_delta_true", "Δ true-class confidence, neighbours"),
}

Grads = dict[str, torch.Tensor]


# ----------------------------------------------------------------------------------------- choosing units


# ------------------------------------------------------------------------------------ the batched step


def per_sample_gradients(model: nn.Module, names: Sequence[str], inputs: torch.Tensor,
                         targets: torch.Tensor) -> Grads:
    """The gradient of each sample's own cross-entropy loss, for some parameters.

    The model must already be in eval mode (BatchNorm on running statistics),
    so that samples do not interact.

    Args:
        model: the network.
        names: parameters to differentiate (names in ``model.named_parameters()``).
        inputs: ``[n, ...]`` one input per sample.
        targets: ``[n]`` class indices.

    Returns:
        ``{name: [n, *param.shape]}``, row i = ``∂L(x_i, y_i)/∂θ``.
    """
    params = {name: p.detach() for name, p in model.named_parameters()}
    wanted = {name: params[name] for name in names}
    frozen = {name: p for name, p in params.items() if name not in wanted}
    frozen.update(dict(model.named_buffers()))

    def sample_loss(weights: Grads, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits = functional_call(model, (weights, frozen), (x.unsqueeze(0),))
        return F.cross_entropy(logits, y.unsqueeze(0))

    return vmap(grad(sample_loss), in_dims=(None, 0, 0))(wanted, inputs, targets)


def unit_norms_squared(grads: Grads, index: UnitIndex) -> torch.Tensor:
    """``[n, F]`` float64: squared L2 norm of each unit's (filter's) weight gradient, per sample."""
    return torch.cat([grads[g.param_name].double().flatten(2).pow(2).sum(2) for g in index], dim=1)


def chosen_norms(norms_squared: torch.Tensor, unit_ids: torch.Tensor) -> torch.Tensor:
    """``[n]`` float64: L2 norm of the concatenated gradients of each sample's chosen units ``[n, k]``."""
    return norms_squared.gather(1, unit_ids).sum(1).sqrt()


def unit_step(grads: Grads, index: UnitIndex, unit_ids: torch.Tensor, lr: float,
              scale: torch.Tensor | None = None) -> Grads:
    """Per-sample parameter deltas of one SGD step restricted to each sample's units.

    Args:
        grads: ``{param: [n, *shape]}`` per-sample gradients of (at least) the
            unit-bearing parameters.
        index: the units; each group must be the rows (output channels) of its parameter.
        unit_ids: ``[n, k]`` each sample's chosen units.
        lr: the learning rate.
        scale: ``[n]`` gradient multipliers (the norm matching of random and
            least salient units), or None for 1.

    Returns:
        ``{param: [n, *shape]}`` deltas ``-lr * scale * g`` on the chosen rows, 0
        elsewhere, for the parameters that hold a chosen unit of some sample
        (the others do not move).
    """
    n = unit_ids.shape[0]
    chosen = torch.zeros(n, len(index), dtype=torch.bool, device=unit_ids.device)
    chosen.scatter_(1, unit_ids, True)
    deltas = {}
    for group in index:
        rows = chosen[:, group.offset:group.stop]
        if not bool(rows.any()):
            continue
        g = grads[group.param_name]
        rows = rows.to(g.dtype).reshape(n, group.num_units, *([1] * (g.dim() - 2)))
        deltas[group.param_name] = _sgd_delta(g * rows, lr, scale)
    return deltas


def full_step(grads: Grads, lr: float) -> Grads:
    """Per-sample deltas of one SGD step on every parameter: ``{param: -lr * g}``."""
    return {name: _sgd_delta(g, lr, None) for name, g in grads.items()}


def _sgd_delta(g: torch.Tensor, lr: float, scale: torch.Tensor | None) -> torch.Tensor:
    # The same arithmetic as torch.optim.SGD applied to a rescaled gradient:
    # p.add_(scale * g, alpha=-lr), so the batched step matches a real one to rounding.
    if scale is not None:
        g = g * scale.to(g.dtype).reshape(-1, *([1] * (g.dim() - 1)))
    return g * -lr


def updated_probabilities(model: nn.Module, deltas: Grads, inputs: torch.Tensor) -> torch.Tensor:
    """Class probabilities under each sample's own updated parameters, all samples at once.

    Args:
        model: the network, in eval mode.
        deltas: ``{param: [n, *shape]}`` sample i's update of each moving
            parameter (parameters absent from the dict keep their value).
        inputs: ``[n, m, ...]`` the m inputs each updated model classifies.

    Returns:
        ``[n, m, classes]`` float64 softmax probabilities.
    """
    params = {name: p.detach() for name, p in model.named_parameters()}
    buffers = dict(model.named_buffers())

    def classify(delta: Grads, x: torch.Tensor) -> torch.Tensor:
        moved = {name: params[name] + d for name, d in delta.items()}
        return functional_call(model, ({**params, **moved}, buffers), (x,))

    logits = vmap(classify, in_dims=(0, 0))(deltas, inputs)
    return torch.softmax(logits.double(), dim=-1)


# -------------------------------------------------------------------- the reference: a real step per sample


def stepped_copy(model: nn.Module, inputs: torch.Tensor, target: int, index: UnitIndex | None,
                 unit_ids: Sequence[int] | None, lr: float, grad_scale: float = 1.0) -> nn.Module:
    """A deep copy of ``model`` after one real ``torch.optim.SGD`` step on one sample.

    The slow, obviously correct way (one model copy per sample) that the
    batched evaluation must equal; also the baseline of the speed comparison.

    Args:
        model: the network (not modified).
        inputs: ``[...]`` one input, without batch dim.
        target: its class.
        index: the units of ``unit_ids`` (ignored when ``unit_ids`` is None).
        unit_ids: the units whose whole filter weights move; None = every parameter.
        lr: the learning rate (plain SGD: no momentum, no weight decay).
        grad_scale: multiplies the gradient of the moving weights first.

    Returns:
        The updated copy, in eval mode.
    """
    tuned = copy.deepcopy(model).eval()
    params = dict(tuned.named_parameters())
    for p in params.values():
        p.grad = None
    loss = F.cross_entropy(tuned(inputs.unsqueeze(0)), torch.as_tensor([target], device=inputs.device))
    loss.backward()
    if unit_ids is None:
        moving = list(params.values())
    else:
        moving = []
        for group in index:
            rows = [int(u) - group.offset for u in unit_ids if group.offset <= int(u) < group.stop]
            if rows:
                p = params[group.param_name]
                keep = torch.zeros_like(p.grad)
                keep[rows] = 1
                p.grad.mul_(keep)
                moving.append(p)
    for p in moving:
        p.grad.mul_(grad_scale)
    torch.optim.SGD(moving, lr=lr, momentum=0.0, weight_decay=0.0).step()
    return tuned


# --------------------------------------------------------------------------------------------- the analysis


@dataclass(frozen=True)
class FineTuneResult:
    """What :meth:`FineTune.run` measured.

    Attributes:
        rows: one row per (sample, selection, k): sample_id, target, pred (as
            profiled), selection, k (0 for "all"), grad_norm (L2 norm of the
            chosen filters' weight gradients, of all parameters' for "all"),
            step_norm (of the gradient actually applied: the salient units'
            norm for random and least), true_before, true_after (the sample's
            softmax probability of its class), new_pred, corrected,
            neighbors (how many), neighbors_corrected (fraction of them
            classified correctly by the updated model), neighbors_delta_true
            (their mean change of true-class probability).
        summary: one row per (selection, k): n, and for each metric of
            :data:`METRICS` its mean and ``<metric>_low`` / ``<metric>_high``,
            the bounds of a paired percentile bootstrap interval.
        config: the settings (ks, select, lr, seed, num_neighbors, ...) and
            ``pred_changed``, the samples whose prediction recomputed here
            differs from the run's (near ties on another device; 0 normally).
    """

    rows: pa.Table
    summary: pa.Table
    config: dict = field(default_factory=dict)

    def save(self, directory: str | Path) -> dict[str, Path]:
        """Writes ``finetune.parquet``, ``finetune-summary.parquet`` and ``finetune.png`` into ``directory``."""
        directory = output_folder(directory)
        paths = {"rows": directory / "finetune.parquet", "summary": directory / "finetune-summary.parquet",
                 "figure": directory / "finetune.png"}
        for key in ("rows", "summary"):
            with atomic_path(paths[key]) as tmp:
                pq.write_table(getattr(self, key), tmp)
        self.plot(paths["figure"])
        return paths

    def table(self, metric: str = "corrected") -> pd.DataFrame:
        """One metric as a k x selection frame of means; "all" (k-independent) is repeated on every row."""
        check_choice("metric", metric, METRICS)
        frame = self.summary.to_pandas()
        per_k = frame[frame["selection"] != "all"].pivot(index="k", columns="selection", values=metric)
        columns = [s for s in UNIT_SELECTIONS if s in per_k.columns]
        per_k = per_k[columns] if columns else pd.DataFrame(index=pd.Index(self.config.get("ks", []), name="k"))
        full = frame[frame["selection"] == "all"]
        if len(full):
            per_k["all"] = float(full[metric].iloc[0])
        return per_k

    def plot(self, path: str | Path | None = None):
        """The paper's Figure 6: one panel per metric against k, a line and CI band per selection.

        "all" does not depend on k: it is a horizontal line with its band.

        Returns:
            The matplotlib figure (also written to ``path`` when given).
        """
        import matplotlib

        if path is not None:
            matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        summary = self.summary.to_pandas()
        fig, axes = plt.subplots(1, len(METRICS), figsize=(4.2 * len(METRICS), 3.6), constrained_layout=True)
        for ax, (metric, (_, label)) in zip(axes, METRICS.items()):
            for selection, part in summary.groupby("selection", sort=False):
                if selection == "all":
                    row = part.iloc[0]
                    ax.axhline(row[metric], color="black", linestyle="--", linewidth=1, label="all parameters")
                    ax.axhspan(row[f"{metric}_low"], row[f"{metric}_high"], color="black", alpha=0.08, linewidth=0)
                    continue
                part = part.sort_values("k")
                line, = ax.plot(part["k"], part[metric], marker="o", ms=3, label=selection)
                ax.fill_between(part["k"], part[f"{metric}_low"], part[f"{metric}_high"],
                                color=line.get_color(), alpha=0.2, linewidth=0)
            ax.set_xscale("log")
            ax.set_xlabel("k (filters updated)")
            ax.set_ylabel(label)
        axes[0].legend(title="selection", fontsize=8)
        fig.suptitle(f"one SGD step (lr={self.config.get('lr')}) on each misclassified sample "
                     f"(n={int(summary['n'].max())}, {self.config.get('level', 0.95):.0%} bootstrap CI)")
        if path is not None:
            with atomic_path(Path(path)) as tmp:
                fig.savefig(tmp, format="png", dpi=120)
            plt.close(fig)
        return fig


class FineTune:
    """One-step fine-tuning of each misclassified sample, configured once, run on a run directory.

    ``FineTune(model, ks=(1, 5, 25)).run(run, dataset)`` takes, for every
    misclassified sample of ``run``, one plain SGD step of learning rate
    ``lr`` on that sample's own cross-entropy loss, updating only the whole
    filter weights of its top-k salient, k random or k least salient units
    (the last two with their gradient rescaled to the salient units' L2 norm
    for the same k), or every parameter ("all"), and classifies the sample
    and its nearest saliency neighbours with the updated model. The model
    runs in eval mode throughout (flags restored afterwards) and is never
    modified.

    Args:
        model: the network the run profiled.
        ks: numbers of units to update.
        select: selections among "salient", "random", "least", "all".
        lr: the learning rate of the one step.
        seed: seeds the random units and the bootstrap.
        num_neighbors: saliency-space neighbours per sample (cosine of
            standardized profiles, among the run's misclassified samples).
        chunk_size: samples whose updates are evaluated together (bounds
            memory: a chunk holds its samples' full gradients and deltas).
        num_resamples: bootstrap resamples.
        level: confidence level of the intervals.
        units: the run's units when they are not one of the named schemes.
        check_model: refuse a model whose weights differ from the run's.
        progress: show a progress bar over the chunks.
    """

    def __init__(self, model: nn.Module, *, ks: Sequence[int] = DEFAULT_KS, select: Sequence[str] | str = SELECTIONS,
                 lr: float = 1e-3, seed: int = 0, num_neighbors: int = 10, chunk_size: int = 16,
                 num_resamples: int = 1000, level: float = 0.95, units: UnitsSpec | UnitIndex | None = None,
                 check_model: bool = True, progress: bool = False):
        if isinstance(select, str):
            select = [s.strip() for s in select.split(",") if s.strip()]
        unknown = [s for s in select if s not in SELECTIONS]
        if unknown or not select:
            raise InputError(f"unknown selection(s) {unknown or list(select)}; expected some of {', '.join(SELECTIONS)}")
        self.select = tuple(s for s in SELECTIONS if s in select)
        self.ks = tuple(sorted({int(k) for k in ks}))
        if any(s != "all" for s in self.select) and (not self.ks or self.ks[0] < 1):
            raise InputError(f"ks must be positive integers, got {list(ks)}")
        if not lr > 0:
            raise InputError(f"lr must be positive, got {lr}")
        if chunk_size < 1 or num_neighbors < 1:
            raise InputError(f"chunk_size and num_neighbors must be >= 1, got {chunk_size}, {num_neighbors}")
        self.model = model
        self.lr = float(lr)
        self.seed = int(seed)
        self.num_neighbors = int(num_neighbors)
        self.chunk_size = int(chunk_size)
        self.num_resamples = int(num_resamples)
        self.level = float(level)
        self.units = units
        self.check_model = check_model
        self.progress = progress

    def run(self, run: Run, data: Dataset, samples: str | Sequence[int] | np.ndarray = "misclassified"
            ) -> FineTuneResult:
        """Measures every (sample, selection, k).

        Args:
            run: a finished run of this model on ``data``.
            data: the data set the run profiled, ``data[sample_id] = (input, class)``.
            samples: "misclassified" (the paper), or sample ids.

        Returns:
            The per-sample rows and the bootstrap summary.
        """
        index = self._check_run(run)
        ids, targets, preds = chosen_samples(run, samples, "fine-tune on")
        neighbors = _neighbor_ids(run, ids, self.num_neighbors)
        chosen = self._choices(run, ids, len(index))
        pool, pool_targets = _pool(run, ids, neighbors)
        device = model_device(self.model)
        inputs = run_inputs(data, pool, pool_targets).to(device)
        if inputs.is_floating_point():
            inputs = inputs.to(next(iter(self.model.parameters())).dtype)
        # Row 0 of each sample's evaluation set is the sample itself, rows 1.. its neighbours.
        where = np.searchsorted(pool, np.concatenate([ids[:, None], neighbors], axis=1))
        names = [name for name, _ in self.model.named_parameters()] if "all" in self.select else index.param_names
        columns: dict[str, list[np.ndarray]] = {}
        with eval_mode(self.model):
            with torch.no_grad():
                base = torch.softmax(self.model(inputs).double(), dim=1).cpu().numpy()
            chunks = range(0, len(ids), self.chunk_size)
            for start in tqdm(chunks, desc="finetune", unit="chunk", disable=not self.progress):
                rows = slice(start, start + self.chunk_size)
                for measured in self._chunk(index, names, inputs, pool_targets, base, where[rows],
                                            {s: c[rows] for s, c in chosen.items()}):
                    _append(columns, measured | {"sample_id": ids[rows], "target": targets[rows],
                                                 "pred": preds[rows]})
        rows_table = _rows_table(columns)
        pred_changed = int((base[where[:, 0]].argmax(1) != preds).sum())
        return FineTuneResult(rows=rows_table, summary=self.summarize(rows_table),
                              config=self._config(run, len(ids)) | {"pred_changed": pred_changed})

    def summarize(self, rows: pa.Table) -> pa.Table:
        """Per (selection, k): sample count, metric means and paired bootstrap intervals over samples."""
        frame = rows.to_pandas()
        keys = list(dict.fromkeys(zip(frame["selection"], frame["k"])))
        out: dict[str, list] = {"selection": [s for s, _ in keys], "k": [int(k) for _, k in keys]}
        out["n"] = [int(frame["sample_id"].nunique())] * len(keys)
        for i, (metric, (column, _)) in enumerate(METRICS.items()):
            wide = frame.pivot(index="sample_id", columns=["selection", "k"], values=column)
            values = wide[keys].to_numpy(dtype=np.float64)
            ci = bootstrap_mean_ci(values, self.num_resamples, self.level, seed=self.seed + i)
            out[metric], out[f"{metric}_low"], out[f"{metric}_high"] = ci.mean, ci.low, ci.high
        return pa.table(out)

    def _chunk(self, index: UnitIndex, names: list[str], inputs: torch.Tensor, pool_targets: np.ndarray,
               base: np.ndarray, where: np.ndarray, chosen: dict[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
        """Every (selection, k) of one chunk of samples; ``where`` ``[c, 1 + K]`` indexes ``inputs``."""
        device = inputs.device
        own = torch.as_tensor(where[:, 0], device=device)
        grads = per_sample_gradients(self.model, names, inputs[own], torch.as_tensor(pool_targets[where[:, 0]],
                                                                                     device=device))
        evaluated = inputs[torch.as_tensor(where, device=device)]
        measured = []
        if any(s in chosen for s in UNIT_SELECTIONS):
            norms_squared = unit_norms_squared(grads, index)
        for selection in self.select:
            if selection == "all":
                norm = torch.cat([g.double().flatten(1).pow(2) for g in grads.values()], 1).sum(1).sqrt()
                probs = self._evaluate(full_step(grads, self.lr), evaluated)
                measured.append(_measure(probs, base, where, pool_targets, selection, ALL_K, norm, norm))
                continue
            for k in self.ks:
                unit_ids = torch.as_tensor(chosen[selection][:, :k], device=norms_squared.device)
                norm = chosen_norms(norms_squared, unit_ids)
                scale, step_norm = None, norm
                if selection != "salient":
                    salient = torch.as_tensor(_salient_ids(chosen, selection)[:, :k], device=norms_squared.device)
                    step_norm = chosen_norms(norms_squared, salient)
                    # A zero gradient (dead filters) has no direction to rescale: the step stays 0.
                    scale = torch.where(norm > 0, step_norm / norm.clamp_min(1e-300), torch.zeros_like(norm))
                    step_norm = torch.where(norm > 0, step_norm, torch.zeros_like(norm))
                deltas = unit_step(grads, index, unit_ids.to(device), self.lr, scale)
                probs = self._evaluate(deltas, evaluated)
                measured.append(_measure(probs, base, where, pool_targets, selection, k, norm, step_norm))
        return measured

    def _evaluate(self, deltas: Grads, evaluated: torch.Tensor) -> np.ndarray:
        with torch.no_grad():
            return updated_probabilities(self.model, deltas, evaluated).cpu().numpy()

    def _choices(self, run: Run, ids: np.ndarray, num_units: int) -> dict[str, np.ndarray]:
        """``{selection: [n, max k]}`` unit ids; "salient" is always there (random and least match its norm)."""
        wanted = [s for s in self.select if s != "all"]
        if not wanted:
            return {}
        if self.ks[-1] > num_units:
            raise InputError(f"k={self.ks[-1]} exceeds the run's {num_units} units")
        profiles = run.profiles(only=ids)
        return {s: select_units(profiles, self.ks[-1], s, self.seed, ids)
                for s in dict.fromkeys(["salient", *wanted])}

    def _check_run(self, run: Run) -> UnitIndex:
        index = run_units(run, self.model, self.units, self.check_model)
        not_rows = [g.param_name for g in index if g.partition != "rows"]
        if not_rows:
            raise InputError(f"fine-tuning updates whole filters (output channels), but the units of "
                             f"{', '.join(not_rows[:3])} are not the rows of their parameter "
                             f"(units {index.scheme!r}); profile with units 'filters', 'conv' or 'conv+linear'")
        return index

    def _config(self, run: Run, num_samples: int) -> dict[str, Any]:
        return {"run": str(run.path), "ks": list(self.ks), "select": list(self.select), "lr": self.lr,
                "optimizer": "SGD, no momentum, no weight decay, one step", "seed": self.seed,
                "num_neighbors": self.num_neighbors, "neighbors_among": "misclassified",
                "norm_matching": "random/least gradients scaled to the L2 norm of the salient filters' "
                                 "weight gradients for the same k",
                "num_samples": num_samples, "num_resamples": self.num_resamples, "level": self.level}


def _salient_ids(chosen: dict[str, np.ndarray], selection: str) -> np.ndarray:
    if "salient" not in chosen:
        raise InputError(f"{selection} units need the salient units' gradient norm")
    return chosen["salient"]


def _measure(probs: np.ndarray, base: np.ndarray, where: np.ndarray, pool_targets: np.ndarray, selection: str,
             k: int, grad_norm: torch.Tensor, step_norm: torch.Tensor) -> dict[str, np.ndarray]:
    """Per-sample columns from ``probs`` ``[c, 1 + K, C]`` (row 0 the sample, then its neighbours)."""
    c = len(where)
    targets = pool_targets[where]                                   # [c, 1 + K]
    after = np.take_along_axis(probs, targets[..., None], 2)[..., 0]
    before = base[where, targets]
    correct = probs.argmax(2) == targets
    return {
        "selection": np.full(c, selection), "k": np.full(c, k, np.int64),
        "grad_norm": grad_norm.cpu().numpy(), "step_norm": step_norm.cpu().numpy(),
        "true_before": before[:, 0], "true_after": after[:, 0], "new_pred": probs[:, 0].argmax(1),
        "corrected": correct[:, 0],
        "neighbors": np.full(c, where.shape[1] - 1, np.int64),
        "neighbors_corrected": correct[:, 1:].mean(1),
        "neighbors_delta_true": (after[:, 1:] - before[:, 1:]).mean(1),
    }


_ROW_ORDER = ["sample_id", "target", "pred", "selection", "k", "grad_norm", "step_norm", "true_before",
              "true_after", "new_pred", "corrected", "neighbors", "neighbors_corrected", "neighbors_delta_true"]


def _rows_table(columns: dict[str, list[np.ndarray]]) -> pa.Table:
    """The rows sorted by (selection order, k, sample_id)."""
    frame = pd.DataFrame({name: np.concatenate(parts) for name, parts in columns.items()})[_ROW_ORDER]
    frame["_order"] = frame["selection"].map(SELECTIONS.index)
    frame = frame.sort_values(["_order", "k", "sample_id"], kind="stable").drop(columns="_order")
    return pa.Table.from_pandas(frame, preserve_index=False)


def _append(columns: dict[str, list[np.ndarray]], values: dict[str, np.ndarray]) -> None:
    for name, value in values.items():
        columns.setdefault(name, []).append(np.asarray(value))


def _neighbor_ids(run: Run, ids: np.ndarray, k: int) -> np.ndarray:
    """``[n, k]`` each sample's nearest misclassified samples in saliency space (itself excluded)."""
    table = Neighbors(run, k=k, among="misclassified").nn(ids)
    return table.column("neighbor_id").to_numpy().reshape(len(ids), k)


def _pool(run: Run, ids: np.ndarray, neighbors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The distinct samples to load (sorted ids) and their classes from the run."""
    pool = np.unique(np.concatenate([ids, neighbors.ravel()]))
    table = run.table()
    all_ids = table.column("sample_id").to_numpy()
    order = np.argsort(all_ids)
    targets = table.column("target").to_numpy()[order][np.searchsorted(all_ids[order], pool)]
    return pool, targets.astype(np.int64)


# ----------------------------------------------------------------------------------------------- command line


def add_finetune_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of ``paramsal finetune RUN ...``."""
    parser.add_argument("run", help="run directory made by `paramsal profile`")
    parser.add_argument("--ks", type=positive_int_list, default=list(DEFAULT_KS),
                        help="comma-separated numbers of filters to update (default 1,5,25,75,150,300)")
    parser.add_argument("--select", default=",".join(SELECTIONS),
                        help="comma-separated selections: salient,random,least,all (default all four)")
    parser.add_argument("--lr", type=float, default=1e-3, help="learning rate of the one SGD step (default 0.001)")
    parser.add_argument("--neighbors", type=int, default=10,
                        help="saliency-space neighbours per sample, among the misclassified (default 10)")
    parser.add_argument("--seed", type=int, default=0, help="seeds the random units and the bootstrap")
    parser.add_argument("--chunk-size", type=int, default=16, help="samples whose updates are evaluated together")
    parser.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples (default 1000)")
    add_source_arguments(parser)
    parser.add_argument("--out", help="output directory (default RUN/analyses)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def run_finetune_command(args: argparse.Namespace) -> int:
    """``paramsal finetune``: loads the run's model and data, writes the tables and the figure, prints the summary."""
    run = open_analysis_run(args)
    out = output_folder(args.out or run.path / "analyses")  # before the work, not after
    model, data, _ = load_source(run, args)
    tune = FineTune(model, ks=args.ks, select=args.select, lr=args.lr, seed=args.seed,
                    num_neighbors=args.neighbors, chunk_size=args.chunk_size, num_resamples=args.resamples,
                    check_model=not args.allow_other_weights, progress=not args.quiet)
    started = time.perf_counter()
    result = tune.run(run, data)
    elapsed = time.perf_counter() - started
    paths = result.save(out)
    print(format_summary(result))
    samples = int(result.config["num_samples"])
    configs = result.summary.num_rows
    print(f"\n{samples} samples x {configs} (selection, k) = {samples * configs} one-step updates, each evaluated "
          f"on the sample and {tune.num_neighbors} neighbours, in {elapsed:.1f} s "
          f"({samples * configs / elapsed:.1f} updates/s)")
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


def format_summary(result: FineTuneResult) -> str:
    """The summary as aligned text: one line per (selection, k), each metric as mean [low, high]."""
    frame = result.summary.to_pandas()
    lines = [f"lr={result.config.get('lr')}, n={int(frame['n'].max())} misclassified samples, "
             f"{result.config.get('num_neighbors')} neighbours each, {result.config.get('level', 0.95):.0%} bootstrap CI"]
    return "\n".join(lines + ci_table(frame, METRICS))
