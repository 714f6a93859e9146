"""Whether float32 convolutions and matrix products may run in TF32 here, and a way to switch TF32 off for a while.

On NVIDIA GPUs from Ampere on, float32 convolutions (cuDNN) and matrix
products (cuBLAS) may round their operands to TF32, 10 bits of mantissa, as
the user's settings allow. PyTorch 2.9 moved those settings to
``torch.backends.{cuda.matmul, cudnn.conv, ...}.fp32_precision`` ("tf32",
"ieee", or "none": inherit), and reading a legacy flag such as
``torch.backends.cudnn.allow_tf32`` raises once the new settings disagree
among cuDNN's operators (``torch.backends.fp32_precision = "ieee"`` does
that). So the settings are read here through the new API, and a legacy flag
only where the new one says nothing ("none") or does not exist (older torch).

Convolutions follow cuDNN's conv setting and Linear layers cuBLAS's matmul
setting, whatever computes them: the fused kernel picks its tile precision
the same way, so a layer's reduction is as precise as the layer itself.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

#: The operations whose float32 precision is read: cuDNN convolutions and cuBLAS matrix products.
OPS = ("conv", "matmul")


def _setting(op: str):
    """The backend object whose ``fp32_precision`` governs ``op`` (new API), or None on older torch."""
    if not hasattr(torch.backends, "fp32_precision"):
        return None
    return torch.backends.cudnn.conv if op == "conv" else torch.backends.cuda.matmul  # type: ignore[attr-defined]


def tf32_allowed(op: str) -> bool:
    """Whether float32 ``op`` ("conv" or "matmul") may use TF32 on an Ampere-or-newer GPU, as the user set it.

    A legacy flag that cannot be read (the new settings disagree) counts as
    allowing TF32: cuDNN's own default.
    """
    setting = _setting(op)
    if setting is not None:
        value = setting.fp32_precision
        if value in ("tf32", "ieee"):
            return value == "tf32"
    try:
        return bool(torch.backends.cudnn.allow_tf32 if op == "conv" else torch.backends.cuda.matmul.allow_tf32)
    except RuntimeError:
        return op == "conv"


def reduced(t: torch.Tensor) -> bool:
    """Whether float32 work on ``t`` may be rounded to TF32: a CUDA float32 tensor with TF32 allowed for some op."""
    return t.is_cuda and t.dtype == torch.float32 and any(tf32_allowed(op) for op in OPS)


@contextmanager
def full_float32() -> Iterator[None]:
    """float32 convolutions and matrix products in full precision inside the block; the user's settings after.

    PyTorch tells an operator's precision set by the user from one it holds
    by default (a default follows the generic ``torch.backends.fp32_precision``,
    a user's setting does not), and the getters do not: writing back a value
    that was read would turn a default into a setting of the user's. So the
    generic setting is switched to "ieee" (and back), and an operator is set
    and reset only where the user set it to "tf32" themselves.
    """
    if not hasattr(torch.backends, "fp32_precision"):  # pragma: no cover - torch before 2.9
        saved = {op: tf32_allowed(op) for op in OPS}
        for op in OPS:
            _set_legacy(op, False)
        try:
            yield
        finally:
            for op, allowed in saved.items():
                _set_legacy(op, allowed)
        return
    generic = torch.backends.fp32_precision
    torch.backends.fp32_precision = "ieee"
    forced = [op for op in OPS if _setting(op).fp32_precision == "tf32"]  # the user's own, which "ieee" leaves
    for op in forced:
        _setting(op).fp32_precision = "ieee"
    try:
        yield
    finally:
        for op in forced:
            _setting(op).fp32_precision = "tf32"
        torch.backends.fp32_precision = generic


def _set_legacy(op: str, allowed: bool) -> None:  # pragma: no cover - torch before 2.9
    if op == "conv":
        torch.backends.cudnn.allow_tf32 = allowed
    else:
        torch.backends.cuda.matmul.allow_tf32 = allowed


__all__ = ["OPS", "full_float32", "reduced", "tf32_allowed"]
