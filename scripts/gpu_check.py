"""One-call GPU check: correctness of every backend on CUDA, then ResNet-50 throughput.

Run on a machine with a CUDA GPU (a few minutes):

    python scripts/gpu_check.py --out gpu-results.json

Prints and saves: the largest relative error of hooks/vmap vs the loop on
small networks (float64 and float32, on the GPU), and for torchvision
ResNet-50 at 224x224 the samples/s of a plain forward+backward and of each
backend (medians), their ratio, and the projected time for the 50,000
ImageNet validation images.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from paramsal import Profiler, profile_batch  # noqa: E402


def correctness(device: str) -> list[dict]:
    from nets import SMALL_CASES, TORCHVISION_CASES, batch, build

    rows = []
    for case in SMALL_CASES + TORCHVISION_CASES:
        for dtype in (torch.float64, torch.float32):
            model = build(case, dtype).to(device)
            x, y = batch(case, 6, dtype)
            x, y = x.to(device), y.to(device)
            want = profile_batch(model, x, y, backend="loop", units=case.units)
            scale = want.abs().amax(1, keepdim=True).clamp_min(1e-30)
            for backend in ("hooks", "vmap"):
                got = profile_batch(model, x, y, backend=backend, units=case.units)
                err = ((got - want).abs() / scale).max().item()
                rows.append({"case": case.name, "dtype": str(dtype), "backend": backend, "max_rel_err": err})
                print(f"{case.name:24s} {str(dtype):14s} {backend:6s} max rel err {err:.2e}", flush=True)
    return rows


def timed(fn, repeats: int) -> float:
    fn()
    torch.cuda.synchronize()
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)


def throughput(batch: int, repeats: int) -> list[dict]:
    torch.backends.cudnn.benchmark = True
    model = torchvision.models.resnet50().cuda().eval()
    x = torch.randn(batch, 3, 224, 224, device="cuda")
    y = torch.randint(0, 1000, (batch,), device="cuda")

    def plain():
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()

    rows = []
    plain_s = timed(plain, repeats)
    rows.append({"method": "plain", "samples_per_s": batch / plain_s})
    for backend in ("hooks",):
        profiler = Profiler(model, backend=backend)
        torch.cuda.reset_peak_memory_stats()
        seconds = timed(lambda: profiler(x, y), repeats)
        rows.append({"method": backend, "samples_per_s": batch / seconds, "x_plain": plain_s / seconds,
                     "projected_50k_s": 50_000 * seconds / batch,
                     "peak_gb": torch.cuda.max_memory_allocated() / 2**30})
    for row in rows:
        print(row, flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default="gpu-results.json")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("no CUDA device")
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "correctness": correctness("cuda"), "resnet50": throughput(args.batch, args.repeats)}
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"written {args.out}")


if __name__ == "__main__":
    main()
