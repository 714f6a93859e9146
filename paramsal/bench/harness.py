"""Benchmark harness: declarative cases, methods timed in one process, medians and ratios.

Every figure is reported next to two baselines measured in the same run: a
plain batched forward+backward of the same model and batch (the practical
limit: per-sample weight gradients cost the same multiply-adds) and the
one-sample loop (what the paper's code does).
"""

from __future__ import annotations

import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from paramsal.bench.models import cifar_resnet18
from paramsal.engine.profile import Profiler


@dataclass(frozen=True)
class Case:
    """A model and a batch to time."""

    name: str
    make_model: Callable[[], nn.Module]
    input_shape: tuple[int, ...]
    classes: int
    batch: int = 64
    dtype: torch.dtype = torch.float32
    device: str = "cpu"

    def build(self, seed: int = 0) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
        torch.manual_seed(seed)
        model = self.make_model().to(self.device, self.dtype).eval()
        x = torch.randn(self.batch, *self.input_shape, dtype=self.dtype, device=self.device)
        y = torch.randint(0, self.classes, (self.batch,), device=self.device)
        return model, x, y


def _small_cnn() -> nn.Module:
    from paramsal.zoo import demo_model
    return demo_model(pretrained=False)


CASES = {
    "resnet18-cifar": Case("resnet18-cifar", cifar_resnet18, (3, 32, 32), 10),
    "small-cnn": Case("small-cnn", _small_cnn, (1, 28, 28), 10),
}

METHODS = ("plain", "loop", "hooks", "vmap")


def method(name: str, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Callable[[], object]:
    """A zero-argument callable doing one batch's work with the named method."""
    if name == "plain":
        def plain() -> None:
            model.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
        return plain
    profiler = Profiler(model, backend=name)
    return lambda: profiler(x, y)


@dataclass
class Timing:
    case: str
    method: str
    batch: int
    seconds: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    @property
    def samples_per_s(self) -> float:
        return self.batch / self.median


def time_method(fn: Callable[[], object], repeats: int, warmup: int = 1) -> list[float]:
    for _ in range(warmup):
        fn()
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - start)
    return seconds


def run(case: Case, methods: tuple[str, ...] = METHODS, repeats: int = 3) -> list[Timing]:
    """Times each method on the case in this process; the baselines are always included."""
    model, x, y = case.build()
    wanted = ["plain", "loop"] + [m for m in methods if m not in ("plain", "loop")]
    return [Timing(case.name, m, case.batch, time_method(method(m, model, x, y), repeats)) for m in wanted]


def table(timings: list[Timing]) -> str:
    """A Markdown table: samples/s (median), ratio to plain forward+backward and to the loop."""
    by_method = {t.method: t for t in timings}
    plain, loop = by_method["plain"].samples_per_s, by_method["loop"].samples_per_s
    lines = [f"case {timings[0].case}, batch {timings[0].batch}, torch {torch.__version__}, "
             f"{torch.get_num_threads()} threads, {platform.processor() or platform.machine()}",
             "", "| method | samples/s | x plain | x loop |", "| --- | ---: | ---: | ---: |"]
    for t in timings:
        lines.append(f"| {t.method} | {t.samples_per_s:.1f} | {t.samples_per_s / plain:.2f} | "
                     f"{t.samples_per_s / loop:.2f} |")
    return "\n".join(lines)


def dataset_overhead(batch_size: int = 64, repeats: int = 3, out_dir: str | None = None) -> str:
    """End-to-end ``profile_dataset`` on the demo split vs the engine alone on the same batches.

    The difference is what the DataLoader, the Parquet writes and the
    statistics cost; the table reports it as a share of the engine's time.
    """
    import tempfile

    from paramsal.engine.dataset import profile_dataset
    from paramsal.zoo import demo_dataset, demo_model

    model, data = demo_model(), demo_dataset("test")
    profiler = Profiler(model)
    batches = [(data.images[s:s + batch_size], data.labels[s:s + batch_size])
               for s in range(0, len(data), batch_size)]

    def engine() -> None:
        for x, y in batches:
            profiler(x, y)

    def end_to_end() -> None:
        with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
            profile_dataset(model, data, tmp, batch_size=batch_size, progress=False)

    engine_s = statistics.median(time_method(engine, repeats))
    full_s = statistics.median(time_method(end_to_end, repeats))
    n = len(data)
    return "\n".join([
        f"demo data ({n} samples, batch {batch_size}), torch {torch.__version__}, {torch.get_num_threads()} threads",
        "", "| what | seconds (median) | samples/s |", "| --- | ---: | ---: |",
        f"| engine alone (Profiler on in-memory batches) | {engine_s:.2f} | {n / engine_s:.0f} |",
        f"| profile_dataset end to end (DataLoader, Parquet, statistics) | {full_s:.2f} | {n / full_s:.0f} |",
        "", f"overhead: {100 * (full_s - engine_s) / engine_s:.1f}% of the engine's time",
    ])
