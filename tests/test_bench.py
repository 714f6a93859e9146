"""The benchmark harness runs every method on a case and reports ratios to the baselines of the same run."""

import torch
from torch import nn

from paramsal.bench.harness import Case, run, table


def test_harness_reports_every_method_with_baselines():
    case = Case("tiny", lambda: nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(2 * 6 * 6, 3)),
                (1, 8, 8), 3, batch=4)
    methods = ("hooks", "vmap", "hooks-torch", "vmap-whole")
    timings = run(case, methods, repeats=2, memory=False)
    assert [t.method for t in timings] == ["plain", "loop", *methods]
    assert all(len(t.seconds) == 2 and t.samples_per_s > 0 for t in timings)
    text = table(timings)
    assert "| plain |" in text and "| 1.00 |" in text and "| hooks |" in text and "| vmap-whole |" in text
    assert text.splitlines()[0].endswith("float32")
    assert torch.get_num_threads() >= 1


def test_saved_results_carry_device_versions_and_date_in_both_formats(tmp_path):
    import json

    import pyarrow.parquet as pq

    from paramsal.bench.harness import records, save_records

    case = Case("tiny", lambda: nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(2 * 2 * 2, 3)),
                (1, 4, 4), 3, batch=2)
    rows = records(run(case, ("hooks",), repeats=1, memory=False))
    save_records(rows, tmp_path / "r.json")
    save_records(rows, str(tmp_path / "r.parquet"))
    from_json = json.loads((tmp_path / "r.json").read_text())
    from_parquet = pq.read_table(tmp_path / "r.parquet").to_pylist()
    assert [r["method"] for r in from_json] == [r["method"] for r in from_parquet] == ["plain", "loop", "hooks"]
    for row in from_json:
        assert {"device", "dtype", "torch", "paramsal", "date", "samples_per_s"} <= row.keys()
        assert row["samples_per_s"] > 0 and row["dtype"] == "float32"


def test_the_scale_benchmark_reports_each_figure_of_the_run_it_builds(tmp_path):
    from paramsal import open_run
    from paramsal.bench.scale import ACCURACY, scale_report

    report = scale_report(600, tmp_path, units=96, batch_size=64, rows=100, k=3)
    run = open_run(tmp_path / "run-600x96")
    assert run.complete and run.num_units == 96
    assert abs(run.accuracy - ACCURACY) < 0.06  # labels are the model's own but for a random 24%
    for figure in ("profiling", "on disk", "Run.iter_profiles", "pandas", "duckdb", "paramsal neighbors --k 3"):
        assert figure in report
    assert f"({len(run.sample_ids('misclassified')):,} misclassified among themselves)" in report
    assert (tmp_path / "neighbors" / "neighbors.parquet").is_file()


def test_a_causal_lm_case_scores_only_its_answer_and_every_method_takes_that_loss():
    """The smollm2 case's shape of work on a tiny causal LM: the last ``answer`` tokens labelled, and the plain
    baseline's loss the one the profilers take."""
    import dataclasses

    from paramsal import profile_batch
    from paramsal.bench.harness import CASES, method
    from paramsal.engine.tasks import IGNORE_INDEX, task_loss

    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed, self.out = nn.Embedding(20, 8), nn.Linear(8, 20)

        def forward(self, ids):
            return self.out(torch.tanh(self.embed(ids).cumsum(1)))  # position t sees positions <= t

    case = dataclasses.replace(CASES["smollm2"], make_model=Tiny, input_shape=(12,), vocab=20, batch=3,
                               units="linear-rows", answer=4)
    model, x, y = case.build()
    assert (y[:, :8] == IGNORE_INDEX).all() and torch.equal(y[:, 8:], x[:, 8:])
    method("plain", model, x, y, case.units, case.task)()
    want = torch.autograd.grad(task_loss("causal-lm")(model(x), y).mean(), model.out.weight)[0]
    assert torch.allclose(model.out.weight.grad, want)
    hooks = method("hooks", model, x, y, case.units, case.task)().profiles
    assert torch.allclose(hooks, profile_batch(model, x, y, units="linear-rows", task="causal-lm", backend="loop"),
                          rtol=1e-4, atol=1e-7)
