"""The scale benchmark: a run with ResNet-50's unit count at ImageNet-val size, built and read on this machine.

The model is as cheap per sample as a model with 26,560 units can be (one
1x1 convolution with 26,560 output channels on 3x1x1 inputs, then a linear
head), so that the figures are those of the data path, the run directory
and the analyses rather than of the network: profiling time, bytes on disk,
read rates of :meth:`Run.iter_profiles` and of pandas / duckdb over the
parts, and the time and peak memory of ``paramsal neighbors`` (in a process
of its own, which reports its peak resident set).

    paramsal bench --scale --samples 50000 --out /tmp/scale
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import TensorDataset

#: ResNet-50's filters, the paper's ImageNet model, and its top-1 accuracy on ImageNet val (torchvision V1 weights).
RESNET50_UNITS = 26_560
ACCURACY = 0.7613


def synthetic_model(units: int = RESNET50_UNITS, classes: int = 10, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, units, 1), nn.ReLU(), nn.Flatten(), nn.Linear(units, classes))


def synthetic_data(model: nn.Module, samples: int, accuracy: float = ACCURACY, classes: int = 10,
                   seed: int = 0) -> TensorDataset:
    """Random inputs labelled with the model's own prediction, except a random ``1 - accuracy`` of them.

    So that the model makes as many mistakes as ResNet-50 does on ImageNet
    val, and the analyses of mistakes have as many samples to work on.
    """
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(samples, 3, 1, 1, generator=generator)
    with torch.no_grad():
        labels = torch.cat([model(inputs[s:s + 1024]).argmax(1) for s in range(0, samples, 1024)])
    wrong = torch.rand(samples, generator=generator) >= accuracy
    shift = torch.randint(1, classes, (samples,), generator=generator)
    return TensorDataset(inputs, torch.where(wrong, (labels + shift) % classes, labels))


def scale_report(samples: int, out: str | os.PathLike, units: int = RESNET50_UNITS, batch_size: int = 256,
                 rows: int = 1024, k: int = 10) -> str:
    """Builds the run under ``out`` (resuming one already there) and returns the figures as a Markdown table."""
    from paramsal.jobs.bulk import profile_dataset

    out = Path(out)
    root = out / f"run-{samples}x{units}"
    figures: list[tuple[str, str]] = []
    started = time.perf_counter()
    model = synthetic_model(units)
    run = profile_dataset(model, synthetic_data(model, samples), root, batch_size=batch_size, device="cpu",
                          progress=sys.stderr.isatty())
    figures.append(("profiling (or resuming) the run", f"{time.perf_counter() - started:.1f} s"))
    files = [root / p.file for p in run.parts]
    on_disk = sum(f.stat().st_size for f in files)
    profile_bytes = samples * units * 4
    figures.append(("profiles on disk (parts)", f"{on_disk / 1e9:.2f} GB ({profile_bytes / 1e9:.2f} GB of float32)"))
    for what, read in (("Run.iter_profiles (checked, raw)", lambda: _iter_profiles(run, rows)),
                       ("pandas.read_parquet, part by part", lambda: _pandas(files)),
                       ("duckdb over profiles/*.parquet", lambda: _duckdb(root))):
        if what.startswith("duckdb") and importlib.util.find_spec("duckdb") is None:
            figures.append((f"read rate: {what}", "not measured: duckdb is not installed (pip install duckdb)"))
            continue
        seconds = _timed(read)
        figures.append((f"read rate: {what}", f"{profile_bytes / seconds / 1e9:.2f} GB/s ({seconds:.1f} s)"))
    mistakes = len(run.sample_ids("misclassified"))
    seconds, peak = _peak(["neighbors", str(root), "--k", str(k), "--out", str(out / "neighbors")])
    figures.append((f"paramsal neighbors --k {k} ({mistakes:,} misclassified among themselves)",
                    f"{seconds:.1f} s, peak RSS {peak / 1e9:.2f} GB"))
    seconds, peak = _peak(["depth-bias", str(root), "--k", str(k), "--out", str(out / "depth-bias")])
    figures.append((f"paramsal depth-bias --k {k}: POT tails of every unit fitted, mistakes scored",
                    f"{seconds:.1f} s, peak RSS {peak / 1e9:.2f} GB"))
    head = (f"{samples:,} samples x {units:,} units, batch {batch_size}, {torch.get_num_threads()} threads, "
            f"{os.cpu_count()} CPUs, torch {torch.__version__}")
    lines = [head, "", "| what | figure |", "| --- | ---: |"] + [f"| {a} | {b} |" for a, b in figures]
    return "\n".join(lines)


def _iter_profiles(run, rows: int) -> None:
    for _ in run.iter_profiles(rows=rows, standardized=False):
        pass


def _pandas(files: list[Path]) -> None:
    import pandas as pd

    for path in files:
        pd.read_parquet(path, columns=["profile"])


def _duckdb(root: Path) -> None:
    import duckdb

    # The sum of every profile's first unit makes duckdb read each profile list, not just the row count.
    duckdb.execute(f"select sum(profile[1]) from read_parquet('{root}/profiles/part-*.parquet')").fetchall()


def _timed(work: Callable[[], None]) -> float:
    started = time.perf_counter()
    work()
    return time.perf_counter() - started


#: Runs a paramsal command, then prints its process's peak resident set (VmHWM; ``ru_maxrss`` would include
#: what the process held before it exec'ed Python).
_PEAK = ("import sys\nfrom paramsal.cli import main\ncode = main(sys.argv[1:])\n"
         "print(next(l for l in open('/proc/self/status') if l.startswith('VmHWM')).split()[1])\nsys.exit(code)")


def _peak(arguments: list[str]) -> tuple[float, int]:
    """Wall seconds and peak resident bytes of ``paramsal ARGUMENTS`` in a process of its own."""
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", _PEAK, *arguments], check=True, capture_output=True, text=True)
    return time.perf_counter() - started, int(done.stdout.split()[-1]) * 1024


__all__ = ["RESNET50_UNITS", "scale_report", "synthetic_data", "synthetic_model"]
