"""A merge killed again and again (SIGKILL) is finished by the same command, bit-identical to one never stopped."""

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

from paramsal import verify_run

KILLS = 12
#: 1,000 demo images in parts of 8: 125 parts over two shards, so a merge lists parts often enough to be killed
#: between and inside its writes, and takes longer than a dozen short lives.
PROFILE = [sys.executable, "-m", "paramsal", "profile", "--model", "demo", "--data", "demo:test", "--limit", "1000",
           "--batch-size", "8", "--part-size", "8", "--quiet"]


def merge(shards: list[Path], out: Path) -> list[str]:
    return [sys.executable, "-m", "paramsal", "merge", *map(str, shards), "--out", str(out)]


def listed(root: Path) -> int:
    try:
        return len(json.loads((root / "manifest.json").read_text())["parts"])
    except (OSError, ValueError, KeyError):
        return 0


def writing(root: Path) -> bool:
    return any(".tmp-" in p.name for folder in (root, root / "profiles", root / "stats") if folder.is_dir()
               for p in folder.iterdir())


def kill_once(command: list[str], root: Path, rng: random.Random, how: str) -> str:
    """Starts the merge and SIGKILLs it: inside a copy, after 1-2 more parts are listed, or at a random moment."""
    before = listed(root)
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + (30 if how != "random" else rng.uniform(0.02, 0.4))  # start-up, or its first copies
    more = rng.randint(1, 2)
    moment = how
    while time.time() < deadline and proc.poll() is None:
        if how == "inside a write" and writing(root) and listed(root) > before:
            break
        if how == "parts on" and listed(root) >= before + more:
            time.sleep(rng.uniform(0, 0.02))
            break
        time.sleep(0.0005)
    else:
        moment = "random" if proc.poll() is None else "finished before the kill"
    if proc.poll() is not None:
        return "finished before the kill"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    return moment


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("merge-kills")
    paths = [root / f"shard{i}" for i in range(2)]
    for i, path in enumerate(paths):
        subprocess.run([*PROFILE, "--shard", f"{i}/2", "--out", str(path)], check=True, stdout=subprocess.DEVNULL)
    return paths


@pytest.mark.slow
def test_a_killed_merge_is_finished_by_the_same_command_bit_identical(shards, tmp_path):
    clean, killed = tmp_path / "clean", tmp_path / "killed"
    subprocess.run(merge(shards, clean), check=True, stdout=subprocess.DEVNULL)
    rng = random.Random(0)
    hows = ["inside a write", "parts on", "random"]
    moments = [kill_once(merge(shards, killed), killed, rng, hows[i % 3]) for i in range(KILLS)]
    assert moments.count("finished before the kill") == 0, moments
    assert sum(m != "random" for m in moments) >= KILLS // 2, moments
    assert not json.loads((killed / "manifest.json").read_text())["complete"]
    done = subprocess.run(merge(shards, killed), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert verify_run(killed) == []
    a, b = (json.loads((d / "manifest.json").read_text()) for d in (clean, killed))
    assert [(p["index"], p["sha256"], p["stats_sha256"]) for p in a["parts"]] == \
        [(p["index"], p["sha256"], p["stats_sha256"]) for p in b["parts"]]
    assert a["files"] == b["files"] and a["complete"] and b["complete"]
    # and once finished, the same command again changes nothing
    before = (killed / "manifest.json").read_bytes()
    assert subprocess.run(merge(shards, killed), stdout=subprocess.DEVNULL).returncode == 0
    assert json.loads((killed / "manifest.json").read_bytes())["parts"] == json.loads(before)["parts"]
