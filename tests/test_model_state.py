"""A profiling call leaves the model as it found it, on success and on failure."""

import pytest
import torch
from nets import TinyResNet
from torch import nn

from paramsal import profile_batch


def hooks_of(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
               + len(getattr(m, "_backward_pre_hooks", {})) for m in model.modules())


def snapshot(model: nn.Module):
    return ([m.training for m in model.modules()], [p.grad.clone() if p.grad is not None else None
                                                   for p in model.parameters()],
            [p.requires_grad for p in model.parameters()], hooks_of(model))


def prepared_model() -> nn.Module:
    model = TinyResNet().double()
    model.train()
    model.layer1.eval()  # mixed flags must come back exactly
    model.fc.weight.requires_grad_(False)
    model(torch.randn(4, 3, 10, 10, dtype=torch.float64)).sum().backward()  # some existing .grad
    return model


def assert_same(before, after):
    modes, grads, requires, hooks = before
    modes2, grads2, requires2, hooks2 = after
    assert modes == modes2 and requires == requires2 and hooks == hooks2 == 0
    for g, g2 in zip(grads, grads2):
        assert (g is None and g2 is None) or torch.equal(g, g2)


@pytest.mark.parametrize("backend", ["loop", "vmap", "hooks"])
def test_state_restored_after_success(backend):
    model = prepared_model()
    before = snapshot(model)
    profile_batch(model, torch.randn(3, 3, 10, 10, dtype=torch.float64), torch.tensor([0, 1, 2]),
                  backend=backend, units="conv+linear")
    assert_same(before, snapshot(model))


@pytest.mark.parametrize("backend", ["loop", "vmap", "hooks"])
def test_state_restored_after_forward_raises(backend):
    model = prepared_model()

    def explode(module, args, output):
        raise RuntimeError("boom")

    handle = model.layer2.register_forward_hook(explode)
    before = snapshot(model)
    with pytest.raises(Exception, match="boom"):
        profile_batch(model, torch.randn(3, 3, 10, 10, dtype=torch.float64), torch.tensor([0, 1, 2]),
                      backend=backend)
    after = snapshot(model)
    handle.remove()
    assert hooks_of(model) == 0
    assert_same(before[:3] + (0,), after[:3] + (after[3] - 1,))


def test_train_mode_batchnorm_would_differ_so_eval_is_used():
    model = TinyResNet().double()
    model.train()
    x, y = torch.randn(4, 3, 10, 10, dtype=torch.float64), torch.tensor([0, 1, 2, 3])
    in_train = profile_batch(model, x, y, backend="hooks")
    model.eval()
    assert torch.allclose(in_train, profile_batch(model, x, y, backend="loop"), rtol=1e-10, atol=0)
    model.train()
    running = model.stem[1].running_mean.clone()
    profile_batch(model, x, y, backend="vmap")
    assert torch.equal(running, model.stem[1].running_mean)  # running statistics not updated
