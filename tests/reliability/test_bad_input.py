"""Every bad input ends as one line that names the problem and the fix: exit code 2, no traceback unless asked.

The command-line cases run ``paramsal.cli.main`` in-process and read stderr;
the library cases check the :class:`InputError` message.
"""

import os
import pickle
import re

import numpy as np
import pytest
import torch
from torch.utils.data import Subset

import paramsal.cli.profiling as profiling
from paramsal import InputError, SaliencyStats, load_reference_stats, open_run
from paramsal.cli import main
from paramsal.engine.devices import resolve_device
from paramsal.jobs.bulk import data_fingerprint
from paramsal.zoo import demo_dataset, demo_model


def error_line(capsys) -> str:
    """The command's stderr, checked to be exactly one ``paramsal: error:`` line and no traceback."""
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0, err
    assert err.startswith("paramsal: error: "), err
    assert "Traceback" not in err and "usage:" not in err
    return err


def fails(capsys, *argv: str) -> str:
    """Runs the command, which must exit with code 2; returns its one-line error."""
    assert main(list(argv)) == 2
    return error_line(capsys)


# ----------------------------------------------------------------------------------------------- argparse, --debug


@pytest.mark.parametrize(("argv", "words"), [
    (["profile", "--model", "demo", "--data", "demo", "--out", "r", "--backend", "nope"],
     ["argument --backend: invalid choice: 'nope'", "`paramsal profile --help`"]),
    (["profile", "--model", "demo", "--data", "demo", "--out", "r", "--batch-size", "many"],
     ["argument --batch-size: expected an integer >= 1, got 'many'"]),
    (["prune"], ["the following arguments are required: run", "`paramsal prune --help`"]),
    (["frobnicate"], ["invalid choice: 'frobnicate'", "`paramsal --help`"]),
])
def test_argparse_errors_are_one_line(argv, words, capsys):
    err = fails(capsys, *argv)
    assert all(word in err for word in words), err


def test_debug_prints_the_traceback_before_the_one_line_message(tmp_path, capsys, monkeypatch):
    missing = str(tmp_path / "missing")
    assert "not a paramsal run directory" in fails(capsys, "stats", missing)
    for argv in (["--debug", "stats", missing], ["stats", missing, "--debug"]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err[0] == "Traceback (most recent call last):"
        assert err[-1].startswith("paramsal: error: ") and "not a paramsal run directory" in err[-1]
    assert main(["profile", "--debug", "--limit", "0"]) == 2  # a usage error, before parsing finished
    assert "Traceback" in capsys.readouterr().err
    monkeypatch.setenv("PARAMSAL_DEBUG", "1")
    assert main(["stats", missing]) == 2
    assert "Traceback" in capsys.readouterr().err


def test_a_bug_in_paramsal_keeps_its_traceback_and_is_not_exit_2(monkeypatch, tmp_path):
    """A guard (it passes before the changes too): only ParamsalError is reported as the user's mistake."""
    def broken(args):
        raise KeyError("internal")

    monkeypatch.setattr(profiling, "stats_command", broken)
    with pytest.raises(KeyError, match="internal"):
        main(["stats", str(tmp_path)])


# ----------------------------------------------------------------------------------------------- paramsal profile


@pytest.mark.parametrize(("option", "value", "minimum"), [
    ("--num-workers", "-1", 0), ("--limit", "-5", 1), ("--limit", "0", 1), ("--part-size", "0", 1),
    ("--batch-size", "0", 1),
])
def test_profile_refuses_counts_out_of_range(option, value, minimum, tmp_path, capsys):
    out = tmp_path / "run"
    err = fails(capsys, "profile", "--model", "demo", "--data", "demo", "--out", str(out), "--quiet", option, value)
    assert f"argument {option}: expected an integer >= {minimum}, got {value}" in err
    assert not out.exists(), "a refused job must not leave a run behind"


def test_unknown_demo_split_is_named(tmp_path, capsys):
    err = fails(capsys, "profile", "--model", "demo", "--data", "demo:nosplit", "--out", str(tmp_path / "r"))
    assert "no split 'nosplit'" in err and "demo:train or demo:test" in err


# ----------------------------------------------------------------------------------------------- --device


def test_unknown_device_is_named(tmp_path, run_dir, capsys):
    expected = "unknown device 'tpu'; expected cpu, cuda or cuda:N"
    assert expected in fails(capsys, "profile", "--model", "demo", "--data", "demo", "--out", str(tmp_path / "r"),
                             "--device", "tpu")
    assert expected in fails(capsys, "prune", str(run_dir), "--device", "tpu")
    with pytest.raises(InputError, match=expected):
        resolve_device("tpu")


def test_cuda_devices_are_checked_against_the_machine(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    # The Python error names the argument, the command line's the flag (issue 22: each speaks its own language).
    with pytest.raises(InputError, match=r"'cuda:0': this machine has no CUDA GPU.*device='cpu'"):
        resolve_device("cuda:0")
    err = fails(capsys, "profile", "--model", "demo", "--data", "demo:test", "--limit", "8", "--device", "cuda:0",
                "--out", str(tmp_path / "run"), "--quiet")
    assert re.search(r"'cuda:0': this machine has no CUDA GPU.*--device cpu", err), err
    assert resolve_device(None) == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(InputError, match=r"'cuda:2': this machine has 2 CUDA GPUs \(cuda:0..cuda:1\)"):
        resolve_device("cuda:2")
    assert resolve_device("cuda:1") == torch.device("cuda:1")


# ----------------------------------------------------------------------------------------------- statistics files


def test_stats_refuse_bad_sizes_and_non_finite_profiles():
    for bad in (-1, "3", 2.5):
        with pytest.raises(InputError, match=f"num_units must be a non-negative integer.*got {bad!r}"):
            SaliencyStats(bad)
    stats = SaliencyStats(3).update(np.ones((4, 3)))
    before = (stats.count, stats.mean.copy(), stats.m2.copy())
    values = np.zeros((5, 3))
    values[2, 1], values[4, 0] = np.nan, np.inf
    with pytest.raises(InputError, match="non-finite value at row 2, unit 1 .*2 of 5 rows"):
        stats.update(torch.as_tensor(values))
    assert stats.count == before[0]
    np.testing.assert_array_equal(stats.mean, before[1])
    np.testing.assert_array_equal(stats.m2, before[2])


def test_stats_file_that_is_not_parquet_is_named(tmp_path):
    path = tmp_path / "stats.parquet"
    path.write_bytes(b"these are not statistics")
    with pytest.raises(InputError, match=f"{path} is not a statistics file paramsal can read") as info:
        SaliencyStats.load(path)
    assert "\n" not in str(info.value)
    with pytest.raises(InputError, match="no statistics file at"):
        SaliencyStats.load(tmp_path / "missing.parquet")


class _RunsCode:
    """Unpickling this runs a shell command: what a malicious statistics or image file would hold."""

    def __init__(self, sentinel):
        self.sentinel = sentinel

    def __reduce__(self):
        return os.system, (f"touch {self.sentinel}",)


def _refused_safely(message: str) -> None:
    assert "\n" not in message and "can read safely" in message
    assert "weights_only=False" not in message and "weights_only` set to `False" not in message


def test_a_pickle_with_code_is_not_a_statistics_file(tmp_path):
    sentinel = tmp_path / "code-ran"
    evil = tmp_path / "stats.pth"
    torch.save(_RunsCode(sentinel), evil)
    with pytest.raises(InputError, match=f"{evil} is not a statistics file paramsal can read safely") as info:
        load_reference_stats(evil)
    _refused_safely(str(info.value))
    assert not sentinel.exists()
    plain = tmp_path / "object.pth"
    plain.write_bytes(pickle.dumps(_RunsCode(sentinel)))
    with pytest.raises(InputError, match="can read safely"):
        load_reference_stats(plain)


def test_explain_image_files_that_cannot_be_read_are_named(run_dir, tmp_path, capsys):
    evil = tmp_path / "x.pt"
    torch.save(_RunsCode(tmp_path / "code-ran"), evil)
    err = fails(capsys, "explain", str(run_dir), "--image", str(evil), "--label", "0")
    assert f"{evil} is not an image tensor file paramsal can read safely" in err
    _refused_safely(err)
    assert not (tmp_path / "code-ran").exists()
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n and then nothing an image needs")
    err = fails(capsys, "explain", str(run_dir), "--image", str(broken), "--label", "0")
    assert f"image file {broken} could not be read as an image" in err


# ----------------------------------------------------------------------------------------------- model and data


@pytest.fixture
def other_weights(tmp_path):
    model = demo_model()
    with torch.no_grad():
        next(iter(model.parameters())).mul_(1.5)
    path = tmp_path / "other.pt"
    torch.save(model.state_dict(), path)
    return str(path)


@pytest.mark.parametrize(("command", "options"), [
    ("prune", ["--ks", "1", "--select", "salient", "--resamples", "10", "--quiet"]),
    ("explain", ["--sample", "12", "--k", "2"]),
    ("mask", ["--samples", "1", "--percents", "5", "--k", "2"]),
    ("sanity", ["--sample", "12", "--k", "2", "--stages", "1"]),
    ("report", ["--queries", "1", "--k", "2", "--explain", "1"]),
])
def test_other_weights_are_refused_unless_allowed(command, options, run_dir, other_weights, tmp_path, capsys):
    argv = [command, str(run_dir), "--weights", other_weights, "--out", str(tmp_path / "out"), *options]
    err = fails(capsys, *argv)
    assert "the model's weights differ from those the run" in err
    assert "--allow-other-weights" in err and "allow_other_weights=True" not in err  # the command line speaks flags
    assert main(argv + ["--allow-other-weights"]) == 0


def test_data_of_another_fingerprint_is_refused(run_dir, capsys):
    err = fails(capsys, "explain", str(run_dir), "--sample", "0", "--data", "demo:train")
    recorded = open_run(run_dir).manifest["data_fingerprint"]
    found = data_fingerprint(Subset(demo_dataset("train"), range(64)))  # the run's limit applies to --data too
    assert recorded != found
    assert f"fingerprint {found}" in err and f"fingerprint {recorded}" in err and "--allow-other-data" in err


def test_explained_samples_must_have_the_runs_labels(run_dir, capsys):
    err = fails(capsys, "explain", str(run_dir), "--sample", "3", "--data", "reliability.factories:relabelled_data",
                "--allow-other-data")
    label = int(demo_dataset("test")[3][1])
    assert f"sample 3 has class {(label + 1) % 10} in the data set and {label} in the run" in err


# ----------------------------------------------------------------------------------------------- unfinished runs


@pytest.fixture
def unfinished(run_dir, edit_manifest):
    """The run as a killed `paramsal profile` of 640 samples in parts of 64 leaves it: 64 written, not complete."""
    def unfinish(manifest):
        manifest.update(complete=False, num_samples=640)
        manifest["config"]["batches_per_part"] = 2

    edit_manifest(run_dir, unfinish)
    return run_dir


@pytest.mark.parametrize(("command", "options"), [
    ("neighbors", []), ("prune", []), ("finetune", []), ("explain", ["--sample", "0"]), ("mask", []),
    ("sanity", ["--sample", "0"]), ("plots", []), ("report", []),
])
def test_analyses_refuse_an_unfinished_run(command, options, unfinished, capsys):
    err = fails(capsys, command, str(unfinished), *options)
    assert (f"{unfinished} is unfinished (64 of 640 samples); finish it by running the same `paramsal profile` "
            "command again, or pass --allow-partial") in err


def test_allow_partial_analyses_what_was_written(unfinished, tmp_path):
    assert main(["plots", str(unfinished), "--allow-partial", "--out", str(tmp_path / "figures")]) == 0
    assert (tmp_path / "figures").is_dir()


# ----------------------------------------------------------------------------------------------- outputs


def test_neighbors_names_an_output_folder_it_cannot_write(run_dir, tmp_path, capsys):
    (run_dir / "analyses").write_text("a file where the folder should be")
    err = fails(capsys, "neighbors", str(run_dir), "--k", "2")
    assert f"cannot write to {run_dir / 'analyses'}" in err and "not writable" in err and "--out DIR" in err
    below_a_file = tmp_path / "file.txt"
    below_a_file.write_text("")
    err = fails(capsys, "neighbors", str(run_dir), "--k", "2", "--out", str(below_a_file / "nn"))
    assert f"cannot write to {below_a_file}" in err and "--out DIR" in err
    assert main(["neighbors", str(run_dir), "--k", "2", "--out", str(tmp_path / "nn")]) == 0


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root writes into read-only directories")
def test_neighbors_on_a_read_only_run(run_dir, capsys):
    (run_dir / "analyses").mkdir(exist_ok=True)
    for folder in (run_dir / "analyses", run_dir):
        folder.chmod(0o555)
    try:
        err = fails(capsys, "neighbors", str(run_dir), "--k", "2")
    finally:
        for folder in (run_dir, run_dir / "analyses"):
            folder.chmod(0o755)
    assert "not writable" in err and "--out DIR" in err
