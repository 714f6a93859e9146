"""``--shard I/N`` jobs in separate directories, joined by ``paramsal merge``, against one job."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
from torch.utils.data import Subset

from paramsal import InputError, RunCorruptError, RunMismatchError, open_run, profile_dataset
from paramsal.cli import main
from paramsal.rundir.merge import merge_runs
from paramsal.zoo import demo_dataset, demo_model

OPTIONS = {"batch_size": 32, "part_size": 64, "progress": False}


@pytest.fixture(scope="module")
def model():
    return demo_model()


@pytest.fixture(scope="module")
def data():
    return Subset(demo_dataset("test"), range(320))  # 5 parts


@pytest.fixture(scope="module")
def whole(tmp_path_factory, model, data):
    return profile_dataset(model, data, tmp_path_factory.mktemp("whole") / "run", **OPTIONS)


@pytest.fixture(scope="module")
def shards(tmp_path_factory, model, data):
    root = tmp_path_factory.mktemp("shards")
    return [profile_dataset(model, data, root / f"shard{i}", shard=(i, 3), **OPTIONS).path for i in range(3)]


def test_shards_hold_contiguous_shares(shards):
    held = [[p.index for p in open_run(path).parts] for path in shards]
    assert held == [[0, 1], [2, 3], [4]]
    assert not any(open_run(path).complete for path in shards)


def test_merged_shards_are_the_run_one_job_makes(shards, whole, tmp_path):
    merged = merge_runs(shards, tmp_path / "merged")
    assert merged.complete
    assert [p.sha256 for p in merged.parts] == [p.sha256 for p in whole.parts]
    assert pq.read_table(merged.path / "stats.parquet").equals(pq.read_table(whole.path / "stats.parquet"))
    np.testing.assert_array_equal(merged.profiles(), whole.profiles())


def test_merge_from_the_command_line(shards, tmp_path, capsys):
    assert main(["merge", *map(str, shards[:2]), "--out", str(tmp_path / "two")]) == 0
    two = open_run(tmp_path / "two")
    assert not two.complete and two.num_samples == 256
    assert "unfinished (256 of 320)" in capsys.readouterr().out


def test_sources_may_overlap_but_not_come_from_other_runs(shards, whole, tmp_path):
    merged = merge_runs([whole.path, *shards], tmp_path / "overlap")  # every part twice, identical
    assert merged.complete
    with pytest.raises(RunMismatchError, match="another model_fingerprint"):
        other = profile_dataset(demo_model(pretrained=False), Subset(demo_dataset("test"), range(320)),
                                tmp_path / "other", shard=(0, 3), **OPTIONS)
        merge_runs([shards[1], other.path], tmp_path / "mixed")


def test_merge_refuses_bad_sources_and_targets(shards, tmp_path):
    with pytest.raises(InputError, match="already holds a run"):
        merge_runs(shards, shards[0])
    broken = tmp_path / "broken"
    merge_runs([shards[2]], broken)
    part = broken / "profiles" / "part-00004.parquet"
    part.write_bytes(part.read_bytes()[:-10] + b"0123456789")
    with pytest.raises(RunCorruptError, match="part-00004"):
        merge_runs([shards[0], broken], tmp_path / "from-broken")
