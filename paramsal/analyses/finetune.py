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

* ``g`` = the gradient of **sample n's own loss** (cross-entropy, or the
  ``loss`` given) with respect to the parameters, the model in eval mode
  (BatchNorm on its running statistics, which no step changes);
* the step updates only the whole filter weights (rows of the unit-bearing
  parameters) of the k chosen units: ``θ_u <- θ_u - lr * c * g_u``, plain SGD
  (no momentum, no weight decay). ``c = 1`` for "salient"; for "random" and
  "least", ``c = ||g_salient(k)|| / ||g_S(k)||``, where ``||.||`` is the L2 norm
  of the concatenated weight gradients of all k chosen filters, so that every
  selection takes a step of the same length and only its direction differs
  (paper B.1). "all" steps on every parameter (biases and BatchNorm affine
  parameters included) with ``c = 1``; k does not apply (``k = 0`` in the
  tables);
* a step whose chosen filters have no gradient (dead filters, or random and
  least filters matched to salient ones without gradient) has no direction:
  it is zero, the sample is measured unchanged, and the row says
  ``skipped`` (the summary counts them);
* the updated model classifies sample n and its nearest neighbours in
  saliency space (cosine, standardized profiles, among the misclassified
  samples, :func:`~paramsal.analyses.neighbors.neighbor_ids`).

Nothing is copied per sample: every sample's update is a parameter delta,
and one ``vmap`` of ``functional_call`` over a batch of samples evaluates
each sample's updated model on its own inputs (the sample and its
neighbours). The per-sample gradients come from
:func:`paramsal.engine.functional.per_sample_gradients`; the oracle is
:func:`paramsal.reference.stepped_copy`, a real ``torch.optim.SGD`` step on
a deep copy.

A run of task ``"answer"`` (a chat LLM's wrong answers, units ``"neurons"``
or ``"heads"``) is fine-tuned as :mod:`.answer_finetune` describes.

```python
tune = FineTune(ks=(1, 5, 25), select=("salient", "random", "least", "all"), lr=1e-3)
result = tune.evaluate(run)            # FineTuneResult: table, summary, plot(), save()
result.save(run.path / "analyses")     # finetune-lr0.001.parquet, -summary.parquet, .json, .png
```
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, vmap

from paramsal._typing import MapDataset
from paramsal.analyses.answer_finetune import AnswerFineTuneResult, finetune_answers
from paramsal.analyses.base import Prepared, result_config
from paramsal.analyses.curves import CurvesAnalysis, Metric, OneStepResult, append_columns
from paramsal.analyses.neighbors import neighbor_ids
from paramsal.analyses.sources import Samples, recorded_targets
from paramsal.engine.functional import LossFn, per_sample_gradients
from paramsal.engine.profile import eval_mode
from paramsal.engine.units import UnitIndex, UnitsSpec
from paramsal.errors import InputError, check_integer
from paramsal.options import ALL_K, FINETUNE_KS, FINETUNE_SELECTIONS
from paramsal.rundir.run import Run

__all__ = ["METRICS", "FineTune", "FineTuneResult", "chosen_norms", "full_step", "unit_norms_squared", "unit_step",
           "updated_probabilities"]

#: The summary's metrics (see :class:`~paramsal.analyses.curves.Metric`).
METRICS = {
    "corrected": Metric("corrected", "% samples corrected", share=True, heading="% corrected"),
    "neighbors_corrected": Metric("neighbors_corrected", "% neighbours corrected", share=True,
                                  heading="% neighbours corrected"),
    "neighbors_delta_true": Metric("neighbors_delta_true", "Δ true-class confidence, neighbours",
                                   heading="neighbours Δ true"),
}

Grads = dict[str, torch.Tensor]

_COLUMNS = ["sample_id", "target", "pred", "selection", "k", "grad_norm", "step_norm", "skipped", "true_before",
            "true_after", "new_pred", "corrected", "neighbors", "neighbors_corrected", "neighbors_delta_true"]


# ------------------------------------------------------------------------------------ the batched step


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


# --------------------------------------------------------------------------------------------- the analysis


class FineTuneResult(OneStepResult):
    """What :class:`~paramsal.analyses.finetune.FineTune` measured.

    ``table`` columns: sample_id, target, pred (as profiled), selection, k
    (0 for "all"), grad_norm (L2 norm of the chosen filters' weight
    gradients, of all parameters' for "all"), step_norm (of the gradient
    actually applied: the salient units' norm for random and least),
    skipped (the step was zero: the chosen filters, or the salient ones
    whose norm random and least match, have no gradient; the sample is then
    measured unchanged), true_before, true_after (the sample's softmax
    probability of its class), new_pred, corrected, neighbors (how many),
    neighbors_corrected (share of them classified correctly after the step),
    neighbors_delta_true (their mean change of true-class probability).
    ``summary``: selection, k, n, skipped (how many of the n steps), and the
    bootstrap columns of corrected, neighbors_corrected (fractions) and
    neighbors_delta_true.
    """

    kind: ClassVar[str] = "finetune"
    panels: ClassVar[int] = 3
    metrics: ClassVar[Mapping[str, Metric]] = METRICS
    x_label: ClassVar[str] = "k (filters updated)"


class FineTune(CurvesAnalysis):
    """One-step fine-tuning of each misclassified sample, configured once, evaluated on a run.

    ``FineTune(ks=(1, 5, 25)).evaluate(run)`` takes, for every misclassified
    sample of ``run``, one plain SGD step of learning rate ``lr`` on that
    sample's own loss, updating only the whole filter weights of its top-k
    salient, k random or k least salient units (the last two with their
    gradient rescaled to the salient units' L2 norm for the same k), or
    every parameter ("all"), and classifies the sample and its nearest
    saliency neighbours with the updated model. The model runs in eval mode
    throughout (flags restored afterwards) and is never modified. On a run of
    task "answer" the step moves every weight of the chosen neurons or heads,
    and the reference answer's log-probability and the greedy answers are
    measured instead (:class:`~paramsal.analyses.answer_finetune.AnswerFineTuneResult`; the model's weights are
    moved for each step and restored exactly).

    Args:
        model: the network the run profiled (None rebuilds it from the run).
        ks: numbers of units to update; those above the run's unit count are
            left out, with one note.
        select: selections among "salient", "random", "least", "all".
        lr: the learning rate of the one step.
        neighbors: saliency-space neighbours per sample (cosine of
            standardized profiles, among the run's misclassified samples).
        ranking: how units are ranked: "zscore" (the paper) or "pot" (tail scores, :meth:`Run.scores`).
        reference: the samples ranked against: "all" (the paper), "correct", "class" or another run.
        seed: seeds the random units and the bootstrap.
        batch_size: samples whose updates are evaluated together (bounds
            memory: a batch holds its samples' full gradients and deltas).
        num_resamples: bootstrap resamples.
        level: confidence level of the intervals.
        units: the run's units when they are not one of the named schemes.
        loss: ``loss(outputs [N, ...], targets [N]) -> [N]``, each sample's
            own loss (default cross-entropy); the step descends it.
        **common: :class:`~paramsal.analyses.base.Analysis`'s keywords
            (allow_partial, allow_other_weights, allow_other_data,
            trust_run_specs, device, progress).
    """

    purpose = "fine-tune on"
    selection_choices = FINETUNE_SELECTIONS
    default_ks = FINETUNE_KS
    tasks = ("classification", "answer")

    def __init__(self, model: nn.Module | None = None, *, ks: Sequence[int] = FINETUNE_KS,
                 select: Sequence[str] | str = FINETUNE_SELECTIONS, lr: float = 1e-3, neighbors: int = 10,
                 ranking: str = "zscore", seed: int = 0, batch_size: int = 16, num_resamples: int = 1000,
                 level: float = 0.95, units: UnitsSpec | UnitIndex | None = None, loss: LossFn | None = None,
                 reference: str | os.PathLike | Run = "all", **common: Any):
        super().__init__(model, ks=ks, select=select, ranking=ranking, seed=seed, batch_size=batch_size,
                         num_resamples=num_resamples, level=level, units=units, reference=reference, **common)
        if not lr > 0:
            raise InputError(f"lr must be positive, got {lr}")
        self.lr = float(lr)
        self.neighbors = check_integer("neighbors", neighbors)
        self.loss = loss

    def evaluate(self, run: Run | str | os.PathLike, data: MapDataset | None = None,
                 samples: Samples = None) -> FineTuneResult | AnswerFineTuneResult:
        """Measures every (sample, selection, k).

        Args:
            run: a finished run of this model (or its directory).
            data: the data set the run profiled, ``data[sample_id] = (input, class)``;
                None rebuilds it from the run.
            samples: "misclassified" (the default, the paper), "correct", or sample ids.

        Returns:
            The per-sample rows and the bootstrap summary (an
            :class:`~paramsal.analyses.answer_finetune.AnswerFineTuneResult` for a run of task "answer").
        """
        prepared = self.prepare(run, data, samples, units=self.units)
        if prepared.task == "answer":
            if self.loss is not None:
                raise InputError("a run of task 'answer' is fine-tuned on its own loss (the reference answer's); "
                                 "leave loss unset")
            neighbors = self._neighbors(prepared.run, prepared.ids)
            return finetune_answers(self, prepared, samples, *self._choices(prepared), neighbors, self.lr)
        index, model, ids = prepared.index, prepared.model, prepared.ids
        _check_rows(index)
        ks, chosen = self._choices(prepared)
        neighbors = self._neighbors(prepared.run, ids)
        names = [name for name, _ in model.named_parameters()] if "all" in self.select else index.param_names
        columns: dict[str, list[np.ndarray]] = {}
        pred_changed = 0
        with eval_mode(model):
            for rows in self._batches(len(ids), "finetune"):
                # Row 0 of each sample's evaluation set is the sample itself, rows 1.. its neighbours.
                pool, where = np.unique(np.concatenate([ids[rows, None], neighbors[rows]], 1), return_inverse=True)
                where = where.reshape(len(ids[rows]), -1)
                pool_targets = recorded_targets(prepared.run, pool).astype(np.int64)
                # The batch's samples and neighbours, loaded (and their labels checked) as the prepared samples are.
                inputs = dataclasses.replace(prepared, ids=pool, targets=pool_targets, preds=pool_targets).inputs()
                with torch.no_grad():
                    base = torch.softmax(model(inputs).double(), dim=1).cpu().numpy()
                pred_changed += int((base[where[:, 0]].argmax(1) != prepared.preds[rows]).sum())
                for measured in self._batch(model, index, names, inputs, pool_targets, base, where,
                                            {s: c[rows] for s, c in chosen.items()}, ks):
                    append_columns(columns, measured | {"sample_id": ids[rows], "target": prepared.targets[rows],
                                                 "pred": prepared.preds[rows]})
        table = self._rows(columns, FINETUNE_SELECTIONS, _COLUMNS)
        keys = [(s, k) for s in self.select for k in ((ALL_K,) if s == "all" else ks)]
        summary = self._summarize(table, METRICS, keys, counts=("skipped",))
        config = result_config(
            prepared.run, self, **self._facts(prepared, samples, ks), pred_changed=pred_changed,
            loss=getattr(self.loss, "__name__", repr(self.loss)) if self.loss is not None else "cross_entropy",
            optimizer="SGD, no momentum, no weight decay, one step", neighbors_among="misclassified",
            norm_matching="random/least gradients scaled to the L2 norm of the salient filters' weight gradients "
                          "for the same k", name_parts=[f"lr{self.lr:g}", *self._ranking_parts()])
        return FineTuneResult(table, summary, config)

    def _choices(self, prepared: Prepared) -> tuple[tuple[int, ...], dict[str, np.ndarray]]:
        """The usable ks and ``{selection: [n, k]}`` each sample's units (salient always, for the norm matching)."""
        wanted = [s for s in self.select if s != "all"]
        if not wanted:
            return (), {}
        ks = self.usable_ks(self.ks, len(prepared.index))
        return ks, self._chosen_units(prepared, ks[-1], ["salient", *wanted])

    def _batch(self, model: nn.Module, index: UnitIndex, names: list[str], inputs: torch.Tensor,
               pool_targets: np.ndarray, base: np.ndarray, where: np.ndarray, chosen: dict[str, np.ndarray],
               ks: Sequence[int]) -> list[dict[str, np.ndarray]]:
        """Every (selection, k) of one batch of samples; ``where`` ``[c, 1 + K]`` indexes ``inputs``."""
        device = inputs.device
        own = torch.as_tensor(where[:, 0], device=device)
        targets = torch.as_tensor(pool_targets[where[:, 0]], device=device)
        grads = per_sample_gradients(model, names, inputs[own], targets, loss=self.loss)
        evaluated = inputs[torch.as_tensor(where, device=device)]
        measured = []
        norms_squared = unit_norms_squared(grads, index) if chosen else torch.zeros(0)
        for selection in self.select:
            if selection == "all":
                norm = torch.cat([g.double().flatten(1).pow(2) for g in grads.values()], 1).sum(1).sqrt()
                probs = _probabilities(model, full_step(grads, self.lr), evaluated)
                measured.append(_measure(probs, base, where, pool_targets, selection, ALL_K, norm, norm))
                continue
            for k in ks:
                unit_ids = torch.as_tensor(chosen[selection][:, :k], device=norms_squared.device)
                norm = chosen_norms(norms_squared, unit_ids)
                scale, step_norm = None, norm
                if selection != "salient":
                    salient = torch.as_tensor(chosen["salient"][:, :k], device=norms_squared.device)
                    step_norm = chosen_norms(norms_squared, salient)
                    # A zero gradient (dead filters) has no direction to rescale: the step stays 0.
                    scale = torch.where(norm > 0, step_norm / norm.clamp_min(1e-300), torch.zeros_like(norm))
                    step_norm = torch.where(norm > 0, step_norm, torch.zeros_like(norm))
                deltas = unit_step(grads, index, unit_ids.to(device), self.lr, scale)
                probs = _probabilities(model, deltas, evaluated)
                measured.append(_measure(probs, base, where, pool_targets, selection, k, norm, step_norm))
        return measured

    def _neighbors(self, run: Run, ids: np.ndarray) -> np.ndarray:
        """``[n, neighbors]`` each sample's nearest misclassified samples in saliency space (itself excluded)."""
        pool = len(run.sample_ids("misclassified"))
        if self.neighbors >= pool:
            raise InputError(f"neighbors={self.neighbors} is too many: the run {run.path} has {pool} misclassified "
                             f"samples, so a sample has at most {pool - 1} neighbours among them; choose "
                             f"neighbors <= {pool - 1} (--neighbors)")
        return neighbor_ids(run, ids, self.neighbors, among="misclassified")


def _probabilities(model: nn.Module, deltas: Grads, evaluated: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return updated_probabilities(model, deltas, evaluated).cpu().numpy()


def _check_rows(index: UnitIndex) -> None:
    not_rows = [g.param_name for g in index if g.partition != "rows"]
    if not_rows:
        raise InputError(f"fine-tuning updates whole filters (output channels), but the units of "
                         f"{', '.join(not_rows[:3])} are not the rows of their parameter "
                         f"(units {index.scheme!r}); profile with units 'filters', 'conv' or 'conv+linear'")


def _measure(probs: np.ndarray, base: np.ndarray, where: np.ndarray, pool_targets: np.ndarray, selection: str,
             k: int, grad_norm: torch.Tensor, step_norm: torch.Tensor) -> dict[str, np.ndarray]:
    """Per-sample columns from ``probs`` ``[c, 1 + K, C]`` (row 0 the sample, then its neighbours)."""
    c = len(where)
    targets = pool_targets[where]                                   # [c, 1 + K]
    after = np.take_along_axis(probs, targets[..., None], 2)[..., 0]
    before = base[where, targets]
    correct = probs.argmax(2) == targets
    step_norms = step_norm.cpu().numpy()
    return {
        "selection": np.full(c, selection, dtype=object), "k": np.full(c, k, np.int64),
        "grad_norm": grad_norm.cpu().numpy(), "step_norm": step_norms, "skipped": step_norms == 0,
        "true_before": before[:, 0], "true_after": after[:, 0], "new_pred": probs[:, 0].argmax(1),
        "corrected": correct[:, 0],
        "neighbors": np.full(c, where.shape[1] - 1, np.int64),
        "neighbors_corrected": correct[:, 1:].mean(1),
        "neighbors_delta_true": (after[:, 1:] - before[:, 1:]).mean(1),
    }
