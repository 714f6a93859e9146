"""Bad input gets an error that names the problem."""

import pytest
import torch
from nets import PlainCNN
from torch import nn

from paramsal import InputError, NonFiniteError, UnsupportedModuleError, profile_batch
from paramsal.kernels import register_reducer, unregister_reducer
from paramsal.kernels.conv import reduce_conv

X = torch.randn(3, 3, 14, 14)


def test_labels_out_of_range_are_named():
    with pytest.raises(InputError, match=r"label 9 at position 1 is outside the model's 5 classes"):
        profile_batch(PlainCNN(), X, torch.tensor([0, 9, 1]))
    with pytest.raises(InputError, match="label -1"):
        profile_batch(PlainCNN(), X, torch.tensor([-1, 0, 1]))


def test_labels_are_checked_on_every_batch_of_a_reused_profiler():
    from paramsal import Profiler

    profiler = Profiler(PlainCNN())
    profiler(X, torch.tensor([0, 1, 2]))
    with pytest.raises(InputError, match=r"label 5 at position 2 is outside the model's 5 classes"):
        profiler(X, torch.tensor([0, 1, 5]))


def test_shape_mismatches_are_named():
    with pytest.raises(InputError, match=r"targets \(2,\) do not match inputs \(3, 3, 14, 14\)"):
        profile_batch(PlainCNN(), X, torch.tensor([0, 1]))
    with pytest.raises(InputError, match="integer class indices"):
        profile_batch(PlainCNN(), X, torch.zeros(3))
    with pytest.raises(InputError, match=r"inputs of shape \(3, 3, 5, 5\)"):
        profile_batch(PlainCNN(), torch.randn(3, 3, 5, 5), torch.tensor([0, 1, 2]), backend="hooks")
    with pytest.raises(InputError, match="non-empty batch"):
        profile_batch(PlainCNN(), torch.randn(0, 3, 14, 14), torch.zeros(0, dtype=torch.long))


@pytest.mark.parametrize("backend", ["loop", "vmap", "hooks"])
def test_non_finite_loss_names_the_sample(backend):
    x = X.clone()
    x[2, 0, 0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match=r"positions \[2\]"):
        profile_batch(PlainCNN(), x, torch.tensor([0, 1, 2]), backend=backend)


def test_loss_without_per_sample_values_is_rejected():
    with pytest.raises(InputError, match="one value per sample"):
        profile_batch(PlainCNN(), X, torch.tensor([0, 1, 2]), backend="hooks",
                      loss=lambda out, y: nn.functional.cross_entropy(out, y))


def test_a_built_in_subclass_with_its_own_forward_is_served_call_by_call_and_a_weight_it_rescales_is_refused():
    class Odd(nn.Conv2d):
        def forward(self, x):  # its conv sees other inputs: the call's rule still holds
            return super().forward(x * 2)

    class Rescaled(nn.Conv2d):
        def forward(self, x):  # its weight is used before the conv: no rule sees that use
            return self._conv_forward(x, self.weight * 2, self.bias)

    x, y = X.double(), torch.tensor([0, 1, 0])
    odd = nn.Sequential(nn.Sequential(Odd(3, 2, 3)), nn.Flatten(), nn.Linear(2 * 12 * 12, 2)).double()
    assert torch.allclose(profile_batch(odd, x, y, backend="hooks"), profile_batch(odd, x, y, backend="loop"),
                          rtol=1e-10, atol=0)
    rescaled = nn.Sequential(nn.Sequential(Rescaled(3, 2, 3)), nn.Flatten(), nn.Linear(2 * 12 * 12, 2)).double()
    with pytest.raises(UnsupportedModuleError, match=r"parameter '0\.0\.weight' is passed to .*mul.*backend='vmap'"):
        profile_batch(rescaled, x, y, backend="hooks")
    assert profile_batch(rescaled, x, y).shape == (3, 2)  # auto falls back to vmap


def test_subclass_keeping_forward_uses_parent_reducer_and_registry_guards_overrides():
    class Named(nn.Conv2d):
        pass

    model = nn.Sequential(Named(3, 2, 3), nn.Flatten(), nn.Linear(2 * 12 * 12, 2)).double()
    x, y = X.double(), torch.tensor([0, 1, 0])
    assert torch.allclose(profile_batch(model, x, y, backend="hooks"), profile_batch(model, x, y, backend="loop"),
                          rtol=1e-10, atol=0)
    with pytest.raises(InputError, match="already registered"):
        register_reducer(nn.Conv2d, reduce_conv)
    register_reducer(Named, reduce_conv)
    try:
        register_reducer(Named, reduce_conv, override=True)
    finally:
        unregister_reducer(Named)


def test_module_called_twice_is_summed_by_hooks_and_exact_with_vmap():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 3, padding=1)

        def forward(self, x):
            return self.conv(torch.relu(self.conv(x))).mean((2, 3))

    model = Shared().double()
    x, y = X.double(), torch.tensor([0, 1, 2])
    want = profile_batch(model, x, y, backend="loop")
    for backend in ("hooks", "vmap"):  # hooks sums the two calls' per-sample gradients before |.|
        assert torch.allclose(profile_batch(model, x, y, backend=backend), want, rtol=1e-10, atol=0)


def test_unknown_options_are_named():
    with pytest.raises(InputError, match="unknown backend 'fast'"):
        profile_batch(PlainCNN(), X, torch.tensor([0, 1, 2]), backend="fast")
    with pytest.raises(InputError, match="unknown aggregation 'max'"):
        profile_batch(PlainCNN(), X, torch.tensor([0, 1, 2]), aggregation="max")


def test_batch_statistics_batchnorm_is_refused_by_hooks_and_exact_otherwise():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False), nn.Flatten(),
                          nn.LazyLinear(3)).double()
    x, y = X.double(), torch.tensor([0, 1, 2])
    model(x)
    with pytest.raises(UnsupportedModuleError, match=r"'1' \(BatchNorm2d\).*batch statistics"):
        profile_batch(model, x, y, backend="hooks")
    want = torch.cat([profile_batch(model, x[i:i + 1], y[i:i + 1], backend="loop") for i in range(3)])
    assert torch.allclose(profile_batch(model, x, y), want, rtol=1e-10, atol=0)  # auto -> vmap


@pytest.mark.parametrize("analysis, option", [("Pruning", "batch_size"), ("Pruning", "num_resamples"),
                                              ("FineTune", "neighbors"), ("InputSaliency", "k"),
                                              ("Masking", "batch_size")])
def test_analysis_counts_must_be_integers_of_at_least_one(analysis, option):
    import numpy as np

    import paramsal

    cls = getattr(paramsal, analysis)
    for bad in (0, -3, 2.0, True, "8"):
        with pytest.raises(InputError, match=f"{option} must be an integer >= 1, got {bad!r}"):
            cls(**{option: bad})
    assert getattr(cls(**{option: np.int64(3)}), option) == 3
    with pytest.raises(InputError, match="seed must be an integer >= 0, got -1"):
        paramsal.Pruning(seed=-1)


def test_a_parameter_added_to_or_multiplied_with_something_else_than_a_batch_is_refused():
    class Masked(nn.Module):
        def __init__(self, use: str):
            super().__init__()
            self.use = use
            self.layer_scale = nn.Parameter(torch.rand(4, 1, 1, dtype=torch.float64))
            self.conv = nn.Conv2d(3, 4, 3).double()

        def forward(self, x):
            h = self.conv(x)
            if self.use == "twice":  # scaled by a number first: a use no rule serves
                return (h * (2 * self.layer_scale)).mean((2, 3))
            return (h * self.layer_scale).mean((2, 3))

    x, y = X.double(), torch.tensor([0, 1, 3])
    served = Masked("batch")
    assert torch.allclose(profile_batch(served, x, y, backend="hooks", units="layer-scale"),
                          profile_batch(served, x, y, backend="loop", units="layer-scale"), rtol=1e-10, atol=0)
    with pytest.raises(UnsupportedModuleError, match=r"parameter 'layer_scale' is passed to torch.*mul"):
        profile_batch(Masked("twice"), x, y, backend="hooks", units="layer-scale")
