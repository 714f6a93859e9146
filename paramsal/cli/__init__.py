"""The ``paramsal`` command: one module per command group, each importing what it runs only when it runs.

Every mistake of the user's (a bad option, a missing file, a run that is not
the model's) ends as one line ``paramsal: error: ...`` on stderr and exit code
2; ``--debug`` (or ``PARAMSAL_DEBUG=1``) prints the traceback above it. Any
other exception is a bug in paramsal and keeps its traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import sys
import traceback
import warnings
from collections.abc import Iterator, Sequence

from paramsal.cli.parsing import OneLineParser, UsageError, in_flags
from paramsal.errors import ParamsalError

#: Set to 1 to print the traceback of every error, as ``--debug`` does.
DEBUG_ENV = "PARAMSAL_DEBUG"

#: The command groups, in the order ``paramsal --help`` lists them: each module has ``register(subparsers)``.
GROUPS = ("paramsal.cli.profiling", "paramsal.cli.runs", "paramsal.cli.curves", "paramsal.cli.explain",
          "paramsal.cli.bench", "paramsal.cli.compare")

__all__ = ["DEBUG_ENV", "OneLineParser", "UsageError", "build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="paramsal", description="Parameter-space saliency, a batch at a time.")
    _add_debug_argument(parser, default=False)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)
    for group in GROUPS:
        importlib.import_module(group).register(sub)
    for command in sub.choices.values():
        # Accepted after the command too (`paramsal prune RUN --debug`); SUPPRESS keeps a
        # `paramsal --debug prune RUN` from being reset to False by the command's default.
        _add_debug_argument(command, default=argparse.SUPPRESS)
    return parser


def _add_debug_argument(parser: argparse.ArgumentParser, default: object) -> None:
    parser.add_argument("--debug", action="store_true", default=default,
                        help=f"print the traceback of an error before its one-line message (or set {DEBUG_ENV}=1)")


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the command line ``argv`` (default ``sys.argv[1:]``) and returns the exit code.

    Returns:
        The command's code (0), or 2 after printing ``paramsal: error: <message>``
        for a :class:`ParamsalError`, or 1 when standard output was closed early (a pipe into ``head``);
        other exceptions propagate with their traceback.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    args = None
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        with warnings.catch_warnings(), _ranks():
            warnings.showwarning = _show_warning
            return args.func(args)
    except ParamsalError as exc:
        # Before parsing finished (a usage error) only the raw words tell whether --debug was asked for.
        debug = getattr(args, "debug", False) if args is not None else "--debug" in argv
        if debug or os.environ.get(DEBUG_ENV, "") not in ("", "0"):
            traceback.print_exception(exc, file=sys.stderr)
        message = exc.command_line or in_flags(str(exc), _command_parser(parser, args))
        print(f"paramsal: error: {_one_line(message)}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # The reader of our output went away (`paramsal samples RUN | head`): not an error of the command's. The
        # rest of the output goes nowhere, so that flushing it at exit does not raise again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


def _command_parser(parser: argparse.ArgumentParser, args: argparse.Namespace | None) -> \
        argparse.ArgumentParser | None:
    """The parser of the command ``args`` ran (None before parsing finished)."""
    if args is None or parser._subparsers is None:
        return None
    choices = parser._subparsers._group_actions[0].choices
    assert isinstance(choices, dict)  # a subparsers action's choices map each command to its parser
    return choices.get(args.command)


@contextlib.contextmanager
def _ranks() -> Iterator[None]:
    """Under ``torchrun``: every rank joins the process group, and rank 0 alone prints results.

    The commands run the same on every rank (each profiles or analyses its
    share, then the ranks combine what they found), so the other ranks'
    standard output would repeat rank 0's; their errors still show.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        yield
        return
    from paramsal.jobs import distributed

    joined = distributed.init_from_environment()
    try:
        if distributed.current_ranks().is_main:
            yield
        else:
            with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet):
                yield
    finally:
        if joined:
            distributed.leave()


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """paramsal's own warnings (a fallback, a skipped sample) read as the command's notes; others as usual."""
    from paramsal.errors import ParamsalWarning

    if issubclass(category, ParamsalWarning):
        print(f"paramsal: warning: {message}", file=sys.stderr)
    else:
        print(warnings.formatwarning(message, category, filename, lineno, line), end="", file=file or sys.stderr)


def _one_line(message: str) -> str:
    """The message on one line: some errors carry a library's multi-line text (torch, pyarrow)."""
    return " ".join(part.strip() for part in message.splitlines() if part.strip())
