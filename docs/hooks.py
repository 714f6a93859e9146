"""MkDocs hook: what the docs say about options comes from where the options are declared.

* A page line ``<!-- options: ProfileOptions -->`` (or ``JobOptions``) becomes
  :func:`paramsal.config.options_table` of that class, so the fields' ``help``
  text is at once the Python documentation, ``paramsal profile --help`` and
  this table.
* A page line ``<!-- help: COMMAND -->`` becomes a folded block with
  ``paramsal COMMAND --help`` (``<!-- help: paramsal -->``: ``paramsal --help``),
  built from the command line's own parser (no torch is imported).

An unknown class or command fails the build.
"""

from __future__ import annotations

import os
import re
import textwrap

from paramsal import config

#: The placeholder line, with the options class it names.
PLACEHOLDER = re.compile(r"^<!--\s*options:\s*(\w+)\s*-->\s*$", re.MULTILINE)
#: The command placeholder line.
HELP = re.compile(r"^<!--\s*help:\s*([\w-]+)\s*-->\s*$", re.MULTILINE)
#: The width the help text is wrapped to.
HELP_COLUMNS = 100
#: The classes a page may name.
CLASSES = {"ProfileOptions": config.ProfileOptions, "JobOptions": config.JobOptions}


def markdown_table(kind: type) -> str:
    """``options_table(kind)`` with every ``|`` inside a description escaped, so that a help text such as
    "mean |gradient|" stays in its cell instead of splitting the row."""
    rows = config.options_table(kind).splitlines()
    fixed = rows[:2]
    for row in rows[2:]:
        cells = row[2:-2].split(" | ", 3)  # name, default, flag, description: only the last may hold a "|"
        cells[-1] = re.sub(r"(?<!\\)\|", r"\\|", cells[-1])
        fixed.append("| " + " | ".join(cells) + " |")
    return "\n".join(fixed)


def command_help(command: str) -> str:
    """``paramsal COMMAND --help`` (or ``paramsal --help`` for "paramsal"), wrapped to :data:`HELP_COLUMNS`."""
    from paramsal.cli import build_parser

    saved = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = str(HELP_COLUMNS)  # argparse wraps to the terminal's width, read from here
    try:
        parser = build_parser()
        if command != "paramsal":
            commands = next(a for a in parser._actions if a.dest == "command").choices
            if command not in commands:
                raise KeyError(command)
            parser = commands[command]
        return parser.format_help()
    finally:
        if saved is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = saved


def folded_help(command: str) -> str:
    """The help of ``command`` as a folded admonition (pymdownx.details) holding a text block."""
    title = "paramsal --help" if command == "paramsal" else f"paramsal {command} --help"
    block = "```text\n" + command_help(command).rstrip() + "\n```"
    return f'??? example "`{title}`"\n\n' + textwrap.indent(block, "    ")


def on_page_markdown(markdown: str, page, **kwargs) -> str:
    def table(match: re.Match) -> str:
        name = match.group(1)
        if name not in CLASSES:
            raise ValueError(f"{page.file.src_path}: <!-- options: {name} --> names no options class "
                             f"(expected one of {', '.join(CLASSES)})")
        return markdown_table(CLASSES[name])

    def help_block(match: re.Match) -> str:
        try:
            return folded_help(match.group(1))
        except KeyError:
            raise ValueError(f"{page.file.src_path}: <!-- help: {match.group(1)} --> names no paramsal "
                             "command") from None

    return HELP.sub(help_block, PLACEHOLDER.sub(table, markdown))
