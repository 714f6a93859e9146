"""Pruning and perturbation curves (the paper's section 3.1, Figure 3, and appendix A.5).

If a sample's most salient units are really the ones responsible for its
mistake, turning them off should lower the confidence in the wrong class,
raise the true class's, and correct some mistakes, more than turning off k
random units, which in turn should do more than turning off the k least
salient ones. :class:`Pruning` measures this for every misclassified sample
of a run and every k of a grid:

* ``mode="zero"`` turns the units off: the filter's output channel and, where
  a BatchNorm follows, the BatchNorm's output channel are set to 0, so the
  next layer receives a zero channel (see :mod:`.unit_editing` for exactly
  what that is equivalent to zeroing, and :func:`paramsal.reference.pruned_copy`
  for the copy it is checked against);
* ``mode="noise"`` adds Gaussian noise of standard deviation ``noise_std``
  (default 0.001) to the chosen filters' weights instead. The noise a unit
  of a sample gets is drawn once, from ``(seed, sample, unit)``
  (:mod:`.noise`): every
  selection and k that perturbs that unit of that sample adds the same
  noise, so at k = all units the three selections perturb alike.

Each (selection, k) is one batched forward pass per batch of samples, every
sample with its own units, and never a copy of the model.

A run of task ``"answer"`` (a chat LLM's answers to ``qa:`` questions, units
``"neurons"`` or ``"heads"``) is pruned the same way, its wrong answers by
default, each sample's units switched off by
:class:`~paramsal.analyses.compound_editing.CompoundEditor` (checked against
:func:`paramsal.reference.zeroed_copy`). What is measured
(:class:`AnswerPruningResult`) is the reference answer's log-probability
given prompt and prefix (teacher-forced), its mean token probability, and
whether the model's greedy answer, decoded again with the units off, is now
right ("% corrected", judged as the run judged it).

```python
result = Pruning(ks=(1, 5, 10)).evaluate(run)       # PruningResult: table, summary, plot(), save()
result.metric_table("pct_corrected")                # k x selection
```
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from paramsal._typing import MapDataset
from paramsal.analyses.base import Prepared, result_config
from paramsal.analyses.compound_editing import CompoundEditor
from paramsal.analyses.curves import CurvesAnalysis, CurvesResult, Metric, append_columns
from paramsal.analyses.noise import gaussian_deltas
from paramsal.analyses.sources import Samples
from paramsal.analyses.unit_editing import UnitEditor, unit_mask
from paramsal.engine.profile import eval_mode
from paramsal.engine.units import UnitIndex, UnitsSpec
from paramsal.errors import InputError, check_choice
from paramsal.jobs.bulk import answer_judge
from paramsal.options import PRUNING_KS, PRUNING_MODES, UNIT_SELECTIONS
from paramsal.rundir.run import Run
from paramsal.zoo.qa import answer_scores

__all__ = ["ANSWER_METRICS", "METRICS", "AnswerPruningResult", "PerturbationResult", "Pruning", "PruningResult",
           "noise_seed"]

#: The summary's metrics (see :class:`~paramsal.analyses.curves.Metric`).
METRICS = {
    "delta_incorrect": Metric("delta_incorrect", "Δ incorrect-class confidence"),
    "delta_true": Metric("delta_true", "Δ true-class confidence"),
    "pct_corrected": Metric("corrected", "% samples corrected", scale=100.0, share=True, heading="% corrected"),
}

_COLUMNS = ["sample_id", "target", "pred", "selection", "k", "incorrect_before", "incorrect_after", "true_before",
            "true_after", "delta_incorrect", "delta_true", "new_pred", "corrected"]

#: The summary's metrics of an answer run.
ANSWER_METRICS = {
    "delta_logprob": Metric("delta_logprob", "Δ reference log-probability"),
    "delta_token_prob": Metric("delta_token_prob", "Δ mean token probability"),
    "pct_corrected": Metric("corrected", "% answers corrected", scale=100.0, share=True, heading="% corrected"),
}

_ANSWER_COLUMNS = ["sample_id", "selection", "k", "logprob_before", "logprob_after", "delta_logprob",
                   "token_prob_before", "token_prob_after", "delta_token_prob", "answer_after", "corrected"]


class PruningResult(CurvesResult):
    """What :class:`~paramsal.analyses.pruning.Pruning` measured with ``mode="zero"``.

    ``table`` columns: sample_id, target, pred (the incorrect class, as
    profiled), selection, k, incorrect_before, incorrect_after (softmax
    probability of ``pred``), true_before, true_after (of ``target``),
    delta_incorrect, delta_true, new_pred, corrected (``new_pred == target``).
    ``summary``: selection, k, n and the bootstrap columns of
    delta_incorrect, delta_true, pct_corrected (percent).
    """

    kind: ClassVar[str] = "pruning"
    title: ClassVar[str] = "pruning"
    panels: ClassVar[int] = 3
    metrics: ClassVar[Mapping[str, Metric]] = METRICS
    x_label: ClassVar[str] = "k (units turned off)"


class PerturbationResult(PruningResult):
    """What :class:`~paramsal.analyses.pruning.Pruning` measured with ``mode="noise"`` (the same columns)."""

    kind: ClassVar[str] = "perturbation"
    title: ClassVar[str] = "perturbation"
    x_label: ClassVar[str] = "k (units perturbed)"

    def headline(self) -> str:
        return f"perturbation, noise std {self.config.get('noise_std')}: {self._samples_phrase()}"


class AnswerPruningResult(CurvesResult):
    """What :class:`~paramsal.analyses.pruning.Pruning` measured on a run of task "answer".

    ``table`` columns: sample_id, selection, k, logprob_before,
    logprob_after (the reference answer's log-probability given prompt and
    prefix, teacher-forced), delta_logprob, token_prob_before,
    token_prob_after (its mean token probability), delta_token_prob,
    answer_after (the greedy answer with the units off), corrected (that
    answer is right). ``summary``: selection, k, n and the bootstrap columns
    of delta_logprob, delta_token_prob, pct_corrected (percent).
    """

    kind: ClassVar[str] = "answer-pruning"
    title: ClassVar[str] = "pruning (answers)"
    panels: ClassVar[int] = 3
    metrics: ClassVar[Mapping[str, Metric]] = ANSWER_METRICS
    x_label: ClassVar[str] = "k (units turned off)"

    def _samples_phrase(self) -> str:
        return super()._samples_phrase().replace("misclassified", "wrong-answer")


class Pruning(CurvesAnalysis):
    """Pruning (or perturbation) curves of misclassified samples, configured once, evaluated on a run.

    ``Pruning(ks=(1, 5, 10)).evaluate(run)`` turns off, for every
    misclassified sample of ``run``, its top-k salient units, k random units
    and its k least salient units, and reports how the confidences change.
    The model runs in eval mode (flags restored afterwards), without
    gradients, on the device of its parameters. On a run of task "answer"
    (units "neurons" or "heads") it measures the reference answer's
    log-probability and the greedy answers instead (:class:`AnswerPruningResult`).

    Args:
        model: the network the run profiled (None rebuilds it from the run).
        ks: the numbers of units to turn off; those above the run's unit
            count are left out, with one note.
        select: selections among "salient", "random", "least".
        mode: "zero" (turn units off) or "noise" (add ``N(0, noise_std**2)``
            noise to the chosen filters' weights; paper A.5's N(0, 0.001) is
            read as a standard deviation, as ``torch.normal(0, 0.001)`` takes it).
        noise_std: standard deviation of the noise.
        ranking: how units are ranked: "zscore" (the paper) or "pot" (tail scores, :meth:`Run.scores`).
        reference: the samples ranked against: "all" (the paper), "correct", "class" or another run.
        seed: seeds the random selection, the noise and the bootstrap.
        batch_size: samples per forward pass.
        num_resamples: bootstrap resamples.
        level: confidence level of the intervals.
        units: the run's units when they are not one of the named schemes.
        **common: :class:`~paramsal.analyses.base.Analysis`'s keywords
            (allow_partial, allow_other_weights, allow_other_data,
            trust_run_specs, device, progress).
    """

    purpose = "prune"
    selection_choices = UNIT_SELECTIONS
    default_ks = PRUNING_KS
    tasks = ("classification", "answer")

    def __init__(self, model: nn.Module | None = None, *, ks: Sequence[int] = PRUNING_KS,
                 select: Sequence[str] | str = UNIT_SELECTIONS, mode: str = "zero", noise_std: float = 1e-3,
                 ranking: str = "zscore", seed: int = 0, batch_size: int = 64, num_resamples: int = 1000,
                 level: float = 0.95, units: UnitsSpec | UnitIndex | None = None,
                 reference: str | os.PathLike | Run = "all", **common: Any):
        super().__init__(model, ks=ks, select=select, ranking=ranking, seed=seed, batch_size=batch_size,
                         num_resamples=num_resamples, level=level, units=units, reference=reference, **common)
        check_choice("mode", mode, PRUNING_MODES)
        if not noise_std >= 0:
            raise InputError(f"noise_std must be >= 0, got {noise_std}")
        self.mode = mode
        self.noise_std = float(noise_std)

    def evaluate(self, run: Run | str | os.PathLike, data: MapDataset | None = None,
                 samples: Samples = None) -> PruningResult | AnswerPruningResult:
        """Measures every (sample, selection, k).

        Args:
            run: a finished run of this model (or its directory).
            data: the data set the run profiled, ``data[sample_id] = (input, class)``;
                None rebuilds it from the run.
            samples: "misclassified" (the default, the paper), "correct", or sample ids.

        Returns:
            A :class:`PruningResult` (``mode="zero"``) or :class:`PerturbationResult`; an
            :class:`AnswerPruningResult` for a run of task "answer".
        """
        prepared = self.prepare(run, data, samples, units=self.units)
        if prepared.task == "answer":
            return self._answers(prepared, samples)
        model, ids, targets, preds = prepared.model, prepared.ids, prepared.targets, prepared.preds
        ks = self.usable_ks(self.ks, len(prepared.index))
        chosen = self._chosen_units(prepared, ks[-1], self.select)
        columns: dict[str, list[np.ndarray]] = {}
        pred_changed = 0
        kind = "pruning" if self.mode == "zero" else "perturbation"
        with eval_mode(model), torch.no_grad():
            editor = None
            for rows in self._batches(len(ids), kind):
                inputs = prepared.inputs(rows)
                if editor is None:
                    editor = UnitEditor.locate(model, inputs[:1], prepared.index)
                base = _probabilities(model(inputs))
                pred_changed += int((base.argmax(1) != preds[rows]).sum())
                seeds = [noise_seed(self.seed, int(i)) for i in ids[rows]]
                for selection in self.select:
                    for k in ks:
                        after = self._edited(editor, inputs, chosen[selection][rows, :k], seeds)
                        append_columns(columns, _measure(ids[rows], targets[rows], preds[rows], selection, k, base,
                                                         after))
        table = self._rows(columns, self.select, _COLUMNS)
        summary = self._summarize(table, METRICS, [(s, k) for s in self.select for k in ks])
        # Recomputed predictions may differ from the profiled ones on near ties (another device);
        # the incorrect class stays the profiled prediction, and the count is reported.
        config = result_config(prepared.run, self, **self._facts(prepared, samples, ks), pred_changed=pred_changed,
                               name_parts=[*([] if self.mode == "zero" else [f"std{self.noise_std:g}"]),
                                           *self._ranking_parts()])
        return (PruningResult if self.mode == "zero" else PerturbationResult)(table, summary, config)

    def _answers(self, prepared: Prepared, samples: Samples) -> AnswerPruningResult:
        """Every (wrong answer, selection, k) of an answer run (see the module docstring)."""
        if self.mode != "zero":
            raise InputError("mode='noise' perturbs whole output channels of one layer; a run of task 'answer' is "
                             "pruned with mode='zero' (its neurons and heads span several layers)")
        model, ids = prepared.model, prepared.ids
        ks = self.usable_ks(self.ks, len(prepared.index))
        chosen = self._chosen_units(prepared, ks[-1], self.select)
        editor = CompoundEditor(model, prepared.index)
        judge = answer_judge(model, prepared.data)
        recorded = _recorded_correct(prepared.run, ids)
        columns: dict[str, list[np.ndarray]] = {}
        judged_changed = 0
        with eval_mode(model), torch.no_grad():
            for rows in self._batches(len(ids), "pruning"):
                inputs, labels = prepared.batch(rows)
                no_losses = np.zeros(len(inputs))  # the judge's log-probability column is not read here
                base = answer_scores(model(inputs), labels)
                judged_changed += int((judge(ids[rows], no_losses, None)["correct"] != recorded[rows]).sum())
                for selection in self.select:
                    for k in ks:
                        with editor.switched_off(unit_mask(chosen[selection][rows, :k], len(prepared.index))):
                            after = answer_scores(model(inputs), labels)
                            said = judge(ids[rows], no_losses, None)
                        append_columns(columns, _answer_measures(ids[rows], selection, k, base, after, said))
        table = self._rows(columns, self.select, _ANSWER_COLUMNS)
        summary = self._summarize(table, ANSWER_METRICS, [(s, k) for s in self.select for k in ks])
        # Greedy answers recomputed (on another device, say) may be judged otherwise than the profiled ones: the
        # count is reported, and "corrected" means right after the edit, whatever the judgement before.
        config = result_config(prepared.run, self, **self._facts(prepared, samples, ks), judged_changed=judged_changed,
                               name_parts=self._ranking_parts())
        return AnswerPruningResult(table, summary, config)

    def _edited(self, editor: UnitEditor, inputs: torch.Tensor, unit_ids: np.ndarray,
                seeds: Sequence[int]) -> np.ndarray:
        """Class probabilities ``[n, C]`` of the batch with each sample's ``unit_ids`` edited."""
        if self.mode == "zero":
            with editor.switched_off(unit_mask(unit_ids, len(editor.index))):
                return _probabilities(editor.model(inputs))
        weight = next(iter(editor.model.parameters()))
        deltas = gaussian_deltas(editor.index, unit_ids, self.noise_std, seeds, dtype=weight.dtype,
                                 device=weight.device)
        with editor.perturbed(deltas):
            return _probabilities(editor.model(inputs))


def noise_seed(seed: int, sample_id: int) -> int:
    """The seed of sample ``sample_id``'s noise (:func:`~paramsal.analyses.unit_editing.gaussian_deltas`).

    One per (seed, sample), shared by every selection and k, so a unit of a
    sample always gets the same noise, whatever the batching.
    """
    return int(np.random.SeedSequence([seed, sample_id]).generate_state(1, np.uint64)[0])


def _probabilities(logits: torch.Tensor) -> np.ndarray:
    return torch.softmax(logits.double(), dim=1).cpu().numpy()


def _recorded_correct(run: Run, ids: np.ndarray) -> np.ndarray:
    """``[n]`` whether the run recorded samples ``ids`` as right."""
    table = run.table()
    order = np.argsort(table.column("sample_id").to_numpy())
    found = np.searchsorted(table.column("sample_id").to_numpy()[order], ids)
    return table.column("correct").to_numpy(zero_copy_only=False)[order][found]


def _answer_measures(ids: np.ndarray, selection: str, k: int, base: tuple[np.ndarray, np.ndarray],
                     after: tuple[np.ndarray, np.ndarray], said: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {
        "sample_id": ids, "selection": np.full(len(ids), selection, dtype=object),
        "k": np.full(len(ids), k, dtype=np.int64),
        "logprob_before": base[0], "logprob_after": after[0], "delta_logprob": after[0] - base[0],
        "token_prob_before": base[1], "token_prob_after": after[1], "delta_token_prob": after[1] - base[1],
        "answer_after": np.asarray(said["answer"], dtype=object), "corrected": np.asarray(said["correct"], bool),
    }


def _measure(ids: np.ndarray, targets: np.ndarray, preds: np.ndarray, selection: str, k: int,
             base: np.ndarray, after: np.ndarray) -> dict[str, np.ndarray]:
    rows = np.arange(len(ids))
    new_pred = after.argmax(1)
    return {
        "sample_id": ids, "target": targets, "pred": preds,
        "selection": np.full(len(ids), selection, dtype=object), "k": np.full(len(ids), k, dtype=np.int64),
        "incorrect_before": base[rows, preds], "incorrect_after": after[rows, preds],
        "true_before": base[rows, targets], "true_after": after[rows, targets],
        "delta_incorrect": after[rows, preds] - base[rows, preds],
        "delta_true": after[rows, targets] - base[rows, targets],
        "new_pred": new_pred, "corrected": new_pred == targets,
    }
