"""Exceptions raised by paramsal.

Every error names the offending object (a module path, a sample position, a
file) so the user sees what to fix without a debugger.
"""

from __future__ import annotations

import numbers
from collections.abc import Collection, Iterator
from contextlib import contextmanager


class ParamsalError(Exception):
    """Base class of every error paramsal raises on purpose.

    Its message speaks Python (``overwrite=True``), and the command line
    rewrites the options it names into their flags (``--overwrite``); where a
    way out differs on the command line in more than words (a spec instead of
    an object), ``command_line`` is the whole message as ``paramsal`` prints it.
    """

    def __init__(self, *args: object, command_line: str | None = None):
        super().__init__(*args)
        self.command_line = command_line


class InputError(ParamsalError, ValueError):
    """Inputs, targets or options that the engine cannot use."""


class NonFiniteError(ParamsalError, FloatingPointError):
    """A loss or a gradient came out NaN or infinite."""


class UnsupportedModuleError(ParamsalError, TypeError):
    """A module has no per-sample reducer (or is used in a way the hooks backend cannot follow)."""


class UnsupportedUseError(UnsupportedModuleError):
    """A unit parameter is used in a way the hooks backend cannot serve exactly (found during a forward pass)."""


def unsupported_use(problem: str, instead: str = "vmap") -> UnsupportedUseError:
    """The error for a use a backend would miss: ``problem``, then the backend that sees it (the one
    ``backend="auto"`` falls back to)."""
    return UnsupportedUseError(f"{problem}: use backend={instead!r} (backend='auto' falls back to it)")


class RunMismatchError(ParamsalError):
    """A run directory was made with another model, data set or units."""


class RunCorruptError(ParamsalError):
    """A run directory's files do not match its manifest (damaged, truncated, missing, stray or edited).

    ``problem`` is what is wrong, without the way to repair it that the message adds.
    """

    def __init__(self, message: str, problem: str | None = None):
        super().__init__(message)
        self.problem = problem or message


class RunLockedError(ParamsalError):
    """Another live job is writing the run directory."""


class StorageError(ParamsalError, OSError):
    """A file of a run could not be written (full disk, permissions); the finished parts are kept."""


def check_choice(what: str, value: object, choices: Collection[str]) -> None:
    """Raises :class:`InputError` naming ``value`` and the valid ``choices`` unless it is one of them.

    Args:
        what: the option as the message names it: a description ("unit selection": "unknown unit selection
            'top'") or an argument as Python spells it ("among=": "unknown among='wrong'").
    """
    if value not in choices:
        shown = f"{what}{value!r}" if what.endswith("=") else f"{what} {value!r}"
        raise InputError(f"unknown {shown}; expected one of {', '.join(choices)}")


def check_integer(what: str, value: object, least: int = 1) -> int:
    """``value`` as an ``int``; :class:`InputError` unless it is an integer (numpy's too, not a bool) ``>= least``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < least:
        raise InputError(f"{what} must be an integer >= {least}, got {value!r}")
    return int(value)


def first_line(exc: BaseException) -> str:
    """An exception's message cut to its first line, so that the error it becomes stays one line (a library's
    message may run to many lines of advice)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class ParamsalWarning(UserWarning):
    """Something paramsal did differently from what was asked, to keep the numbers exact (a fallback, a skipped
    sample, a k left out), said once."""


class EngineError(Exception):
    """A failure inside paramsal's own code: a bug to report, never the user's mistake.

    Deliberately not a ``RuntimeError``/``ValueError``: code that turns the
    model's own failures into :class:`InputError` must let this one through.
    """


@contextmanager
def engine_code(what: str) -> Iterator[None]:
    """Marks paramsal's own code that runs inside the user's forward pass (hooks), so its failures read as ours."""
    try:
        yield
    except ParamsalError:
        raise
    except Exception as exc:
        raise EngineError(f"paramsal's {what} failed ({type(exc).__name__}: {exc}); this is a bug in paramsal, "
                          "please report it") from exc


@contextmanager
def user_code(what: str, hint: str = "") -> Iterator[None]:
    """The user's model or loss: the errors it raises on bad input become one :class:`InputError` naming ``what``."""
    try:
        yield
    except (ParamsalError, EngineError):
        raise
    except (RuntimeError, ValueError, TypeError, IndexError) as exc:
        if type(exc).__name__ == "OutOfMemoryError":  # torch's, a RuntimeError: the batch is too big, not wrong
            raise
        raise InputError(f"{what} failed: {exc}{hint}") from exc
