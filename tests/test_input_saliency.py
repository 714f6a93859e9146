"""Input-space saliency: the double-backward gradient against finite differences, the picture, masking."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

import paramsal
from paramsal.analyses.base import load_result
from paramsal.analyses.input_saliency import AttributionResult, InputSaliency, boosted_profile, cosine_distance
from paramsal.analyses.masking import (
    Masking,
    MaskingResult,
    blurred,
    confidence_raised,
    mask_pixels,
    pixel_count,
    random_pixels,
    summarize_masking,
    top_pixels,
)
from paramsal.analyses.pictures import channel_max, gaussian_kernel, plot_explanations, visual_map
from paramsal.analyses.selection import select_units
from paramsal.reference import attribution_loop


def choose_units(z, k, select="salient", seed=0, sample_ids=None):
    """select_units on a tensor, as a tensor (what the tests below were written against)."""
    return torch.as_tensor(select_units(torch.as_tensor(z).detach().numpy(), k, select, seed, sample_ids))


class SmoothCNN(nn.Module):
    """Smooth activations (Tanh, Softplus) so that finite differences of the double gradient are valid."""

    def __init__(self, classes: int = 4):
        super().__init__()
        self.conv1 = nn.Conv2d(2, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)
        self.conv2 = nn.Conv2d(3, 4, 3, stride=2)
        self.fc = nn.Linear(4 * 2 * 2, classes)

    def forward(self, x):
        x = torch.tanh(self.bn(self.conv1(x)))
        x = F.softplus(self.conv2(x))
        return self.fc(x.flatten(1))


def _model_and_stats(dtype=torch.float64, seed: int = 0):
    torch.manual_seed(seed)
    model = SmoothCNN().to(dtype)
    with torch.no_grad():  # running statistics that are not the identity, so eval-mode BN matters
        model.bn.running_mean.uniform_(-0.2, 0.2)
        model.bn.running_var.uniform_(0.5, 1.5)
    reference = torch.randn(12, 2, 6, 6, dtype=dtype)
    stats = paramsal.SaliencyStats(len(paramsal.units_of(model))).update(
        paramsal.profile_batch(model, reference, torch.randint(0, 4, (12,))))
    return model, stats


def _smooth_run(path, dtype=torch.float64, inputs=None, labels=None, at=0, n=12, seed=0):
    """A run of :class:`SmoothCNN` over ``n`` random samples, with ``inputs``/``labels`` placed from id ``at``."""
    model, _ = _model_and_stats(dtype, seed)
    x, y = torch.randn(n, 2, 6, 6, dtype=dtype), torch.randint(0, 4, (n,))
    if inputs is not None:
        x[at:at + len(inputs)], y[at:at + len(inputs)] = inputs, labels
    data = TensorDataset(x, y)
    run = paramsal.profile_dataset(model, data, path / "run", batch_size=n, device="cpu", progress=False)
    return model, run, data


def _distance(model, stats, x, y, target):
    """D_C(ŝ(x), target) for one sample, written out directly (the reference; the model must be in eval mode)."""
    assert not model.training
    params = [p for p in model.parameters() if p.dim() == 4]
    loss = F.cross_entropy(model(x[None]), y[None])
    grads = torch.autograd.grad(loss, params, create_graph=True)
    raw = torch.cat([g.abs().flatten(1).mean(1) for g in grads])
    z = (raw - torch.as_tensor(stats.mean)) / torch.as_tensor(stats.std)
    return 1 - F.cosine_similarity(z, target, dim=0)


@pytest.mark.parametrize("backend", ["vmap", "loop"])
def test_attribution_matches_finite_differences(backend):
    model, stats = _model_and_stats()
    x = torch.randn(3, 2, 6, 6, dtype=torch.float64)
    y = torch.tensor([0, 2, 3])
    model.eval()
    explainer = InputSaliency(model, stats=stats, k=2, boost=100.0, backend=backend)
    z = explainer.profiles(x, y)
    units = choose_units(z, 2)
    target = boosted_profile(z, units, 100.0)
    attribution = explainer.attribute(x, y)
    assert attribution.shape == x.shape and attribution.dtype == torch.float64
    eps = 1e-6
    rng = np.random.default_rng(0)
    with torch.no_grad(), torch.enable_grad():
        for n in range(3):
            for flat in rng.choice(x[n].numel(), 6, replace=False):
                step = torch.zeros(x[n].numel(), dtype=torch.float64)
                step[flat] = eps
                step = step.view_as(x[n])
                plus = _distance(model, stats, x[n] + step, y[n], target[n])
                minus = _distance(model, stats, x[n] - step, y[n], target[n])
                numeric = abs(float((plus - minus).detach()) / (2 * eps))
                assert float(attribution[n].flatten()[flat]) == pytest.approx(numeric, rel=1e-5, abs=1e-9)


def test_vmap_equals_loop_and_model_state_is_restored():
    model, stats = _model_and_stats()
    model.train()
    x = torch.randn(4, 2, 6, 6, dtype=torch.float64)
    y = torch.tensor([1, 0, 3, 2])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    batched = InputSaliency(model, stats=stats, k=3, batch_size=3).attribute(x, y)
    looped = InputSaliency(model, stats=stats, k=3, backend="loop").attribute(x, y)
    torch.testing.assert_close(batched, looped, rtol=1e-9, atol=1e-12)
    assert model.training and model.bn.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # BN running stats untouched
    assert all(p.grad is None for p in model.parameters())
    assert not model._forward_hooks and not model._backward_hooks


def test_each_sample_is_independent_of_the_batch():
    model, stats = _model_and_stats()
    x = torch.randn(3, 2, 6, 6, dtype=torch.float64)
    y = torch.tensor([0, 1, 2])
    explainer = InputSaliency(model, stats=stats, k=2)
    torch.testing.assert_close(explainer.attribute(x, y)[1:2], explainer.attribute(x[1:2], y[1:2]))


def test_random_selection_is_seeded_per_sample():
    z = torch.randn(5, 30)
    a = choose_units(z, 4, "random", seed=3, sample_ids=[10, 11, 12, 13, 14])
    b = choose_units(z[2:], 4, "random", seed=3, sample_ids=[12, 13, 14])
    assert torch.equal(a[2:], b)
    assert all(len(set(row.tolist())) == 4 for row in a)
    assert not torch.equal(a, choose_units(z, 4, "random", seed=4, sample_ids=[10, 11, 12, 13, 14]))
    top = choose_units(z, 4)
    assert torch.equal(top, torch.argsort(z, dim=1, descending=True)[:, :4])


def test_boosted_profile_and_cosine_distance():
    z = torch.tensor([[1.0, -2.0, 3.0]], requires_grad=True)
    target = boosted_profile(z, torch.tensor([[2]]), 100.0)
    assert not target.requires_grad
    assert target.tolist() == [[1.0, -2.0, 300.0]]
    assert float(cosine_distance(z.detach(), z.detach())) == pytest.approx(0.0, abs=1e-6)
    assert float(cosine_distance(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0]))) == pytest.approx(1.0)


def test_errors_name_the_problem():
    model, stats = _model_and_stats()
    with pytest.raises(paramsal.InputError, match="select"):
        InputSaliency(model, stats=stats, select="best")
    with pytest.raises(paramsal.InputError, match="k=99"):
        InputSaliency(model, stats=stats, k=99)
    with pytest.raises(paramsal.InputError, match="statistics have 5 units"):
        InputSaliency(model, stats=paramsal.SaliencyStats(5))
    with pytest.raises(paramsal.InputError, match="targets"):
        InputSaliency(model, stats=stats, k=2).attribute(torch.randn(2, 2, 6, 6), torch.zeros(3, dtype=torch.long))
    with pytest.raises(paramsal.InputError, match="ranking"):
        InputSaliency(model, stats=stats, ranking="gumbel")
    with pytest.raises(paramsal.InputError, match="needs a model and statistics"):
        InputSaliency(model).attribute(torch.randn(2, 2, 6, 6), torch.zeros(2, dtype=torch.long))


# ---------------------------------------------------------------------------------------------------- picture


def test_visual_map_clips_between_percentiles_and_blurs():
    attribution = torch.zeros(3, 10, 10)
    attribution[1] = torch.arange(100.0).view(10, 10)  # channel max = the ramp
    attribution[0] = -0.5                               # absolute values count, but the max wins
    unblurred = visual_map(attribution, blur=1)
    ramp = torch.arange(100.0).view(10, 10)
    lo, hi = torch.quantile(ramp.flatten(), 0.9), torch.quantile(ramp.flatten(), 0.99)
    torch.testing.assert_close(unblurred, ((ramp - lo) / (hi - lo)).clamp(0, 1))
    assert float(unblurred.min()) == 0 and float(unblurred.max()) == 1
    blurred = visual_map(attribution)
    assert blurred.shape == (10, 10) and 0 <= float(blurred.min()) and float(blurred.max()) <= 1
    assert visual_map(attribution[None].repeat(2, 1, 1, 1)).shape == (2, 10, 10)
    assert float(gaussian_kernel(3).sum()) == pytest.approx(1.0)
    assert torch.equal(channel_max(-attribution), channel_max(attribution))


def test_plot_writes_png(tmp_path):
    images = torch.randn(2, 1, 8, 8)
    maps = torch.rand(2, 8, 8)
    path = tmp_path / "fig.png"
    plot_explanations(images, maps, path, other_maps=torch.rand(2, 8, 8), titles=["a", "b"])
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(paramsal.InputError, match="3 maps"):
        plot_explanations(images, torch.rand(3, 8, 8))


# ---------------------------------------------------------------------------------------------------- masking


@pytest.mark.parametrize("percent", [1, 5, 10, 20])
def test_masking_touches_exactly_the_chosen_pixels(percent):
    inputs = torch.randn(3, 2, 7, 9) + 5  # no input pixel is 0 already
    scores = torch.rand(3, 7, 9)
    count = pixel_count(percent, 63)
    assert count == max(1, round(percent / 100 * 63))
    chosen = top_pixels(scores, count)
    masked = mask_pixels(inputs, chosen)
    assert masked.shape == inputs.shape
    changed = (masked != inputs)
    assert torch.equal(changed[:, 0], changed[:, 1])                       # all channels of a pixel
    assert changed[:, 0].flatten(1).sum(1).tolist() == [count] * 3         # exactly that many per sample
    threshold = torch.sort(scores.flatten(1), dim=1, descending=True).values[:, count - 1]
    assert bool((scores.flatten(1)[changed[:, 0].flatten(1)].view(3, count) >= threshold[:, None]).all())
    assert bool((masked[changed] == 0).all())
    random_choice = random_pixels(3, 63, count, seed=1, sample_ids=[4, 5, 6])
    assert (mask_pixels(inputs, random_choice) != inputs)[:, 0].flatten(1).sum(1).tolist() == [count] * 3
    assert torch.equal(random_choice[1:], random_pixels(2, 63, count, seed=1, sample_ids=[5, 6]))


def test_masking_table_and_selection(tmp_path):
    x = torch.randn(4, 2, 6, 6)
    y = torch.tensor([0, 1, 2, 3])
    model, run, data = _smooth_run(tmp_path, torch.float32, x, y, at=7)
    stats = run.stats
    table = Masking(model, percents=(5, 50), k=2).evaluate(run, data, samples=[7, 8, 9, 10]).table
    assert len(table) == 4 * 2 * 2
    frame = table
    assert set(frame["pixels"]) == {"salient", "random"}
    assert frame.loc[frame["percent"] == 50, "num_pixels"].eq(18).all()
    assert np.allclose(frame["units_drop"], 1 - frame["units_raw_after"] / frame["units_raw_before"])
    assert (frame["units_raw_before"] > 0).all()
    base = paramsal.profile_batch(model, x, y)
    first = frame[(frame["sample_id"] == 7)].iloc[0]
    units = choose_units(stats.standardize(base), 2)[0]
    assert first["units_raw_before"] == pytest.approx(float(base[0, units].mean()), rel=1e-5)
    gains = frame[(frame["pixels"] == "salient") & (frame["percent"] == 5)]
    expected = gains.loc[gains["true_after"] - gains["true_before"] >= 0.0, "sample_id"].to_numpy()
    assert np.array_equal(confidence_raised(table, 5, min_gain=0.0), expected)
    summary = summarize_masking(table)
    assert len(summary) == 4 and set(summary.columns) >= {"units_drop", "delta_true", "n"}
    with pytest.raises(paramsal.InputError, match="percent"):
        Masking(model, percents=(0,))


def test_demo_model_attribution_runs_quickly():
    """The vmap path on the real BatchNorm ResNet: shapes, finite, agrees with the loop."""
    from paramsal.zoo import demo_dataset, demo_model

    model, data = demo_model(), demo_dataset("test")
    x, y = data.images[:1], data.labels[:1]
    stats = paramsal.SaliencyStats(len(paramsal.units_of(model))).update(paramsal.profile_batch(
        model, data.images[:16], data.labels[:16]))
    a = InputSaliency(model, stats=stats).attribute(x, y)
    b = InputSaliency(model, stats=stats, backend="loop").attribute(x, y)
    assert a.shape == x.shape and bool(torch.isfinite(a).all()) and float(a.max()) > 0
    torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-6 * float(b.max()))
    assert not math.isnan(float(visual_map(a).sum()))


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    """A profiled run of the first 120 demo test images that records how to reload its model and data."""
    from torch.utils.data import Subset

    from paramsal.zoo import demo_dataset, demo_model

    return paramsal.profile_dataset(demo_model(), Subset(demo_dataset("test"), range(120)),
                                    tmp_path_factory.mktemp("explain") / "run", batch_size=60, progress=False,
                                    source={"model": "demo", "data": "demo:test", "limit": 120})


def test_explain_command_writes_png(tmp_path, small_run):
    """The CLI entry point end to end on a profiled run."""
    from paramsal.cli import main

    run = str(small_run.path)
    assert main(["explain", run, "--sample", "12", "--sample", "14", "--k", "5", "--out", str(tmp_path)]) == 0
    assert [p.name for p in tmp_path.glob("*.png")] == ["explain-id12-id14.png"]
    assert main(["explain", run, "--sample", "999999", "--out", str(tmp_path)]) == 2
    torch.save(torch.zeros(1, 28, 28), tmp_path / "x.pt")
    assert main(["explain", run, "--image", str(tmp_path / "x.pt")]) == 2
    from paramsal.zoo import demo_dataset

    image, label = demo_dataset("test")[12]
    label = int(label)
    np.save(tmp_path / "mine.npy", image.numpy())
    assert main(["explain", run, "--image", str(tmp_path / "mine.npy"), "--label", str(label), "--k", "5",
                 "--out", str(tmp_path / "image")]) == 0
    saved = load_result(tmp_path / "image", "explain-mine")
    assert saved.table["target"].tolist() == [label] and saved.arrays["inputs"].shape == (1, *image.shape)


def test_mask_command_writes_tables(tmp_path, small_run, capsys):
    import pyarrow.parquet as pq

    from paramsal.cli import main

    assert main(["mask", str(small_run.path), "--samples", "3", "--percents", "5,10", "--out", str(tmp_path)]) == 0
    table = pq.read_table(tmp_path / "masking.parquet")
    wrong = small_run.sample_ids(only="misclassified")[:3]
    assert sorted(set(table.column("sample_id").to_pylist())) == sorted(wrong.tolist())
    assert table.num_rows == 3 * 2 * 2  # samples x (salient, random) x percents
    assert "gain >= 25 points" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------------- the contract


def _brier(outputs, targets):
    """A per-sample loss other than cross-entropy: the Brier score of the softmax, ``sum_c (p_c - [c = y])^2``."""
    p = outputs.softmax(1)
    return p.pow(2).sum(1) - 2 * p.gather(1, targets[:, None])[:, 0] + 1


@pytest.mark.parametrize("backend", ["vmap", "loop"])
def test_a_custom_loss_reaches_the_gradient(backend):
    model, _ = _model_and_stats()
    x = torch.randn(3, 2, 6, 6, dtype=torch.float64)
    y = torch.tensor([0, 2, 3])
    stats = paramsal.SaliencyStats(len(paramsal.units_of(model))).update(
        paramsal.profile_batch(model, torch.randn(12, 2, 6, 6, dtype=torch.float64), torch.randint(0, 4, (12,)),
                               loss=_brier))
    explainer = InputSaliency(model, stats=stats, k=2, loss=_brier, backend=backend)
    z = explainer.profiles(x, y)
    torch.testing.assert_close(z, stats.standardize(paramsal.reference.reference_profiles(
        model, x, y, paramsal.units_of(model), loss=_brier)))
    target = boosted_profile(z, choose_units(z, 2), 100.0)
    model.eval()
    expected = attribution_loop(model, x, y, target, stats=stats, loss=_brier)
    got = explainer.attribute(x, y)
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-12)
    cross_entropy = InputSaliency(model, stats=stats, k=2, backend=backend).attribute(x, y)
    assert not torch.allclose(got, cross_entropy, rtol=1e-3)


@pytest.mark.parametrize("value", ["blur", "mean", "zero", 0.5, -2])
def test_mask_value_is_what_masked_pixels_become(value):
    inputs = torch.randn(2, 3, 8, 8) + 5
    pixels = top_pixels(torch.rand(2, 8, 8), 6)
    masked = Masking(value=value).masked(inputs, pixels)
    where = torch.zeros(2, 64, dtype=torch.bool)
    where[torch.arange(2)[:, None], pixels] = True
    where = where.view(2, 1, 8, 8).expand_as(inputs)
    if value == "blur":
        ndimage = pytest.importorskip("scipy.ndimage")
        sigma = max(1.0, 8 / 16)
        expected = torch.stack([torch.stack([torch.as_tensor(ndimage.gaussian_filter(
            channel.double().numpy(), sigma, mode="nearest", truncate=3.0)) for channel in image])
            for image in inputs]).float()
        torch.testing.assert_close(blurred(inputs), expected)
    elif value == "mean":
        expected = inputs.mean(dim=(2, 3), keepdim=True).expand_as(inputs)
    else:
        expected = torch.full_like(inputs, 0.0 if value == "zero" else float(value))
    assert torch.equal(masked[~where], inputs[~where])
    torch.testing.assert_close(masked[where], expected[where])
    assert bool((masked[where] != inputs[where]).all())


def test_mask_value_is_refused_unless_known():
    from paramsal.cli.explain import mask_value

    for bad in ("grey", float("nan"), True):
        with pytest.raises(paramsal.InputError, match="mask value"):
            Masking(value=bad)
    assert mask_value("0.25") == 0.25 and mask_value("blur") == "blur"
    with pytest.raises(Exception, match="finite number"):
        mask_value("inf")


def test_evaluate_draws_both_selections_and_round_trips(tmp_path):
    model, run, data = _smooth_run(tmp_path)
    result = InputSaliency(model, k=2, select="random").evaluate(run, data, samples=[3, 1])
    assert isinstance(result, AttributionResult) and result.name == "explain-id1-id3"
    assert result.table["sample_id"].tolist() == [1, 3]
    assert result.summary["selection"].tolist() == ["random", "salient"]
    assert result.arrays["inputs"].shape == (2, 2, 6, 6)
    assert result.arrays["maps"].shape == result.arrays["other_maps"].shape == (2, 6, 6)
    with torch.no_grad():
        assert result.table["pred"].tolist() == model.eval()(data.tensors[0][[1, 3]]).argmax(1).tolist()
    z = run.stats.standardize(paramsal.profile_batch(model, data.tensors[0][[1, 3]], data.tensors[1][[1, 3]]))
    assert [list(u) for u in result.table["other_units"]] == choose_units(z, 2).tolist()
    assert [list(u) for u in result.table["units"]] == choose_units(z, 2, "random", 0, [1, 3]).tolist()
    shares = result.table[["top10_share", "other_top10_share"]].to_numpy()
    assert bool(((shares >= 0.1 - 1e-12) & (shares <= 1 + 1e-12)).all())
    assert len(result.plot().axes) == 2 * 5
    loaded = load_result(tmp_path / "out", result.save(tmp_path / "out") and result.name)
    assert isinstance(loaded, AttributionResult)
    pd = pytest.importorskip("pandas")
    pd.testing.assert_frame_equal(loaded.table, result.table)
    pd.testing.assert_frame_equal(loaded.summary, result.summary)
    assert loaded.arrays.keys() == result.arrays.keys()
    assert all(np.array_equal(loaded.arrays[key], result.arrays[key]) for key in result.arrays)
    assert (tmp_path / "out" / "explain-id1-id3.png").read_bytes()[:4] == b"\x89PNG"


def test_masking_result_round_trips(tmp_path):
    model, run, data = _smooth_run(tmp_path, torch.float32)
    result = Masking(model, percents=(5, 50), k=2, value="zero").evaluate(run, data, samples=[0, 2])
    assert isinstance(result, MaskingResult) and result.name == "masking-zero"
    assert len(result.plot().axes) == 3
    result.save(tmp_path / "out")
    loaded = load_result(tmp_path / "out", "masking-zero")
    pd = pytest.importorskip("pandas")
    pd.testing.assert_frame_equal(loaded.table, result.table)
    pd.testing.assert_frame_equal(loaded.summary, result.summary)
    assert loaded.config["value"] == "zero"


def test_drawing_leaves_the_backend_alone(tmp_path, monkeypatch):
    import matplotlib

    monkeypatch.setattr(matplotlib, "use", lambda *a, **k: pytest.fail("matplotlib.use was called"))
    plot_explanations(torch.randn(1, 1, 8, 8), torch.rand(1, 8, 8), tmp_path / "x.png")
