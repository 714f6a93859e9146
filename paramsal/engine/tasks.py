"""Per-sample losses of the tasks models are trained for: one loss per sample, whatever its outputs' shape.

A classifier's sample has one label (``[N, C]`` logits, ``[N]`` labels: the
paper's cross-entropy). A sequence model's sample has a label per position
(``[N, T, C]`` logits, ``[N, T]`` labels), and positions labelled
:data:`IGNORE_INDEX` carry none: padding, and for a masked language model
every position but the masked ones. Its loss is the mean cross-entropy over
its labelled positions, the loss the paper's BERT experiment profiles; a
sample with no labelled position has loss 0 and a zero profile.

The sample table of a run describes, for a sequence task, each sample's first
labelled position (for one masked token per sentence, that token).

``"answer"`` is a causal LM's loss on a reference answer after a prompt (the
``qa:`` data of :mod:`paramsal.zoo.qa`, which labels only the answer's
tokens); it differs from ``"causal-lm"`` in what makes a sample correct: the
model's whole greedy answer, judged against the reference by the data set
(:meth:`paramsal.zoo.qa.QADataset.judge`), rather than its first token.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from paramsal.engine.functional import IGNORE_INDEX, LossFn, cross_entropy_per_sample
from paramsal.errors import InputError, check_choice
from paramsal.options import NEXT_TOKEN_TASKS, TASKS

__all__ = ["IGNORE_INDEX", "NEXT_TOKEN_TASKS", "check_sequence_labels", "first_labelled", "is_sequence_task",
           "next_token_cross_entropy", "sample_labels", "task_loss", "token_cross_entropy"]


def token_cross_entropy(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``[N, T, C], [N, T] -> [N]``: each sample's mean cross-entropy over its labelled positions."""
    per_token = F.cross_entropy(outputs.flatten(0, -2), targets.flatten(), reduction="none",
                                ignore_index=IGNORE_INDEX).reshape(targets.shape)
    labelled = (targets != IGNORE_INDEX).flatten(1).sum(1)
    return per_token.flatten(1).sum(1) / labelled.clamp_min(1)


def next_token_cross_entropy(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """A causal language model's loss: position t's logits predict label t + 1 (``targets`` are the input ids, or
    ids with :data:`IGNORE_INDEX` at the positions not to predict)."""
    return token_cross_entropy(outputs[:, :-1], targets[:, 1:])


_LOSSES: dict[str, LossFn] = {"classification": cross_entropy_per_sample,
                              "token-classification": token_cross_entropy,
                              "masked-lm": token_cross_entropy,
                              "causal-lm": next_token_cross_entropy,
                              "answer": next_token_cross_entropy}


def task_loss(task: str) -> LossFn:
    """The per-sample loss of a task (:data:`~paramsal.options.TASKS`)."""
    check_choice("task", task, TASKS)
    return _LOSSES[task]


def is_sequence_task(task: str) -> bool:
    """Whether a task labels positions (targets ``[N, T]``) rather than samples."""
    return task != "classification"


def first_labelled(outputs: torch.Tensor, targets: torch.Tensor, task: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logits [N, C], labels [N])`` at each sample's first labelled position: what a run's sample table
    records of a sequence task (a sample with none gets position 0 and label -1, never "correct")."""
    if not is_sequence_task(task):
        return outputs, targets
    if outputs.dim() != 3 or targets.dim() != 2 or outputs.shape[:2] != targets.shape:
        raise InputError(f"task {task!r} needs logits [N, T, C] and labels [N, T], got {tuple(outputs.shape)} and "
                         f"{tuple(targets.shape)}")
    position, labels = _first_positions(targets, task)
    rows = torch.arange(len(position), device=outputs.device)
    return (outputs[:, :-1] if task in NEXT_TOKEN_TASKS else outputs)[rows, position], labels


def sample_labels(targets: torch.Tensor, task: str) -> torch.Tensor:
    """``[N]`` the label the sample table records: the class index, or a sequence's first label (-1 for none)."""
    return _first_positions(targets, task)[1] if is_sequence_task(task) else targets


def _first_positions(targets: torch.Tensor, task: str) -> tuple[torch.Tensor, torch.Tensor]:
    if task in NEXT_TOKEN_TASKS:
        targets = targets[:, 1:]
    labelled = targets != IGNORE_INDEX
    position = labelled.to(torch.int8).argmax(1)
    rows = torch.arange(len(targets), device=targets.device)
    return position, torch.where(labelled.any(1), targets[rows, position], torch.full_like(position, -1))


def check_sequence_labels(targets: torch.Tensor, classes: int) -> None:
    """Labels ``[N, T]`` of a sequence task must be class indices or :data:`IGNORE_INDEX`."""
    bad = ((targets != IGNORE_INDEX) & ((targets < 0) | (targets >= classes))).nonzero()
    if len(bad):
        sample, position = (int(v) for v in bad[0])
        raise InputError(f"label {int(targets[sample, position])} of sample {sample} at position {position} is "
                         f"outside the model's {classes} classes (0..{classes - 1}, or {IGNORE_INDEX} for no label); "
                         f"{len(bad)} label(s) out of range")
