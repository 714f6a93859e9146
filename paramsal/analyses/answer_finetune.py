"""One-step fine-tuning of a run of task "answer": what :class:`~paramsal.analyses.finetune.FineTune` does with a
chat LLM's wrong answers.

For wrong answer n, selection S and k, one plain SGD step descends n's own
loss (the reference answer's mean token cross-entropy) and moves every weight
of the k chosen units: a neuron's rows of ``gate_proj`` and ``up_proj`` and
its column of ``down_proj``, a head's rows of ``q_proj`` and its columns of
``o_proj`` (:func:`~paramsal.engine.units.unit_owners`). Random and least
salient steps are rescaled to the salient units' gradient norm for the same
k; "all" steps on every parameter. After the step, the reference's
log-probability and the greedy answers of n and of its nearest wrong answers
in saliency space are measured. One sample at a time, the model's weights
are moved in place and restored exactly afterwards; the oracle is
:func:`~paramsal.reference.stepped_copy`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import ClassVar

import numpy as np
import torch
from torch import nn

from paramsal.analyses.base import Prepared, result_config
from paramsal.analyses.curves import CurvesAnalysis, Metric, OneStepResult, append_columns
from paramsal.analyses.sources import Samples, recorded_targets
from paramsal.engine.profile import eval_mode
from paramsal.engine.tasks import task_loss
from paramsal.engine.units import UnitIndex, unit_owners
from paramsal.jobs.bulk import answer_judge
from paramsal.options import ALL_K, FINETUNE_SELECTIONS
from paramsal.zoo.qa import answer_scores

__all__ = ["ANSWER_METRICS", "AnswerFineTuneResult", "finetune_answers"]

Grads = dict[str, torch.Tensor]

#: The summary's metrics of an answer run.
ANSWER_METRICS = {
    "corrected": Metric("corrected", "% answers corrected", share=True, heading="% corrected"),
    "delta_logprob": Metric("delta_logprob", "Δ reference log-probability", heading="Δ log-prob"),
    "neighbors_corrected": Metric("neighbors_corrected", "% neighbours corrected", share=True,
                                  heading="% neighbours corrected"),
    "neighbors_delta_logprob": Metric("neighbors_delta_logprob", "Δ reference log-probability, neighbours",
                                      heading="neighbours Δ log-prob"),
}

_ANSWER_COLUMNS = ["sample_id", "selection", "k", "grad_norm", "step_norm", "skipped", "logprob_before",
                   "logprob_after", "delta_logprob", "answer_after", "corrected", "neighbors", "neighbors_corrected",
                   "neighbors_delta_logprob"]


class AnswerFineTuneResult(OneStepResult):
    """What :class:`~paramsal.analyses.finetune.FineTune` measured on a run of task "answer".

    ``table`` columns: sample_id, selection, k (0 for "all"), grad_norm,
    step_norm, skipped (as for :class:`FineTuneResult`, over every weight of
    the chosen units), logprob_before, logprob_after (the reference answer's
    log-probability given prompt and prefix), delta_logprob, answer_after
    (the greedy answer after the step), corrected, neighbors,
    neighbors_corrected (share of them answering right after the step),
    neighbors_delta_logprob (their mean change of reference log-probability).
    ``summary``: selection, k, n, skipped and the bootstrap columns of the
    four metrics.
    """

    kind: ClassVar[str] = "answer-finetune"
    title: ClassVar[str] = "one-step fine-tuning (answers)"
    panels: ClassVar[int] = 4
    metrics: ClassVar[Mapping[str, Metric]] = ANSWER_METRICS
    x_label: ClassVar[str] = "k (units updated)"
    per: ClassVar[str] = "wrong answer"


def finetune_answers(tune: CurvesAnalysis, prepared: Prepared, samples: Samples, ks: Sequence[int],
                     chosen: dict[str, np.ndarray], neighbors: np.ndarray, lr: float) -> AnswerFineTuneResult:
    """Every (wrong answer, selection, k) of an answer run, one sample at a time (see the module docstring).

    Args:
        tune: the :class:`~paramsal.analyses.finetune.FineTune` (its selections, batches, seed and bootstrap).
        prepared: the run, model, data and chosen samples.
        samples: what the caller asked for (recorded).
        ks: the usable ks; chosen: ``{selection: [n, k]}`` each sample's units (salient always).
        neighbors: ``[n, K]`` each sample's nearest wrong answers in saliency space.
        lr: the learning rate.
    """
    index, model, ids = prepared.index, prepared.model, prepared.ids
    judge = answer_judge(model, prepared.data)
    owners = _unit_owners(model, index)
    columns: dict[str, list[np.ndarray]] = {}
    with eval_mode(model):
        for rows in tune._batches(len(ids), "finetune"):
            for n in range(rows.start, rows.stop):
                pool = np.concatenate([ids[n:n + 1], neighbors[n]])
                inputs, labels = dataclasses.replace(prepared, ids=pool,
                                                     targets=recorded_targets(prepared.run, pool)).batch()
                steps = _answer_steps(tune.select, model, index, owners, inputs[:1], labels[:1],
                                      {s: c[n] for s, c in chosen.items()}, ks)
                with torch.no_grad():
                    base = answer_scores(model(inputs), labels)[0]
                for selection, k, deltas, grad_norm, step_norm in steps:
                    with _moved(model, deltas, lr), torch.no_grad():
                        after = answer_scores(model(inputs), labels)[0]
                        said = judge(pool, np.zeros(len(pool)), None)
                    append_columns(columns, _answer_measures(ids[n], selection, k, grad_norm, step_norm,
                                                             base, after, said))
    table = tune._rows(columns, FINETUNE_SELECTIONS, _ANSWER_COLUMNS)
    keys = [(s, k) for s in tune.select for k in ((ALL_K,) if s == "all" else ks)]
    summary = tune._summarize(table, ANSWER_METRICS, keys, counts=("skipped",))
    config = result_config(
        prepared.run, tune, **tune._facts(prepared, samples, ks), loss="the reference answer's mean token "
        "cross-entropy", optimizer="SGD, no momentum, no weight decay, one step", neighbors_among="misclassified",
        norm_matching="random/least gradients scaled to the L2 norm of the salient units' weight gradients for "
                      "the same k", name_parts=[f"lr{lr:g}", *tune._ranking_parts()])
    return AnswerFineTuneResult(table, summary, config)


def _answer_steps(selections: Sequence[str], model: nn.Module, index: UnitIndex,
                  owners: dict[str, tuple[int, int, torch.Tensor]], inputs: torch.Tensor, labels: torch.Tensor,
                  chosen: dict[str, np.ndarray], ks: Sequence[int]) -> list[tuple[str, int, Grads, float, float]]:
    """``(selection, k, gradients to descend, grad_norm, step_norm)`` of one sample's every step: the gradient
    of its answer loss masked to the chosen units' weights (rescaled for random and least), or whole."""
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    names = list(params) if "all" in selections else list(owners)
    loss = task_loss("answer")(model(inputs), labels).sum()
    grads = dict(zip(names, torch.autograd.grad(loss, [params[name] for name in names], allow_unused=True)))
    grads = {name: g if g is not None else torch.zeros_like(params[name]) for name, g in grads.items()}
    squared = torch.zeros(len(index), dtype=torch.float64)
    for name, (offset, _, owner) in owners.items():
        kept = owner >= 0
        squared.index_add_(0, owner[kept].cpu() + offset, grads[name][kept].double().pow(2).cpu())
    steps = []
    for selection in selections:
        if selection == "all":
            norm = float(torch.cat([g.double().flatten().pow(2) for g in grads.values()]).sum().sqrt())
            steps.append((selection, ALL_K, grads, norm, norm))
            continue
        for k in ks:
            units = torch.as_tensor(chosen[selection][:k])
            norm = float(squared[units].sum().sqrt())
            # random and least step as far as salient would; a zero gradient has no direction: no step
            step_norm = float(squared[torch.as_tensor(chosen["salient"][:k])].sum().sqrt()) if norm > 0 else 0.0
            scale = step_norm / norm if norm > 0 else 0.0
            moving = {}
            for name, (offset, stop, owner) in owners.items():
                local = units[(units >= offset) & (units < stop)] - offset
                mask = torch.isin(owner, local.to(owner.device))
                if bool(mask.any()):
                    moving[name] = grads[name] * mask.to(grads[name].dtype) * scale
            steps.append((selection, k, moving, norm, step_norm))
    return steps


def _unit_owners(model: nn.Module, index: UnitIndex) -> dict[str, tuple[int, int, torch.Tensor]]:
    """``{param: (offset, stop, owners)}``: the units of each unit-bearing parameter's group, and the unit (within
    its group) of each of its elements (:func:`~paramsal.engine.units.unit_owners`), on the parameter's device."""
    return {part.param_name: (group.offset, group.stop,
                              unit_owners(part).to(model.get_parameter(part.param_name).device))
            for group in index for part in group.parts or (group,)}


@contextmanager
def _moved(model: nn.Module, gradients: Grads, lr: float) -> Iterator[None]:
    """The model with one SGD step ``p -= lr * g`` on the given parameters inside the block (the arithmetic of
    ``torch.optim.SGD``); their values are restored exactly on leaving."""
    params = dict(model.named_parameters())
    saved = {name: params[name].detach().clone() for name in gradients}
    try:
        with torch.no_grad():
            for name, g in gradients.items():
                params[name].add_(g, alpha=-lr)
        yield
    finally:
        with torch.no_grad():
            for name, value in saved.items():
                params[name].copy_(value)


def _answer_measures(sample: int, selection: str, k: int, grad_norm: float, step_norm: float, base: np.ndarray,
                     after: np.ndarray, said: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """One row from the reference log-probabilities ``base``, ``after`` ``[1 + K]`` (the sample, then its
    neighbours) and the judged greedy answers after the step."""
    correct = np.asarray(said["correct"], bool)
    return {
        "sample_id": np.array([sample]), "selection": np.array([selection], dtype=object), "k": np.array([k]),
        "grad_norm": np.array([grad_norm]), "step_norm": np.array([step_norm]), "skipped": np.array([step_norm == 0]),
        "logprob_before": base[:1], "logprob_after": after[:1], "delta_logprob": after[:1] - base[:1],
        "answer_after": np.asarray(said["answer"], dtype=object)[:1], "corrected": correct[:1],
        "neighbors": np.array([len(base) - 1]), "neighbors_corrected": np.array([correct[1:].mean()]),
        "neighbors_delta_logprob": np.array([(after[1:] - base[1:]).mean()]),
    }
