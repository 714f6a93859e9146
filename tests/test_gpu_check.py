"""scripts/gpu_check.py's dry run: every stage runs on the CPU, or says why not, from any folder and without the
package installed, so that the one-call GPU check cannot rot between the rare runs on a GPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.py"

#: The stages, in the order the script runs them.
STAGES = ["resnet50_speed", "resnet50_correctness", "kernel_shapes", "determinism", "data_path", "architectures",
          "correctness_small"]
#: What the environment record must say (None on a CPU where only a GPU has an answer).
ENVIRONMENT = {"card", "compute_capability", "driver", "cuda", "cudnn", "triton", "torch", "git_commit", "cpu_cores",
               "dev_shm_gb", "float32", "paramsal"}

#: Runs the script as ``python scripts/gpu_check.py`` would, with the venv's editable install of paramsal taken off
#: the import machinery: its finder would otherwise find the package whatever the script does.
LAUNCH = """
import runpy, sys
sys.meta_path[:] = [f for f in sys.meta_path if "__editable__" not in getattr(f, "__module__", "")]
sys.argv = [{script!r}, "--dry-run", "--out", {out!r}]
runpy.run_path({script!r}, run_name="__main__")
"""


@pytest.mark.slow
def test_dry_run_records_every_stage_in_order(tmp_path):
    out = tmp_path / "gpu.json"
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}  # the script sets it
    env["PYTHONPATH"] = os.pathsep.join(p for p in env.get("PYTHONPATH", "").split(os.pathsep)
                                        if p and not Path(p).resolve().is_relative_to(ROOT))
    done = subprocess.run([sys.executable, "-c", LAUNCH.format(script=str(SCRIPT), out=str(out))], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert f"results: {out}" in done.stdout
    record = json.loads(out.read_text())
    assert record["dry_run"] is True
    assert ENVIRONMENT <= set(record["environment"])
    assert Path(record["environment"]["paramsal"]) == ROOT / "paramsal"
    assert [stage["name"] for stage in record["stages"]] == STAGES
    for stage in record["stages"]:
        assert stage["status"] in ("ok", "skipped"), (stage["name"], stage.get("reason"), stage.get("traceback"))
        assert stage["status"] == "ok" or stage["reason"], stage["name"]
        assert stage["wall_s"] >= 0, stage["name"]
        assert all("error" not in row for row in stage.get("rows", [])), stage["name"]
