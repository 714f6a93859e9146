"""One-call GPU check: is paramsal's CUDA path right, and how fast is it, on the card at hand.

Run it from the repository root of a plain copy of the working tree (nothing installed but torch, torchvision,
Triton, numpy, pyarrow and PIL); it finds the package and the test networks itself:

    python scripts/gpu_check.py --out gpu.json

The stages, in order, each timed and recorded on its own (one failing never stops the others; the JSON is written
after every stage, so a run cut short keeps what it measured; past ``--deadline`` seconds the remaining stages are
recorded as skipped):

* ``resnet50_speed``: torchvision's ResNet-50 at batch 256, 224x224, in float32 (torch's default precision) and bf16,
  channels-last on and off: samples/s of a plain forward+backward (the practical limit) and of the Profiler (hooks
  with the fused kernel), the first call's time, the steady median, the ratio to plain, the projected time for
  50,000 images and the peak CUDA memory;
* ``resnet50_correctness``: hooks (``backend="auto"``) vs the loop on a small batch in full float32, under TF32 and
  in bf16: the largest error relative to each row's largest unit, the backend the Profiler ends on, its warnings;
* ``kernel_shapes``: the fused kernel on every distinct ResNet-50 convolution against the float64 torch
  reference, in float32 (TF32 off), TF32 and bf16: the error, the kernel's time and TFLOP/s, and the torch path's
  time for the same layer;
* ``determinism``: the same batch profiled twice, by default and under ``deterministic=True`` settings: equal bits?
* ``data_path``: 8,000 photograph-like JPEGs (500x375) in an ``imagefolder:`` layout: decode rates by worker count,
  ``profile_dataset`` end to end in bf16 against the Profiler alone on in-memory batches (how busy the data path
  keeps the GPU), the writer threads' time, and the host-device synchronizations per batch in the steady state;
* ``architectures``: the model-coverage cases through the benchmark harness at batch 64;
* ``correctness_small``: hooks and vmap vs the loop on the test networks, float64 and float32 in full float32.

``--dry-run`` runs every stage on a tiny CPU workload in one thread (two samples of 32x32, a dozen small JPEGs, two
repeats, the kernel through Triton's interpreter on shrunk shapes), recording what needs CUDA as skipped with the
reason, in about a minute: ``make test`` runs it (tests/test_gpu_check.py), so that
the script cannot rot between the rare runs on a GPU. ``--deadline``, ``--batch`` and ``--images`` override the
workload's sizes. The exit status is 1 when a stage failed (its error and traceback are in the JSON), else 0.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import datetime
import functools
import gc
import json
import multiprocessing
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
# A bare copy of the working tree has nothing installed: the package and the test networks are found here.
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
# Triton reads TRITON_INTERPRET once, when it is first imported (paramsal.kernels.fused imports it), so the dry run's
# choice of the interpreter must be made before the imports below, not after the arguments are parsed.
if "--dry-run" in sys.argv[1:]:
    os.environ["TRITON_INTERPRET"] = "1"

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from nets import SMALL_CASES, TORCHVISION_CASES, batch, build, relative_error  # noqa: E402
from torch import nn  # noqa: E402

import paramsal  # noqa: E402
from paramsal import profile_batch  # noqa: E402
from paramsal.bench.harness import CASES, VMAP_WHOLE, device_name, records, run, table, time_method  # noqa: E402
from paramsal.bench.models import RESNET50_CONVS  # noqa: E402
from paramsal.engine.profile import Profiler  # noqa: E402
from paramsal.engine.units import units_of  # noqa: E402
from paramsal.jobs.bulk import profile_dataset  # noqa: E402
from paramsal.jobs.hardware import default_workers, job_settings  # noqa: E402
from paramsal.kernels import fused  # noqa: E402
from paramsal.kernels.conv import conv_weight_grad_sample, reduce_conv  # noqa: E402
from paramsal.kernels.tf32 import full_float32, tf32_allowed  # noqa: E402
from paramsal.rundir import writing  # noqa: E402
from paramsal.zoo.specs import first_samples, load_data  # noqa: E402

#: The architectures of the model-coverage table, each with the units its bench case profiles (and ConvNeXt with
#: the paper's filters too).
ARCHITECTURES = (("resnet18-cifar", None), ("convnext-tiny", None), ("convnext-tiny", "filters"), ("vit-small", None),
                 ("efficientnet-b0", None), ("bert-small", None))
#: The ImageNet validation set, what the projected times are for.
IMAGENET_VAL = 50_000


@dataclass(frozen=True)
class Workload:
    """Every size the check uses: the GPU run's by default, :data:`DRY` for the dry run on the CPU."""

    #: ResNet-50's speed and the data path: the bulk job's default batch on a GPU
    batch: int = 256
    side: int = 224
    repeats: int = 3
    #: the correctness checks and the kernel's shapes
    check_batch: int = 8
    #: large enough that cuDNN picks the algorithms of real batches
    determinism_batch: int = 64
    #: ResNet-50's conv channels and sides are divided by this (tiny shapes for Triton's interpreter)
    kernel_shrink: int = 1
    kernel_repeats: int = 10
    images: int = 8000
    image_size: tuple[int, int] = (500, 375)  # ImageNet's typical width x height
    transform: str = "imagenet"
    #: DataLoader workers the decode rate is measured at, besides the job's default
    decode_workers: tuple[int, ...] = (4, 8)
    sync_batches: int = 6
    arch_batch: int = 64
    small_batch: int = 6


#: A workload that proves every stage's code on two slow cores in about a minute; its figures mean nothing.
DRY = Workload(batch=2, side=32, repeats=2, check_batch=2, determinism_batch=2, kernel_shrink=16,
               kernel_repeats=2, images=12, image_size=(40, 30), transform="tensor", decode_workers=(0, 2),
               sync_batches=3, arch_batch=2, small_batch=2)


@dataclass(frozen=True)
class Mode:
    """A float precision the checks run in: the kernel's input dtype, the Profiler's precision, and whether
    float32 runs in full precision (TF32 off) or under torch's default settings (TF32 for cuDNN convolutions)."""

    name: str
    dtype: torch.dtype
    precision: str = "float32"
    exact: bool = False

    def settings(self) -> contextlib.AbstractContextManager:
        return full_float32() if self.exact else contextlib.nullcontext()


MODES = {mode.name: mode for mode in (Mode("float64", torch.float64, exact=True),
                                      Mode("float32", torch.float32, exact=True),
                                      Mode("tf32", torch.float32),
                                      Mode("bf16", torch.bfloat16, "bf16"))}


# ------------------------------------------------------------------------------------------------ the runner


class Skip(Exception):
    """A stage or a row that cannot run here; its message is the reason recorded."""


def require(mode: Mode, device: torch.device, kernel: bool = False) -> None:
    """Raises :class:`Skip` where ``mode`` cannot be checked here, for the kernel alone or for a whole model."""
    if mode.name == "tf32" and device.type != "cuda":
        raise Skip("needs CUDA (TF32 is a GPU mode)")
    if kernel and mode.dtype == torch.float64 and device.type == "cuda":
        raise Skip("the kernel takes float64 under Triton's interpreter only")
    if kernel and mode.dtype == torch.bfloat16 and fused.interpreting():
        raise Skip("Triton's interpreter reads bfloat16 as raw integers")


class Stage:
    """What one stage records: free-form figures, rows (one per case, each failing on its own) and the summary
    it printed."""

    def __init__(self) -> None:
        self.figures: dict[str, Any] = {}
        self.rows: list[dict[str, Any]] = []
        self.summary: list[str] = []

    def say(self, text: str) -> None:
        print(text, flush=True)
        self.summary.append(text)

    @contextlib.contextmanager
    def row(self, **keys: Any) -> Iterator[dict[str, Any]]:
        """A row of figures, kept with what it measured before an error (its text and traceback then)."""
        row = dict(keys)
        self.rows.append(row)
        try:
            yield row
        except Skip as why:
            row["skipped"] = str(why)
        except Exception as exc:  # one case failing must not hide the others' figures
            row["error"] = f"{type(exc).__name__}: {exc}"[:1000]
            row["traceback"] = traceback.format_exc()[-4000:]
            self.say(f"  {keys}: {row['error'][:300]}")

    def failed_rows(self) -> int:
        return sum("error" in row for row in self.rows)


class Check:
    """The run: its device, workload and deadline, and the JSON record written after every stage."""

    def __init__(self, out: Path, device: torch.device, work: Workload, deadline_s: float, dry_run: bool):
        self.out, self.device, self.work = out, device, work
        self.started = time.monotonic()
        self.deadline = self.started + deadline_s
        self.record: dict[str, Any] = {
            "script": "scripts/gpu_check.py", "dry_run": dry_run, "device": str(device),
            "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "deadline_s": deadline_s, "workload": dataclasses.asdict(work), "environment": environment(device),
            "stages": []}
        self.save()

    def past_deadline(self) -> bool:
        return time.monotonic() > self.deadline

    def until_deadline(self, items: Iterable, stage: Stage) -> Iterator:
        """``items`` while time remains; the stage records that it was cut short otherwise."""
        for item in items:
            if self.past_deadline():
                stage.figures["cut_short"] = "deadline"
                stage.say("  deadline passed: the remaining cases are left out")
                return
            yield item

    def stage(self, name: str, measure: Callable[[Check, Stage], None]) -> None:
        """Runs one stage, catching its errors and warnings, and saves the record."""
        entry: dict[str, Any] = {"name": name}
        self.record["stages"].append(entry)
        if self.past_deadline():
            entry.update(status="skipped", reason="deadline", wall_s=0.0)
            print(f"\n== {name}: skipped (deadline)", flush=True)
            self.save()
            return
        print(f"\n== {name}", flush=True)
        stage, started = Stage(), time.monotonic()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            entry.update(_outcome(measure, self, stage))
        entry.update(wall_s=time.monotonic() - started, figures=stage.figures, rows=stage.rows,
                     summary=stage.summary, warnings=_distinct(caught))
        self.record["fused_kernel_broken"] = {str(k): v for k, v in fused._broken.items()}
        print(f"== {name}: {entry['status']}{' (' + entry['reason'] + ')' if 'reason' in entry else ''} "
              f"in {entry['wall_s']:.1f} s", flush=True)
        self.save()
        # what a stage left behind (after an out-of-memory error, say) must not hold the next one back
        _release_memory(self.device)

    def save(self) -> None:
        """Writes the record whole or not at all: a run killed while writing keeps the last complete one."""
        self.record["wall_s"] = time.monotonic() - self.started
        partial = self.out.with_name(self.out.name + ".partial")
        partial.write_text(json.dumps(self.record, indent=1, default=str))
        os.replace(partial, self.out)


def _outcome(measure: Callable[[Check, Stage], None], check: Check, stage: Stage) -> dict[str, Any]:
    """The stage's status: ok, skipped (with the reason) or failed (an error, or rows that failed)."""
    try:
        measure(check, stage)
    except Skip as why:
        stage.say(f"  skipped: {why}")
        return {"status": "skipped", "reason": str(why)}
    except Exception as exc:
        stage.say(f"  failed: {type(exc).__name__}: {exc}")
        return {"status": "failed", "reason": f"{type(exc).__name__}: {exc}"[:1000],
                "traceback": traceback.format_exc()[-8000:]}
    if stage.failed_rows():
        return {"status": "failed", "reason": f"{stage.failed_rows()} of {len(stage.rows)} rows failed"}
    return {"status": "ok"}


def _distinct(caught: list[warnings.WarningMessage], most: int = 20) -> list[dict[str, Any]]:
    counts = Counter(f"{w.category.__name__}: {w.message}" for w in caught)
    return [{"text": text[:1000], "count": n} for text, n in counts.most_common(most)]


def _release_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------------ environment


def environment(device: torch.device) -> dict[str, Any]:
    """The card, the software versions, the machine and the float32 settings the figures were measured under."""
    return {**_card(device),
            "cuda": torch.version.cuda, "cudnn": _safely(torch.backends.cudnn.version),
            "triton": getattr(fused.triton, "__version__", None), "torch": torch.__version__,
            "torchvision": _safely(lambda: __import__("torchvision").__version__),
            "python": platform.python_version(), "paramsal": str(Path(paramsal.__file__).parent),
            "git_commit": _safely(_git_commit), "cpu_cores": os.cpu_count(), "dev_shm_gb": _safely(_shm_gb),
            "float32": {"tf32_conv": tf32_allowed("conv"), "tf32_matmul": tf32_allowed("matmul"),
                        "fp32_precision": getattr(torch.backends, "fp32_precision", None)},
            "env": {name: os.environ.get(name) for name in ("TRITON_INTERPRET", "CUBLAS_WORKSPACE_CONFIG",
                                                            "CUDA_VISIBLE_DEVICES")}}


def _card(device: torch.device) -> dict[str, Any]:
    if device.type != "cuda":
        return {"card": device_name("cpu"), "compute_capability": None, "memory_gb": None, "multiprocessors": None,
                "driver": None}
    props = torch.cuda.get_device_properties(device)
    return {"card": props.name, "compute_capability": f"{props.major}.{props.minor}",
            "memory_gb": props.total_memory / 2**30, "multiprocessors": props.multi_processor_count,
            "driver": _safely(_driver_version)}


def _safely(read: Callable[[], Any]) -> Any:
    """``read()``, or "unknown" with the reason: a missing tool must not cost the whole record."""
    try:
        return read()
    except Exception as exc:
        return f"unknown ({type(exc).__name__}: {exc})"[:200]


def _git_commit() -> str:
    done = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
    return done.stdout.strip() if done.returncode == 0 else "unknown"


def _driver_version() -> str:
    # torch reports the CUDA runtime it was built with, not the driver; nvidia-smi knows the driver
    done = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True,
                          text=True, timeout=30)
    return done.stdout.strip().splitlines()[0] if done.returncode == 0 else "unknown"


def _shm_gb() -> dict[str, float]:
    usage = shutil.disk_usage("/dev/shm")
    return {"total": usage.total / 2**30, "free": usage.free / 2**30}


# ------------------------------------------------------------------------------------------------ shared helpers


def resnet50_batch(check: Check, batch_size: int, side: int) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """A randomly initialized ResNet-50 in eval mode on the device, and a batch for it (the harness's case)."""
    case = dataclasses.replace(CASES["resnet50-imagenet"], batch=batch_size, input_shape=(3, side, side),
                               device=str(check.device))
    return case.build()


def plain_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, precision: str) -> Callable[[], None]:
    """A batch's forward and backward pass, nothing per sample: the practical limit of any profiler."""
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32

    def step() -> None:
        model.zero_grad(set_to_none=True)
        with torch.autocast(x.device.type, dtype=dtype, enabled=precision == "bf16"):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
    return step


def measured(step: Callable[[], object], check: Check, batch_size: int) -> dict[str, Any]:
    """The first call's time, the steady median rate over the workload's repeats and their peak CUDA memory."""
    first = time_method(step, 1, warmup=0, device=str(check.device))[0]
    if check.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(check.device)
    median = statistics.median(time_method(step, check.work.repeats, warmup=0, device=str(check.device)))
    peak = torch.cuda.max_memory_allocated(check.device) / 2**20 if check.device.type == "cuda" else None
    return {"first_call_s": first, "median_s": median, "samples_per_s": batch_size / median,
            "projected_50k_s": IMAGENET_VAL * median / batch_size, "peak_mb": peak}


def device_seconds(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    """Median seconds of ``fn`` after a warm-up call: CUDA events on a GPU, the host clock on the CPU."""
    if device.type != "cuda":
        return statistics.median(time_method(fn, repeats))
    fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def row_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """The largest ``|got - want|`` relative to its row's largest ``|want|``."""
    return relative_error(got.double(), want.double())


@contextlib.contextmanager
def wrapped(owner: object, name: str, around: Callable[..., Any]) -> Iterator[None]:
    """``owner.name`` replaced by ``around(original, *args, **kwargs)`` inside the block."""
    original = getattr(owner, name)
    setattr(owner, name, functools.wraps(original)(lambda *args, **kwargs: around(original, *args, **kwargs)))
    try:
        yield
    finally:
        setattr(owner, name, original)


def timing(durations: list[float]) -> Callable[..., Any]:
    """An ``around`` for :func:`wrapped` that adds each call's wall seconds to ``durations`` (from any thread)."""
    def around(original: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            durations.append(time.perf_counter() - started)
    return around


# ------------------------------------------------------------------------------------------------ a. speed


def resnet50_speed(check: Check, stage: Stage) -> None:
    """Plain forward+backward and the Profiler on ResNet-50, per precision and memory layout."""
    work = check.work
    stage.figures.update(batch=work.batch, side=work.side, repeats=work.repeats, tf32_conv=tf32_allowed("conv"))
    configs = [(precision, channels_last) for precision in ("float32", "bf16") for channels_last in (True, False)]
    for precision, channels_last in check.until_deadline(configs, stage):
        speed_config(check, stage, precision, channels_last)
        _release_memory(check.device)


def speed_config(check: Check, stage: Stage, precision: str, channels_last: bool) -> None:
    """One precision and layout: plain first, then the Profiler, each a row, on a fresh model (a layout once set
    stays with the model)."""
    model, x, y = resnet50_batch(check, check.work.batch, check.work.side)
    if channels_last:  # the Profiler would convert the model itself; plain must run in the same layout
        model, x = model.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    steps = {"plain": lambda: plain_step(model, x, y, precision),
             "profiler": lambda: functools.partial(Profiler(model, precision=precision, channels_last=channels_last),
                                                   x, y)}
    plain_rate = None
    for method, make in steps.items():
        model.zero_grad(set_to_none=True)  # plain's gradients would count in the Profiler's peak memory
        with stage.row(precision=precision, channels_last=channels_last, method=method) as row:
            row.update(measured(make(), check, check.work.batch))
            if method == "plain":  # it comes first; if it failed, the Profiler's row has no ratio
                plain_rate = row["samples_per_s"]
            row["x_plain"] = row["samples_per_s"] / plain_rate if plain_rate else None
            stage.say(_speed_line(row))


def _speed_line(row: dict[str, Any]) -> str:
    peak = "" if row["peak_mb"] is None else f", peak {row['peak_mb']:.0f} MB"
    ratio = "" if row["x_plain"] is None else f" ({row['x_plain']:.2f}x plain)"
    return (f"  {row['precision']:8s} channels-last {'on ' if row['channels_last'] else 'off'} {row['method']:8s} "
            f"first {row['first_call_s']:6.2f} s, {row['samples_per_s']:7.1f}/s{ratio}, "
            f"50,000 in {row['projected_50k_s']:.0f} s{peak}")


# ------------------------------------------------------------------------------------------------ b. correctness


def resnet50_correctness(check: Check, stage: Stage) -> None:
    """Hooks (``backend="auto"``) vs the loop on ResNet-50, per precision mode; also vs the full-float32 loop."""
    model, x, y = resnet50_batch(check, check.work.check_batch, check.work.side)
    exact = None
    for name in ("float32", "tf32", "bf16"):
        mode = MODES[name]
        with stage.row(mode=name) as row:
            require(mode, check.device)
            with mode.settings():
                want = Profiler(model, backend="loop", precision=mode.precision)(x, y).profiles
                got, row["backend"], row["warnings"] = auto_profiled(model, x, y, mode.precision)
            exact = want if name == "float32" else exact
            row["max_rel_err"] = row_error(got, want)
            if exact is not None:
                row["max_rel_err_vs_float32_loop"] = row_error(got, exact)
            stage.say(f"  {name:8s} hooks vs loop {row['max_rel_err']:.2e} (vs full-float32 loop "
                      f"{row.get('max_rel_err_vs_float32_loop', float('nan')):.2e}), backend {row['backend']}, "
                      f"{len(row['warnings'])} warning(s)")


def auto_profiled(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                  precision: str) -> tuple[torch.Tensor, str, list[str]]:
    """``backend="auto"``'s profiles, the backend it ended on and every warning it gave (not only paramsal's)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        profiler = Profiler(model, precision=precision)
        profiles = profiler(x, y).profiles
    return profiles, profiler.backend, [f"{w.category.__name__}: {w.message}" for w in caught]


# ------------------------------------------------------------------------------------------------ c. kernel


def kernel_shapes(check: Check, stage: Stage) -> None:
    """The fused kernel on every distinct ResNet-50 convolution, per mode, against the float64 reference."""
    if not fused.available(torch.zeros(1, device=check.device)):
        raise Skip("the fused kernel cannot run here (Triton missing, or no interpreter on a CPU)")
    stage.figures.update(batch=check.work.check_batch, shrink=check.work.kernel_shrink,
                         repeats=check.work.kernel_repeats, reference="float64 torch path on the mode's inputs")
    for shape in check.until_deadline(RESNET50_CONVS, stage):
        conv, x, gy = conv_case(shape, check)
        for mode in MODES.values():
            with stage.row(shape=shape, mode=mode.name) as row:
                require(mode, check.device, kernel=True)
                row.update(kernel_figures(conv, x, gy, mode, check))
                row.update(torch_path_figures(conv, x, gy, mode, check, row["kernel_ms"]))
        stage.say(_kernel_line(shape, [r for r in stage.rows if r["shape"] == shape]))


def conv_case(shape: tuple[int, ...], check: Check) -> tuple[nn.Conv2d, torch.Tensor, torch.Tensor]:
    """The conv of one ``RESNET50_CONVS`` entry (shrunk for a dry run) and channels-last inputs and output
    gradients, as the channels-last model hands them to the kernel."""
    cin, cout, k, stride, padding, side = shape
    shrink = check.work.kernel_shrink
    cin, cout, side = max(1, cin // shrink), max(1, cout // shrink), max(k, side // shrink)
    out_side = (side + 2 * padding - k) // stride + 1
    n, last = check.work.check_batch, torch.channels_last
    conv = nn.Conv2d(cin, cout, k, stride, padding, bias=False).to(check.device)
    x = torch.randn(n, cin, side, side, device=check.device).contiguous(memory_format=last)
    gy = torch.randn(n, cout, out_side, out_side, device=check.device).contiguous(memory_format=last)
    return conv, x, gy


def kernel_figures(conv: nn.Conv2d, x: torch.Tensor, gy: torch.Tensor, mode: Mode, check: Check) -> dict[str, Any]:
    """Error and speed of the kernel in one mode. The reference takes the inputs as rounded to the mode's dtype,
    so the error is the kernel's arithmetic alone."""
    xm, gym = x.to(mode.dtype), gy.to(mode.dtype)  # the layout is kept
    geometry = fused.Geometry(conv.kernel_size, conv.stride, conv.padding)
    with mode.settings():
        want = conv_weight_grad_sample(copy.deepcopy(conv).double(), xm.double(), gym.double()).flatten(2).abs().mean(2)
        with fused.mode("on"):  # a failing variant raises here instead of quietly taking the torch path
            kernel = functools.partial(fused.row_abs_means, xm, gym, geometry, out_dtype=torch.float32)
            got = kernel()
            seconds = device_seconds(kernel, check.device, check.work.kernel_repeats)
    n, c, k, (kh, kw), (oh, ow) = x.shape[0], x.shape[1], gy.shape[1], conv.kernel_size, gy.shape[2:]
    flops = 2 * n * k * c * kh * kw * oh * ow
    return {"max_rel_err": row_error(got, want), "kernel_ms": 1e3 * seconds, "tflops": flops / seconds / 1e12,
            "tf32_on": mode.name == "tf32" and tf32_allowed("conv")}


def torch_path_figures(conv: nn.Conv2d, x: torch.Tensor, gy: torch.Tensor, mode: Mode, check: Check,
                       kernel_ms: float) -> dict[str, Any]:
    """The library's own reduction of the layer with the kernel off, timed the same way: what the kernel brings."""
    layer = copy.deepcopy(conv).to(mode.dtype)
    xm, gym, filters = x.to(mode.dtype), gy.to(mode.dtype), list(units_of(layer, "filters"))
    with mode.settings(), fused.mode("off"):
        seconds = device_seconds(lambda: reduce_conv(layer, xm, gym, filters, "mean_abs"), check.device,
                                 check.work.kernel_repeats)
    return {"torch_path_ms": 1e3 * seconds, "speedup_vs_torch_path": 1e3 * seconds / kernel_ms}


def _kernel_line(shape: tuple[int, ...], rows: list[dict[str, Any]]) -> str:
    def cell(row: dict[str, Any]) -> str:
        if "max_rel_err" not in row:
            return f"{row['mode']} -"
        return (f"{row['mode']} {row['max_rel_err']:.1e} {row['kernel_ms']:.3f} ms {row['tflops']:.1f} TFLOP/s "
                f"{row.get('speedup_vs_torch_path', float('nan')):.1f}x torch")
    return f"  {str(shape):28s} " + " | ".join(cell(row) for row in rows)


# ------------------------------------------------------------------------------------------------ d. determinism


def determinism(check: Check, stage: Stage) -> None:
    """The same batch profiled twice, with the job's default settings and with ``deterministic=True``'s."""
    model, x, y = resnet50_batch(check, check.work.determinism_batch, check.work.side)
    # job_settings only sets CUBLAS_WORKSPACE_CONFIG if the environment lacks it, and cuBLAS reads it once: record
    # whether the process started with it, since earlier stages have used cuBLAS by now
    stage.figures["cublas_workspace_config_at_start"] = check.record["environment"]["env"]["CUBLAS_WORKSPACE_CONFIG"]
    for precision in ("float32", "bf16"):
        for deterministic in (False, True):
            with stage.row(precision=precision, deterministic=deterministic) as row:
                with job_settings(check.device, deterministic):
                    profiler = Profiler(model, precision=precision)
                    first, second = profiler(x, y).profiles, profiler(x, y).profiles
                row["bitwise_equal"] = torch.equal(first, second)
                row["max_abs_diff"] = float((first - second).abs().max())
                stage.say(f"  {precision:8s} deterministic={str(deterministic):5s} bitwise equal: "
                          f"{row['bitwise_equal']} (largest difference {row['max_abs_diff']:.1e})")


# ------------------------------------------------------------------------------------------------ e. data path


def data_path(check: Check, stage: Stage) -> None:
    """JPEGs written, decoded by DataLoader workers, profiled end to end, against the Profiler alone."""
    work = check.work
    with scratch_folder(work) as root:
        stage.figures.update(folder=str(root.parent), images=work.images, image_size=work.image_size, batch=work.batch,
                             precision="bf16")
        with stage.row(part="write_jpegs") as row:
            row["seconds"] = write_jpegs(root / "images", work.images, work.image_size)
            row["megabytes"] = sum(p.stat().st_size for p in (root / "images").rglob("*.jpg")) / 2**20
            stage.say(f"  {work.images} JPEGs ({row['megabytes']:.0f} MB) written in {row['seconds']:.1f} s")
        data = load_data(f"imagefolder:{root / 'images'}", transform=work.transform)
        decode_rates(data, check, stage)
        model = resnet50_batch(check, 1, work.side)[0]
        with stage.row(part="profiler_alone") as row:
            row.update(profiler_alone(model, tuple(data[0][0].shape), check))
        with stage.row(part="profile_dataset") as row:
            row.update(end_to_end(model, data, root / "run", check))
        with stage.row(part="syncs") as row:
            row.update(sync_counts(model, data, root / "syncs", check))
            if check.device.type != "cuda":  # the loop and its batch marks ran; only the count needs CUDA
                raise Skip("needs CUDA (torch's sync debug mode)")
    _data_path_summary(stage)


@contextlib.contextmanager
def scratch_folder(work: Workload) -> Iterator[Path]:
    """A temporary folder, in /dev/shm when it has room for the images and one run (reads and writes then cost
    no disk), else the system's temporary folder; removed afterwards."""
    needed = work.images * (50_000 + 26_560 * 4 * 1.2)  # a JPEG each, and one row of ResNet-50's units in a run
    shm = Path("/dev/shm")
    parent = shm if shm.is_dir() and shutil.disk_usage(shm).free > 2 * needed else None
    with tempfile.TemporaryDirectory(prefix="paramsal-gpu-check-", dir=parent) as tmp:
        yield Path(tmp)


def write_jpegs(folder: Path, count: int, size: tuple[int, int], classes: int = 10) -> float:
    """Writes ``count`` photograph-like JPEGs in ``classes`` class folders with a pool of processes; returns the
    seconds it took. Forked workers: they only run numpy and PIL, never CUDA."""
    started = time.perf_counter()
    for c in range(classes):
        (folder / f"class{c}").mkdir(parents=True)
    cores = os.cpu_count() or 1
    chunk = max(1, count // (4 * cores))
    chunks = [(folder, start, min(start + chunk, count), size, classes) for start in range(0, count, chunk)]
    with ProcessPoolExecutor(cores, mp_context=multiprocessing.get_context("fork")) as pool:
        list(pool.map(_write_chunk, chunks))
    return time.perf_counter() - started


def _write_chunk(job: tuple[Path, int, int, tuple[int, int], int]) -> None:
    """Smoothed noise at quality 90, as scripts/jpeg_decode.py writes it: it compresses like a photograph."""
    from PIL import Image, ImageFilter

    folder, start, stop, (width, height), classes = job
    rng = np.random.default_rng(start)  # a seed per chunk: the same images whatever order the pool runs them in
    for i in range(start, stop):
        noise = Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8))
        noise.filter(ImageFilter.GaussianBlur(3)).save(folder / f"class{i % classes}" / f"{i}.jpg", quality=90)


def decode_rates(data: Any, check: Check, stage: Stage) -> None:
    """Images per second that DataLoader workers decode and transform, at each worker count, batches only."""
    from torch.utils.data import DataLoader

    for workers in sorted({*check.work.decode_workers, default_workers(check.device)}):
        with stage.row(part="decode", workers=workers) as row:
            started = time.perf_counter()
            for _ in DataLoader(data, batch_size=check.work.batch, num_workers=workers):
                pass
            row["images_per_s"] = len(data) / (time.perf_counter() - started)
            stage.say(f"  decode with {workers:2d} workers: {row['images_per_s']:.0f} images/s")


def profiler_alone(model: nn.Module, shape: tuple[int, ...], check: Check) -> dict[str, Any]:
    """The Profiler's own rate in bf16 on a batch already on the device: what the data path must keep up with."""
    x = torch.randn(check.work.batch, *shape, device=check.device)
    y = torch.randint(0, 1000, (check.work.batch,), device=check.device)
    profiler = Profiler(model, precision="bf16")
    return measured(functools.partial(profiler, x, y), check, check.work.batch)


def end_to_end(model: nn.Module, data: Any, out: Path, check: Check) -> dict[str, Any]:
    """``profile_dataset`` in bf16 with the default workers, timed whole, and its writer threads' seconds: in
    ``write_part`` (Parquet, sha256, fsync) and in all of a part's work on the thread (moments, tables too)."""
    write_part_s: list[float] = []
    thread_s: list[float] = []
    with wrapped(writing, "write_part", timing(write_part_s)), \
            wrapped(writing.PartWriter, "_write", timing(thread_s)):
        started = time.perf_counter()
        profile_dataset(model, data, out, batch_size=check.work.batch, precision="bf16", progress=False)
        seconds = time.perf_counter() - started
    shutil.rmtree(out)  # room for the next run
    return {"seconds": seconds, "samples_per_s": len(data) / seconds,
            "projected_50k_s": IMAGENET_VAL * seconds / len(data), "workers": default_workers(check.device),
            "parts": len(write_part_s), "write_part_s": sum(write_part_s), "writer_thread_s": sum(thread_s)}


def sync_counts(model: nn.Module, data: Any, out: Path, check: Check) -> dict[str, Any]:
    """Host-device synchronizations per batch of ``profile_dataset``'s loop, as torch's sync debug mode reports
    them, and where they come from. The steady state leaves out the first two batches (checks, compilation) and
    the last (the job's end lands it). On a CPU nothing is counted."""
    marks: list[int] = []  # how many warnings had come when each batch's Profiler call began
    subset = first_samples(data, check.work.sync_batches * check.work.batch)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")

        def marking(original: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
            marks.append(len(caught))
            return original(*args, **kwargs)

        with wrapped(Profiler, "__call__", marking), sync_debug("warn", check.device):
            profile_dataset(model, subset, out, batch_size=check.work.batch, precision="bf16", progress=False)
    shutil.rmtree(out)
    syncs = [i for i, w in enumerate(caught) if "synchroniz" in str(w.message)]
    bounds = [*marks, len(caught)]
    per_batch = [sum(a <= i < b for i in syncs) for a, b in zip(bounds, bounds[1:])]
    first, last = bounds[min(2, len(marks))], bounds[max(len(marks) - 1, 0)]
    steady = [caught[i] for i in syncs if first <= i < last]
    return {"batches": len(marks), "per_batch": per_batch, "steady_median": statistics.median(per_batch[2:-1] or [0]),
            "before_first_batch": sum(i < bounds[0] for i in syncs), "total": len(syncs),
            "steady_sources": Counter(f"{Path(w.filename).name}:{w.lineno}" for w in steady).most_common(20)}


@contextlib.contextmanager
def sync_debug(mode: str, device: torch.device) -> Iterator[None]:
    """torch's CUDA sync debug mode inside the block (nothing on a CPU), restored afterwards."""
    if device.type != "cuda":
        yield
        return
    before = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode(mode)
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(before)


def _data_path_summary(stage: Stage) -> None:
    parts = {row["part"]: row for row in stage.rows if "error" not in row and "skipped" not in row}
    alone, full = parts.get("profiler_alone"), parts.get("profile_dataset")
    if alone and full:
        stage.figures["busy"] = full["samples_per_s"] / alone["samples_per_s"]
        stage.say(f"  profiler alone {alone['samples_per_s']:.0f}/s, profile_dataset {full['samples_per_s']:.0f}/s "
                  f"({100 * stage.figures['busy']:.0f}% busy), 50,000 in {full['projected_50k_s']:.0f} s; writers "
                  f"{full['writer_thread_s']:.1f} s ({full['write_part_s']:.1f} s in write_part) for "
                  f"{full['parts']} parts")
    if "syncs" in parts:
        syncs = parts["syncs"]
        stage.say(f"  syncs per batch {syncs['per_batch']} (steady median {syncs['steady_median']}), from "
                  f"{syncs['steady_sources'][:5]}")


# ------------------------------------------------------------------------------------------------ f, g


def architectures(check: Check, stage: Stage) -> None:
    """The model-coverage cases through the harness: plain, loop, hooks, vmap and whole-batch vmap."""
    for name, units in check.until_deadline(ARCHITECTURES, stage):
        case = dataclasses.replace(CASES[name], batch=check.work.arch_batch, device=str(check.device),
                                   units=units or CASES[name].units)
        with stage.row(case=name, units=case.units) as row:
            try:
                timings = run(case, ("hooks", "vmap", VMAP_WHOLE), check.work.repeats, memory=False)
            except ImportError as exc:  # an optional model package (transformers) this machine lacks
                raise Skip(f"needs {exc.name}") from exc
            plain = next(t for t in timings if t.method == "plain")
            row["methods"] = [{**r, "x_plain": plain.median / r["median_s"]} for r in records(timings)]
            stage.say(table(timings))


def correctness_small(check: Check, stage: Stage) -> None:
    """Hooks and vmap vs the loop on the test networks, float64 and float32, in full float32."""
    for case in check.until_deadline(SMALL_CASES + TORCHVISION_CASES, stage):
        for dtype in (torch.float64, torch.float32):
            with stage.row(case=case.name, dtype=str(dtype).removeprefix("torch.")) as row, full_float32():
                model = build(case, dtype).to(check.device)
                x, y = (t.to(check.device) for t in batch(case, check.work.small_batch, dtype))
                want = profile_batch(model, x, y, backend="loop", units=case.units)
                for backend in ("hooks", "vmap"):
                    row[backend] = row_error(profile_batch(model, x, y, backend=backend, units=case.units), want)
                stage.say(f"  {case.name:24s} {row['dtype']:8s} hooks {row['hooks']:.2e} vmap {row['vmap']:.2e}")


STAGES = {"resnet50_speed": resnet50_speed, "resnet50_correctness": resnet50_correctness,
          "kernel_shapes": kernel_shapes, "determinism": determinism, "data_path": data_path,
          "architectures": architectures, "correctness_small": correctness_small}


# ------------------------------------------------------------------------------------------------ main


def main() -> None:
    # --dry-run is looked for before the arguments are parsed (it picks Triton's interpreter): no abbreviation of it
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--out", type=Path, default=Path("gpu.json"), help="the JSON record (default gpu.json)")
    parser.add_argument("--dry-run", action="store_true", help="a tiny CPU workload, to prove the script runs")
    parser.add_argument("--deadline", type=float, default=450.0,
                        help="seconds from the start after which the remaining stages are skipped (default 450)")
    parser.add_argument("--batch", type=int, help="ResNet-50's batch for speed and the data path (default 256)")
    parser.add_argument("--images", type=int, help="JPEGs for the data path (default 8000)")
    args = parser.parse_args()
    device = torch.device("cpu" if args.dry_run else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device here; --dry-run tries the script out on the CPU")
    if args.dry_run:  # its figures mean nothing, and one thread keeps it from fighting other jobs for two cores
        torch.set_num_threads(1)
    work = DRY if args.dry_run else Workload()
    work = dataclasses.replace(work, **{k: v for k, v in (("batch", args.batch), ("images", args.images)) if v})
    args.out.parent.mkdir(parents=True, exist_ok=True)
    check = Check(args.out.resolve(), device, work, args.deadline, args.dry_run)
    print(_environment_line(check.record["environment"]), flush=True)
    for name, measure in STAGES.items():
        check.stage(name, measure)
    print("\n" + "\n".join(f"{s['name']:22s} {s['status']:8s} {s['wall_s']:7.1f} s  {s.get('reason', '')[:90]}"
                           for s in check.record["stages"]))
    print(f"results: {check.out}", flush=True)
    sys.exit(1 if any(s["status"] == "failed" for s in check.record["stages"]) else 0)


def _environment_line(env: dict[str, Any]) -> str:
    return (f"{env['card']} (compute {env['compute_capability']}, driver {env['driver']}), torch {env['torch']}, "
            f"CUDA {env['cuda']}, cuDNN {env['cudnn']}, Triton {env['triton']}, commit {env['git_commit']}, "
            f"{env['cpu_cores']} cores, /dev/shm {env['dev_shm_gb']}, TF32 conv {env['float32']['tf32_conv']} "
            f"matmul {env['float32']['tf32_matmul']}")


if __name__ == "__main__":
    main()
