"""Which torch device to compute on: the user's ``--device`` / ``device=`` checked before any work starts.

A wrong device otherwise surfaces late, deep inside ``model.to(...)`` or the
first CUDA call, as a torch error that does not say what to pass instead.
"""

from __future__ import annotations

import torch

from paramsal.errors import InputError
from paramsal.options import DEVICES


def resolve_device(device: str | torch.device | None) -> torch.device:
    """The device to compute on, checked to exist on this machine.

    Args:
        device: "cpu", "cuda", "cuda:N", a ``torch.device`` of those, or None
            for CUDA when a GPU is available and the CPU otherwise.

    Returns:
        The parsed device.

    Raises:
        InputError: for a device that is not understood (e.g. "tpu"), CUDA on a
            machine without a CUDA GPU, or a GPU index beyond the GPUs present.
    """
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    parsed = _parsed(device)
    if parsed.type == "cpu":
        return parsed
    if not torch.cuda.is_available():
        raise InputError(f"device {str(device)!r}: this machine has no CUDA GPU (torch.cuda.is_available() is "
                         "False); use device='cpu'")
    count = torch.cuda.device_count()
    if parsed.index is not None and parsed.index >= count:
        raise InputError(f"device {str(device)!r}: this machine has {count} CUDA GPU{'s' if count != 1 else ''} "
                         f"(cuda:0..cuda:{count - 1}); pick one of them or use device='cpu'")
    return parsed


def _parsed(device: str | torch.device) -> torch.device:
    """``device`` as a cpu or cuda ``torch.device``; anything else is not a device paramsal runs on."""
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        # torch's own message lists every backend it was built with (xla, mps, ...), not what works here.
        parsed = None
    if parsed is None or parsed.type not in ("cpu", "cuda"):
        raise InputError(f"unknown device {str(device)!r}; expected {DEVICES}")
    return parsed


__all__ = ["resolve_device"]
