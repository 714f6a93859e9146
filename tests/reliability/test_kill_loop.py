"""Crash-safe: SIGKILL at random moments, part writes included, then the same command: the same bytes."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from paramsal import open_run, verify_run

KILLS = 20

#: The whole demo test split in 94 parts of 32 rows (batches of 16): writes are frequent, so kills land in
#: them often, and there is more work than twenty short lives can finish.
COMMAND = [sys.executable, "-m", "paramsal.cli", "profile", "--model", "demo", "--data", "demo:test",
           "--batch-size", "16", "--part-size", "32", "--quiet"]


def writing(root: Path) -> bool:
    """A temporary file exists: a part, its moments or the manifest is being written right now."""
    return any(".tmp-" in p.name for folder in (root, root / "profiles", root / "stats") if folder.is_dir()
               for p in folder.iterdir())


def listed_parts(root: Path) -> int:
    try:
        return len(json.loads((root / "manifest.json").read_text())["parts"])
    except (OSError, ValueError, KeyError):
        return 0  # not there yet, or being replaced this very moment


def kill_once(root: Path, rng: random.Random, inside_a_write: bool) -> str:
    """Starts the job and SIGKILLs it: as soon as a write is under way, or at a random moment.

    A random moment is a random time into the start-up, or a random few
    milliseconds after the job has listed 1 or 2 more parts; so no job gets
    far, and twenty cannot finish the run.
    """
    before = listed_parts(root)
    proc = subprocess.Popen(COMMAND + ["--out", str(root)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    more = 0 if inside_a_write else rng.randint(0, 2)
    deadline = time.time() + (30 if inside_a_write or more else rng.uniform(0.1, 2.5))
    moment = "random" if more == 0 else f"random, {more} part(s) on"
    while time.time() < deadline and proc.poll() is None:
        if inside_a_write and writing(root):
            moment = "inside a write"
            break
        if more and listed_parts(root) >= before + more:
            time.sleep(rng.uniform(0, 0.05))
            break
        time.sleep(0.0005)
    if proc.poll() is not None:
        return "finished before the kill"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    return moment


@pytest.mark.slow
def test_twenty_kills_then_the_same_command_end_bit_identical(tmp_path):
    clean, killed = tmp_path / "clean", tmp_path / "killed"
    subprocess.run(COMMAND + ["--out", str(clean)], check=True, stdout=subprocess.DEVNULL)
    rng = random.Random(0)
    moments = [kill_once(killed, rng, inside_a_write=i % 2 == 0) for i in range(KILLS)]
    assert "finished before the kill" not in moments and not json.loads(
        (killed / "manifest.json").read_text())["complete"], moments
    assert moments.count("inside a write") >= KILLS // 4, moments
    subprocess.run(COMMAND + ["--out", str(killed)], check=True, stdout=subprocess.DEVNULL)
    assert verify_run(killed) == []
    a, b = (json.loads((d / "manifest.json").read_text()) for d in (clean, killed))
    assert [(p["index"], p["sha256"], p["stats_sha256"]) for p in a["parts"]] == \
        [(p["index"], p["sha256"], p["stats_sha256"]) for p in b["parts"]]
    assert a["files"] == b["files"]
    assert open_run(killed).num_samples == 3000
