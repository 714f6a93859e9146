"""The analyses that evaluate a chat LLM again on the wrong answers of a run of task "answer" (the tiny chat model
of :mod:`chat`), checked against deep copies whose units are really zeroed."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from chat import answer_run, chat_model, chat_questions, trained

from paramsal import profile_batch, profile_dataset, units_of
from paramsal.analyses import FineTune, Pruning
from paramsal.analyses.answer_finetune import AnswerFineTuneResult
from paramsal.analyses.base import load_result
from paramsal.analyses.neighbors import neighbor_ids
from paramsal.analyses.pruning import AnswerPruningResult
from paramsal.analyses.selection import select_units, unit_scores
from paramsal.engine.tasks import IGNORE_INDEX, task_loss
from paramsal.errors import InputError
from paramsal.reference import stepped_copy, zeroed_copy
from paramsal.zoo.qa import greedy_answers, greedy_tokens, matches


@pytest.fixture(scope="module", params=["neurons", "heads"])
def answers(request, tmp_path_factory):
    return answer_run(tmp_path_factory.mktemp(request.param), units=request.param)


def _reference_logprob(model, ids: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """The reference answer's log-probability and mean token probability, one token at a time."""
    with torch.no_grad():
        logits = model(ids[None])[0].double()
    taken = [torch.log_softmax(logits[t - 1], -1)[labels[t]] for t in range(1, len(ids)) if labels[t] != IGNORE_INDEX]
    return float(sum(taken)), float(np.mean([float(v.exp()) for v in taken]))


def test_pruning_an_answer_run_equals_copies_with_the_units_zeroed(answers, tmp_path):
    model, data, run = answers
    result = Pruning(model, ks=(1, 3), num_resamples=50).evaluate(run, data)
    assert isinstance(result, AnswerPruningResult)
    wrong = run.sample_ids("misclassified")
    assert sorted(set(result.table["sample_id"])) == wrong.tolist() and len(wrong) >= 5
    scores = unit_scores(run, wrong)
    index = units_of(model, run.manifest.config.units)
    for selection in ("salient", "random", "least"):
        chosen = select_units(scores, 3, selection, 0, wrong)
        for n, sample in enumerate(wrong[:4]):
            for k in (1, 3):
                row = result.table[(result.table["sample_id"] == sample) & (result.table["selection"] == selection)
                                   & (result.table["k"] == k)].iloc[0]
                pruned = zeroed_copy(model, index, chosen[n, :k])
                logprob, token_prob = _reference_logprob(pruned, *data[int(sample)])
                assert row["logprob_after"] == pytest.approx(logprob, abs=1e-9)
                assert row["token_prob_after"] == pytest.approx(token_prob, abs=1e-9)
                budget = int(data.answer_lengths.max()) + 8
                said = greedy_answers(pruned, data, [int(sample)], max_new_tokens=budget)[0]
                assert row["answer_after"] == said
                assert row["corrected"] == matches(said, data.questions[int(sample)].answer)
            before = _reference_logprob(model, *data[int(sample)])[0]
            assert row["logprob_before"] == pytest.approx(before, abs=1e-9)
    assert result.config["judged_changed"] == 0  # the same greedy answers as the run's
    summary = result.summary.set_index(["selection", "k"])
    by_hand = result.table[(result.table["selection"] == "salient") & (result.table["k"] == 3)]
    assert summary.loc[("salient", 3), "pct_corrected"] == pytest.approx(100 * by_hand["corrected"].mean())
    assert summary.loc[("salient", 3), "delta_logprob"] == pytest.approx(by_hand["delta_logprob"].mean())
    result.save(tmp_path / "saved")
    again = load_result(tmp_path / "saved", result.name, run)
    assert isinstance(again, AnswerPruningResult) and again.table.equals(result.table)


def test_perturbing_an_answer_run_is_refused_in_one_line(answers):
    model, data, run = answers
    with pytest.raises(InputError, match="a run of task 'answer' is pruned with mode='zero'"):
        Pruning(model, ks=(1,), mode="noise").evaluate(run, data)


def test_fine_tuning_an_answer_run_equals_real_sgd_steps_on_copies(answers):
    model, data, run = answers
    tune = FineTune(model, ks=(2,), select=("salient", "random", "all"), lr=0.5, neighbors=2, num_resamples=20)
    result = tune.evaluate(run, data, samples=run.sample_ids("misclassified")[:3])
    assert isinstance(result, AnswerFineTuneResult) and len(result.table) == 3 * 3
    index = units_of(model, run.manifest.config.units)
    wrong = run.sample_ids("misclassified")
    scores = unit_scores(run, wrong[:3])
    loss = task_loss("answer")
    budget = int(data.answer_lengths.max()) + 8
    for n, sample in enumerate(wrong[:3]):
        pool = [int(sample), *neighbor_ids(run, wrong[n:n + 1], 2, among="misclassified")[0]]
        salient = select_units(scores, 2, "salient", 0, wrong[:3])[n]
        for selection in ("salient", "random", "all"):
            row = result.table[(result.table["sample_id"] == sample) & (result.table["selection"] == selection)]
            row = row.iloc[0]
            units = None if selection == "all" else select_units(scores, 2, selection, 0, wrong[:3])[n]
            scale = 1.0
            if selection == "random":  # the step as long as the salient units' (by hand)
                scale = (_chosen_grad_norm(model, index, data[int(sample)], salient, loss)
                         / _chosen_grad_norm(model, index, data[int(sample)], units, loss))
                assert row["grad_norm"] == pytest.approx(_chosen_grad_norm(model, index, data[int(sample)], units,
                                                                           loss), rel=1e-9)
            tuned = stepped_copy(model, *data[int(sample)], index if units is not None else None, units, lr=0.5,
                                 grad_scale=scale, loss=loss)
            after = [_reference_logprob(tuned, *data[i])[0] for i in pool]
            assert row["logprob_after"] == pytest.approx(after[0], abs=1e-9)
            before = [_reference_logprob(model, *data[i])[0] for i in pool]
            assert row["neighbors_delta_logprob"] == pytest.approx(np.mean(np.subtract(after, before)[1:]), abs=1e-9)
            said = greedy_answers(tuned, data, pool, max_new_tokens=budget)
            assert row["answer_after"] == said[0]
            right = [matches(a, data.questions[i].answer) for a, i in zip(said, pool)]
            assert row["corrected"] == right[0] and row["neighbors_corrected"] == pytest.approx(np.mean(right[1:]))
    assert result.table["delta_logprob"].abs().min() > 0  # every step moved the answer


def _chosen_grad_norm(model, index, sample, units, loss) -> float:
    """The L2 norm of the gradient of every weight of ``units``, from the whole gradient and the owners by hand."""
    ids, labels = sample
    model.zero_grad()
    loss(model(ids[None]), labels[None]).sum().backward()
    total = 0.0
    for group in index:
        for unit in [u - group.offset for u in units if group.offset <= u < group.stop]:
            for part in group.parts or (group,):
                grad = model.get_parameter(part.param_name).grad
                if part.partition == "rows":
                    total += float(grad[unit].double().pow(2).sum())
                elif part.partition == "columns":
                    total += float(grad[:, unit].double().pow(2).sum())
                else:
                    total += float(grad[part.assignment == unit].double().pow(2).sum())
    model.zero_grad()
    return total ** 0.5


def test_target_predicted_takes_the_loss_at_the_models_own_greedy_answer(tmp_path):
    model = chat_model()
    data = chat_questions(tmp_path, model, count=10)
    trained(model, data, steps=40)
    run = profile_dataset(model, data, tmp_path / "run", batch_size=4, units="neurons", task="answer",
                          target="predicted", progress=False)
    assert run.manifest.config.target == "predicted"
    said = greedy_tokens(model, data, max_new_tokens=int(data.answer_lengths.max()) + 8)
    table, profiles = run.table(), run.profiles(standardized=False)
    for n, tokens in enumerate(said):  # one sample at a time, by hand: its context, then what it said
        context = data.context(n).tolist()
        ids = torch.tensor([context + tokens])
        labels = torch.tensor([[IGNORE_INDEX] * len(context) + tokens])
        want = profile_batch(model, ids, labels, units="neurons", task="causal-lm", backend="loop")
        np.testing.assert_allclose(profiles[n], want[0].float().numpy(), rtol=2e-5, atol=1e-12)
        with torch.no_grad():
            loss = float(task_loss("causal-lm")(model(ids), labels)[0])
        assert table.column("loss")[n].as_py() == pytest.approx(loss, rel=1e-6)
        assert table.column("answer_logprob")[n].as_py() == pytest.approx(-loss * len(tokens), rel=1e-6)
        assert table.column("pred")[n].as_py() == tokens[0]  # the greedy answer's first token
    # the table keeps the data set's labels and the judgement of the greedy answer against the reference
    assert table.column("target").to_pylist() == [int(data[n][1][data.answer_starts[n]]) for n in range(10)]
    assert table.column("correct").to_pylist() == data.judge(model, range(10)).tolist()
    assert table.column("answer").to_pylist() == model.tokenizer.batch_decode(said, skip_special_tokens=True)
    with pytest.raises(InputError, match="target 'predicted' of task 'answer' is the model's greedy answer, which "
                                         "profile_dataset decodes"):
        profile_batch(model, *data.predicted(model, [0])[:2], units="neurons", task="answer", target="predicted")
    with pytest.raises(InputError, match="target='predicted' is not defined for task='causal-lm'"):
        profile_dataset(model, data, tmp_path / "other", task="causal-lm", target="predicted", progress=False)
