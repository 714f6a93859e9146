"""The engine's own bugs read as bugs; the user's bad input reads as one line naming it."""

from __future__ import annotations

import pytest
import torch
from nets import PlainCNN
from torch import nn

import paramsal.engine.hooks as hooks
from paramsal import EngineError, InputError, profile_batch
from paramsal.kernels import register_reducer, unregister_reducer

X, Y = torch.randn(3, 3, 14, 14), torch.tensor([0, 1, 2])


class Layer(nn.Conv2d):
    def forward(self, x):  # a layer of the user's own, with a reducer they registered
        return super().forward(x) * 1.0


def model_with(layer: nn.Module) -> nn.Module:
    model = nn.Sequential(layer, nn.Flatten(), nn.LazyLinear(5))
    model(X)
    return model


def test_a_bug_in_a_reducer_surfaces_as_itself_not_as_bad_input():
    def broken(layer, activations, backprops, groups, aggregation, chunk_size):
        raise RuntimeError("an index out of bounds in the reducer")

    register_reducer(Layer, broken)
    try:
        with pytest.raises(RuntimeError, match="out of bounds in the reducer") as caught:
            profile_batch(model_with(Layer(3, 2, 3)), X, Y, backend="hooks")
        assert not isinstance(caught.value, InputError)
    finally:
        unregister_reducer(Layer)


def test_a_bug_in_the_forward_bookkeeping_is_an_engine_error(monkeypatch):
    def broken(self, *args):
        raise KeyError("bookkeeping")

    monkeypatch.setattr(hooks.HookSession, "_record", broken)
    with pytest.raises(EngineError, match="bug in paramsal") as caught:
        profile_batch(PlainCNN(), X, Y, backend="hooks")
    assert isinstance(caught.value.__cause__, KeyError)


def test_the_models_own_failure_on_bad_input_is_input_error():
    with pytest.raises(InputError, match=r"the model \(PlainCNN\) on inputs of shape \(3, 3, 5, 5\) failed"):
        profile_batch(PlainCNN(), torch.randn(3, 3, 5, 5), Y, backend="hooks")


class BatchMean(nn.Module):
    def forward(self, x):
        return x.mean(0, keepdim=True)


def test_a_sample_without_its_batch_dimension_is_named():
    with pytest.raises(InputError, match=r"targets \(\) do not match inputs \(3, 14, 14\)"):
        profile_batch(PlainCNN(), X[0], torch.tensor(1))
    with pytest.raises(InputError, match=r"the model \(PlainCNN\) on inputs of shape \(3, 14, 14\) failed"):
        profile_batch(PlainCNN(), X[0], torch.tensor([0, 1, 2]))
    mixing = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(576, 5), BatchMean())
    with pytest.raises(InputError, match=r"outputs \(1, 5\) for a batch of 3 inputs of shape \(3, 3, 14, 14\): "
                                         r"inputs must be a batch \[N, \.\.\.\] .* one row of outputs per sample"):
        profile_batch(mixing, X, Y)


def test_a_layer_the_run_lacks_is_named(tmp_path):
    from torch.utils.data import Subset

    from paramsal import profile_dataset
    from paramsal.zoo import demo_dataset, demo_model

    run = profile_dataset(demo_model(), Subset(demo_dataset("test"), range(16)), tmp_path / "run", batch_size=16,
                          progress=False)
    with pytest.raises(InputError, match=r"layers \[99\] are not in the run .* \(its layers are 0\.\.14\)"):
        run.profiles(layers=[99])
    with pytest.raises(InputError, match="selects no units of"):
        run.profiles(layers=slice(40, 50))
    with pytest.raises(InputError, match="only='wrong': expected one of misclassified, correct, nonfinite"):
        run.profiles(only="wrong")
