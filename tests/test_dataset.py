"""Bulk profiling: a run directory that survives a crash and reads back exactly."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from torch.utils.data import Dataset, Subset, TensorDataset

from paramsal import InputError, RunMismatchError, SaliencyStats, open_run, profile_batch, profile_dataset
from paramsal.cli import main
from paramsal.rundir.writing import PartWriter
from paramsal.zoo import demo_dataset, demo_model

SUBSET = 200


@pytest.fixture(scope="module")
def data():
    return Subset(demo_dataset("test"), range(SUBSET))


@pytest.fixture(scope="module")
def model():
    return demo_model()


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, model, data):
    return profile_dataset(model, data, tmp_path_factory.mktemp("full") / "run", batch_size=32, part_size=64,
                           features=True, progress=False)


def rows(run):
    table = pq.read_table(run.path / "profiles").sort_by("sample_id")
    return table


def test_rows_are_the_engine_rows_and_stats_equal_two_pass(full_run, model, data):
    table = rows(full_run)
    assert table.column("sample_id").to_pylist() == list(range(SUBSET))
    x = torch.stack([data[i][0] for i in range(SUBSET)])
    y = torch.tensor([data[i][1] for i in range(SUBSET)])
    want = profile_batch(model, x, y, backend="loop")
    got = full_run.profiles(standardized=False)
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-4, atol=1e-6 * float(want.abs().max()))
    logits = model(x).detach()
    assert (table.column("pred").to_numpy() == logits.argmax(1).numpy()).all()
    assert (table.column("target").to_numpy() == y.numpy()).all()
    np.testing.assert_allclose(table.column("target_prob").to_numpy(),
                               logits.softmax(1)[torch.arange(SUBSET), y].numpy(), rtol=1e-4, atol=1e-6)
    values = got.astype(np.float64)
    stats = full_run.stats
    assert stats.count == SUBSET
    np.testing.assert_allclose(stats.mean, values.mean(0), rtol=1e-12)
    np.testing.assert_allclose(np.sqrt(stats.m2 / (SUBSET - 1)), values.std(0, ddof=1), rtol=1e-9)
    features = full_run.features()
    np.testing.assert_allclose(features, model.features(x).detach().numpy(), rtol=1e-4, atol=1e-5)


def test_crash_then_resume_equals_uninterrupted(tmp_path, model, data, full_run, monkeypatch):
    out = tmp_path / "run"
    real_flush = PartWriter._write
    calls = []

    def crashing_flush(*args, **kwargs):
        if len(calls) == 2:
            raise KeyboardInterrupt("simulated kill")
        calls.append(1)
        return real_flush(*args, **kwargs)

    monkeypatch.setattr(PartWriter, "_write", crashing_flush)
    with pytest.raises(KeyboardInterrupt):
        profile_dataset(model, data, out, batch_size=32, part_size=64, features=True, progress=False)
    monkeypatch.undo()
    partial = open_run(out)
    assert not partial.complete and partial.num_samples == 128
    # a stray temp file and an unlisted orphan part, as a kill mid-write could leave
    (out / "profiles" / ".part-00002.parquet.tmp-999").write_bytes(b"half a file")
    (out / "profiles" / "part-00002.parquet").write_bytes(b"not parquet")

    resumed = profile_dataset(model, data, out, batch_size=32, part_size=64, features=True, progress=False)
    assert resumed.complete
    a, b = rows(full_run), rows(resumed)
    assert a.column("sample_id").equals(b.column("sample_id"))
    np.testing.assert_array_equal(resumed.profiles(standardized=False), full_run.profiles(standardized=False))
    np.testing.assert_allclose(resumed.stats.mean, full_run.stats.mean, rtol=1e-12)
    np.testing.assert_allclose(resumed.stats.m2, full_run.stats.m2, rtol=1e-9)
    assert [p.start for p in resumed.parts] == [0, 64, 128, 192]


def test_other_readers_read_the_parts(full_run):
    pd = pytest.importorskip("pandas")
    frame = pd.read_parquet(full_run.path / "profiles")
    assert len(frame) == SUBSET and len(frame["profile"].iloc[0]) == full_run.num_units
    duckdb = pytest.importorskip("duckdb")
    count, wrong = duckdb.sql(f"select count(*), sum(case when correct then 0 else 1 end) "
                              f"from read_parquet('{full_run.path}/profiles/*.parquet')").fetchall()[0]
    assert count == SUBSET and wrong == int((~frame["correct"]).sum())
    assert pq.read_table(full_run.path / "stats.parquet").num_rows == full_run.num_units
    assert SaliencyStats.load(full_run.path / "stats.parquet").count == SUBSET


def test_reader_selects_layers_rows_and_foreign_stats(full_run):
    raw = full_run.profiles(standardized=False)
    stats = full_run.stats
    np.testing.assert_allclose(full_run.profiles(), (raw - stats.mean) / stats.std, rtol=1e-5, atol=1e-5)
    units = full_run.units
    layer = units.column("layer").to_numpy()
    shallow = full_run.profiles(standardized=False, layers=slice(0, 3))
    np.testing.assert_array_equal(shallow, raw[:, layer < 3])
    table = full_run.table()
    wrong = ~table.column("correct").to_numpy(zero_copy_only=False)
    np.testing.assert_array_equal(full_run.profiles(standardized=False, only="misclassified"), raw[wrong])
    np.testing.assert_array_equal(full_run.sample_ids(only=[5, 3]), [3, 5])
    other = SaliencyStats(full_run.num_units, count=2, mean=np.ones(full_run.num_units),
                          m2=np.full(full_run.num_units, 4.0))
    np.testing.assert_allclose(full_run.profiles(stats=other), (raw - 1.0) / 2.0, rtol=1e-5)


def test_another_model_or_units_is_a_named_mismatch(tmp_path, model, data):
    out = tmp_path / "run"
    small = Subset(data, range(40))
    first = profile_dataset(model, small, out, batch_size=20, progress=False).manifest["model_fingerprint"]
    other = demo_model(pretrained=False)
    with pytest.raises(RunMismatchError, match="model_fingerprint"):
        profile_dataset(other, small, out, batch_size=20, progress=False)
    with pytest.raises(RunMismatchError, match="units_fingerprint"):
        profile_dataset(model, small, out, batch_size=20, units="conv+linear", progress=False)
    assert open_run(out).complete  # the refused jobs touched nothing
    replaced = profile_dataset(other, small, out, batch_size=20, overwrite=True, progress=False)
    assert open_run(out).manifest["model_fingerprint"] == replaced.manifest["model_fingerprint"] != first
    assert replaced.complete and replaced.num_samples == 40


class BadLabels(Dataset):
    """Valid samples, then a label the model does not have."""

    def __init__(self, base, bad_from):
        self.base, self.bad_from = base, bad_from

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        x, y = self.base[i]
        return x, (42 if i >= self.bad_from else y)


def test_bad_labels_are_named_and_finished_parts_survive(tmp_path, model, data):
    out = tmp_path / "run"
    bad = BadLabels(Subset(data, range(100)), bad_from=70)
    with pytest.raises(InputError, match="label 42 at position 6 is outside the model's 10 classes"):
        profile_dataset(model, bad, out, batch_size=16, part_size=32, progress=False)
    run = open_run(out)
    assert run.num_samples == 64 and len(run.profiles()) == 64


def test_wrong_image_shape_and_unwritable_dir(tmp_path, model):
    images = TensorDataset(torch.randn(8, 3, 28, 28), torch.zeros(8, dtype=torch.long))
    with pytest.raises(InputError, match=r"inputs of shape \(8, 3, 28, 28\)"):
        profile_dataset(model, images, tmp_path / "run", batch_size=8, progress=False)
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(InputError, match="not writable"):
        profile_dataset(model, images, blocker / "run", progress=False)


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert main(["profile", "--model", "demo", "--data", f"imagefolder:{tmp_path}/missing",
                 "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "is not a directory" in err
    assert main(["profile", "--model", "torchvision:resnet18", "--data", "demo", "--out", str(tmp_path)]) == 2
    assert "needs --weights" in capsys.readouterr().err
    assert main(["stats", str(tmp_path)]) == 2
    assert "not a paramsal run directory" in capsys.readouterr().err


@pytest.mark.slow
def test_killed_cli_job_resumes_to_the_same_rows(tmp_path):
    args = [sys.executable, "-m", "paramsal.cli", "profile", "--model", "demo", "--data", "demo:test",
            "--limit", "1024", "--batch-size", "16", "--part-size", "64", "--quiet"]
    killed, clean = tmp_path / "killed", tmp_path / "clean"
    proc = subprocess.Popen(args + ["--out", str(killed)], stdout=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline:
        manifest = killed / "manifest.json"
        if manifest.is_file() and len(json.loads(manifest.read_text())["parts"]) >= 2:
            break
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    first = open_run(killed)
    if first.complete:
        pytest.skip("the job finished before it could be killed")
    subprocess.run(args + ["--out", str(killed)], check=True, stdout=subprocess.DEVNULL)
    subprocess.run(args + ["--out", str(clean)], check=True, stdout=subprocess.DEVNULL)
    a, b = open_run(killed), open_run(clean)
    assert a.complete and a.num_samples == 1024
    np.testing.assert_array_equal(a.sample_ids(), np.arange(1024))
    np.testing.assert_array_equal(a.profiles(standardized=False), b.profiles(standardized=False))
    np.testing.assert_allclose(a.stats.mean, b.stats.mean, rtol=1e-12)


def test_demo_run_shows_the_papers_figure_2_observation(tmp_path):
    assert main(["demo", "--out", str(tmp_path / "demo"), "--quiet"]) == 0
    run = open_run(tmp_path / "demo")
    wrong = ~run.table().column("correct").to_numpy(zero_copy_only=False)
    assert run.num_samples == len(demo_dataset("test")) and wrong.sum() >= 100
    z = run.profiles()
    assert z[wrong].mean() > z[~wrong].mean()
