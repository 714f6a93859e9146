"""Turning units off, or perturbing their weights, separately for every sample of one batch.

The validation analyses ask "what if this sample's top-k units were gone?"
for many samples, each with its own k units. Copying the model per sample
would be exact but slow; instead, :class:`UnitEditor` edits the *outputs* of
the layers that own the units, through forward hooks that live only inside a
context manager, so one forward pass serves a whole batch in which every
sample has its own edit.

What "turning unit c of a layer off" means here, exactly:

* the layer's output channel c is set to 0 for that sample (the same as
  zeroing ``weight[c]`` and ``bias[c]``: the filter is gone, wherever its
  output goes);
* if a BatchNorm consumes that layer's output (and nothing else), the
  BatchNorm's output channel c is set to 0 too (the same as zeroing its scale
  ``weight[c]`` *and* shift ``bias[c]``). Zeroing the shift alone would not
  do: in eval mode BatchNorm maps a zero channel to
  ``-running_mean / sqrt(running_var + eps) * weight + bias``, which is
  usually not zero. With both edits the next layer receives an all-zero
  channel (ReLU(0) = 0), which is what the paper means by turning a filter
  off.

Which BatchNorm follows which layer is observed in one probe forward pass
(:meth:`UnitEditor.locate`): a BatchNorm follows a layer when every tensor it
received was an output of that layer, not modified in place in between. So
``bn(conv(x))`` is found however the model's ``forward`` is written, and
``bn(relu_(conv(x)))`` or ``bn(conv(x) + y)`` are not (the layer output alone
is then zeroed).

Perturbing adds a per-sample weight delta ``D_n`` to some output channels.
Convolution and linear maps are linear in their weights, so
``layer(x_n; W + D_n) = layer(x_n; W) + layer(x_n; D_n)``; the extra term is
computed for all (sample, channel) pairs of the batch at once as one grouped
convolution (or one batched product for Linear), without any copy of ``W``.

Supported layers: ``nn.Conv1d/2d/3d`` (any stride, padding, padding mode,
dilation, groups, bias) and ``nn.Linear``, for units that are whole output
channels (the "rows" partition: the default "filters", "conv", "conv+linear").

The oracles: :func:`paramsal.reference.pruned_copy` writes the same edit into
a deep copy's parameters; :mod:`.noise` draws the perturbations.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from paramsal.engine.profile import eval_mode
from paramsal.engine.units import CONV_TYPES, UnitGroup, UnitIndex, UnitsSpec, units_of
from paramsal.errors import InputError

_CONV_FN = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}

#: Upper bound on the elements of the gathered layer input that one chunk of
#: the perturbation term may hold (about 256 MB of float32).
_GATHER_BUDGET = 1 << 26


@dataclass(frozen=True)
class UnitSite:
    """Where the units of one parameter live in the forward pass.

    Attributes:
        group: the units (one per output channel of ``module``).
        module: path of the layer that owns the parameter.
        channel_dim: dim of the layer's output that indexes its channels
            (1 for convolutions, -1 for Linear).
        followers: paths of the BatchNorm layers that consume only this
            layer's output; their output channels are zeroed too.
    """

    group: UnitGroup
    module: str
    channel_dim: int
    followers: tuple[str, ...]


@dataclass(frozen=True)
class WeightDeltas:
    """Per-sample additions to whole output channels of one parameter.

    Row m adds ``values[m]`` to ``weight[channels[m]]`` for the sample at
    batch position ``samples[m]`` only.

    Attributes:
        param: the parameter's name in ``model.named_parameters()``.
        samples: ``[M]`` batch positions.
        channels: ``[M]`` output channels.
        values: ``[M, *weight.shape[1:]]`` the deltas.
    """

    param: str
    samples: torch.Tensor
    channels: torch.Tensor
    values: torch.Tensor


class UnitEditor:
    """Per-sample unit surgery, configured once for a model, used per batch.

    Build one with :meth:`locate` (which finds the BatchNorm following each
    layer); then ``with editor.switched_off(off): model(x)`` runs ``x`` with
    sample n's units ``off[n]`` turned off, and ``with
    editor.perturbed(deltas): model(x)`` with its weight deltas added. Hooks
    exist only inside the ``with`` block and are removed even when the
    forward pass raises; nothing is stored on modules or parameters.

    Args:
        model: the network.
        index: its units (as from :func:`paramsal.units_of`).
        sites: one :class:`UnitSite` per group of ``index``, in order.
    """

    def __init__(self, model: nn.Module, index: UnitIndex, sites: Sequence[UnitSite]):
        if [s.group.param_name for s in sites] != index.param_names:
            raise InputError("UnitEditor needs exactly one site per unit group, in the index's order")
        self.model = model
        self.index = index
        self.sites = tuple(sites)
        self._by_param = {s.group.param_name: s for s in self.sites}
        self._open_blocks = 0  # hooks are on the model while > 0

    @property
    def editing(self) -> bool:
        """Whether a ``switched_off``/``perturbed`` block is open (its hooks are on the model)."""
        return self._open_blocks > 0

    @classmethod
    def locate(cls, model: nn.Module, example_inputs: torch.Tensor,
               units: UnitsSpec | UnitIndex = "filters") -> UnitEditor:
        """Finds each unit's layer and following BatchNorm with one probe forward pass.

        Args:
            model: the network (the probe runs in eval mode, without
                gradients, and changes nothing).
            example_inputs: ``[N, ...]`` any batch the model accepts (one
                sample is enough).
            units: the units (see :func:`paramsal.units_of`); every group must
                be the rows of a Conv1d/2d/3d or Linear weight.

        Returns:
            The editor.

        Raises:
            InputError: a unit group that is not a convolution's or Linear's
                output channels (the error names the parameter and module).
        """
        index = units if isinstance(units, UnitIndex) else units_of(model, units)
        layers = {g.module_name: _check_editable(model, g) for g in index}
        followers = _observe_followers(model, layers, example_inputs)
        sites = [UnitSite(group=g, module=g.module_name, channel_dim=_channel_dim(layers[g.module_name]),
                          followers=followers.get(g.module_name, ())) for g in index]
        return cls(model, index, sites)

    @contextmanager
    def switched_off(self, off: torch.Tensor) -> Iterator[nn.Module]:
        """Turns sample n's units ``off[n]`` off for the forward passes inside the block.

        Args:
            off: ``[N, F]`` bool, True = unit off for that sample; N must be
                the batch size of the forward passes inside the block.

        Yields:
            The model (unchanged; the hooks do the editing).
        """
        off = torch.as_tensor(off, dtype=torch.bool)
        if off.dim() != 2 or off.shape[1] != len(self.index):
            raise InputError(f"off must be [N, {len(self.index)}] (one column per unit), got {tuple(off.shape)}")
        masks: dict[str, list[tuple[torch.Tensor, int]]] = {}
        for site in self.sites:
            site_off = off[:, site.group.offset:site.group.stop]
            if not bool(site_off.any()):
                continue
            for module in (site.module,) + site.followers:
                masks.setdefault(module, []).append((site_off, site.channel_dim if module == site.module else 1))
        hooks = {name: _zeroing_hook(name, entries) for name, entries in masks.items()}
        with self._hooked(hooks):
            yield self.model

    @contextmanager
    def perturbed(self, deltas: Sequence[WeightDeltas]) -> Iterator[nn.Module]:
        """Adds per-sample weight deltas for the forward passes inside the block.

        Args:
            deltas: per parameter, which samples get which delta on which
                output channels (see :class:`WeightDeltas` and
                :func:`~paramsal.analyses.noise.gaussian_deltas`). Batch
                positions index the batch of the forward passes inside the block.

        Yields:
            The model (unchanged; the hooks add ``layer(x_n; D_n)``).
        """
        by_module: dict[str, list[WeightDeltas]] = {}
        for delta in deltas:
            site = self._by_param.get(delta.param)
            if site is None:
                raise InputError(f"weight deltas for {delta.param!r}, which holds no units of this editor")
            by_module.setdefault(site.module, []).append(delta)
        hooks = {name: _perturbing_hook(name, entries) for name, entries in by_module.items()}
        with self._hooked(hooks):
            yield self.model

    @contextmanager
    def _hooked(self, hooks: Mapping[str, Callable[..., Any]]) -> Iterator[None]:
        handles = []
        self._open_blocks += 1
        try:
            for name, hook in hooks.items():
                handles.append(self.model.get_submodule(name).register_forward_hook(hook))
            yield
        finally:
            for handle in handles:
                handle.remove()
            self._open_blocks -= 1


def unit_mask(unit_ids: np.ndarray | torch.Tensor | Sequence[Sequence[int]], num_units: int) -> torch.Tensor:
    """The ``[N, F]`` bool mask of :meth:`UnitEditor.switched_off` from each sample's unit ids.

    Args:
        unit_ids: ``[N, k]`` unit ids (or N lists of possibly different lengths).
        num_units: F.
    """
    rows = [np.asarray(ids, dtype=np.int64).reshape(-1) for ids in unit_ids]
    flat = np.concatenate(rows) if rows else np.zeros(0, np.int64)
    if flat.size and (flat.min() < 0 or flat.max() >= num_units):
        bad = next(i for i, ids in enumerate(rows) if ids.size and (ids.min() < 0 or ids.max() >= num_units))
        raise InputError(f"unit ids of sample {bad} out of range [0, {num_units})")
    off = torch.zeros(len(rows), num_units, dtype=torch.bool)
    sample_of = np.repeat(np.arange(len(rows)), [len(ids) for ids in rows])
    off[torch.from_numpy(sample_of), torch.from_numpy(flat)] = True
    return off


def _check_editable(model: nn.Module, group: UnitGroup) -> nn.Module:
    module = model.get_submodule(group.module_name)
    editable = isinstance(module, CONV_TYPES + (nn.Linear,)) and group.attr == "weight"
    if not editable or group.partition != "rows":
        raise InputError(
            f"cannot turn off the units of {group.param_name!r} ({type(module).__name__} at "
            f"{group.module_name or '<root>'}, partition {group.partition!r}): only whole output channels of "
            "Conv1d/2d/3d and Linear weights can be switched off or perturbed (units 'filters', 'conv', "
            "'conv+linear')")
    return module


def _channel_dim(module: nn.Module) -> int:
    return -1 if isinstance(module, nn.Linear) else 1


def _observe_followers(model: nn.Module, layers: Mapping[str, nn.Module],
                       example_inputs: torch.Tensor) -> dict[str, tuple[str, ...]]:
    """Which BatchNorm consumes only which layer's output, seen in one forward pass.

    Output tensors are matched by identity and by their version counter, so a
    tensor changed in place between the layer and the BatchNorm does not
    count as the layer's output.
    """
    produced: dict[int, tuple[str, torch.Tensor, int]] = {}
    sources: dict[str, set[str | None]] = {}

    def record_output(name: str):
        def hook(module, inputs, output):
            # Holding the tensor keeps its id from being reused during the probe.
            produced[id(output)] = (name, output, output._version)
        return hook

    def record_input(name: str):
        def hook(module, inputs):
            x = inputs[0] if inputs else None
            entry = produced.get(id(x))
            fresh = (entry is not None and entry[1] is x and x._version == entry[2]
                     and _normalizes_channels(layers[entry[0]], x))
            sources.setdefault(name, set()).add(entry[0] if fresh else None)
        return hook

    handles = []
    try:
        for name, module in layers.items():
            handles.append(module.register_forward_hook(record_output(name)))
        for name, module in model.named_modules():
            if isinstance(module, _BatchNorm):
                handles.append(module.register_forward_pre_hook(record_input(name)))
        # Eval mode: a probe in train mode would move the BatchNorm running statistics.
        with eval_mode(model), torch.no_grad():
            model(example_inputs)
    finally:
        for handle in handles:
            handle.remove()

    followers: dict[str, list[str]] = {}
    for bn, producers in sources.items():
        if len(producers) == 1 and None not in producers:
            followers.setdefault(cast(str, next(iter(producers))), []).append(bn)
    return {layer: tuple(bns) for layer, bns in followers.items()}


def _normalizes_channels(layer: nn.Module, x: torch.Tensor) -> bool:
    # BatchNorm's channels are dim 1; a Linear's are its last dim, the same only for a 2-D output.
    return isinstance(layer, CONV_TYPES) or x.dim() == 2


def _zeroing_hook(name: str, entries: list[tuple[torch.Tensor, int]]):
    """A forward hook zeroing, per sample, the output channels of ``entries`` ([N, C] masks, channel dims)."""
    # Writing zeros at the (sample, channel) pairs that are off costs in proportion to them, far less than
    # a masked_fill over the whole output, and gives exact zeros even where the output held inf/NaN.
    pairs = [(off.shape, off.nonzero(as_tuple=True), channel_dim) for off, channel_dim in entries]

    def hook(module, inputs, output):
        for i, (shape, index, channel_dim) in enumerate(pairs):
            _check_output(name, output, shape, channel_dim)
            if index[0].device != output.device:  # moved once, on the first call
                index = tuple(t.to(output.device) for t in index)
                pairs[i] = (shape, index, channel_dim)
            zero = torch.zeros((), dtype=output.dtype, device=output.device)
            output = output.movedim(channel_dim, 1).index_put(index, zero).movedim(1, channel_dim)
        return output

    return hook


def _check_output(name: str, output: torch.Tensor, mask_shape: torch.Size, channel_dim: int) -> None:
    if (not isinstance(output, torch.Tensor) or output.dim() < 2 or output.shape[0] != mask_shape[0]
            or output.shape[channel_dim] != mask_shape[1]):
        shape = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
        raise InputError(f"{name or '<root>'}: output {shape} does not fit a per-sample mask of "
                         f"{mask_shape[0]} samples x {mask_shape[1]} channels (dim {channel_dim}); the batch "
                         "inside the block must have one row per mask row")


def _perturbing_hook(name: str, entries: list[WeightDeltas]):
    """A forward hook adding ``layer(x_n; D_n)`` for every (sample, channel) of ``entries``."""

    def hook(mod, inputs, output):
        x = inputs[0]
        for delta in entries:
            extra = (_conv_delta_term(mod, x, delta) if isinstance(mod, CONV_TYPES)
                     else _linear_delta_term(x, delta))
            samples, channels = delta.samples.to(output.device), delta.channels.to(output.device)
            if int(samples.max()) >= output.shape[0]:
                raise InputError(f"{name}: weight deltas for batch position {int(samples.max())}, "
                                 f"but the batch has {output.shape[0]} samples")
            channel_dim = _channel_dim(mod)
            moved = output.movedim(channel_dim, 1)
            moved = moved.index_put((samples, channels), extra.to(output.dtype), accumulate=True)
            output = moved.movedim(1, channel_dim)
        return output

    return hook


def _conv_delta_term(conv: nn.modules.conv._ConvNd, x: torch.Tensor, delta: WeightDeltas) -> torch.Tensor:
    """``conv(x[samples[m]]; values[m])`` for every row m: ``[M, *output_spatial]``.

    Row m needs only the input channels of its output channel's group, so the
    rows form one grouped convolution with M groups over the gathered inputs.
    """
    cin_per_group = conv.in_channels // conv.groups
    cout_per_group = conv.out_channels // conv.groups
    padding: str | tuple[int, ...] | int = conv.padding
    if conv.padding_mode != "zeros":
        # As the layer itself does: pad with the chosen mode first, then convolve unpadded.
        x = F.pad(x, conv._reversed_padding_repeated_twice, mode=conv.padding_mode)
        padding = 0
    conv_fn = _CONV_FN[x.dim() - 2]
    samples = delta.samples.to(x.device)
    first_in = (delta.channels.to(x.device) // cout_per_group) * cin_per_group
    in_channels = first_in[:, None] + torch.arange(cin_per_group, device=x.device)
    per_row = cin_per_group * int(np.prod(x.shape[2:]))
    step = max(1, _GATHER_BUDGET // max(per_row, 1))
    pieces = []
    for start in range(0, len(samples), step):
        rows = slice(start, start + step)
        gathered = x[samples[rows, None], in_channels[rows]]  # [m, cin_per_group, *spatial]
        m = gathered.shape[0]
        out = conv_fn(gathered.reshape(1, m * cin_per_group, *x.shape[2:]),
                      delta.values[rows].to(x.device, x.dtype), None, conv.stride, padding, conv.dilation, m)
        pieces.append(out[0])
    return torch.cat(pieces)


def _linear_delta_term(x: torch.Tensor, delta: WeightDeltas) -> torch.Tensor:
    """``x[samples[m]] @ values[m]`` for every row m: ``[M, *x.shape[1:-1]]``."""
    gathered = x[delta.samples.to(x.device)]  # [M, ..., in]
    values = delta.values.to(x.device, x.dtype)
    return torch.einsum("m...i,mi->m...", gathered, values)
