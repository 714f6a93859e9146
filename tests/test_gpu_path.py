"""The GPU path, proved where a CPU can prove it: precision settings, the first-row proof under TF32, the fallback
when Triton fails, bf16/fp16 captures reaching the kernel as they are, the kernel's column order on ResNet-50's
convolutions, the torch path's tiles on a GPU, defaults chosen by device, features from the profiling pass."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from nets import SMALL_CASES, batch, build
from torch import nn

import paramsal.engine.profile as profile_module
from paramsal import Profiler, profile_batch
from paramsal.bench.models import RESNET50_CONVS
from paramsal.engine import backends
from paramsal.errors import ParamsalWarning
from paramsal.jobs import hardware as devices
from paramsal.kernels import fused
from paramsal.kernels.conv import conv_weight_grad_sample
from paramsal.kernels.tiles import tile_shape

needs_kernel = pytest.mark.skipif(not fused.available(torch.zeros(1)), reason="needs Triton's interpreter")
CASE = next(c for c in SMALL_CASES if c.name == "plain_cnn_conv_linear")


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float(((got - want).abs() / want.abs().amax(1, keepdim=True)).max())


# ----------------------------------------------------------------------------------------------- precision


#: Each documented way to set float32 precision, and whether TF32 is then allowed for (conv, matmul). PyTorch tells
#: a value set by the user from a default, which a process cannot undo: each runs in a fresh process.
SETTINGS = {"fp32_precision=ieee": ("torch.backends.fp32_precision = 'ieee'", False, False),
            "conv tf32, matmul ieee": ("torch.backends.cudnn.conv.fp32_precision = 'tf32'\n"
                                       "torch.backends.cuda.matmul.fp32_precision = 'ieee'", True, False),
            "legacy allow_tf32 flags": ("torch.backends.cudnn.allow_tf32 = False\n"
                                        "torch.backends.cuda.matmul.allow_tf32 = True", False, True),
            "set_float32_matmul_precision(high)": ("torch.set_float32_matmul_precision('high')", True, True)}

#: Reads the settings the way the kernel does, then profiles with the kernel forced on (it read them inside the
#: backward pass, where the first one crashed it) against the loop.
SETTING_CHECK = """
import sys, torch
sys.path.insert(0, {tests!r})
from nets import SMALL_CASES, batch, build
from paramsal import profile_batch
from paramsal.kernels import fused, tf32
{setting}
case = next(c for c in SMALL_CASES if c.name == "plain_cnn_conv_linear")
model = build(case, torch.float32)
x, y = batch(case, 4, torch.float32)
want = profile_batch(model, x, y, backend="loop", units=case.units)
with fused.mode("on"):
    got = profile_batch(model, x, y, backend="hooks", units=case.units)
error = ((got - want).abs() / want.abs().amax(1, keepdim=True)).max()
print(tf32.tf32_allowed("conv"), tf32.tf32_allowed("matmul"), float(error))
"""


def fresh_process(code: str) -> str:
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "TRITON_INTERPRET": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.strip().splitlines()[-1]


@needs_kernel
@pytest.mark.parametrize("setting", list(SETTINGS), ids=list(SETTINGS))
def test_every_documented_precision_setting_is_read_and_hooks_still_equal_the_loop(setting):
    code, conv, matmul = SETTINGS[setting]
    allowed_conv, allowed_matmul, error = fresh_process(
        SETTING_CHECK.format(tests=str(Path(__file__).parent), setting=code)).split()
    assert (allowed_conv, allowed_matmul) == (str(conv), str(matmul))
    assert float(error) <= 1e-5


def test_full_float32_switches_tf32_off_and_leaves_the_users_settings_as_they_were():
    """Inside, no TF32 anywhere; after, a default is still a default (the user's later generic setting reaches it)
    and a value the user set is theirs again."""
    out = fresh_process("""
import torch
from paramsal.kernels import tf32
b = torch.backends
with tf32.full_float32():
    inside = (tf32.tf32_allowed("conv"), tf32.tf32_allowed("matmul"))
b.fp32_precision = "ieee"
default_follows = b.cudnn.conv.fp32_precision
b.fp32_precision = "none"
b.cudnn.conv.fp32_precision = "tf32"
with tf32.full_float32():
    inside += (tf32.tf32_allowed("conv"),)
print(inside == (False, False, False), default_follows, b.cudnn.conv.fp32_precision, tf32.reduced(torch.zeros(1)))
""")
    assert out == "True ieee tf32 False"


# ----------------------------------------------------------------------------------------------- the first-row proof


def tf32_like(run, exact: list[bool], error: float):
    """A backend whose batched rows carry TF32-sized rounding, except in full float32 (as on a GPU)."""
    def rounded(model, inputs, *args):
        result = run(model, inputs, *args)
        if not exact[0]:
            noise = 1 + error * torch.linspace(-1, 1, result.profiles.shape[1])
            result.profiles = result.profiles * noise
        return result
    return rounded


@pytest.mark.parametrize(("error", "falls_back"), [(2e-3, False), (5e-2, True)], ids=["tf32-rounding", "mixing"])
def test_the_first_row_proof_runs_in_full_float32_where_the_batch_may_use_tf32(error, falls_back, monkeypatch):
    """Rounding of 2e-3 (twice TF32's worst seen on ResNet-50) passes because the proof is recomputed in full
    float32; a difference the proof must catch (a backward pass that mixes samples) still does."""
    exact = [False]

    class Exact:
        def __enter__(self):
            exact[0] = not falls_back  # a real mixing stays in full float32 too
        def __exit__(self, *exc):
            exact[0] = False

    monkeypatch.setattr(profile_module.tf32, "reduced", lambda t: True)
    monkeypatch.setattr(profile_module.tf32, "full_float32", Exact)
    monkeypatch.setitem(backends.BACKEND_FUNCTIONS, "hooks", tf32_like(backends.hooks_backend, exact, error))
    model = build(CASE, torch.float32)
    x, y = batch(CASE, 4, torch.float32)
    profiler = Profiler(model, units=CASE.units)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        profiler(x, y)
    assert (profiler.backend != "hooks") == falls_back
    assert any(issubclass(w.category, ParamsalWarning) for w in caught) == falls_back


# ----------------------------------------------------------------------------------------------- Triton failing


@needs_kernel
def test_a_kernel_that_fails_to_compile_falls_back_to_the_torch_path_once(monkeypatch):
    def broken():
        class Launcher:
            def __getitem__(self, grid):
                def launch(*args, **kwargs):
                    raise RuntimeError("out of resource: shared memory, Required: 196608, Hardware limit: 101376")
                return launch
        return Launcher()

    monkeypatch.setattr(fused, "_kernel", broken)
    monkeypatch.setattr(fused, "preferred", lambda t: True)  # "auto" hands CPU tensors to it, as CUDA ones
    monkeypatch.setattr(fused, "_broken", {})
    monkeypatch.setattr(fused, "_proven", set())
    model = build(CASE, torch.float32)
    x, y = batch(CASE, 4, torch.float32)
    want = profile_batch(model, x, y, backend="loop", units=CASE.units)
    with pytest.warns(ParamsalWarning, match="fused Triton kernel failed on cpu .*out of resource") as caught:
        got = profile_batch(model, x, y, backend="hooks", units=CASE.units)
    assert relative_error(got, want) <= 1e-5
    assert sum("fused Triton kernel" in str(w.message) for w in caught) == 1  # several layers, one warning
    assert fused._broken
    with fused.mode("on"), pytest.raises(RuntimeError, match="out of resource"):  # forced: the error itself
        profile_batch(model, x, y, backend="hooks", units=CASE.units)


# ----------------------------------------------------------------------------------------------- reduced precision


@needs_kernel
def test_fp16_captures_reach_the_kernel_in_fp16_and_equal_the_float32_copies(monkeypatch):
    """Under a lowered precision the conv and Linear captures go to the kernel as they are (bf16 alike, on a GPU:
    Triton's interpreter cannot read bf16); the torch path, which copies them to float32, gives the same rows."""
    seen = []
    real = fused.row_abs_means

    def spy(x, gy, *args, **kwargs):
        seen.append((x.dtype, gy.dtype, kwargs.get("out_dtype")))
        return real(x, gy, *args, **kwargs)

    monkeypatch.setattr(fused, "row_abs_means", spy)
    model = build(CASE, torch.float32)
    x, y = batch(CASE, 4, torch.float32)
    with fused.mode("on"):
        got = profile_batch(model, x, y, backend="hooks", units=CASE.units, precision="fp16")
    lowered = [dtypes for dtypes in seen if dtypes[0] == torch.float16]  # the first conv sees the float32 image
    assert len(lowered) >= len(seen) - 1 and all(gy == torch.float16 for _, gy, _ in lowered)
    assert all(out == torch.float32 for *_, out in seen)  # accumulated in float32, returned so
    with fused.mode("off"):
        want = profile_batch(model, x, y, backend="hooks", units=CASE.units, precision="fp16")
    assert got.dtype == want.dtype == torch.float32
    assert relative_error(got, want) <= 1e-4


# ------------------------------------------------------------------------------------------ the kernel on ResNet-50


def test_the_resnet50_shapes_are_the_models():
    import torchvision

    model = torchvision.models.resnet50(weights=None).eval()
    seen: dict[tuple, None] = {}

    def note(conv, args, out):
        seen[(conv.in_channels, conv.out_channels, conv.kernel_size[0], conv.stride[0], conv.padding[0],
              args[0].shape[-1])] = None

    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            module.register_forward_hook(note)
    with torch.no_grad():
        model(torch.zeros(1, 3, 224, 224))
    assert tuple(seen) == RESNET50_CONVS


def kernel_error(cin: int, cout: int, k: int, stride: int, padding: int, side: int) -> float:
    conv = nn.Conv2d(cin, cout, k, stride=stride, padding=padding).double()
    x = torch.randn(1, cin, side, side, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        gy = torch.randn_like(conv(x))
    want = conv_weight_grad_sample(conv, x, gy).flatten(2).abs().mean(2)
    got = fused.row_abs_means(x, gy, fused.Geometry(conv.kernel_size, conv.stride, conv.padding, conv.dilation))
    return float((got - want).abs().max() / want.abs().max())


#: A fast sample of the shapes for make test: the 7x7 stem, 3x3 with stride 1 and 2, a strided and a wide 1x1.
QUICK = [RESNET50_CONVS[i] for i in (0, 2, 6, 8, 21)]


@needs_kernel
@pytest.mark.parametrize("shape", QUICK, ids=str)
def test_the_kernels_column_order_is_exact_on_resnet50_convolutions(shape):
    assert kernel_error(*shape) <= 1e-12


@needs_kernel
@pytest.mark.full
@pytest.mark.parametrize("shape", [s for s in RESNET50_CONVS if s not in QUICK], ids=str)
def test_the_kernel_is_exact_on_every_resnet50_convolution(shape):
    assert kernel_error(*shape) <= 1e-12


def test_the_torch_path_takes_few_large_tiles_on_a_gpu():
    """ResNet-50's layers at batch 256 on an 80 GB card: whole rows of columns and every sample in one tile, where
    the CPU's cache-sized tiles take hundreds each."""
    budget = (80 << 30) // 32 // 4  # the reducer share of an 80 GB card, in float32 elements
    for cin, cout, k, *_ in RESNET50_CONVS:
        width = cin * k * k
        samples, columns = tile_shape(budget, 1, cout, width)
        assert columns == width and samples >= 256
        cpu_samples, cpu_columns = tile_shape(None, 1, cout, width)
        assert cpu_columns <= 256 and cpu_samples * cpu_columns * cout <= 2**21


# ----------------------------------------------------------------------------------------------- defaults


def test_defaults_follow_the_device(monkeypatch):
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert (devices.default_batch_size(cuda), devices.default_batch_size(cpu)) == (256, 64)
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert devices.default_workers(cuda) == 63  # no cap of 8: a 64-core machine decodes with 63 workers
    assert devices.default_workers(cpu) == 0
    assert devices.writer_threads() == 4
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert devices.default_workers(cuda) == 7 and devices.writer_threads() == 2
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    assert devices.writer_threads() == 1


def test_job_settings_are_restored_and_deterministic_asks_torch_for_it(monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    before = torch.are_deterministic_algorithms_enabled()
    with devices.job_settings(torch.device("cpu"), deterministic=True):
        assert torch.are_deterministic_algorithms_enabled()
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == devices.CUBLAS_DETERMINISTIC
    assert torch.are_deterministic_algorithms_enabled() == before


# ----------------------------------------------------------------------------------------------- features


def test_features_come_from_the_profiling_forward_pass():
    model = build(CASE, torch.float32)
    x, y = batch(CASE, 4, torch.float32)
    calls = []
    model.register_forward_pre_hook(lambda module, args: calls.append(len(args[0])))
    profiler = Profiler(model, units=CASE.units, features=True)
    profiler(x, y)  # the first batch pays for the proofs
    calls.clear()
    result = profiler(x, y)
    assert calls == [4]  # one forward pass of the batch, no second one for the features
    assert torch.equal(result.features, profiler._features_of(x, result.profiles.dtype))


# ----------------------------------------------------------------------------------------------- the write path


def test_parts_are_written_plain_hashed_as_written_and_alike_from_several_writer_threads(tmp_path, monkeypatch):
    """The profile column without compression or dictionary; the manifest's sha256, taken while writing, is the
    file's; two writer threads write the bytes one does."""
    import pyarrow.parquet as pq
    from torch.utils.data import Subset

    from paramsal import open_run, profile_dataset
    from paramsal._io import file_record
    from paramsal.jobs import bulk as dataset
    from paramsal.zoo import demo_dataset, demo_model

    data = Subset(demo_dataset("test"), range(192))
    runs = {}
    for threads in (1, 2):
        monkeypatch.setattr(dataset, "writer_threads", lambda threads=threads: threads)
        runs[threads] = profile_dataset(demo_model(), data, tmp_path / f"run{threads}", batch_size=32, part_size=64,
                                        progress=False)
    assert [p.sha256 for p in runs[1].parts] == [p.sha256 for p in runs[2].parts]
    run = open_run(runs[2].path)
    for part in run.parts:
        assert file_record(run.path / part.file) == {"bytes": part.bytes, "sha256": part.sha256}
    metadata = pq.ParquetFile(run.path / run.parts[0].file).metadata
    profile = next(metadata.row_group(0).column(i) for i in range(metadata.num_columns)
                   if metadata.row_group(0).column(i).path_in_schema.startswith("profile"))
    assert profile.compression == "UNCOMPRESSED" and not profile.is_stats_set
    assert not any("DICTIONARY" in encoding for encoding in profile.encodings)
    assert metadata.row_group(0).num_rows <= 256


def test_a_row_whose_sum_overflows_is_not_flagged_and_a_nan_is_named():
    from paramsal.engine.backends import BatchResult

    model = build(CASE, torch.float32)
    profiler = Profiler(model, units=CASE.units)
    units = len(profiler.index)
    profiles = torch.ones(3, units)
    profiles[0] = 3e38  # finite, but its sum is inf
    profiles[2, 5] = float("nan")
    flags = profiler.nonfinite(BatchResult(profiles, torch.zeros(3, 2), torch.zeros(3)))
    assert flags[0] is None and flags[1] is None and flags[2] == profiler.index.param_of(5)


@pytest.mark.parametrize("where", ["device", "host"])
def test_the_moments_of_the_finite_rows_equal_a_float64_two_pass(where):
    """Both ways a batch's moments are taken: in torch on the device (run here on the CPU), in numpy on the host."""
    import numpy as np

    from paramsal.jobs.pipeline import device_moments
    from paramsal.ranking.stats import finite_moments

    profiles = torch.randn(37, 300) * 10 + 1e3  # a mean that dwarfs the spread
    profiles[4, 7] = float("nan")
    profiles[9] = float("inf")
    keep = torch.isfinite(profiles).all(1)
    moments = device_moments(profiles, keep) if where == "device" else finite_moments(profiles.numpy(), keep.numpy())
    count, mean, m2 = (np.asarray(m) for m in moments)
    values = profiles[keep].double().numpy()
    want = values.mean(0), np.square(values - values.mean(0)).sum(0)
    assert int(count) == 35
    np.testing.assert_allclose(mean, want[0], rtol=1e-14)
    np.testing.assert_allclose(m2, want[1], rtol=1e-10)
