#!/usr/bin/env python
"""Train the ``paramsal`` demo model (SmallResNet on Animal-MNIST) on the CPU.

Produces ``paramsal/zoo/weights/demo_smallresnet.pt`` (a ``state_dict``) from
the ``"train"`` split only; the ``"test"`` split is used once, at the end, to
report held-out accuracy.

Reproducibility: all randomness (initialization, shuffling, augmentation)
comes from ``torch.manual_seed(--seed)`` and explicit ``torch.Generator``
objects, deterministic algorithms are enforced, and the number of intra-op
threads is fixed (``--threads``). Re-running the same command with the same
torch version on the same kind of CPU gives identical weights; other torch
versions / CPUs may differ in the last float bits.

Recipe: SGD (momentum 0.9, Nesterov), batch 128, weight decay 5e-4 (not on
BatchNorm / bias), one linear warm-up epoch then cosine decay of the learning
rate, augmentation = random horizontal flip + random translation of up to 2
pixels (silhouettes of animals are left/right symmetric in meaning).

Usage (from the repository root)::

    python scripts/train_demo_model.py                # defaults used for the shipped weights
    python scripts/train_demo_model.py --epochs 3 --out /tmp/w.pt
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from typing import Tuple

import torch
import torch.nn.functional as F
from torch import nn

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

# Import the zoo modules only: the demo model must not depend on the engine.
from paramsal.zoo import DEMO_CLASSES, DEMO_WEIGHTS, demo_dataset, demo_model  # noqa: E402
from paramsal.zoo import datasets as zoo_datasets  # noqa: E402


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--epochs", type=int, default=8, help="training epochs (default: 8)")
    p.add_argument("--out", type=Path, default=DEMO_WEIGHTS, help="output state_dict path")
    p.add_argument("--seed", type=int, default=0, help="global torch seed (default: 0)")
    p.add_argument("--lr", type=float, default=0.1, help="peak learning rate (default: 0.1)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default: 2)")
    return p.parse_args()


def augment(x: torch.Tensor, gen: torch.Generator, max_shift: int = 2) -> torch.Tensor:
    """Random horizontal flip and random translation.

    Args:
        x: Normalized images, ``[B, 1, H, W]``.
        gen: Generator driving the random choices.
        max_shift: Maximum translation in pixels along each axis.

    Returns:
        Augmented images, ``[B, 1, H, W]``; uncovered pixels are filled with
        the normalized background value (pixel 0).
    """
    b, _, h, w = x.shape
    flip = torch.rand(b, generator=gen) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    background = (0.0 - zoo_datasets.MEAN) / zoo_datasets.STD
    padded = F.pad(x, (max_shift,) * 4, value=background)
    offs = torch.randint(0, 2 * max_shift + 1, (b, 2), generator=gen).tolist()
    return torch.stack([padded[i, :, dy : dy + h, dx : dx + w] for i, (dy, dx) in enumerate(offs)])


@torch.no_grad()
def evaluate(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> Tuple[float, int]:
    """Return ``(accuracy, number of mistakes)`` of ``model`` in eval mode.

    Args:
        model: Classifier mapping ``[N, 1, 28, 28]`` to ``[N, K]``.
        images: ``[N, 1, 28, 28]`` float32.
        labels: ``[N]`` int64.
    """
    model.eval()
    preds = torch.cat([model(chunk).argmax(1) for chunk in images.split(500)])
    wrong = int((preds != labels).sum())
    return 1.0 - wrong / len(labels), wrong


def check_normalization(train_images: torch.Tensor) -> None:
    """Check that the stored MEAN/STD match the train split statistics."""
    raw = train_images * zoo_datasets.STD + zoo_datasets.MEAN  # back to [0, 1]
    mean, std = raw.mean().item(), raw.std().item()
    print(f"train pixel mean={mean:.4f} std={std:.4f} "
          f"(stored MEAN={zoo_datasets.MEAN} STD={zoo_datasets.STD})")
    if abs(mean - zoo_datasets.MEAN) > 1e-3 or abs(std - zoo_datasets.STD) > 1e-3:
        raise SystemExit("normalization constants in paramsal/zoo/datasets.py are stale")


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    torch.use_deterministic_algorithms(True)

    train, test = demo_dataset("train"), demo_dataset("test")
    print(f"classes: {DEMO_CLASSES}")
    print(f"train: {len(train)} images, test: {len(test)} images")
    check_normalization(train.images)

    model = demo_model(pretrained=False)  # initialized from the seeded RNG
    n_params = sum(p.numel() for p in model.parameters())
    print(f"SmallResNet parameters: {n_params}")

    decay = [p for n, p in model.named_parameters() if p.ndim > 1]
    no_decay = [p for n, p in model.named_parameters() if p.ndim <= 1]
    opt = torch.optim.SGD(
        [{"params": decay, "weight_decay": args.weight_decay},
         {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr, momentum=0.9, nesterov=True,
    )
    steps_per_epoch = math.ceil(len(train) / args.batch_size)
    total = args.epochs * steps_per_epoch
    warmup = min(steps_per_epoch, total)

    def lr_at(step: int) -> float:
        if step < warmup:
            return args.lr * (step + 1) / warmup
        return 0.5 * args.lr * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))

    shuffle_gen = torch.Generator().manual_seed(args.seed + 1)
    aug_gen = torch.Generator().manual_seed(args.seed + 2)
    step = 0
    t0 = time.perf_counter()
    for epoch in range(args.epochs):
        model.train()
        perm = torch.randperm(len(train), generator=shuffle_gen)
        loss_sum, correct = 0.0, 0
        for idx in perm.split(args.batch_size):
            x = augment(train.images[idx], aug_gen)
            y = train.labels[idx]
            for g in opt.param_groups:
                g["lr"] = lr_at(step)
            logits = model(x)
            loss = F.cross_entropy(logits, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            loss_sum += loss.item() * len(idx)
            correct += int((logits.argmax(1) == y).sum())
        print(f"epoch {epoch + 1}/{args.epochs}  loss {loss_sum / len(train):.4f}  "
              f"train-aug acc {correct / len(train):.4f}  ({time.perf_counter() - t0:.0f}s)",
              flush=True)
    train_time = time.perf_counter() - t0

    model.eval()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), args.out)

    train_acc, train_wrong = evaluate(model, train.images, train.labels)
    test_acc, test_wrong = evaluate(model, test.images, test.labels)
    print(f"training time: {train_time:.1f}s")
    print(f"saved {args.out} ({args.out.stat().st_size} bytes)")
    print(f"train accuracy: {train_acc:.4f} ({train_wrong} mistakes / {len(train)})")
    print(f"held-out test accuracy: {test_acc:.4f} ({test_wrong} mistakes / {len(test)})")


if __name__ == "__main__":
    main()
