"""The entry point: a batch of samples in, a batch of raw saliency profiles out."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from paramsal.config import ProfileOptions, configured
from paramsal.engine.backends import (
    BACKEND_FUNCTIONS,
    BatchResult,
    check_samples_apart,
    model_outputs,
    prove_sample_layout,
)
from paramsal.engine.functional import LossFn, Precision, cross_entropy_per_sample, targeted_loss
from paramsal.engine.model import check_precision, default_channels_last, eval_mode, features_module, to_channels_last
from paramsal.engine.plan import hooks_refusal
from paramsal.engine.tasks import check_sequence_labels, is_sequence_task, task_loss
from paramsal.engine.units import UnitIndex, check_aggregation_of, units_of
from paramsal.errors import InputError, NonFiniteError, ParamsalWarning, UnsupportedUseError
from paramsal.kernels import tf32
from paramsal.kernels.reduce import Aggregation

#: What :meth:`Profiler.nonfinite` (and a run's ``nonfinite_param``) says of a sample whose loss alone is not finite.
LOSS_FLAG = "(loss)"

#: Where ``backend="auto"`` goes when a forward pass shows that a backend would miss a use of a parameter.
FALLBACKS = {"hooks": "vmap", "vmap": "loop"}


class Profiler:
    """Computes raw parameter-saliency profiles, configured once and called per batch.

    Row n of the result is ``s_k = agg_{i in unit k} dL_n/dθ_i`` where ``L_n``
    is the loss of sample n alone: the numbers of the paper's one-sample
    reference code, whatever the backend. The model is switched to eval mode
    for each call (BatchNorm on running statistics, dropout off, so samples are
    independent) and restored afterwards; ``.grad`` of the parameters is never
    touched and no hook outlives a call, even when the forward pass raises.

    Args:
        model: the network; its parameters' dtype is the profiles' dtype
            (float32 for ``precision="bf16"/"fp16"``, which need a float32 model).
        options: how each sample is profiled (:class:`~paramsal.config.ProfileOptions`: units, backend,
            aggregation, loss, target, task, precision, ...); default its defaults.
        **overrides: any field of :class:`~paramsal.config.ProfileOptions` by name, set over ``options``.

    The backends: "auto" starts on hooks where every unit's module has a
    reducer (else vmap) and, from the first batch whose forward pass uses a
    unit parameter where its backend cannot see that use, goes on with vmap,
    and loop where vmap cannot see it either, each with one warning; "hooks"
    and "vmap" raise :class:`~paramsal.errors.UnsupportedUseError` there;
    "loop" profiles a sample at a time (the reference).

    ``precision="bf16"`` / ``"fp16"`` run the forward and backward passes
    under ``torch.autocast`` and return float32 losses, outputs and profiles;
    every backend does the same, so "loop" stays the oracle. The docs'
    precision page states the error (``scripts/precision_error.py`` measures
    it). fp16 scales each sample's loss by
    :data:`~paramsal.engine.functional.FP16_LOSS_SCALE` against underflow and
    divides the profiles back; a sample that overflows fp16's range comes out
    non-finite and is flagged like any other (:meth:`nonfinite`).

    ``channels_last`` converts the model's 4-D parameters once, here (the
    model keeps that layout; the values are unchanged), and each 4-D batch
    per call; the profiles equal the default layout's up to float32 rounding.

    Examples:
        >>> import torch, paramsal
        >>> model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.Flatten(), torch.nn.Linear(64, 3))
        >>> profiler = paramsal.Profiler(model, units="conv+linear")
        >>> result = profiler(torch.randn(5, 1, 6, 6), torch.tensor([0, 1, 2, 0, 1]))
        >>> tuple(result.profiles.shape)  # 5 samples, 4 filters + 3 rows
        (5, 7)
    """

    def __init__(self, model: nn.Module, options: ProfileOptions | None = None, **overrides: Any):
        options = configured(ProfileOptions, options, overrides, where="Profiler")
        check_precision(model, options.precision)
        self.model = model
        self.options = options
        self.precision = options.precision
        self._precision = Precision(options.precision)
        self.channels_last = default_channels_last(model) if options.channels_last is None \
            else bool(options.channels_last)
        if self.channels_last:
            to_channels_last(model)
        units = options.units
        self.index = units if isinstance(units, UnitIndex) else units_of(model, units)
        check_aggregation_of(self.index, options.aggregation)
        # The backends compute units of one parameter each; units spanning several are combined from them.
        self._pieces = self.index.pieces
        backend = options.backend
        self._falls_back = backend == "auto"
        if backend == "auto":
            refusal = hooks_refusal(model, self._pieces)
            backend = "hooks" if refusal is None else "vmap"
            if refusal is not None:
                warnings.warn(f"{refusal}. Profiling {type(model).__name__} with the vmap backend", ParamsalWarning,
                              stacklevel=2)
        self.backend = backend
        self.aggregation: Aggregation = options.aggregation  # type: ignore[assignment]  # checked by the options
        self.loss: LossFn | None = options.loss
        self.task = options.task
        self.target = options.target
        if self.task == "answer" and self.target == "predicted":
            raise InputError("target 'predicted' of task 'answer' is the model's greedy answer, which "
                             "profile_dataset decodes for each batch; to profile a batch at it, pass its tokens as "
                             "the labels (paramsal.zoo.qa.QADataset.predicted) with target 'label'")
        self._loss = targeted_loss(self.loss if self.loss is not None or self.task == "classification"
                                   else task_loss(self.task), self.target)
        self.chunk_size = options.chunk_size
        self.features = features_module(model, options.features)
        self._run = BACKEND_FUNCTIONS[backend]
        self._class_counts: dict[tuple, int] = {}
        self._layout_proven = False  # the hooks backend's proof that rows are samples (prove_sample_layout)
        self._loop_checked: set[str] = set()  # batched backends whose first row matched the loop's

    def __call__(self, inputs: torch.Tensor, targets: torch.Tensor, *, check_finite: bool = True) -> BatchResult:
        """Profiles one batch.

        Args:
            inputs: ``[N, ...]`` a batch the model accepts; moved to the model's device.
            targets: ``[N, ...]``; class indices ``[N]`` for the default loss.
            check_finite: raise :class:`NonFiniteError` for a non-finite loss or
                gradient; False returns them (see :meth:`nonfinite`).

        Returns:
            A :class:`BatchResult` with profiles ``[N, F]``, outputs and losses.
        """
        device = next(iter(self.model.parameters())).device
        labels = targets
        inputs, targets = self._checked(inputs, targets, device)
        with eval_mode(self.model), torch.autocast(device.type, enabled=False):
            if self.loss is None:
                # The labels as given: a bulk job's are still on the host, so checking them costs no device sync.
                self._check_labels(inputs, labels)
            if not isinstance(self.target, str) and self.target >= self._classes(inputs):
                raise InputError(f"target={self.target} is outside the model's {self._classes(inputs)} classes")
            result = self._profile(inputs, targets)
        if check_finite:
            self._check_finite(result)
        return result

    def nonfinite(self, result: BatchResult, suspects: torch.Tensor | None = None) -> list[str | None]:
        """Per sample: None if its loss and profile are finite, else the first parameter whose gradient is not
        (:data:`LOSS_FLAG` when only the loss is).

        A row's sum screens it (NaN and inf carry into the sum, which a sum
        of large finite values can also overflow to): only the rows it flags
        are looked at entry by entry, so that a batch of ResNet-50's 26,560
        units per row costs one pass, not an ``isfinite`` of every entry.

        Args:
            suspects: ``[N]`` bool, the rows that screen flagged, when it was taken already (on the device).
        """
        if suspects is None:
            suspects = ~torch.isfinite(result.profiles.sum(1)) | ~torch.isfinite(result.losses)
        suspects = suspects.nonzero()
        flags: list[str | None] = [None] * len(result.losses)
        for row in suspects.flatten().tolist():
            units = (~torch.isfinite(result.profiles[row])).nonzero().flatten()
            if len(units):
                flags[row] = self.index.param_of(int(units[0]))
            elif not bool(torch.isfinite(result.losses[row])):
                flags[row] = LOSS_FLAG
        return flags

    def _profile(self, inputs: torch.Tensor, targets: torch.Tensor) -> BatchResult:
        loss = self._loss or cross_entropy_per_sample
        while True:
            try:
                with self._features_captured(inputs) as captured:
                    result = self._run(self.model, inputs, targets, self._pieces, loss, self.aggregation,
                                       self.chunk_size, self._precision)
                if self.features is not None:
                    result.features = self._precision.restored(torch.cat(captured), result.profiles.dtype) \
                        if captured else self._features_of(inputs, result.profiles.dtype)
                if self.backend == "hooks" and not self._layout_proven:  # after the batch: its errors come first
                    self._layout_proven = prove_sample_layout(self.model, inputs, self._pieces)
                if self.backend != "loop" and self.backend not in self._loop_checked:
                    if self._samples_apart(result, inputs, targets, loss):
                        self._loop_checked.add(self.backend)
                result.profiles = self.index.combine(result.profiles)
                return result
            except UnsupportedUseError as exc:
                if not self._falls_back or self.backend not in FALLBACKS:
                    raise
                fallback = FALLBACKS[self.backend]
                warnings.warn(f"{exc}. Profiling {type(self.model).__name__} with the {fallback} backend instead",
                              ParamsalWarning, stacklevel=4)
                self.backend, self._run = fallback, BACKEND_FUNCTIONS[fallback]

    def _samples_apart(self, result: BatchResult, inputs: torch.Tensor, targets: torch.Tensor, loss: LossFn) -> bool:
        """:func:`~paramsal.engine.backends.check_samples_apart` of the batch's first row, in full float32 where the
        batch may have run in TF32: its rounding (up to ~1e-3 of a row's largest unit, in both the batch and the
        loop) would sit at the check's tolerance, so the row and the loop are computed again without it."""
        reduced = self._precision.dtype is None and tf32.reduced(next(iter(self.model.parameters())))
        if not reduced:
            return check_samples_apart(result, self.model, inputs, targets, self._pieces, loss, self.aggregation,
                                       self._precision)
        with tf32.full_float32():
            exact = self._run(self.model, inputs, targets, self._pieces, loss, self.aggregation, self.chunk_size,
                              self._precision)
            return check_samples_apart(exact, self.model, inputs, targets, self._pieces, loss, self.aggregation,
                                       self._precision)

    @contextmanager
    def _features_captured(self, inputs: torch.Tensor) -> Iterator[list[torch.Tensor]]:
        """The features module's inputs ``[n, D]`` as the profiling forward pass computes them (hooks: one batch;
        loop: a sample at a time); none under vmap, whose forward pass sees one sample's tensors through vmap's
        wrappers, so :meth:`_features_of` takes a pass of its own there."""
        captured: list[torch.Tensor] = []
        if self.features is None or self.backend == "vmap":
            yield captured
            return
        module = self.model.get_submodule(self.features)
        handle = module.register_forward_hook(lambda m, args, out: captured.append(args[0].detach().flatten(1)))
        try:
            yield captured
        finally:
            handle.remove()

    def _features_of(self, inputs: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The features module's input ``[N, D]`` from a gradient-free forward pass (at the profiles' precision)."""
        captured: list[torch.Tensor] = []
        module = self.model.get_submodule(self.features or "")
        handle = module.register_forward_hook(lambda m, args, out: captured.append(args[0].detach().flatten(1)))
        try:
            with torch.no_grad(), self._precision.forward(inputs.device):
                self.model(inputs)
        finally:
            handle.remove()
        return self._precision.restored(captured[0], dtype)

    def _checked(self, inputs: torch.Tensor, targets: torch.Tensor,
                 device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        check_batch(inputs, targets, class_indices=self.loss is None and not is_sequence_task(self.task))
        inputs = inputs.to(device, non_blocking=True)  # from pinned memory: no wait for the device's queued work
        if self.channels_last and inputs.dim() == 4:
            inputs = inputs.contiguous(memory_format=torch.channels_last)
        return inputs, targets.to(device, non_blocking=True)

    def _check_labels(self, inputs: torch.Tensor, targets: torch.Tensor) -> None:
        classes = self._classes(inputs)
        if is_sequence_task(self.task):
            check_sequence_labels(targets, classes)
            return
        bad = ((targets < 0) | (targets >= classes)).nonzero().flatten()
        if len(bad):
            first = int(bad[0])
            raise InputError(f"label {int(targets[first])} at position {first} is outside the model's "
                             f"{classes} classes (0..{classes - 1}); {len(bad)} label(s) out of range")

    def _classes(self, inputs: torch.Tensor) -> int:
        """The model's number of classes, from a one-sample forward pass once per input shape.

        Labels must be checked before the loss sees them (an out-of-range
        label fails inside cross-entropy with no position); repeating the
        probe on every batch would cost a forward pass each time.
        """
        key = (tuple(inputs.shape[1:]), inputs.dtype)
        if key not in self._class_counts:
            with torch.no_grad():
                self._class_counts[key] = model_outputs(self.model, inputs[:1], 1, shown=inputs).shape[-1]
        return self._class_counts[key]

    def _check_finite(self, result: BatchResult) -> None:
        bad_loss = (~torch.isfinite(result.losses)).nonzero().flatten()
        if len(bad_loss):
            raise NonFiniteError(f"non-finite loss for sample(s) at positions {bad_loss[:10].tolist()} "
                                 f"(values {result.losses[bad_loss[:3]].tolist()})")
        if bool(torch.isfinite(result.profiles.sum())):  # the screen of :meth:`nonfinite`, for the whole batch
            return
        bad = (~torch.isfinite(result.profiles)).nonzero()
        if len(bad):
            sample, unit = (int(v) for v in bad[0])
            raise NonFiniteError(f"non-finite gradient for sample at position {sample} in parameter "
                                 f"{self.index.param_of(unit)!r} (unit {unit}); {len(bad)} entries affected")


def check_batch(inputs: torch.Tensor, targets: torch.Tensor, *, class_indices: bool) -> None:
    """Raises :class:`InputError` unless ``inputs [N, ...]`` and ``targets [N, ...]`` form a batch.

    With ``class_indices``, targets must be integer class indices ``[N]`` (what cross-entropy takes).
    """
    if not isinstance(inputs, torch.Tensor) or not isinstance(targets, torch.Tensor):
        raise InputError(f"inputs and targets must be tensors, got {type(inputs).__name__} "
                         f"and {type(targets).__name__}")
    if inputs.dim() == 0 or len(inputs) == 0:
        raise InputError(f"inputs must be a non-empty batch [N, ...], got shape {tuple(inputs.shape)}")
    if targets.dim() == 0 or len(targets) != len(inputs):
        raise InputError(f"targets {tuple(targets.shape)} do not match inputs {tuple(inputs.shape)}: "
                         "one target per sample expected")
    if class_indices and (targets.dim() != 1 or targets.is_floating_point()):
        raise InputError(f"cross-entropy needs integer class indices of shape [N], got {targets.dtype} "
                         f"{tuple(targets.shape)}; pass loss= for other targets")


def profile_batch(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor,
                  options: ProfileOptions | None = None, **overrides: Any) -> torch.Tensor:
    """Raw parameter-saliency profiles of a batch, one row per sample.

    Row n is ``s_k = mean_{i in unit k} |dL_n/dθ_i|`` (``aggregation="mean_abs"``),
    the gradient of sample n's *own* loss, exactly as the paper's
    one-sample-at-a-time reference code, computed in eval mode.

    Args:
        model: the network (left in the mode it was in; ``.grad`` untouched).
        inputs: ``[N, ...]``, e.g. images ``[N, C, H, W]``.
        targets: ``[N]`` class indices for the default cross-entropy loss (``[N, T]`` for a sequence task).
        options, **overrides: as for :class:`Profiler` (:class:`~paramsal.config.ProfileOptions`).

    Returns:
        ``[N, F]`` in the dtype of the model's parameters.

    Examples:
        >>> import torch, paramsal
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
        >>> x, y = torch.randn(6, 4), torch.tensor([0, 1, 2, 0, 1, 2])
        >>> fast = paramsal.profile_batch(model, x, y, units="linear-rows")
        >>> slow = paramsal.profile_batch(model, x, y, units="linear-rows", backend="loop")  # the reference
        >>> tuple(fast.shape), torch.allclose(fast, slow, rtol=1e-5, atol=1e-7)
        ((6, 11), True)
    """
    return Profiler(model, options, **overrides)(inputs, targets).profiles
