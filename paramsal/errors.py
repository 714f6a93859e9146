"""Exceptions raised by paramsal.

Every error names the offending object (a module path, a sample position, a
file) so the user sees what to fix without a debugger.
"""

from __future__ import annotations


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
