"""Turning an MLP's neurons off for chosen samples of a batch: the ``"neurons"`` units' counterpart of
:class:`~paramsal.analyses.unit_editing.UnitEditor`.

A neuron's unit is its rows of the layers into the hidden layer and its column
of the layer out of it (:func:`paramsal.units_of`, ``units="neurons"``).
Zeroing all of those weights makes the neuron's input-side activations zero
and, whatever the activation function gives at zero, removes the neuron from
the output: its column of the output layer is zero. So the same effect,
without touching a weight, is to zero the neuron's entry of the output
layer's input, per sample: a forward pre-hook on that layer multiplies its
input ``[N, ..., hidden]`` by a ``[N, 1, ..., hidden]`` mask. The tests check
it against a deep copy whose weights are really zeroed. The hook runs on every
call of the layer inside the block, so greedy decoding with a KV cache (which
calls the model again per new token) sees the same neurons off.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from paramsal.engine.units import UnitGroup, UnitIndex
from paramsal.errors import InputError


class NeuronEditor:
    """Per-sample neuron switch-off, configured once for a model and its ``"neurons"`` units.

    Args:
        model: the network.
        index: its units; every group must be an MLP's neurons (``units_of(model, "neurons")``).
    """

    def __init__(self, model: nn.Module, index: UnitIndex):
        self.model = model
        self.index = index
        self._outputs = [(group, _output_layer(model, group)) for group in index]

    @contextmanager
    def switched_off(self, off: torch.Tensor) -> Iterator[nn.Module]:
        """Turns sample n's neurons ``off[n]`` off for the forward passes inside the block.

        Args:
            off: ``[N, F]`` bool, True = neuron off for that sample; N is the batch size of the passes inside.

        Yields:
            The model (unchanged; the hooks do the editing, and are removed on leaving, even after an error).
        """
        off = torch.as_tensor(off, dtype=torch.bool)
        if off.dim() != 2 or off.shape[1] != len(self.index):
            raise InputError(f"off must be [N, {len(self.index)}] (one column per neuron), got {tuple(off.shape)}")
        handles = []
        try:
            for group, layer in self._outputs:
                kept = ~off[:, group.offset:group.stop]
                if not bool(kept.all()):
                    handles.append(layer.register_forward_pre_hook(_masking(kept)))
            yield self.model
        finally:
            for handle in handles:
                handle.remove()


def _masking(kept: torch.Tensor):
    def hook(module: nn.Module, args: tuple) -> tuple:
        x = args[0]
        if x.shape[0] != kept.shape[0]:
            raise InputError(f"the mask has {kept.shape[0]} samples but the batch has {x.shape[0]}")
        shape = (kept.shape[0],) + (1,) * (x.dim() - 2) + (kept.shape[1],)
        return (x * kept.reshape(shape).to(x.device, x.dtype),) + args[1:]
    return hook


def _output_layer(model: nn.Module, group: UnitGroup) -> nn.Linear:
    """The Linear layer out of a neurons group's hidden layer: the part whose units are its columns."""
    out = [part for part in group.parts if part.partition == "columns"]
    if group.partition != "compound" or group.attr != "neurons" or len(out) != 1:
        raise InputError(f"the units of {group.param_name!r} are not an MLP's neurons; NeuronEditor needs "
                         "units_of(model, 'neurons')")
    layer = model.get_submodule(out[0].module_name)
    assert isinstance(layer, nn.Linear)  # the scheme joins only Linear layers' weights
    return layer
