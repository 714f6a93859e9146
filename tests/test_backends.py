"""Every backend equals the one-sample-at-a-time reference."""


import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from nets import SMALL_CASES, TORCHVISION_CASES, Case, batch, build, profiled_by_auto, relative_error
from torch import nn

from paramsal import profile_batch, units_of
from paramsal.errors import ParamsalWarning
from paramsal.reference.profiles import reference_profiles

TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-4}
AGGREGATIONS = ["mean_abs", "abs_mean"]


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
@pytest.mark.parametrize("case", SMALL_CASES, ids=lambda c: c.name)
def test_loop_backend_equals_reference(case: Case, aggregation: str):
    model = build(case, torch.float64)
    x, y = batch(case, 3, torch.float64)
    want = reference_profiles(model, x, y, units_of(model, case.units), aggregation)
    got = profile_batch(model, x, y, backend="loop", units=case.units, aggregation=aggregation)
    assert want.abs().max() > 0
    assert relative_error(got, want) <= 1e-12


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("aggregation", AGGREGATIONS)
@pytest.mark.parametrize("backend", ["hooks", "vmap"])
@pytest.mark.parametrize("case", SMALL_CASES, ids=lambda c: c.name)
def test_batched_backends_equal_loop(case: Case, backend: str, aggregation: str, dtype: torch.dtype):
    model = build(case, dtype)
    x, y = batch(case, 5, dtype)
    want = profile_batch(model, x, y, backend="loop", units=case.units, aggregation=aggregation)
    got = profile_batch(model, x, y, backend=backend, units=case.units, aggregation=aggregation, chunk_size=2)
    assert got.dtype == dtype and got.shape == (5, len(units_of(model, case.units)))
    assert relative_error(got, want) <= TOLERANCE[dtype]


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["hooks", "vmap"])
@pytest.mark.parametrize("case", TORCHVISION_CASES, ids=lambda c: c.name)
def test_torchvision_architectures_equal_loop(case: Case, backend: str):
    model = build(case, torch.float64)
    x, y = batch(case, 3, torch.float64)
    want = profile_batch(model, x, y, backend="loop")
    got = profile_batch(model, x, y, backend=backend)
    assert relative_error(got, want) <= TOLERANCE[torch.float64]


class OwnConv(nn.Module):
    """A layer of no registered type that convolves with its own weight, as given or standardized first."""

    def __init__(self, standardize: bool = False):
        super().__init__()
        self.standardize = standardize
        self.weight = nn.Parameter(torch.randn(3, 2, 2, 2, dtype=torch.float64))

    def forward(self, x):
        w = self.weight
        if self.standardize:  # a use before the convolution: no reducer sees it
            w = (w - w.mean((1, 2, 3), keepdim=True)) / w.std((1, 2, 3), keepdim=True)
        return nn.functional.conv2d(x, w).mean((2, 3))


def test_auto_serves_a_functional_use_of_a_layers_own_weight_and_falls_back_from_a_transformed_one():

    x, y = torch.randn(4, 2, 5, 5, dtype=torch.float64), torch.tensor([0, 2, 1, 0])
    for standardize, backend in ((False, "hooks"), (True, "vmap")):
        model = OwnConv(standardize)
        got, ended_on, notes = profiled_by_auto(model, x, y)
        assert ended_on == backend
        assert len(notes) == standardize and all("'weight' is passed to" in note for note in notes)
        assert relative_error(got, profile_batch(model, x, y, backend="loop")) <= TOLERANCE[torch.float64]


def test_auto_says_why_it_starts_on_vmap():
    from paramsal import Profiler

    model = nn.Sequential(nn.Conv2d(2, 3, 2), nn.BatchNorm2d(3, track_running_stats=False), nn.Flatten())
    with pytest.warns(ParamsalWarning, match="batch statistics even in eval mode.*with the vmap backend"):
        assert Profiler(model).backend == "vmap"


def test_custom_unit_callable_uses_scatter_path_on_every_backend():
    case = SMALL_CASES[0]
    model = build(case, torch.float64)
    x, y = batch(case, 4, torch.float64)

    def checkerboard(name, param):
        if param.dim() != 4:
            return None
        ids = torch.arange(param.numel()).reshape(param.shape) % 3
        ids[0, 0, 0, 0] = -1  # an element in no unit
        return ids

    index = units_of(model, checkerboard)
    want = reference_profiles(model, x, y, index)
    for backend in ("loop", "vmap", "hooks"):
        assert relative_error(profile_batch(model, x, y, backend=backend, units=index), want) <= 1e-12


def test_hooks_on_integer_inputs_follow_output_edges():
    model = nn.Sequential(nn.Embedding(7, 6), nn.Linear(6, 5)).double()

    def last_token_loss(out, y):
        return nn.functional.cross_entropy(out[:, -1], y, reduction="none")

    x = torch.randint(0, 7, (4, 3))
    y = torch.randint(0, 5, (4,))
    want = profile_batch(model, x, y, backend="loop", units="conv+linear", loss=last_token_loss)
    got = profile_batch(model, x, y, backend="hooks", units="conv+linear", loss=last_token_loss)
    assert relative_error(got, want) <= 1e-12


@settings(max_examples=30, deadline=None)
@given(groups=st.sampled_from([1, 2, 3]), cin_per=st.integers(1, 3), cout_per=st.integers(1, 3),
       kh=st.integers(1, 3), kw=st.integers(1, 3), stride=st.integers(1, 3), dilation=st.integers(1, 2),
       padding=st.integers(0, 2), bias=st.booleans(), h=st.integers(5, 9), w=st.integers(5, 9),
       aggregation=st.sampled_from(AGGREGATIONS))
def test_random_conv2d_shapes(groups, cin_per, cout_per, kh, kw, stride, dilation, padding, bias, h, w,
                              aggregation):
    conv = nn.Conv2d(cin_per * groups, cout_per * groups, (kh, kw), stride=stride, padding=padding,
                     dilation=dilation, groups=groups, bias=bias)
    model = nn.Sequential(conv, nn.Tanh(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
                          nn.Linear(cout_per * groups * 4, 3)).double()
    x = torch.randn(3, cin_per * groups, h, w, dtype=torch.float64)
    y = torch.tensor([0, 1, 2])
    index = units_of(model, "conv+linear")
    want = reference_profiles(model, x, y, index, aggregation)
    got = profile_batch(model, x, y, backend="hooks", units=index, aggregation=aggregation)
    assert relative_error(got, want) <= 1e-9


@pytest.mark.parametrize("strategy", ["grouped", "tiled"])
@pytest.mark.parametrize("case", [c for c in SMALL_CASES if c.units in ("filters", "conv")], ids=lambda c: c.name)
def test_each_conv_strategy_equals_loop(case: Case, strategy: str):
    from paramsal.kernels.conv import conv_strategy

    model = build(case, torch.float64)
    x, y = batch(case, 5, torch.float64)
    want = profile_batch(model, x, y, backend="loop", units=case.units)
    with conv_strategy(strategy):
        got = profile_batch(model, x, y, backend="hooks", units=case.units, chunk_size=2)
    assert relative_error(got, want) <= TOLERANCE[torch.float64]


@pytest.mark.parametrize("case", [c for c in SMALL_CASES if c.units in ("filters", "conv")], ids=lambda c: c.name)
def test_tiled_strategy_with_many_small_tiles_equals_loop(case: Case, monkeypatch: pytest.MonkeyPatch):
    """Tiles of a few samples and a few columns, the last one ragged, as large layers get them."""
    from paramsal.kernels import conv, tiles

    monkeypatch.setattr(tiles, "TILE_ELEMENTS", 64)
    monkeypatch.setattr(tiles, "TILE_COLUMNS", 5)
    model = build(case, torch.float64)
    x, y = batch(case, 5, torch.float64)
    want = profile_batch(model, x, y, backend="loop", units=case.units)
    with conv.conv_strategy("tiled"):
        got = profile_batch(model, x, y, backend="hooks", units=case.units)
    assert relative_error(got, want) <= TOLERANCE[torch.float64]


@pytest.mark.parametrize("size", [1, 2])
def test_depthwise_convs_on_small_maps_equal_loop(size: int):
    """The small-map path of depthwise convolutions: 7x7 kernels with 'same' padding on 1x1 and 2x2 maps, where
    most of each filter's weights see only padding (their gradient is exactly 0)."""
    from paramsal.kernels import conv

    model = nn.Sequential(nn.Conv2d(3, 6, 1), nn.Conv2d(6, 6, 7, padding=3, groups=6), nn.Tanh(),
                          nn.Conv2d(6, 6, (5, 3), padding=(2, 1), groups=6), nn.Flatten(),
                          nn.Linear(6 * size * size, 4)).double()
    x, y = torch.randn(5, 3, size, size, dtype=torch.float64), torch.tensor([0, 1, 2, 3, 0])
    maps = torch.zeros(5, 6, size, size, dtype=torch.float64)
    for position, padding in ((1, (3, 3)), (3, (2, 1))):
        layer = conv.ConvCall(model[position].weight, (1, 1), padding, (1, 1), 6)
        group = units_of(model, "filters").groups[(position + 1) // 2]
        assert conv._strategy(layer, maps, maps, group, "mean_abs") is conv.small_map_depthwise_units
    want = profile_batch(model, x, y, backend="loop", units="filters")
    for aggregation in ("mean_abs", "abs_mean"):
        got = profile_batch(model, x, y, backend="hooks", units="filters", aggregation=aggregation)
        assert relative_error(got, profile_batch(model, x, y, backend="loop", units="filters",
                                                 aggregation=aggregation)) <= TOLERANCE[torch.float64]
    assert (want[:, 6:] > 0).all()  # the depthwise filters' units carry gradient


def test_pointwise_convs_on_one_position_and_on_small_maps_equal_loop():
    """A squeeze-and-excitation block's 1x1 convs on a 1x1 map (rank-one gradients), grouped too, and a 1x1 conv on
    a 3x3 map (its patches are its input)."""
    from paramsal.kernels import conv

    class Excite(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(3, 8, 1)
            self.squeeze = nn.Conv2d(8, 4, 1)
            self.expand = nn.Conv2d(4, 8, 1, groups=2)
            self.fc = nn.Linear(8, 3)

        def forward(self, x):
            h = torch.tanh(self.stem(x))
            scale = torch.sigmoid(self.expand(torch.tanh(self.squeeze(h.mean((2, 3), keepdim=True)))))
            return self.fc((h * scale).mean((2, 3)))

    model = Excite().double()
    x, y = torch.randn(5, 3, 3, 3, dtype=torch.float64), torch.tensor([0, 1, 2, 1, 0])
    one = torch.zeros(5, 8, 1, 1, dtype=torch.float64)
    groups = units_of(model, "filters").groups
    assert conv._strategy(conv.ConvCall(model.expand.weight, (1, 1), (0, 0), (1, 1), 2), one[:, :4], one,
                          groups[2], "mean_abs") is conv.single_position_units
    assert torch.equal(conv.conv_patch_columns(model.stem, x), x.reshape(5, 3, 9))
    for aggregation in ("mean_abs", "abs_mean"):
        got = profile_batch(model, x, y, backend="hooks", units="filters", aggregation=aggregation)
        want = profile_batch(model, x, y, backend="loop", units="filters", aggregation=aggregation)
        assert relative_error(got, want) <= TOLERANCE[torch.float64] and (want > 0).all()
