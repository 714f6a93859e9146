"""The bulk job's data-path options: reduced precision, channels-last, default workers."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch.utils.data import Subset

from paramsal import Profiler, RunMismatchError, profile_dataset
from paramsal.jobs.bulk import default_workers
from paramsal.zoo import demo_dataset, demo_model

OPTIONS = {"batch_size": 32, "part_size": 64, "progress": False}


@pytest.fixture(scope="module")
def data():
    return Subset(demo_dataset("test"), range(96))


@pytest.mark.parametrize("precision, channels_last", [("bf16", False), ("float32", True)])
def test_a_run_is_the_profiler_with_the_same_options(tmp_path, data, precision, channels_last):
    run = profile_dataset(demo_model(), data, tmp_path / "run", precision=precision, channels_last=channels_last,
                          **OPTIONS)
    assert run.manifest["config"]["precision"] == precision
    assert run.manifest["config"]["channels_last"] is channels_last
    profiler = Profiler(demo_model(), precision=precision, channels_last=channels_last)
    batches = [data[i] for i in range(len(data))]
    x = torch.stack([b[0] for b in batches])
    y = torch.tensor([b[1] for b in batches])
    want = torch.cat([profiler(x[s:s + 32], y[s:s + 32]).profiles for s in range(0, len(data), 32)])
    np.testing.assert_array_equal(run.profiles(standardized=False), want.numpy())


def test_a_resume_refuses_another_precision(tmp_path, data):
    out = tmp_path / "run"
    profile_dataset(demo_model(), data, out, precision="bf16", **OPTIONS)
    with pytest.raises(RunMismatchError, match="precision: run has 'bf16', this job 'float32'"):
        profile_dataset(demo_model(), data, out, **OPTIONS)


def test_a_run_written_before_the_options_existed_resumes(tmp_path, data):
    out = tmp_path / "run"
    profile_dataset(demo_model(), data, out, **OPTIONS)
    manifest = json.loads((out / "manifest.json").read_text())
    for key in ("precision", "channels_last", "world_size"):
        del manifest["config"][key]
    manifest["parts"], manifest["complete"] = manifest["parts"][:1], False
    del manifest["files"]["stats.parquet"]
    (out / "manifest.json").write_text(json.dumps(manifest))
    resumed = profile_dataset(demo_model(), data, out, **OPTIONS)
    assert resumed.complete and resumed.num_samples == len(data)
    with pytest.raises(RunMismatchError, match="channels_last"):
        profile_dataset(demo_model(), data, out, channels_last=True, **OPTIONS)


def test_workers_feed_a_gpu_and_leave_the_cpu_to_the_computation(monkeypatch):
    assert default_workers(torch.device("cpu")) == 0
    monkeypatch.setattr("os.cpu_count", lambda: 16)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert default_workers(torch.device("cuda", 1)) == 7  # 16 CPUs shared by 2 ranks, one left to each rank
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert default_workers(torch.device("cuda", 1)) == 1
