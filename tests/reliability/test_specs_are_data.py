"""A run directory is data: analysing one never imports or calls code its manifest names, unless asked to.

Each test tampers with a copy of a small finished run so that its manifest's
``source`` names ``reliability.factories:evil_*``, a factory that leaves a
sentinel file when called, then runs an analysis command and checks that the
command stopped with one line naming the spec and both ways out, and that the
sentinel was never written. The trusted variants show that the sentinel does
appear when the factory is called, so the absence means something.
"""

import pytest
from reliability.factories import SENTINEL_ENV

from paramsal import InputError, open_run
from paramsal.analyses.sources import load_source
from paramsal.cli import main

EVIL = {"model": "reliability.factories:evil_model", "data": "reliability.factories:evil_data"}

#: Analysis commands that rebuild the run's model and data, with the options they need.
COMMANDS = {
    "prune": ["--ks", "1", "--select", "salient", "--resamples", "10", "--quiet"],
    "explain": ["--sample", "0", "--top", "2"],
    "report": ["--queries", "1", "--k", "2", "--explain", "1"],
}


@pytest.fixture
def sentinel(tmp_path, monkeypatch):
    path = tmp_path / "factory-was-called"
    monkeypatch.setenv(SENTINEL_ENV, str(path))
    return path


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0, err
    assert err.startswith("paramsal: error: ") and "Traceback" not in err
    return err


@pytest.mark.parametrize("field", ["model", "data"])
@pytest.mark.parametrize("command", list(COMMANDS))
def test_a_spec_naming_code_in_the_manifest_is_not_called(command, field, run_dir, set_source, sentinel, tmp_path,
                                                          capsys):
    set_source(run_dir, **{field: EVIL[field]})
    code = main([command, str(run_dir), "--out", str(tmp_path / "out"), *COMMANDS[command]])
    err = one_line_error(capsys)
    assert code == 2
    assert not sentinel.exists(), "the factory named in the run directory was called"
    assert EVIL[field] in err and "was not imported or called" in err and "a run directory is data" in err
    assert f"--{field} SPEC" in err and "--trust-run-specs" in err


def test_a_stdlib_callable_in_the_manifest_is_refused_too(run_dir, set_source, capsys):
    set_source(run_dir, model="tempfile:mkdtemp")
    assert main(["explain", str(run_dir), *COMMANDS["explain"]]) == 2
    assert "'tempfile:mkdtemp', which was not imported or called" in one_line_error(capsys)


@pytest.mark.parametrize("field", ["model", "data"])
def test_trust_run_specs_does_call_the_factory(field, run_dir, set_source, sentinel, tmp_path):
    set_source(run_dir, **{field: EVIL[field]})
    assert main(["prune", str(run_dir), "--out", str(tmp_path / "out"), "--trust-run-specs",
                 *COMMANDS["prune"]]) == 0
    assert sentinel.read_text() == f"{field} factory was called\n"


def test_a_spec_on_the_command_line_is_the_users_own_and_is_called(run_dir, set_source, sentinel, tmp_path):
    set_source(run_dir, model=EVIL["model"])
    assert main(["prune", str(run_dir), "--model", EVIL["model"], "--out", str(tmp_path / "out"),
                 *COMMANDS["prune"]]) == 0
    assert sentinel.exists()


def test_python_api_refuses_unless_trusted(run_dir, set_source, sentinel):
    set_source(run_dir, data=EVIL["data"])
    run = open_run(run_dir)
    with pytest.raises(InputError, match="was not imported or called"):
        load_source(run)
    assert not sentinel.exists()
    load_source(run, trust_run_specs=True)
    assert sentinel.exists()


@pytest.mark.parametrize(("field", "value", "flag"), [
    ("transform", "fancy", "--transform"),
    ("num_classes", -3, "--num-classes"),
    ("limit", "all", None),
    ("weights", 5, "--weights"),
    ("model", ["demo"], "--model"),
])
def test_other_manifest_fields_are_checked(field, value, flag, run_dir, set_source, capsys):
    set_source(run_dir, **{field: value})
    assert main(["explain", str(run_dir), *COMMANDS["explain"]]) == 2
    err = one_line_error(capsys)
    assert f"source.{field} is {value!r}" in err and "damaged or was edited by hand" in err
    assert flag is None or f"pass {flag} to replace it" in err


def test_the_untampered_run_still_rebuilds_by_itself(run_dir, tmp_path):
    assert main(["explain", str(run_dir), "--out", str(tmp_path / "out"), *COMMANDS["explain"]]) == 0
