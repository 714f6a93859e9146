"""One writer at a time; a resume continues the same run or refuses, and never rewrites what the run is."""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset, Subset, TensorDataset

import paramsal.jobs.bulk as dataset_module
import paramsal.jobs.fingerprints as fingerprints
import paramsal.rundir.run as rundir
from paramsal import (
    InputError,
    ParamsalWarning,
    RunLockedError,
    RunMismatchError,
    StorageError,
    open_run,
    profile_dataset,
)
from paramsal.cli import main
from paramsal.jobs.fingerprints import data_fingerprint
from paramsal.rundir.lock import RunLock
from paramsal.rundir.writing import PartWriter
from paramsal.zoo import demo_dataset, demo_model

BATCH, PART = 16, 32


@pytest.fixture(scope="module")
def model():
    return demo_model()


@pytest.fixture(scope="module")
def data():
    return Subset(demo_dataset("test"), range(96))


def interrupted(model, data, out, monkeypatch, parts: int = 1, **options):
    """Profiles until ``parts`` parts are written, then stops as a kill would (after a manifest write)."""
    real = PartWriter._write
    calls = []

    def flush_then_stop(*args, **kwargs):
        real(*args, **kwargs)
        calls.append(1)
        if len(calls) == parts:
            raise KeyboardInterrupt("stopped")

    monkeypatch.setattr(PartWriter, "_write", flush_then_stop)
    with pytest.raises(KeyboardInterrupt):
        profile_dataset(model, data, out, batch_size=BATCH, part_size=PART, progress=False, **options)
    monkeypatch.undo()


# ----------------------------------------------------------------------------------------------- the lock


def hold_lock_in_another_process(root: Path) -> subprocess.Popen:
    """A process that takes the run's lock as a writer does and sleeps; returns once it holds it."""
    script = textwrap.dedent(f"""
        import sys, time
        from pathlib import Path
        from paramsal.rundir.lock import RunLock
        with RunLock(Path({str(root)!r})):
            print("locked", flush=True)
            time.sleep(120)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_a_second_writer_fails_at_once_naming_the_holder(model, data, tmp_path):
    out = tmp_path / "run"
    profile_dataset(model, data, out, batch_size=BATCH, part_size=PART, progress=False)
    before = {p: p.read_bytes() for p in out.rglob("*.parquet")}
    holder = hold_lock_in_another_process(out)
    try:
        started = time.perf_counter()
        other = Subset(demo_dataset("test"), range(100, 196))
        with pytest.raises(RunLockedError, match=rf"being written by another job \(pid {holder.pid} on host "
                                                  rf"{socket.gethostname()}"):
            profile_dataset(model, other, out, batch_size=BATCH, part_size=PART, progress=False, overwrite=True)
        assert time.perf_counter() - started < 5
    finally:
        holder.kill()
        holder.wait()
    # --overwrite deleted nothing of the run the live job held
    assert {p: p.read_bytes() for p in out.rglob("*.parquet")} == before
    # the kernel dropped the killed holder's lock: no stale lock
    replaced = profile_dataset(model, other, out, batch_size=BATCH, part_size=PART, progress=False,
                               overwrite=True)
    assert replaced.complete and replaced.sample_ids()[0] == 0


def test_the_lock_is_per_job_even_in_one_process(tmp_path):
    with RunLock(tmp_path):
        with pytest.raises(RunLockedError, match=f"pid {os.getpid()}"):
            RunLock(tmp_path).acquire()
    with RunLock(tmp_path):  # released on exit
        pass


def test_two_concurrent_jobs_cannot_mix_their_rows(tmp_path):
    """Job A (slow) holds DIR; job B with other data and --overwrite is refused and A's run is A's alone."""
    out = tmp_path / "run"
    slow = [sys.executable, "-m", "paramsal.cli", "profile", "--model", "demo", "--data", "demo:test",
            "--limit", "256", "--batch-size", "16", "--part-size", "32", "--backend", "loop", "--out", str(out),
            "--quiet"]
    job_a = subprocess.Popen(slow, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 60
        while time.time() < deadline and not (out / "lock").is_file() or not (out / "lock").read_text():
            time.sleep(0.05)
        code = main(["profile", "--model", "demo", "--data", "demo:train", "--limit", "64", "--out", str(out),
                     "--overwrite", "--quiet"])
        assert code == 2
        assert job_a.wait(timeout=120) == 0, job_a.stderr.read()
    finally:
        job_a.kill()
    run = open_run(out)
    assert run.complete and run.manifest["source"]["data"] == "demo:test"
    labels = demo_dataset("test").labels[:256].numpy()
    np.testing.assert_array_equal(run.table().column("target").to_numpy(), labels)


# ----------------------------------------------------------------------------------------------- resume rules


class Relabelled(Dataset):
    """The demo test subset with one label changed and no labels exposed (as a user's own data set)."""

    def __init__(self, base, sample: int):
        self.base, self.sample = base, sample

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        x, y = self.base[i]
        return x, (y + 1) % 10 if i == self.sample else y


def test_a_resume_with_one_label_changed_is_refused(model, data, tmp_path, monkeypatch):
    out = tmp_path / "run"
    interrupted(model, data, out, monkeypatch)
    labels = demo_dataset("test").labels.clone()
    labels[50] = (labels[50] + 1) % 10
    changed = Subset(TensorDataset(demo_dataset("test").images, labels), range(96))
    with pytest.raises(RunMismatchError, match="data_fingerprint"):
        profile_dataset(model, changed, out, batch_size=BATCH, part_size=PART, progress=False)
    assert len(open_run(out).parts) == 1  # the refused job wrote nothing


def test_the_parts_labels_are_checked_even_if_fingerprints_agree(model, data, tmp_path, monkeypatch):
    """Defence in depth: a label the data set now gives differently than a finished part recorded."""
    out = tmp_path / "run"
    monkeypatch.setattr(dataset_module, "data_fingerprint", lambda data: "same-for-all")
    interrupted(model, data, out, monkeypatch, parts=2)
    monkeypatch.setattr(dataset_module, "data_fingerprint", lambda data: "same-for-all")
    labels = demo_dataset("test").labels.clone()
    labels[40] = (labels[40] + 1) % 10
    changed = Subset(TensorDataset(demo_dataset("test").images, labels), range(96))
    with pytest.raises(RunMismatchError, match=rf"sample 40 has label {int(labels[40])} in this data set but "):
        profile_dataset(model, changed, out, batch_size=BATCH, part_size=PART, progress=False)


def test_fingerprints_see_any_label_and_tensor_change_and_probe_the_rest():
    base = demo_dataset("test")
    reference = data_fingerprint(base)
    for i in (0, 1234, 2999):
        labels = base.labels.clone()
        labels[i] = (labels[i] + 1) % 10
        assert data_fingerprint(type(base)(base.images, labels, base.classes)) != reference
    tensors = TensorDataset(base.images.clone(), base.labels)
    before = data_fingerprint(tensors)
    tensors.tensors[0][1717, 0, 3, 3] += 1e-3
    assert data_fingerprint(tensors) != before
    # without labels: 64 probes, spread out, not only evenly spaced
    positions = fingerprints.probe_positions(50_000)
    assert len(positions) == fingerprints.PROBES and len(np.unique(np.diff(positions))) > 8


def test_a_resume_keeps_the_runs_config_and_refuses_what_could_change_the_numbers(model, data, tmp_path,
                                                                                  monkeypatch):
    out = tmp_path / "run"
    interrupted(model, data, out, monkeypatch, data_name="first", source={"model": "demo", "data": "demo:test"})
    before = json.loads((out / "manifest.json").read_text())
    with pytest.raises(RunMismatchError, match=r"another batch_size \(batch_size: run has 16, this job 32\)"):
        profile_dataset(model, data, out, batch_size=32, part_size=PART, progress=False)
    with pytest.raises(RunMismatchError, match=r"another backend"):
        profile_dataset(model, data, out, batch_size=BATCH, part_size=PART, backend="vmap", progress=False)
    with pytest.warns(ParamsalWarning) as notes:
        run = profile_dataset(model, data, out, batch_size=BATCH, part_size=4 * PART, progress=False,
                              data_name="second", source={"model": "demo", "data": "elsewhere"})
    said = " | ".join(str(n.message) for n in notes)
    assert "config data: the run keeps 'first'" in said and "batches_per_part: the run keeps 2" in said
    after = run.manifest
    for key in ("created", "config", "source", "model_fingerprint", "data_fingerprint", "units_fingerprint"):
        assert after[key] == before[key], key
    assert run.complete and [p.start for p in run.parts] == [0, 32, 64]


# ----------------------------------------------------------------------------------------------- bad input


class OneOddShape(Dataset):
    def __init__(self, odd: int, label=None):
        self.odd, self.label = odd, label

    def __len__(self):
        return 40

    def __getitem__(self, i):
        if i == self.odd and self.label is None:
            return torch.zeros(1, 30, 28), 0
        return torch.zeros(1, 28, 28), self.label if i == self.odd else 0


def test_a_sample_of_another_shape_is_named_by_its_index(model, tmp_path):
    with pytest.raises(InputError, match=r"sample 21 has an input of shape \(1, 30, 28\) but sample 16 has "
                                         r"\(1, 28, 28\)"):
        profile_dataset(model, OneOddShape(21), tmp_path / "run", batch_size=BATCH, progress=False)


def test_a_tuple_label_is_named(model, tmp_path):
    with pytest.raises(InputError, match=r"sample 5 has the label \(1, 2\) \(tuple\); expected a class index"):
        profile_dataset(model, OneOddShape(5, label=(1, 2)), tmp_path / "run", batch_size=BATCH, progress=False)


def test_bad_sizes_and_empty_data_are_refused(model, data, tmp_path):
    for options, words in (({"part_size": 0}, "part_size must be an integer >= 1"),
                           ({"part_size": -64}, "part_size must be an integer >= 1"),
                           ({"num_workers": -1}, "num_workers must be an integer >= 0"),
                           ({"batch_size": 0}, "batch_size must be an integer >= 1")):
        with pytest.raises(InputError, match=words):
            profile_dataset(model, data, tmp_path / "run", progress=False, **options)
    with pytest.raises(InputError, match="the data set .* is empty"):
        profile_dataset(model, Subset(data, []), tmp_path / "run", progress=False)
    assert not (tmp_path / "run" / "manifest.json").exists()


def test_a_full_disk_is_named_and_the_run_stays_resumable(model, data, tmp_path, monkeypatch):
    out = tmp_path / "run"
    real = rundir.pq.write_table
    writes = []

    def fill_up(table, where, *args, **kwargs):
        writes.append(where)
        if len(writes) == 7:  # units, then moments and rows of parts 0 and 1, then part 2's moments: its rows
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(table, where, *args, **kwargs)

    monkeypatch.setattr(rundir.pq, "write_table", fill_up)
    with pytest.raises(StorageError, match=r"could not write .*part-00002\.parquet: No space left on device; free "
                                           r"space .* run the same command again"):
        profile_dataset(model, data, out, batch_size=BATCH, part_size=PART, progress=False)
    monkeypatch.undo()
    assert len(open_run(out).parts) == 2
    resumed = profile_dataset(model, data, out, batch_size=BATCH, part_size=PART, progress=False)
    clean = profile_dataset(model, data, tmp_path / "clean", batch_size=BATCH, part_size=PART, progress=False)
    assert [p.sha256 for p in resumed.parts] == [p.sha256 for p in clean.parts]


def test_the_cli_says_a_full_disk_in_one_line(tmp_path, monkeypatch, capsys):
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(rundir.pq, "write_table", full)
    assert main(["profile", "--model", "demo", "--data", "demo:test", "--limit", "32", "--out",
                 str(tmp_path / "run"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "units.parquet: No space left on device" in err


def test_sigkill_of_a_lock_holder_leaves_no_stale_lock(tmp_path):
    holder = hold_lock_in_another_process(tmp_path)
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    with RunLock(tmp_path):
        pass
