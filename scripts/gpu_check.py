"""One-call GPU check: correctness of the fused kernel and of every backend on CUDA, then ResNet-50 throughput.

Run on a machine with a CUDA GPU (a few minutes):

    python scripts/gpu_check.py --out gpu-results.json

Prints and saves:

* the largest relative error of the fused Triton kernel against the torch
  path (float64 on the GPU) on random conv shapes (groups, stride, dilation,
  padding), in float32 (TF32 off) and float16;
* the largest relative error of hooks/vmap vs the loop on the test networks
  (float64 and float32, TF32 off);
* for torchvision ResNet-50 at 224x224 (float32, torch's default TF32
  settings for every method), through the benchmark harness: samples/s of a
  plain forward+backward, the one-sample loop, and the hooks backend with the
  fused kernel and with the torch path (medians), the ratio to plain, the
  projected time for the 50,000 ImageNet validation images and the peak
  memory of a first call;
* the architectures of the model-coverage table (ResNet-18, ConvNeXt, ViT,
  EfficientNet, BERT) at batch 64: hooks against plain, loop, vmap and
  whole-batch vmap;
* the data path: ``profile_dataset`` end to end on ImageNet-sized JPEGs
  decoded by the default DataLoader workers, against the profiler alone on
  in-memory batches (how busy the GPU is kept), in float32 and bf16.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from paramsal import profile_batch  # noqa: E402
from paramsal.bench.harness import CASES, HOOKS_TORCH, VMAP_WHOLE, device_name, records, run, table  # noqa: E402
from paramsal.kernels import fused  # noqa: E402
from paramsal.kernels.conv import conv_weight_grad_sample  # noqa: E402


def kernel_correctness(shapes: int, device: str, seed: int = 0) -> list[dict]:
    """The fused kernel vs the torch path's per-sample gradients, on random conv shapes."""
    rng = random.Random(seed)
    rows = []
    for i in range(shapes):
        groups = rng.choice([1, 1, 2, 4, 32])
        kernel = (rng.randint(1, 7), rng.randint(1, 7))
        conv = nn.Conv2d(groups * rng.randint(1, 40), groups * rng.randint(1, 80), kernel,
                         stride=rng.randint(1, 3), padding=rng.randint(0, 3), dilation=rng.randint(1, 3),
                         groups=groups).to(device).double()
        span = max(d * (k - 1) + 1 for d, k in zip(conv.dilation, kernel))
        x = torch.randn(8, conv.in_channels, rng.randint(span, 40), rng.randint(span, 40), device=device,
                        dtype=torch.float64)
        with torch.no_grad():
            gy = torch.randn_like(conv(x))
        want = conv_weight_grad_sample(conv, x, gy).flatten(2).abs().mean(2)
        geometry = fused.Geometry(conv.kernel_size, conv.stride, conv.padding, conv.dilation, groups)
        for dtype in (torch.float32, torch.float16):
            got = fused.row_abs_means(x.to(dtype), gy.to(dtype), geometry).double()
            err = ((got - want).abs().max() / want.abs().max()).item()
            rows.append({"shape": repr(conv), "dtype": str(dtype), "max_rel_err": err})
        print(f"kernel shape {i:3d} {conv!r}: float32 {rows[-2]['max_rel_err']:.1e}, "
              f"float16 {rows[-1]['max_rel_err']:.1e}", flush=True)
    return rows


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


def throughput(batch: int, repeats: int, device: str) -> list[dict]:
    """The benchmark harness on ResNet-50: plain, loop, hooks with the fused kernel and on the torch path."""
    torch.backends.cudnn.benchmark = True
    case = dataclasses.replace(CASES["resnet50-imagenet"], batch=batch, device=device)
    timings = run(case, ("hooks", HOOKS_TORCH), repeats)
    print(table(timings), flush=True)
    plain = next(t for t in timings if t.method == "plain")
    return [{**row, "x_plain": plain.median / row["median_s"], "projected_50k_s": 50_000 * row["median_s"] / batch}
            for row in records(timings)]


#: The architectures of the model-coverage table, each with the units its bench case profiles (and ConvNeXt with
#: the paper's filters too).
ARCHITECTURES = (("resnet18-cifar", None), ("convnext-tiny", None), ("convnext-tiny", "filters"), ("vit-small", None),
                 ("efficientnet-b0", None), ("bert-small", None))


def architectures(batch: int, repeats: int, device: str) -> list[dict]:
    """The model-coverage cases through the harness: plain, loop, hooks, vmap and whole-batch vmap."""
    rows = []
    for name, units in ARCHITECTURES:
        case = dataclasses.replace(CASES[name], batch=batch, device=device, units=units or CASES[name].units)
        timings = run(case, ("hooks", "vmap", VMAP_WHOLE), repeats, memory=False)
        print(table(timings), flush=True)
        plain = next(t for t in timings if t.method == "plain")
        rows += [{**row, "units": case.units, "x_plain": plain.median / row["median_s"]} for row in records(timings)]
    return rows


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def data_path(device: str, samples: int, batch: int, precision: str = "float32") -> dict:
    """``profile_dataset`` on ResNet-50 end to end (JPEG folder, DataLoader workers) vs the profiler alone.

    The images are ImageNet-sized JPEGs written to a temporary folder and
    decoded by the default workers; the ratio of the end-to-end rate to the
    profiler's own rate on in-memory batches is how busy the data path keeps
    the GPU.
    """
    import tempfile
    import time

    import numpy as np
    from PIL import Image

    from paramsal.bench.models import imagenet_resnet50
    from paramsal.engine.dataset import default_workers, profile_dataset
    from paramsal.engine.profile import Profiler
    from paramsal.zoo.specs import load_data

    torch.backends.cudnn.benchmark = True
    model = imagenet_resnet50().to(device).eval()
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(samples):
            folder = Path(tmp, "images", f"class{i % 10}")
            folder.mkdir(parents=True, exist_ok=True)
            pixels = rng.integers(0, 255, (375, 500, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / f"{i}.jpg", quality=90)
        data = load_data(f"imagefolder:{tmp}/images")
        profiler = Profiler(model, **({"precision": precision} if precision != "float32" else {}))
        x = torch.randn(batch, 3, 224, 224, device=device)
        y = torch.randint(0, 1000, (batch,), device=device)
        profiler(x, y)
        _sync(device)
        started = time.perf_counter()
        for _ in range(3):
            profiler(x, y)
        _sync(device)
        alone = 3 * batch / (time.perf_counter() - started)
        options = {"precision": precision} if precision != "float32" else {}
        profile_dataset(model, data, Path(tmp, "warm"), batch_size=batch, progress=False, **options)
        started = time.perf_counter()
        profile_dataset(model, data, Path(tmp, "run"), batch_size=batch, progress=False, **options)
        end_to_end = samples / (time.perf_counter() - started)
    row = {"precision": precision, "samples": samples, "batch": batch, "workers": default_workers(torch.device(device)),
           "profiler_alone_per_s": alone, "end_to_end_per_s": end_to_end, "busy": end_to_end / alone,
           "projected_50k_s": 50_000 / end_to_end}
    print(f"data path ({precision}): profiler alone {alone:.0f}/s, end to end {end_to_end:.0f}/s "
          f"({100 * row['busy']:.0f}% busy), 50,000 images in {row['projected_50k_s']:.0f} s", flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--shapes", type=int, default=40, help="random conv shapes for the kernel check")
    parser.add_argument("--out", default="gpu-results.json")
    parser.add_argument("--samples", type=int, default=2048, help="JPEG images for the data-path check")
    parser.add_argument("--device", default="cuda",
                        help="cpu only to try the script itself out (with TRITON_INTERPRET=1 and tiny sizes)")
    args = parser.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("no CUDA device")
    result = {"device": device_name(args.device), "torch": torch.__version__}

    def stage(name: str, run) -> None:
        """Runs one part and saves everything so far, so a run cut short keeps what it measured."""
        result[name] = run()
        Path(args.out).write_text(json.dumps(result, indent=1))
        print(f"{name}: written to {args.out}", flush=True)

    # the correctness checks compare float32 itself, not TF32 roundings of it
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    stage("kernel", lambda: kernel_correctness(args.shapes, args.device))
    stage("correctness", lambda: correctness(args.device))
    torch.backends.cudnn.allow_tf32 = True  # torch's default, for plain and hooks alike
    stage("resnet50", lambda: throughput(args.batch, args.repeats, args.device))
    stage("architectures", lambda: architectures(64, args.repeats, args.device))
    stage("data_path", lambda: [data_path(args.device, args.samples, args.batch, precision)
                                for precision in ("float32", "bf16")])


if __name__ == "__main__":
    main()
