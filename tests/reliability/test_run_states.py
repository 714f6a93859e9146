"""Every state of a run directory reads as data: one line naming the problem and the way back, never a traceback.

A run with no finished part, a manifest nested to crash a parser, a foreign
run whose checksums are consistent but whose schema is not the format's, a
reader racing a job that overwrites the run: each is performed here, through
the command line (exit code 2, one line) and the Python API (a typed error).
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from paramsal import RunCorruptError, RunLockedError, open_run, verify_run
from paramsal._io import file_record
from paramsal.cli import main

PART = "profiles/part-00000.parquet"


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("paramsal: error: "), err
    return err


def edit(run_dir: Path, change) -> None:
    path = run_dir / "manifest.json"
    manifest = json.loads(path.read_text())
    change(manifest)
    path.write_text(json.dumps(manifest))


def rewrite_part(run_dir: Path, change) -> None:
    """Replaces part 0 by ``change(table)`` and records the new file's size and sha256: a consistent foreign run."""
    path = run_dir / PART
    pq.write_table(change(pq.read_table(path)), path)
    record = file_record(path)
    edit(run_dir, lambda m: m["parts"][0].update(bytes=record["bytes"], sha256=record["sha256"]))


def with_column(table: pa.Table, name: str, values: pa.Array) -> pa.Table:
    return table.set_column(table.schema.get_field_index(name), name, values)


def narrower(table: pa.Table) -> pa.Table:
    profiles = table.column("profile").combine_chunks()
    width = profiles.type.list_size
    values = profiles.flatten().to_numpy().reshape(-1, width)[:, :-1]
    return with_column(table, "profile", pa.FixedSizeListArray.from_arrays(pa.array(values.ravel()), width - 1))


def variable_length(table: pa.Table) -> pa.Table:
    profiles = table.column("profile").to_pylist()
    profiles[0] = profiles[0][:3]
    return with_column(table, "profile", pa.array(profiles, pa.list_(pa.float32())))


def integer_correct(table: pa.Table) -> pa.Table:
    return with_column(table, "correct", pa.array(table.column("correct").to_numpy().astype(np.int64)))


# Each inconsistency, and the words its error must hold.
INCONSISTENT = {
    "num_units_0": (lambda d: edit(d, lambda m: m.update(num_units=0)), "'num_units' is 0"),
    "num_units_561": (lambda d: edit(d, lambda m: m.update(num_units=561)), "561"),
    "a_profile_column_559_wide": (lambda d: rewrite_part(d, narrower), "'profile' column of type"),
    "variable_length_profiles": (lambda d: rewrite_part(d, variable_length), "'profile' column of type"),
    "an_integer_correct_column": (lambda d: rewrite_part(d, integer_correct), "'correct' column of type int64"),
    "a_nested_manifest": (lambda d: (d / "manifest.json").write_text("[" * 200_000 + "]" * 200_000),
                          "nested too deeply"),
    "aggregation_of_the_wrong_type": (lambda d: edit(d, lambda m: m.update(aggregation=["mean_abs"])),
                                      "'aggregation' is missing or not a str"),
}


@pytest.mark.parametrize("damage", list(INCONSISTENT), ids=list(INCONSISTENT))
def test_an_inconsistent_run_is_named_by_verify_every_command_and_the_api(damage, run_dir, capsys):
    harm, words = INCONSISTENT[damage]
    harm(run_dir)
    problems = verify_run(run_dir)
    assert any(words in p for p in problems), problems
    for argv in (["verify", str(run_dir)], ["stats", str(run_dir)], ["neighbors", str(run_dir)],
                 ["depth-bias", str(run_dir)], ["plots", str(run_dir)]):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        lines = [line for line in err.splitlines() if line.startswith("paramsal: error:")]
        assert lines and "Traceback" not in err and any(words in line for line in lines), (argv, err)
    with pytest.raises(RunCorruptError, match=words):
        run = open_run(run_dir)
        run.profiles()
        run.units  # noqa: B018 - reading is the check


# ----------------------------------------------------------------------------------------------- no part yet


def no_part_yet(run_dir: Path) -> None:
    """The state of a job killed before its first part was listed (or a shard with nothing to do)."""
    edit(run_dir, lambda m: (m.update(parts=[], complete=False), m["files"].pop("stats.parquet")))
    for name in (PART, "stats/part-00000.parquet", "stats.parquet"):
        (run_dir / name).unlink()


def test_a_run_with_no_finished_part_reads_as_data(run_dir, capsys):
    no_part_yet(run_dir)
    run = open_run(run_dir)
    assert "unfinished (0 of 64)" in run.summary() and run.num_samples == 0
    assert run.table().num_rows == 0 and run.profiles(standardized=False).shape == (0, run.num_units)
    assert main(["stats", str(run_dir)]) == 0
    assert "unfinished (0 of 64)" in capsys.readouterr().out
    assert main(["verify", str(run_dir)]) == 0
    assert "0 parts" in capsys.readouterr().out
    for argv in (["neighbors", str(run_dir), "--allow-partial"], ["prune", str(run_dir), "--allow-partial"],
                 ["depth-bias", str(run_dir), "--allow-partial"], ["plots", str(run_dir), "--allow-partial"]):
        assert main(argv) == 2, argv
        assert "no finished part yet" in one_line_error(capsys)


def test_analyses_of_a_run_with_no_part_say_how_to_continue_it(run_dir, capsys):
    no_part_yet(run_dir)
    assert main(["neighbors", str(run_dir), "--allow-partial"]) == 2
    err = one_line_error(capsys)
    assert "holds no finished part yet" in err and "paramsal profile" in err


# ----------------------------------------------------------------------------------------------- a writer at work


def test_a_reader_racing_an_overwrite_is_told_a_job_is_writing(run_dir):
    script = textwrap.dedent(f"""
        import time
        from pathlib import Path
        from paramsal.rundir.lock import RunLock
        with RunLock(Path({str(run_dir)!r})):
            print("locked", flush=True)
            time.sleep(120)
    """)
    holder = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        (run_dir / PART).unlink()  # what a reader sees while the other job replaces the run
        with pytest.raises(RunLockedError, match=rf"being written by another job \(pid {holder.pid}") as caught:
            open_run(run_dir).profiles()
        assert "--repair" not in str(caught.value)
    finally:
        holder.kill()
        holder.wait()
    with pytest.raises(RunCorruptError, match="--repair"):  # once nobody writes it, it is damage
        open_run(run_dir).profiles()


# ----------------------------------------------------------------------------------------------- bad inputs


def test_weights_that_are_not_a_state_dict_are_named(tmp_path, capsys):
    listed = tmp_path / "list.pt"
    torch.save([torch.zeros(3), torch.ones(2)], listed)
    out = str(tmp_path / "run")
    assert main(["profile", "--model", "demo", "--weights", str(listed), "--data", "demo", "--out", out]) == 2
    assert "holds a list, not a state dict" in one_line_error(capsys)
    assert main(["profile", "--model", "demo", "--weights", str(tmp_path), "--data", "demo", "--out", out]) == 2
    err = one_line_error(capsys)
    assert "is a directory, not a weights file" in err and "does not exist" not in err


def test_compare_with_one_resample_draws_its_intervals(run_dir, small_run, capsys):
    assert main(["compare", str(small_run), str(run_dir), "--resamples", "1", "--out",
                 str(run_dir / "analyses")]) == 0
    assert (run_dir / "analyses" / "compare-vs-run.png").is_file()


def test_a_merge_of_different_runs_does_not_advise_overwrite(run_dir, tmp_path, capsys):
    other = tmp_path / "other"
    assert main(["profile", "--model", "demo", "--data", "demo:train", "--limit", "64", "--batch-size", "32",
                 "--out", str(other), "--quiet"]) == 0
    capsys.readouterr()
    assert main(["merge", str(run_dir), str(other), "--out", str(tmp_path / "merged")]) == 2
    err = one_line_error(capsys)
    assert "not shares of one run" in err and "--overwrite" not in err


transformers = pytest.importorskip("transformers")


def hf_directory(tmp_path: Path, case: str) -> Path:
    """A small BERT directory broken in one way."""
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=30, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=8, max_position_embeddings=8, num_labels=2)
    model = transformers.BertForSequenceClassification(config)
    folder = tmp_path / case
    model.save_pretrained(folder)
    if case == "malformed-config":
        (folder / "config.json").write_text("{not json")
    elif case == "unknown-model-type":
        content = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**content, "model_type": "no-such-model"}))
    elif case == "pickle-weights":
        (folder / "model.safetensors").unlink()
        state = {**model.state_dict(), "payload": Payload(str(tmp_path / "executed"))}
        torch.save(state, folder / "pytorch_model.bin")
    return folder


class Payload:
    """Unpickling it would leave a file behind: the sign that code named in the weights ran."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (Path.write_text, (Path(self.path), "executed"))


@pytest.mark.parametrize(("case", "words"), [("malformed-config", "not a valid JSON file"),
                                             ("unknown-model-type", "no-such-model"),
                                             ("pickle-weights", "never unpickles")])
def test_a_broken_hf_directory_is_one_line(case, words, tmp_path, capsys):
    folder = hf_directory(tmp_path, case)
    capsys.readouterr()  # save_pretrained's progress bar
    assert main(["profile", "--model", f"hf:{folder}", "--data", "demo", "--out", str(tmp_path / "run")]) == 2
    err = one_line_error(capsys)
    assert words in err and "weights_only=False" not in err, err
    assert not (tmp_path / "executed").exists()
