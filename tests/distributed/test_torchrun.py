"""``torchrun --nproc-per-node 2 -m paramsal profile`` on the CPU (gloo) against one process.

Every job here runs with one thread per process, so that the ranks and the
single process compute each batch with the same reduction order: the parts
are then the same batches computed the same way, and the runs must agree
exactly, not merely to rounding.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from paramsal import open_run
from paramsal.jobs.fingerprints import probe_positions

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
from killing_data import KILL_AT, MARKER, OTHER_DATA, SAMPLES  # noqa: E402

PROFILE = ["profile", "--model", "demo", "--data", "killing_data:samples", "--batch-size", "32", "--part-size", "64",
           "--device", "cpu", "--quiet"]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "paramsal"]
SINGLE = [sys.executable, "-m", "paramsal"]


def environment(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in (MARKER, KILL_AT, OTHER_DATA)}
    return {**env, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(HERE), *sys.path]), **extra}


def profile(launcher: list[str], out: Path, *extra: str, check: bool = True, **env: str) -> subprocess.CompletedProcess:
    done = subprocess.run([*launcher, *PROFILE, "--out", str(out), *extra], env=environment(**env),
                          capture_output=True, text=True, timeout=300)
    if check and done.returncode != 0:
        raise AssertionError(f"{' '.join(launcher[-3:])} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return done


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("single") / "run"
    profile(SINGLE, out)
    return out


def assert_same_run(path: Path, reference: Path) -> None:
    run, ref = open_run(path), open_run(reference)
    assert run.complete and ref.complete
    np.testing.assert_array_equal(run.sample_ids(), np.arange(SAMPLES))
    assert [(p.start, p.stop, p.sha256) for p in run.parts] == [(p.start, p.stop, p.sha256) for p in ref.parts]
    np.testing.assert_array_equal(run.profiles(standardized=False), ref.profiles(standardized=False))
    for field in ("count", "mean", "m2"):
        np.testing.assert_allclose(getattr(run.stats, field), getattr(ref.stats, field), rtol=1e-12, atol=0)
    assert pq.read_table(path / "stats.parquet").equals(pq.read_table(reference / "stats.parquet"))


def test_two_ranks_make_the_run_one_process_makes(single, tmp_path):
    out = tmp_path / "run"
    done = profile(TORCHRUN, out)
    assert_same_run(out, single)
    assert open_run(out).manifest["config"]["world_size"] == 2
    assert done.stdout.count("accuracy") == 1  # the summary is printed by rank 0 alone


def kill_at() -> int:
    """A sample of rank 1's last part (parts 3..5 are rank 1's) that the fingerprint does not probe."""
    probed = set(probe_positions(SAMPLES).tolist())
    return next(i for i in range(5 * 64 + 20, 6 * 64) if i not in probed)


def test_a_killed_rank_resumes_with_the_same_command(single, tmp_path):
    out, marker = tmp_path / "run", tmp_path / "killed"
    killed = profile(TORCHRUN, out, check=False, **{MARKER: str(marker), KILL_AT: str(kill_at())})
    assert killed.returncode != 0 and marker.exists()
    partial = open_run(out)
    # Killed mid-way: some parts of each rank are listed (the ranks run at about the same pace), not all.
    assert not partial.complete and 1 <= len(partial.parts) < 6
    profile(TORCHRUN, out)
    assert_same_run(out, single)


def test_a_resume_with_another_world_size_shares_the_rest(single, tmp_path):
    out, marker = tmp_path / "run", tmp_path / "killed"
    profile(TORCHRUN, out, check=False, **{MARKER: str(marker), KILL_AT: str(kill_at())})
    remaining = 6 - len(open_run(out).parts)
    resumed = profile(SINGLE, out)
    assert f"the run was started by 2 rank(s); this job's 1 share its {remaining} remaining part(s)" in resumed.stderr
    assert_same_run(out, single)


def test_ranks_with_other_data_are_refused_before_writing(tmp_path):
    out = tmp_path / "run"
    done = profile(TORCHRUN, out, check=False, **{OTHER_DATA: "1"})
    assert done.returncode != 0
    assert "rank 1 of 2 has another data_fingerprint than rank 0" in done.stderr
    assert not (out / "manifest.json").exists()


@pytest.mark.parametrize("rank1_holds", ["nothing", "another run being written"])
def test_ranks_that_do_not_share_the_run_directory_are_refused(rank1_holds, single, tmp_path):
    """Machines without a shared filesystem: each rank sees its own DIR; rank 1's may hold another job's run."""
    out = tmp_path / "run"
    rank1 = tmp_path / "run-rank1"
    holder = None
    if rank1_holds != "nothing":
        shutil.copytree(single, rank1)
        holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom pathlib import Path\n"
                                   "from paramsal.rundir.lock import RunLock\n"
                                   f"with RunLock(Path({str(rank1)!r})):\n    print('locked', flush=True)\n"
                                   "    time.sleep(120)\n"], stdout=subprocess.PIPE, text=True, env=environment())
        assert holder.stdout.readline().strip() == "locked"
    before = {p: p.read_bytes() for p in rank1.rglob("*") if p.is_file() and p.name != "lock"}
    try:
        done = profile([*TORCHRUN[:-2], "-m", "rank_dirs"], out, check=False)
    finally:
        if holder is not None:
            holder.kill()
            holder.wait()
    assert done.returncode != 0
    errors = [line for line in done.stderr.splitlines() if line.startswith("paramsal: error:")]
    assert errors and all("do not see the run directory" in line and "--shard" in line for line in errors), \
        done.stderr[-3000:]
    assert "AssertionError" not in done.stderr and "paramsal/engine" not in done.stderr  # torchrun's own traceback only
    assert {p: p.read_bytes() for p in rank1.rglob("*") if p.is_file() and p.name != "lock"} == before
    assert not open_run(tmp_path / "run-rank0").parts  # nothing was profiled


def test_the_default_part_size_gives_every_rank_parts(tmp_path):
    out = tmp_path / "run"
    command = [*TORCHRUN, *[w for w in PROFILE if w not in ("--part-size", "64")], "--out", str(out)]
    done = subprocess.run(command, env=environment(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    run = open_run(out)
    np.testing.assert_array_equal(run.sample_ids(), np.arange(SAMPLES))
    # 384 samples over 2 ranks x 8 parts would be 24 rows a part: less than a batch, so one batch (32) a part.
    assert run.manifest["config"]["batches_per_part"] == 1 and len(run.parts) == SAMPLES // 32


@pytest.mark.parametrize("command", [
    ["prune", "--ks", "1,5", "--select", "salient,random", "--batch-size", "4", "--resamples", "50"],
    ["mask", "--percents", "5", "--batch-size", "4"],
], ids=["prune", "mask"])
def test_analyses_share_their_samples_across_ranks(single, tmp_path, command):
    outputs = {}
    for name, launcher in (("single", SINGLE), ("ranks", TORCHRUN)):
        outputs[name] = tmp_path / name
        done = subprocess.run([*launcher, command[0], str(single), *command[1:], "--data", "killing_data:samples",
                               "--quiet", "--out", str(outputs[name])], env=environment(), capture_output=True,
                              text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
    tables = sorted(p.name for p in outputs["single"].glob("*.parquet"))
    assert tables and tables == sorted(p.name for p in outputs["ranks"].glob("*.parquet"))
    for name in tables:
        assert pq.read_table(outputs["ranks"] / name).equals(pq.read_table(outputs["single"] / name)), name


def test_neighbours_share_their_queries_across_ranks(single, tmp_path):
    outputs = {}
    for name, launcher in (("single", SINGLE), ("ranks", TORCHRUN)):
        outputs[name] = tmp_path / name
        done = subprocess.run([*launcher, "neighbors", str(single), "--among", "all", "--k", "5", "--budget-mb", "1",
                               "--out", str(outputs[name])], env=environment(), capture_output=True, text=True,
                              timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
    tables = sorted(p.name for p in outputs["single"].glob("*.parquet"))
    assert tables
    for name in tables:
        ranks, alone = (pq.read_table(outputs[which] / name).to_pandas() for which in ("ranks", "single"))
        # Blocks of other shapes sum the float64 products in another order: equal to the last bit or so.
        np.testing.assert_allclose(ranks.pop("similarity" if "similarity" in ranks else "pair_sharing"),
                                   alone.pop("similarity" if "similarity" in alone else "pair_sharing"), rtol=1e-12)
        assert ranks.equals(alone), name
