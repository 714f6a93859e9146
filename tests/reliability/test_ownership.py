"""paramsal touches only what it wrote, in folders it owns, never through a link: each attack, performed.

Every test plants a user's files where a hostile run directory or an unlucky
``--out`` would lead paramsal, runs the command, and asserts that the user's
files are byte-identical afterwards and that a refusal is one line, exit 2.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from paramsal import InputError, open_run, verify_run
from paramsal.cli import main
from paramsal.errors import RunCorruptError
from paramsal.rundir.lock import RunLock

PROFILE = ["profile", "--model", "demo", "--data", "demo:test", "--limit", "64", "--batch-size", "32", "--quiet"]


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (links not followed) with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and not p.is_symlink()}


def user_folder(tmp_path: Path, name: str = "user") -> Path:
    """A folder of a user's own files, named as paramsal names its own."""
    folder = tmp_path / name
    for relative in ("notes.parquet", "part-00000.parquet", "all.parquet", "stats.parquet", "units.parquet",
                     "index.html", "sub/keep.txt"):
        (folder / relative).parent.mkdir(parents=True, exist_ok=True)
        (folder / relative).write_bytes(f"the user's {relative}\n".encode())
    return folder


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    lines = [line for line in err.splitlines() if line.startswith("paramsal: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# ----------------------------------------------------------------------------------------------- the lock


@pytest.mark.parametrize("command", [["depth-bias"], ["prune", "--ranking", "pot", "--ks", "1"], PROFILE],
                         ids=["depth-bias", "prune-pot", "profile"])
def test_a_lock_linked_to_a_users_file_leaves_it_untouched(command, run_dir, tmp_path, capsys):
    """Tails are stored under the run's lock (depth-bias, prune --ranking pot); profile takes it for the job."""
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    (run_dir / "lock").unlink(missing_ok=True)
    (run_dir / "lock").symlink_to(victim)
    argv = [*command, "--out", str(run_dir)] if command[0] == "profile" else [command[0], str(run_dir), *command[1:]]
    main(argv)
    assert victim.read_text() == "precious\n"
    assert any("lock is a symbolic link" in problem for problem in verify_run(run_dir))


def test_a_dangling_lock_link_creates_nothing_outside(run_dir, tmp_path, capsys):
    target = tmp_path / "outside" / "created-by-paramsal"
    target.parent.mkdir()
    (run_dir / "lock").unlink(missing_ok=True)
    (run_dir / "lock").symlink_to(target)
    assert main([*PROFILE, "--out", str(run_dir)]) == 2
    assert "lock is a symbolic link" in one_line_error(capsys)
    assert not target.exists() and list(target.parent.iterdir()) == []
    with pytest.raises(RunCorruptError, match="symbolic link"):
        RunLock(run_dir).acquire()


def test_a_lock_with_another_hard_link_is_not_written_through(run_dir, tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    (run_dir / "lock").unlink(missing_ok=True)
    os.link(victim, run_dir / "lock")
    with pytest.raises(RunCorruptError, match="hard links"):
        RunLock(run_dir).acquire()
    assert victim.read_text() == "precious\n"


# ----------------------------------------------------------------------------------------------- linked folders


@pytest.mark.parametrize("folder", ["tails", "profiles", "stats", "analyses"])
@pytest.mark.parametrize("flag", ["--restart", "--overwrite"])
def test_a_folder_linked_to_a_users_folder_is_not_cleaned(folder, flag, run_dir, tmp_path, capsys):
    user = user_folder(tmp_path)
    before = snapshot(user)
    if (run_dir / folder).exists():
        shutil.rmtree(run_dir / folder)
    (run_dir / folder).symlink_to(user, target_is_directory=True)
    argv = [*PROFILE, "--out", str(run_dir), flag]
    if flag == "--overwrite":
        argv[4] = "demo:train"  # other data: --overwrite replaces the run
    assert main(argv) == 2
    assert f"{folder} is a symbolic link" in one_line_error(capsys)
    assert snapshot(user) == before


def test_verify_names_links_and_never_measures_their_targets(run_dir, capsys):
    part = run_dir / "profiles" / "part-00000.parquet"
    part.unlink()
    part.symlink_to("/etc/passwd")
    problems = verify_run(run_dir)
    assert any(f"{part} is a symbolic link" in p for p in problems), problems
    size = os.path.getsize("/etc/passwd")
    assert not any(f"{size} bytes" in p for p in problems), problems
    with pytest.raises(RunCorruptError, match="symbolic link"):
        open_run(run_dir).profiles()


# ----------------------------------------------------------------------------------------------- --out


@pytest.mark.parametrize("flags", [[], ["--overwrite"], ["--restart"]])
@pytest.mark.parametrize("through_a_link", [False, True], ids=["folder", "link-to-folder"])
def test_profile_refuses_a_users_folder_with_or_without_overwrite(flags, through_a_link, tmp_path, capsys):
    user = user_folder(tmp_path)
    for name in ("tails", "stats"):  # what an older paramsal deleted there
        (user / name).mkdir()
        (user / name / ("all.parquet" if name == "tails" else "part-00000.parquet")).write_text("user's\n")
    before = snapshot(user)
    out = user
    if through_a_link:
        out = tmp_path / "link"
        out.symlink_to(user, target_is_directory=True)
    assert main([*PROFILE, "--out", str(out), *flags]) == 2
    assert "is not empty" in one_line_error(capsys)
    assert snapshot(user) == before


def test_a_foreign_manifest_is_never_deleted(tmp_path, capsys):
    app = tmp_path / "webapp"
    app.mkdir()
    (app / "manifest.json").write_text(json.dumps({"name": "my web app", "icons": []}))
    before = snapshot(app)
    for flags in ([], ["--overwrite"], ["--restart"]):
        assert main([*PROFILE, "--out", str(app), *flags]) == 2
        assert "not a paramsal run" in one_line_error(capsys)
    assert snapshot(app) == before


def test_an_empty_folder_and_a_new_one_are_fine(tmp_path):
    (tmp_path / "empty").mkdir()
    for name in ("empty", "new/nested"):
        assert main([*PROFILE, "--out", str(tmp_path / name)]) == 0
        assert open_run(tmp_path / name).complete


def test_merge_refuses_a_users_folder(run_dir, tmp_path, capsys):
    user = user_folder(tmp_path)
    before = snapshot(user)
    assert main(["merge", str(run_dir), "--out", str(user)]) == 2
    assert "is not empty" in one_line_error(capsys)
    assert snapshot(user) == before


def test_analyses_refuse_to_save_into_a_users_folder(run_dir, tmp_path, capsys):
    user = user_folder(tmp_path)
    before = snapshot(user)
    assert main(["plots", str(run_dir), "--out", str(user)]) == 2
    assert "is not empty" in one_line_error(capsys)
    assert main(["report", str(run_dir), "--out", str(user)]) == 2
    assert "is not empty" in one_line_error(capsys)
    assert snapshot(user) == before
    # a folder of saved results is paramsal's: saving there again is fine
    results = tmp_path / "results"
    assert main(["plots", str(run_dir), "--out", str(results)]) == 0
    assert main(["depth-bias", str(run_dir), "--out", str(results)]) == 0


# ----------------------------------------------------------------------------------------------- results


def test_overwrite_removes_the_old_runs_results_and_nothing_else(run_dir):
    assert main(["plots", str(run_dir)]) == 0
    assert main(["report", str(run_dir)]) == 0
    own = run_dir / "analyses" / "mine.txt"
    own.write_text("the user's note\n")
    assert main([*PROFILE[:4], "demo:train", *PROFILE[5:], "--out", str(run_dir), "--overwrite"]) == 0
    assert sorted(p.name for p in (run_dir / "analyses").iterdir()) == ["mine.txt"]
    assert own.read_text() == "the user's note\n"
    assert list((run_dir / "report").iterdir()) == []
    assert open_run(run_dir).manifest["source"]["data"] == "demo:train"


def test_a_result_of_another_run_is_refused_and_left_out_of_the_report(run_dir, tmp_path):
    from paramsal import load_result

    other = tmp_path / "other"
    assert main([*PROFILE[:4], "demo:train", *PROFILE[5:], "--out", str(other)]) == 0
    assert main(["depth-bias", str(other)]) == 0
    (run_dir / "analyses").mkdir(exist_ok=True)
    for path in (other / "analyses").iterdir():  # the other run's result, copied beside this run's
        shutil.copy(path, run_dir / "analyses" / path.name)
    with pytest.raises(InputError, match="computed from another run"):
        load_result(run_dir / "analyses", "depth-bias")
    assert load_result(other / "analyses", "depth-bias").kind == "depth-bias"
    assert main(["report", str(run_dir)]) == 0
    page = (run_dir / "report" / "index.html").read_text()
    assert "Saved results left out" in page and "computed from another run" in page
    assert "depth-bias.png" not in page


def test_a_save_stopped_part_way_never_reads_as_a_result(run_dir, monkeypatch):
    """A kill while the result's files are replaced: new tables beside the old figure and the old record."""
    from paramsal import DepthBias, load_result
    from paramsal.analyses.depth_bias import DepthBiasResult

    result = DepthBias(k=3).evaluate(run_dir)
    folder = run_dir / "analyses"
    result.save(folder)
    figure = (folder / "depth-bias.png").read_bytes()

    def killed(*args, **kwargs):
        raise KeyboardInterrupt("killed while the figure was drawn")

    monkeypatch.setattr(DepthBiasResult, "plot", killed)
    result.summary.iloc[0, 1] = -1.0  # the new tables differ from the saved ones
    with pytest.raises(KeyboardInterrupt):
        result.save(folder)
    assert (folder / "depth-bias.png").read_bytes() == figure  # the old figure is still there ...
    with pytest.raises(InputError, match="save the result again"):
        load_result(folder, "depth-bias")  # ... but it is never read beside the new tables
    monkeypatch.undo()
    assert main(["report", str(run_dir)]) == 0
    page = (run_dir / "report" / "index.html").read_text()
    assert "depth-bias.png" not in page and "save the result again" in page


# ----------------------------------------------------------------------------------------------- temporaries


def test_a_tails_temporary_left_by_a_kill_is_named_and_removed(run_dir, capsys):
    (run_dir / "tails").mkdir(exist_ok=True)
    leftover = run_dir / "tails" / ".all.parquet.tmp-4242"
    leftover.write_bytes(b"half a table")
    assert any(str(leftover) in p and "temporary" in p for p in verify_run(run_dir))
    assert main([*PROFILE, "--out", str(run_dir)]) == 0  # the finished run, resumed: nothing to profile
    assert not leftover.exists() and verify_run(run_dir) == []
