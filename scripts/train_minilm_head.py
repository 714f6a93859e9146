"""Trains the question-type head of ``minilm-trec`` (paramsal/zoo/weights/minilm_trec_head.pt).

The MiniLM-L6 encoder stays frozen: each TREC training question is embedded
once (mean-pooled, unit length), and the head is a multinomial logistic
regression on those embeddings, fitted by full-batch L-BFGS in float64 with an
L2 penalty, from zeros (so the result depends on no seed). Prints the train and
test accuracy::

    python scripts/train_minilm_head.py --threads 2
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from paramsal.zoo.minilm import CLASSES, HEAD_WEIGHTS, TrecDataset, minilm_trec_model


def embeddings(model, data: TrecDataset, batch: int = 128) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model.embed(data.ids[i:i + batch]) for i in range(0, len(data), batch)]).double()


def fit_head(x: torch.Tensor, y: torch.Tensor, penalty: float, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    weight = torch.zeros(len(CLASSES), x.shape[1], dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(len(CLASSES), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=steps, tolerance_grad=1e-10, tolerance_change=1e-12,
                                  history_size=50, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(x @ weight.T + bias, y) + penalty * weight.square().sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return weight.detach(), bias.detach()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--penalty", type=float, default=1e-4, help="L2 penalty on the head's weights")
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model = minilm_trec_model(head=False)
    train, test = TrecDataset("train"), TrecDataset("test")
    x_train, x_test = embeddings(model, train), embeddings(model, test)
    weight, bias = fit_head(x_train, train.labels, args.penalty, args.steps)
    for name, x, data in (("train", x_train, train), ("test", x_test, test)):
        right = int(((x @ weight.T + bias).argmax(1) == data.labels).sum())
        print(f"{name}: accuracy {right / len(data):.4f} ({len(data) - right} of {len(data)} wrong)")
    torch.save({"weight": weight.float().contiguous(), "bias": bias.float().contiguous()}, HEAD_WEIGHTS)
    print(f"wrote {HEAD_WEIGHTS}")


if __name__ == "__main__":
    main()
