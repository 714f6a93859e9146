"""One-step fine-tuning: the batched step equals a real SGD step, norm matching, seeding, tables, files, CLI."""

from __future__ import annotations

import copy
import sys
import types

import numpy as np
import pytest
import torch
from torch.utils.data import Subset

import paramsal
import paramsal.cli
from paramsal.analyses import finetune as ft
from paramsal.analyses.finetune import FineTune
from paramsal.analyses.neighbors import neighbor_ids
from paramsal.analyses.selection import select_units as choose_units
from paramsal.engine.functional import per_sample_gradients
from paramsal.errors import InputError, ParamsalWarning
from paramsal.reference import stepped_copy
from paramsal.zoo import demo_dataset, demo_model

DATA_MODULE = "finetune_test_data"
SAMPLES = 240
NEIGHBORS = 3
LR = 0.05  # larger than the paper's, so that some steps flip predictions and the comparison means something


def first_samples():
    return Subset(demo_dataset("test"), range(SAMPLES))


sys.modules[DATA_MODULE] = types.SimpleNamespace(first_samples=first_samples)


@pytest.fixture(scope="module")
def model():
    return demo_model().eval()


@pytest.fixture(scope="module")
def run(tmp_path_factory, model):
    return paramsal.profile_dataset(model, first_samples(), tmp_path_factory.mktemp("run"), batch_size=60,
                                    progress=False, model_name="demo", data_name=f"{DATA_MODULE}:first_samples")


@pytest.fixture(scope="module")
def tuned(run, model):
    return FineTune(model, ks=(1, 4, 30), lr=LR, neighbors=NEIGHBORS, batch_size=5,
                    num_resamples=200).evaluate(run, first_samples())


def _reference(model, run, data, result, selection, k, dtype):
    """Per sample: a real SGD step on a deep copy, then its probabilities on the sample and its neighbours."""
    index = paramsal.units_of(model, "filters")
    rows = result.table
    rows = rows[(rows.selection == selection) & (rows.k == (0 if selection == "all" else k))]
    ids = rows.sample_id.to_numpy()[:4]
    profiles = run.profiles(only=ids)
    neighbors = neighbor_ids(run, ids, NEIGHBORS)
    salient = choose_units(profiles, k, "salient", 0, ids)
    chosen = choose_units(profiles, k, selection, 0, ids) if selection != "all" else None
    out = []
    for i, sample in enumerate(ids):
        x, y = data[int(sample)]
        x = x.to(dtype)
        scale = 1.0
        if selection in ("random", "least"):
            scale = _norm(model, x, y, index, salient[i]) / _norm(model, x, y, index, chosen[i])
        copy_ = stepped_copy(model, x, y, index, None if chosen is None else chosen[i].tolist(), LR, scale)
        evaluated = torch.stack([x] + [data[int(j)][0].to(dtype) for j in neighbors[i]])
        with torch.no_grad():
            out.append(torch.softmax(copy_(evaluated).double(), 1).numpy())
    return ids, np.stack(out), neighbors


def _norm(model, x, y, index, unit_ids) -> float:
    """L2 norm of the chosen filters' weight gradients, by plain autograd."""
    model = copy.deepcopy(model).eval()
    loss = torch.nn.functional.cross_entropy(model(x[None]), torch.tensor([y]))
    grads = dict(zip([n for n, _ in model.named_parameters()], torch.autograd.grad(loss, list(model.parameters()))))
    total = 0.0
    for u in unit_ids:
        group = next(g for g in index if g.offset <= u < g.stop)
        total += float(grads[group.param_name][u - group.offset].double().pow(2).sum())
    return total ** 0.5


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-10)], ids=["float32", "float64"])
@pytest.mark.parametrize("selection,k", [("salient", 4), ("random", 4), ("least", 30), ("all", 0)])
def test_batched_step_equals_a_real_sgd_step_on_a_copy(run, model, selection, k, dtype, tol):
    data = first_samples()
    m = copy.deepcopy(model).to(dtype)
    some = run.sample_ids("misclassified")[:4]
    result = FineTune(m, ks=(k or 1,), select=(selection,), lr=LR, neighbors=NEIGHBORS, batch_size=3,
                      num_resamples=10, allow_other_weights=True).evaluate(run, data, samples=some)
    ids, expected, neighbors = _reference(m, run, data, result, selection, k or 1, dtype)
    rows = result.table.set_index("sample_id").loc[ids]
    target = rows.target.to_numpy()
    np.testing.assert_allclose(rows.true_after, expected[np.arange(len(ids)), 0, target], rtol=0, atol=tol)
    np.testing.assert_array_equal(rows.new_pred, expected[:, 0].argmax(1))
    np.testing.assert_array_equal(rows.corrected, expected[:, 0].argmax(1) == target)
    nb_targets = run.table().to_pandas().set_index("sample_id").loc[neighbors.ravel(), "target"].to_numpy()
    nb_targets = nb_targets.reshape(neighbors.shape)
    nb_correct = (expected[:, 1:].argmax(2) == nb_targets).mean(1)
    np.testing.assert_allclose(rows.neighbors_corrected, nb_correct, atol=1e-12)
    assert rows.neighbors.eq(NEIGHBORS).all()


def test_batched_probabilities_equal_the_copies_on_every_class(model):
    data = first_samples()
    index = paramsal.units_of(model, "filters")
    x = torch.stack([data[i][0] for i in range(4)])
    y = torch.tensor([data[i][1] for i in range(4)])
    evaluated = torch.stack([x[[i, (i + 1) % 4, (i + 2) % 4]] for i in range(4)])  # [4, 3, 1, 28, 28]
    unit_ids = torch.tensor([[0, 17, 300, 559], [5, 6, 7, 8], [100, 200, 300, 400], [559, 1, 2, 3]])
    with paramsal.engine.profile.eval_mode(model):
        grads = per_sample_gradients(model, index.param_names, x, y)
        scale = torch.tensor([1.0, 2.0, 0.5, 3.0], dtype=torch.float64)
        probs = ft.updated_probabilities(model, ft.unit_step(grads, index, unit_ids, LR, scale), evaluated)
    for i in range(4):
        copy_ = stepped_copy(model, x[i], int(y[i]), index, unit_ids[i].tolist(), LR, float(scale[i]))
        with torch.no_grad():
            expected = torch.softmax(copy_(evaluated[i]).double(), 1)
        torch.testing.assert_close(probs[i], expected, rtol=0, atol=1e-5)


def test_random_and_least_steps_have_the_salient_norm(tuned):
    rows = tuned.table
    for k in (1, 4, 30):
        at_k = rows[rows.k == k].pivot(index="sample_id", columns="selection", values=["grad_norm", "step_norm"])
        salient = at_k[("grad_norm", "salient")]
        np.testing.assert_allclose(at_k[("step_norm", "salient")], salient, rtol=1e-12)
        for selection in ("random", "least"):
            nonzero = at_k[("grad_norm", selection)] > 0
            np.testing.assert_allclose(at_k[("step_norm", selection)][nonzero], salient[nonzero], rtol=1e-12)


def test_unit_step_rescaled_norm_is_exact():
    index = paramsal.units_of(torch.nn.Sequential(torch.nn.Conv2d(3, 6, 3), torch.nn.Conv2d(6, 4, 1)), "filters")
    grads = {"0.weight": torch.randn(2, 6, 3, 3, 3, dtype=torch.float64),
             "1.weight": torch.randn(2, 4, 6, 1, 1, dtype=torch.float64)}
    squared = ft.unit_norms_squared(grads, index)
    salient, other = torch.tensor([[0, 7], [9, 2]]), torch.tensor([[3, 8], [1, 4]])
    target = ft.chosen_norms(squared, salient)
    scale = target / ft.chosen_norms(squared, other)
    deltas = ft.unit_step(grads, index, other, lr=0.1, scale=scale)
    norm = torch.cat([d.flatten(1) for d in deltas.values()], 1).norm(dim=1)
    torch.testing.assert_close(norm, 0.1 * target, rtol=1e-12, atol=0)
    # only the chosen rows move: sample 0 moves filter 3 of layer 0 and filter 2 (unit 8) of layer 1
    moved = [(name, int(s), int(r)) for name, d in deltas.items() for s, r in (d.flatten(2).abs().sum(2) > 0).nonzero()]
    assert sorted(moved) == [("0.weight", 0, 3), ("0.weight", 1, 1), ("0.weight", 1, 4), ("1.weight", 0, 2)]


def test_random_selection_is_seeded_and_depends_on_the_sample_only():
    z = np.zeros((50, 560), np.float32)
    ids = np.arange(50) * 7
    first = choose_units(z, 25, "random", seed=3, sample_ids=ids)
    np.testing.assert_array_equal(first, choose_units(z, 25, "random", seed=3, sample_ids=ids))
    assert (first != choose_units(z, 25, "random", seed=4, sample_ids=ids)).any(axis=1).all()
    np.testing.assert_array_equal(choose_units(z[:2], 25, "random", 3, ids[[4, 9]]), first[[4, 9]])
    np.testing.assert_array_equal(choose_units(z, 5, "random", 3, ids), first[:, :5])
    assert all(len(set(row)) == 25 for row in first)


def test_random_rows_are_reproducible(run, model, tuned):
    again = FineTune(model, ks=(1, 4, 30), select=("random",), lr=LR, neighbors=NEIGHBORS, batch_size=7,
                     num_resamples=200).evaluate(run, first_samples())
    mine = tuned.table
    mine = mine[mine.selection == "random"].reset_index(drop=True)
    other = again.table
    np.testing.assert_array_equal(mine.new_pred, other.new_pred)
    np.testing.assert_allclose(mine.true_after, other.true_after, atol=1e-6)


def test_all_moves_every_parameter(model):
    data = first_samples()
    x, y = data[0]
    names = [n for n, _ in model.named_parameters()]
    with paramsal.engine.profile.eval_mode(model):
        grads = per_sample_gradients(model, names, x[None], torch.tensor([y]))
    deltas = ft.full_step(grads, LR)
    assert set(deltas) == set(names)  # BatchNorm affine parameters and the classifier's bias included
    assert all(bool(d.abs().sum() > 0) for d in deltas.values())
    copy_ = stepped_copy(model, x, y, None, None, LR)
    for name, p in copy_.named_parameters():
        # compared as updated values: a float32 difference of nearby weights would be mostly rounding
        torch.testing.assert_close(p.detach(), model.get_parameter(name).detach() + deltas[name][0],
                                   rtol=1e-6, atol=1e-7)
    for name, b in copy_.named_buffers():  # eval mode: the running statistics do not move
        torch.testing.assert_close(b, model.get_buffer(name), rtol=0, atol=0)


def test_summary_rows_and_files(tuned, tmp_path):
    rows = tuned.table
    n = rows.sample_id.nunique()
    assert len(rows) == n * (3 * 3 + 1)
    assert set(rows[rows.selection == "all"].k) == {0}
    summary = tuned.summary
    assert list(zip(summary.selection, summary.k))[:3] == [("salient", 1), ("salient", 4), ("salient", 30)]
    for metric in ft.METRICS:
        assert (summary[f"{metric}_low"] <= summary[metric] + 1e-12).all()
        assert (summary[metric] <= summary[f"{metric}_high"] + 1e-12).all()
    means = rows.groupby(["selection", "k"]).corrected.mean()
    for _, row in summary.iterrows():
        assert row.corrected == pytest.approx(means[(row.selection, row.k)])
    table = tuned.metric_table("neighbors_corrected")
    assert list(table.columns) == ["salient", "random", "least", "all"] and list(table.index) == [1, 4, 30]
    assert tuned.config["pred_changed"] == 0
    paths = tuned.save(tmp_path)
    assert all(p.exists() and p.stat().st_size > 0 for p in paths.values())
    assert paths["table"].name == "finetune-lr0.05.parquet"
    assert (summary["skipped"] == 0).all() and not rows.skipped.any()


def test_errors_are_named(run, model):
    with pytest.raises(InputError, match="unknown selection"):
        FineTune(model, select="top")
    with pytest.raises(InputError, match="lr must be positive"):
        FineTune(model, lr=0)
    with pytest.raises(InputError, match=r"k of \[1000\] exceeds"):
        FineTune(model, ks=(1000,), neighbors=NEIGHBORS).evaluate(run, first_samples())
    with pytest.warns(ParamsalWarning, match=r"k=\[1000\] exceed the run's 560 units"):
        kept = FineTune(model, ks=(1, 1000), select="salient", neighbors=NEIGHBORS, num_resamples=10).evaluate(
            run, first_samples(), samples=run.sample_ids("misclassified")[:3])
    assert kept.config["ks"] == [1] and list(kept.summary.k) == [1]
    other = demo_model(pretrained=False)
    with pytest.raises(InputError, match="weights differ"):
        FineTune(other, ks=(1,), neighbors=NEIGHBORS).evaluate(run, first_samples())
    with pytest.raises(InputError, match="not in the run"):
        FineTune(model, ks=(1,), neighbors=NEIGHBORS).evaluate(run, first_samples(), samples=[10_000])
    with pytest.raises(InputError, match="unknown ranking 'gumbel'"):
        FineTune(model, ranking="gumbel")
    with pytest.raises(InputError, match="neighbors=500 is too many"):
        FineTune(model, ks=(1,), neighbors=500).evaluate(run, first_samples())


def test_command_line(run, tmp_path, capsys):
    # The run names its data as module:callable, which is called only for a run its maker trusts.
    assert paramsal.cli.main(["finetune", str(run.path), "--ks", "2,5", "--select", "salient,all", "--neighbors",
                              "3", "--resamples", "50", "--out", str(tmp_path), "--quiet", "--device", "cpu",
                              "--trust-run-specs", "--batch-size", "7"]) == 0
    printed = capsys.readouterr().out
    assert "salient" in printed and "updates/s" in printed
    assert (tmp_path / "finetune-lr0.001.parquet").exists() and (tmp_path / "finetune-lr0.001.png").exists()


class HalfDead(torch.nn.Module):
    """Two live filters (units 0-1) and six dead ones (units 2-7): their output is multiplied by 0."""

    def __init__(self):
        super().__init__()
        self.live = torch.nn.Conv2d(1, 2, 3)
        self.dead = torch.nn.Conv2d(1, 6, 3)
        self.head = torch.nn.Linear(8, 10)

    def forward(self, x):
        features = torch.cat([torch.tanh(self.live(x)), self.dead(x) * 0], 1)
        return self.head(features.mean((2, 3)))


def test_steps_without_gradient_are_counted_as_skipped(tmp_path):
    model, data = HalfDead().eval(), Subset(demo_dataset("test"), range(60))
    run = paramsal.profile_dataset(model, data, tmp_path / "run", batch_size=30, progress=False)
    result = FineTune(model, ks=(1, 3), select=("salient", "random", "least", "all"), neighbors=2, batch_size=8,
                      num_resamples=20).evaluate(run, data)
    rows = result.table
    ids = run.sample_ids("misclassified")
    z = run.profiles(only=ids)
    dead = set(range(2, 8))
    salient = choose_units(z, 3, "salient", 0, ids)
    for selection in ("salient", "random", "least"):
        chosen = choose_units(z, 3, selection, 0, ids)
        for k in (1, 3):
            expected = np.array([set(c[:k]) <= dead or (selection != "salient" and set(s[:k]) <= dead)
                                 for c, s in zip(chosen, salient)])
            at = rows[(rows.selection == selection) & (rows.k == k)].set_index("sample_id").loc[ids]
            np.testing.assert_array_equal(at.skipped.to_numpy(), expected, err_msg=f"{selection}, k={k}")
            np.testing.assert_allclose(at.true_after[expected], at.true_before[expected], atol=1e-6)
    assert rows.skipped.any() and not rows.skipped.all()
    assert not rows[rows.selection == "all"].skipped.any()  # the head has a gradient
    counts = rows.groupby(["selection", "k"]).skipped.sum()
    summary = result.summary.set_index(["selection", "k"])
    np.testing.assert_array_equal(summary.skipped, counts.loc[summary.index])
    assert summary.loc[("least", 1), "skipped"] > 0


def brier_loss(outputs, targets):
    """Squared distance of the softmax to the one-hot target: another per-sample loss than cross-entropy."""
    onehot = torch.zeros_like(outputs).scatter(1, targets[:, None], 1.0)  # (one_hot does not vmap)
    return (torch.softmax(outputs, 1) - onehot).pow(2).sum(1)


def test_a_users_loss_reaches_the_step(run, model):
    data = first_samples()
    some = run.sample_ids("misclassified")[:3]
    settings = dict(ks=(4,), select=("salient", "all"), lr=LR, neighbors=NEIGHBORS, num_resamples=10)
    mine = FineTune(model, loss=brier_loss, **settings).evaluate(run, data, samples=some)
    default = FineTune(model, **settings).evaluate(run, data, samples=some)
    assert mine.config["loss"] == "brier_loss" and default.config["loss"] == "cross_entropy"
    assert not np.allclose(mine.table.true_after, default.table.true_after, atol=1e-6)
    index = paramsal.units_of(model, "filters")
    z = run.profiles(only=some)
    salient = choose_units(z, 4, "salient", 0, some)
    rows = mine.table.set_index(["selection", "sample_id"])
    for i, sample in enumerate(some):
        x, y = data[int(sample)]
        for selection, units in (("salient", salient[i].tolist()), ("all", None)):
            copy_ = stepped_copy(model, x, y, index, units, LR, loss=brier_loss)
            with torch.no_grad():
                expected = torch.softmax(copy_(x[None]).double(), 1)[0, y].item()
            assert rows.loc[(selection, int(sample)), "true_after"] == pytest.approx(expected, abs=1e-5)
