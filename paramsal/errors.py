"""Exceptions raised by paramsal.

Every error names the offending object (a module path, a sample position, a
file) so the user sees what to fix without a debugger.
"""

from __future__ import annotations

from collections.abc import Iterable


class ParamsalError(Exception):
    """Base class of every error paramsal raises on purpose."""


class InputError(ParamsalError, ValueError):
    """Inputs, targets or options that the engine cannot use."""


class NonFiniteError(ParamsalError, FloatingPointError):
    """A loss or a gradient came out NaN or infinite."""


class UnsupportedModuleError(ParamsalError, TypeError):
    """A module has no per-sample reducer (or is used in a way the hooks backend cannot follow)."""


class RunMismatchError(ParamsalError):
    """A run directory was made with another model, data set or units."""


def check_choice(what: str, value: object, choices: Iterable[str]) -> None:
    """Raises :class:`InputError` naming ``value`` and the valid ``choices`` unless it is one of them."""
    if value not in choices:
        raise InputError(f"unknown {what} {value!r}; expected one of {', '.join(choices)}")
