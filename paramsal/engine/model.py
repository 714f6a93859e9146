"""The user's model as the Profiler prepares and reads it: eval mode for a call, channels-last, the features module,
and the parameter dtype a lowered precision needs."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from paramsal.errors import InputError


def check_precision(model: nn.Module, precision: str) -> None:
    """Refuses a lowered precision for a model that is not float32 (autocast lowers float32 work only)."""
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    if precision != "float32" and dtypes - {torch.float32}:
        wrong = sorted(str(d) for d in dtypes - {torch.float32})
        raise InputError(f"precision={precision!r} runs a float32 model under autocast, but "
                         f"{type(model).__name__} has {', '.join(wrong)} parameters: use precision='float32' "
                         "or model.float()")


def default_channels_last(model: nn.Module) -> bool:
    """Channels-last by default for a model on a CUDA device with 4-D parameters (convolutions)."""
    params = list(model.parameters())
    return bool(params) and params[0].is_cuda and any(p.dim() == 4 for p in params)


def to_channels_last(model: nn.Module) -> None:
    """The model's 4-D parameters and buffers in ``torch.channels_last``, in place (the same tensors, new strides).

    ``model.to(memory_format=...)`` would refuse a model with 5-D
    parameters (Conv3d); those, like every tensor of other ranks, stay as they are.
    """
    with torch.no_grad():
        for t in (*model.parameters(), *model.buffers()):
            if t.dim() == 4:
                t.data = t.data.contiguous(memory_format=torch.channels_last)


def features_module(model: nn.Module, features: str | bool | None) -> str | None:
    """The name of the module whose input is a sample's features (True: the last ``nn.Linear``), or None."""
    if features is None or features is False:
        return None
    if features is True:
        linears = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
        if not linears:
            raise InputError(f"features=True needs an nn.Linear classifier in {type(model).__name__}; "
                             "name the module whose input is the feature vector instead")
        return linears[-1]
    try:
        model.get_submodule(features)
    except AttributeError as exc:
        raise InputError(f"features={features!r}: no such module in {type(model).__name__}") from exc
    return features


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode for the duration; every submodule's own flag is restored afterwards."""
    flags = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        yield
    finally:
        for module, training in flags:
            module.training = training
