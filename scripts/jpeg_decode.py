"""Which JPEG decoder feeds ``imagefolder:`` data faster on the CPU: PIL or ``torchvision.io.decode_jpeg``.

    python scripts/jpeg_decode.py [--images 200]

Writes ImageNet-sized JPEGs (500x375, quality 90; smooth noise, so that
they compress like photographs rather than like white noise) to a temporary
folder and times, in one thread, the evaluation transform of each decoder
(resize the short side to 256, crop 224, scale, normalize): images per second
per core (median of three passes), and the largest difference between the
two decoders' tensors.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFilter
from torchvision import io
from torchvision.transforms import v2

from paramsal.zoo.specs import image_transform

MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def write_images(folder: Path, count: int) -> list[Path]:
    rng = np.random.default_rng(0)
    paths = []
    for i in range(count):
        noise = Image.fromarray(rng.integers(0, 255, (375, 500, 3), dtype=np.uint8))
        path = folder / f"{i}.jpg"
        noise.filter(ImageFilter.GaussianBlur(3)).save(path, quality=90)
        paths.append(path)
    return paths


_PIL = image_transform("imagenet")  # what imagefolder: data uses
_TENSOR = v2.Compose([v2.Resize(256, antialias=True), v2.CenterCrop(224), v2.ToDtype(torch.float32, scale=True),
                      v2.Normalize(MEAN, STD)])


def pil(path: Path) -> torch.Tensor:
    with Image.open(path) as image:
        return _PIL(image.convert("RGB"))


def torchvision_io(path: Path) -> torch.Tensor:
    return _TENSOR(io.decode_jpeg(io.read_file(str(path)), mode=io.ImageReadMode.RGB))


def rate(decode, paths: list[Path]) -> float:
    times = []
    for _ in range(3):
        started = time.perf_counter()
        for path in paths:
            decode(path)
        times.append(time.perf_counter() - started)
    return len(paths) / statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=200)
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_images(Path(tmp), args.images)
        rates = {"PIL + torchvision.transforms": rate(pil, paths),
                 "torchvision.io.decode_jpeg + transforms.v2": rate(torchvision_io, paths)}
        difference = max(float((pil(p) - torchvision_io(p)).abs().max()) for p in paths[:20])
    print(f"{args.images} JPEGs 500x375, one thread, torch {torch.__version__}\n")
    print("| decoder | images/s per core |\n| --- | ---: |")
    for name, value in rates.items():
        print(f"| {name} | {value:.0f} |")
    print(f"\nlargest difference between the two (normalized units): {difference:.3f}")


if __name__ == "__main__":
    main()
