"""One bad sample does not stop a job: it is flagged, left out of the statistics and listed; or it stops the job."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset, Subset

from paramsal import NonFiniteError, ParamsalWarning, open_run, profile_batch, profile_dataset, units_of
from paramsal.cli import main
from paramsal.zoo import demo_dataset, demo_model

BAD = (5, 37, 38)


class WithNaN(Dataset):
    """The first 96 demo test images, the ones at ``BAD`` poisoned with a NaN pixel."""

    def __init__(self):
        self.base = Subset(demo_dataset("test"), range(96))

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        x, y = self.base[i]
        if i in BAD:
            x = x.clone()
            x[0, 3, 3] = float("nan")
        return x, y


@pytest.fixture(scope="module")
def skipped(tmp_path_factory):
    with pytest.warns(ParamsalWarning, match=r"3 sample\(s\) had a non-finite loss or gradient .* ids 5, 37, 38"):
        run = profile_dataset(demo_model(), WithNaN(), tmp_path_factory.mktemp("nan") / "run", batch_size=16,
                              part_size=32, progress=False)
    return run


def test_bad_samples_are_flagged_and_kept(skipped):
    table = skipped.table()
    assert skipped.complete and table.num_rows == 96
    flagged = table.column("nonfinite").to_numpy(zero_copy_only=False)
    np.testing.assert_array_equal(np.flatnonzero(flagged), BAD)
    first_unit_param = units_of(demo_model()).groups[0].param_name  # a NaN input poisons every gradient
    assert {table.column("nonfinite_param").to_pylist()[i] for i in BAD} == {first_unit_param}
    np.testing.assert_array_equal(skipped.nonfinite_ids(), BAD)


def test_statistics_are_the_other_samples_two_pass_statistics(skipped):
    model, base = demo_model(), WithNaN().base
    good = [i for i in range(96) if i not in BAD]
    x = torch.stack([base[i][0] for i in good])
    y = torch.tensor([base[i][1] for i in good])
    want = profile_batch(model, x, y, backend="loop").double().numpy()
    stats = skipped.stats
    assert stats.count == len(good)
    np.testing.assert_allclose(stats.mean, want.mean(0), rtol=1e-5, atol=1e-9)
    np.testing.assert_allclose(np.sqrt(stats.m2 / (len(good) - 1)), want.std(0, ddof=1), rtol=1e-4, atol=1e-9)
    # the good samples' rows are their own: a bad neighbour in the batch changed nothing
    np.testing.assert_allclose(skipped.profiles(standardized=False), want, rtol=1e-4, atol=1e-6 * want.max())


def test_default_selections_leave_the_bad_samples_out(skipped):
    ids = skipped.sample_ids()
    assert len(ids) == 93 and not set(BAD) & set(ids.tolist())
    assert not set(BAD) & set(skipped.sample_ids("misclassified").tolist())
    assert np.isfinite(skipped.profiles()).all()
    assert "skipped    3 with a non-finite loss or gradient (ids 5, 37, 38)" in skipped.summary()


def test_fail_stops_with_the_dataset_index(tmp_path):
    with pytest.raises(NonFiniteError, match=r"sample 5 \(dataset index\) has a non-finite loss or gradient"):
        profile_dataset(demo_model(), WithNaN(), tmp_path / "run", batch_size=16, part_size=32, progress=False,
                        on_nonfinite="fail")
    assert open_run(tmp_path / "run").num_samples == 0  # the part holding it was never written


def test_a_resume_after_a_bad_sample_finishes(skipped, tmp_path):
    """A job stopped on a bad sample (fail) resumes with the default (skip) to the same run as one pass."""
    out = tmp_path / "run"
    with pytest.raises(NonFiniteError):
        profile_dataset(demo_model(), WithNaN(), out, batch_size=16, part_size=32, progress=False,
                        on_nonfinite="fail")
    with pytest.warns(ParamsalWarning):
        resumed = profile_dataset(demo_model(), WithNaN(), out, batch_size=16, part_size=32, progress=False)
    assert [p.sha256 for p in resumed.parts] == [p.sha256 for p in skipped.parts]


def test_the_cli_option(tmp_path, capsys):
    assert main(["profile", "--model", "demo", "--data", "demo:test", "--limit", "16", "--on-nonfinite", "fail",
                 "--out", str(tmp_path / "run"), "--quiet"]) == 0
    assert main(["profile", "--model", "demo", "--data", "demo:test", "--on-nonfinite", "maybe",
                 "--out", str(tmp_path / "run2")]) == 2
    assert "invalid choice: 'maybe'" in capsys.readouterr().err
