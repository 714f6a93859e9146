"""The options of profiling are declared once (paramsal.config): every entry point and the command line take them."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import paramsal
from paramsal.cli import build_parser
from paramsal.cli.parsing import given_options
from paramsal.cli.profiling import CLI_ONLY
from paramsal.config import JobOptions, ProfileOptions, options_table
from paramsal.errors import InputError


def _profile_parser():
    parser = build_parser()
    return next(a for a in parser._subparsers._actions if a.dest == "command").choices["profile"]


def _flags(parser) -> dict[str, str]:
    """Every option string of ``parser`` -> the attribute it sets."""
    return {flag: action.dest for action in parser._actions for flag in action.option_strings}


def test_every_option_with_a_flag_is_on_the_command_line_under_its_own_name():
    flags = _flags(_profile_parser())
    for kind in (ProfileOptions, JobOptions):
        for f in dataclasses.fields(kind):
            if f.metadata["flag"] is not None:
                assert flags.get(f.metadata["flag"]) == f.name, f.name


def test_every_flag_of_profile_is_an_option_or_the_command_lines_own():
    declared = {f.metadata["flag"] for kind in (ProfileOptions, JobOptions) for f in dataclasses.fields(kind)}
    own = set(CLI_ONLY) | {"-h", "--help", "--debug", "--no-channels-last"}
    assert set(_flags(_profile_parser())) - declared - own == set()


def test_the_command_line_sets_only_what_it_is_given():
    args = build_parser().parse_args(["profile", "--model", "demo", "--data", "demo", "--out", "x", "--shard", "1/4",
                                      "--no-channels-last", "--target", "3", "--backend", "loop", "--features"])
    assert given_options(args, args.options) == {"shard": (1, 4), "channels_last": False, "target": 3,
                                                  "backend": "loop", "features": True}
    JobOptions(shard=(1, 4))  # what the command line parsed, the options take
    ProfileOptions(target=3, backend="loop", channels_last=False, features=True)


def test_keywords_and_an_options_object_configure_a_profiler_alike():
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    x, y = torch.randn(5, 3), torch.tensor([0, 1, 0, 1, 1])
    by_keywords = paramsal.Profiler(model, units="linear-rows", backend="loop", target="predicted")
    by_options = paramsal.Profiler(model, ProfileOptions(units="linear-rows", backend="loop", target="predicted"))
    overridden = paramsal.Profiler(model, ProfileOptions(units="linear-rows", backend="vmap"), backend="loop",
                                   target="predicted")
    assert by_keywords.options == by_options.options == overridden.options
    want = by_keywords(x, y).profiles
    torch.testing.assert_close(by_options(x, y).profiles, want, rtol=0, atol=0)
    torch.testing.assert_close(overridden(x, y).profiles, want, rtol=0, atol=0)


@pytest.mark.parametrize("call", [
    lambda model: paramsal.Profiler(model, batch_size=4),
    lambda model: paramsal.profile_batch(model, torch.randn(2, 3), torch.tensor([0, 1]), bakend="loop"),
])
def test_an_option_the_entry_point_does_not_take_is_named_with_the_ones_it_does(call):
    model = nn.Linear(3, 2)
    with pytest.raises(InputError, match=r"has no argument '(batch_size|bakend)'; its options are aggregation, "
                                         r"backend,"):
        call(model)


def test_profile_dataset_sorts_keywords_into_both_option_sets(tmp_path):
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    data = TensorDataset(torch.randn(12, 3), torch.arange(12) % 2)
    run = paramsal.profile_dataset(model, data, tmp_path / "a", ProfileOptions(units="linear-rows"),
                                   JobOptions(batch_size=4, progress=False), backend="loop", part_size=8)
    assert (run.manifest.config.backend, run.manifest.config.batch_size, run.manifest.config.rows_per_part) == \
        ("loop", 4, 8)
    assert run.manifest.config.units == "linear-rows"
    with pytest.raises(InputError, match="profile_dataset has no argument 'batchsize'"):
        paramsal.profile_dataset(model, data, tmp_path / "b", batchsize=4)
    with pytest.raises(InputError, match="options must be a ProfileOptions, got JobOptions"):
        paramsal.profile_dataset(model, data, tmp_path / "c", JobOptions())


@pytest.mark.parametrize("given, message", [
    (dict(backend="fast"), "unknown backend 'fast'"),
    (dict(chunk_size=0), "chunk_size must be an integer >= 1"),
    (dict(target=-1), "target=-1: expected 'label' or 'predicted' or a class index"),
    (dict(task="causal-lm", target="predicted"), "not defined for task='causal-lm'"),
])
def test_profile_options_refuse_what_no_profiler_can_take(given, message):
    with pytest.raises(InputError, match=message):
        ProfileOptions(**given)


@pytest.mark.parametrize("given, message", [
    (dict(batch_size=0), "batch_size must be an integer >= 1"),
    (dict(num_workers=True), "num_workers must be an integer >= 0"),
    (dict(shard=(4, 4)), r"shard=\(4, 4\): expected \(i, n\)"),
    (dict(on_nonfinite="ignore"), "unknown on_nonfinite 'ignore'"),
])
def test_job_options_refuse_what_no_job_can_take(given, message):
    with pytest.raises(InputError, match=message):
        JobOptions(**given)


def test_the_options_table_has_a_row_per_option_with_its_flag():
    table = options_table(JobOptions).splitlines()
    assert len(table) == 2 + len(dataclasses.fields(JobOptions))
    assert any(row.startswith("| `shard` |") and "`--shard`" in row for row in table)
