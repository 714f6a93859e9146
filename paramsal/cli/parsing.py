"""What every command shares: a one-line-error parser, argparse types, and the options of analysis commands.

Nothing here imports torch: ``paramsal --help`` builds every command's
options from this module and :mod:`paramsal.options` alone.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from paramsal.config import OptionsClass
from paramsal.errors import InputError
from paramsal.options import DECODERS, DEVICES, TARGETS, TRANSFORMS


class UsageError(InputError):
    """An option argparse refused (a bad choice, a wrong type, a missing argument)."""


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line, reported like every other error of the command.

    argparse prints the whole usage block before its message; for a command
    with twenty options that buries the one line that says what is wrong.
    """

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see `{self.prog} --help`)")


def _int_at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type: an integer ``>= minimum``, refused with a message that says so."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {value}")
        return value

    parse.__name__ = f"int_at_least_{minimum}"  # argparse names the type in some messages
    return parse


#: argparse types: "5" -> 5, refusing values below 1 (counts, sizes) or below 0 (worker processes).
positive_int = _int_at_least(1)
non_negative_int = _int_at_least(0)


def positive_int_list(text: str) -> list[int]:
    """An argparse type: "1,5,25" -> [1, 5, 25], all >= 1."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from exc
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def shard_spec(text: str) -> tuple[int, int]:
    """An argparse type: "1/4" -> (1, 4), the second of four shares (0 <= I < N)."""
    index, _, count = text.partition("/")
    try:
        shard = int(index), int(count)
    except ValueError:
        shard = (-1, 0)
    if not 0 <= shard[0] < shard[1]:
        raise argparse.ArgumentTypeError(f"expected I/N with 0 <= I < N (e.g. 0/4 for the first of four), got {text!r}")
    return shard


#: Python arguments that the command line spells otherwise than ``--name-with-dashes``.
FLAG_ALIASES = {"out_dir": "--out", "resume=False": "--restart", "progress=False": "--quiet"}

_ASSIGNMENT = re.compile(r"\b([a-z][a-z_]*)=(True|False|'[^']*'|\([^)]*\)|[^\s,;)]*)")


def in_flags(message: str, parser: argparse.ArgumentParser | None) -> str:
    """An error message's Python arguments (``overwrite=True``, ``backend='vmap'``) as the flags of the command that
    ``parser`` parses (``--overwrite``, ``--backend vmap``); arguments it has no flag for are left as they are."""
    actions = parser._actions if parser is not None else []
    flags = {action.dest: max(action.option_strings, key=len) for action in actions if action.option_strings}
    spelled = {option for action in actions for option in action.option_strings}
    # "name=..." stands for a value the user chooses: the flag's own placeholder (``--out DIR``)
    placeholders = {option: action.metavar or action.dest.upper() for action in actions
                    for option in action.option_strings}

    def flag(match: re.Match) -> str:
        name, value = match.group(1), match.group(2)
        if f"{name}={value}" in FLAG_ALIASES:
            return FLAG_ALIASES[f"{name}={value}"]
        option = FLAG_ALIASES.get(name) or flags.get(name)
        if option is None:
            return match.group(0)
        if value == "True":
            return option
        if value == "...":
            return f"{option} {placeholders.get(option, value)}"
        if value == "False":
            return f"--no-{option[2:]}" if f"--no-{option[2:]}" in spelled else match.group(0)
        return f"{option} {value.strip(chr(39))}" if value else option

    return _ASSIGNMENT.sub(flag, message)


def printed(frame: Any, shares: Sequence[str] = ()) -> str:
    """A result's table as a command prints it: shares (fractions) in percent, renamed ``<name>_%``, and four
    decimals for the rest (docs/guide/commands.md defines every printed column)."""
    shown = frame.copy()
    for name in shares:
        shown[name] = 100 * shown[name]
    shown = shown.rename(columns={name: f"{name}_%" for name in shares})
    return shown.to_string(index=False, float_format=lambda v: f"{v:.4f}")


def target_choice(text: str) -> str | int:
    """``--target``: "label", "predicted" or a class index."""
    if text in TARGETS:
        return text
    if text.isdigit():
        return int(text)
    raise argparse.ArgumentTypeError(f"expected {' or '.join(TARGETS)} or a class index, got {text!r}")


#: How the command line parses each ``kind`` of option (:func:`paramsal.config.option`).
_FLAG_KINDS: dict[str, dict[str, Any]] = {
    "switch": {"action": "store_true"}, "on-off": {"action": argparse.BooleanOptionalAction}, "choice": {},
    "positive": {"type": positive_int}, "count": {"type": non_negative_int}, "target": {"type": target_choice},
    "shard": {"type": shard_spec}, "text": {}}


def add_option_flags(parser: argparse.ArgumentParser, kind: OptionsClass) -> list[str]:
    """Adds the flag of every field of ``kind`` that has one (:mod:`paramsal.config`), with that field's help.

    A flag the user does not give leaves no attribute (``argparse.SUPPRESS``), so the options class's own
    default applies: :func:`given_options` collects the ones given. Returns the fields' names.
    """
    names = []
    for f in dataclasses.fields(kind):
        flag = f.metadata["flag"]
        if flag is None:
            continue
        how = f.metadata["kind"]
        extra: dict[str, Any] = dict(_FLAG_KINDS[how])
        if how == "choice":
            extra["choices"] = f.metadata["choices"]
        if f.metadata["metavar"]:
            extra["metavar"] = f.metadata["metavar"]
        shown = f.default is not None and how not in ("switch", "on-off") and "default" not in f.metadata["help"]
        default = f" (default: {f.default})" if shown else ""
        parser.add_argument(flag, dest=f.name, default=argparse.SUPPRESS,
                            help=f.metadata["help"].replace("%", "%%") + default, **extra)
        names.append(f.name)
    return names


def given_options(args: argparse.Namespace, names: list[str]) -> dict[str, Any]:
    """The options among ``names`` that the command line set (see :func:`add_option_flags`)."""
    return {name: getattr(args, name) for name in names if hasattr(args, name)}


def choice_list(choices: tuple[str, ...]) -> Callable[[str], list[str]]:
    """An argparse type: "salient,least" -> ["salient", "least"], each one of ``choices``."""
    def parse(text: str) -> list[str]:
        values = [v.strip() for v in text.split(",") if v.strip()]
        unknown = [v for v in values if v not in choices]
        if unknown or not values:
            raise argparse.ArgumentTypeError(f"expected some of {', '.join(choices)}, got {text!r}")
        return values

    parse.__name__ = "choice_list"
    return parse


def add_run_argument(parser: argparse.ArgumentParser) -> None:
    """``RUN`` and ``--allow-partial``: the run an analysis reads."""
    parser.add_argument("run", help="run directory made by `paramsal profile`")
    parser.add_argument("--allow-partial", action="store_true",
                        help="analyse an unfinished run (a profile job that stopped part-way) with the samples "
                             "written so far")


def add_source_arguments(parser: argparse.ArgumentParser) -> None:
    """Overrides of the run's own specs (``--model/--weights/--num-classes/--data/--transform/--device``) and the
    checks that the model and data are the run's (``--trust-run-specs/--allow-other-weights/--allow-other-data``).
    """
    parser.add_argument("--model", help="model spec (default: the one the run was profiled with)")
    parser.add_argument("--weights", help="state dict file for the model (default: the run's)")
    parser.add_argument("--num-classes", type=positive_int,
                        help="classes of a torchvision model (default: the run's)")
    parser.add_argument("--data", help="data spec (default: the run's)")
    parser.add_argument("--transform", choices=TRANSFORMS, help="image transform for imagefolder data")
    parser.add_argument("--decode", choices=DECODERS, help="image decoder for imagefolder data (default: the run's)")
    parser.add_argument("--device", help=f"{DEVICES} (default: CUDA when available)")
    parser.add_argument("--trust-run-specs", action="store_true",
                        help="import and call the code (module.path:factory specs) named in the run's manifest to "
                             "rebuild its model or data; use it only for runs you made yourself")
    parser.add_argument("--allow-other-weights", action="store_true",
                        help="analyse a model whose weights differ from those the run profiled")
    parser.add_argument("--allow-other-data", action="store_true",
                        help="analyse a data set whose fingerprint differs from the one the run profiled")


def add_output_arguments(parser: argparse.ArgumentParser, default: str) -> None:
    """``--out DIR`` (default ``RUN/<default>``) and ``--quiet``."""
    parser.add_argument("--out", metavar="DIR", help=f"output directory (default RUN/{default})")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def analysis_options(args: argparse.Namespace) -> dict[str, Any]:
    """The keyword arguments every analysis takes (see :class:`paramsal.analyses.base.Analysis`), from ``args``."""
    return {"allow_partial": args.allow_partial, "allow_other_weights": getattr(args, "allow_other_weights", False),
            "allow_other_data": getattr(args, "allow_other_data", False),
            "trust_run_specs": getattr(args, "trust_run_specs", False), "device": getattr(args, "device", None),
            "progress": not getattr(args, "quiet", True)}


def opened_run(args: argparse.Namespace, default: str = "analyses") -> tuple[Any, Any]:
    """The command's run (refused while unfinished, unless ``--allow-partial``) and its output folder
    (``--out``, default ``RUN/<default>``), checked before any work to be writable (the run may be read-only) and
    paramsal's to write (:func:`paramsal.rundir.published.owned_folder`)."""
    from paramsal.analyses.sources import open_for_analysis
    from paramsal.rundir.published import owned_folder

    run = open_for_analysis(args.run, args.allow_partial)
    return run, owned_folder(args.out or run.path / default, "out")


def loaded_source(args: argparse.Namespace, run: Any, parts: tuple[str, ...] = ("model", "data")) -> dict[str, Any]:
    """The model and data of an analysis command: the run's own, or those ``--model/--data/...`` name."""
    from paramsal.analyses.sources import SourceOverrides, load_source

    overrides = SourceOverrides(model=args.model, weights=args.weights, num_classes=args.num_classes,
                                data=args.data, transform=args.transform, decode=args.decode)
    return load_source(run, overrides, trust_run_specs=args.trust_run_specs, device=args.device, parts=parts)
