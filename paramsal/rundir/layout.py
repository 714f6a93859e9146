"""Where each file of a run directory lives: the names paramsal makes, and nothing it reads from a file."""

from __future__ import annotations

from pathlib import Path

UNITS = "units.parquet"
STATS = "stats.parquet"
PROFILES_DIR = "profiles"
PART_STATS_DIR = "stats"
#: Fitted POT tails of a complete run (derived data, listed in ``files``; :mod:`paramsal.rundir.tails`).
TAILS_DIR = "tails"
#: The version of the stored tails' layout and method; other versions are fitted again.
TAILS_FORMAT = "paramsal-tails/1"
#: The reference sets whose tails a run may store.
TAIL_REFERENCES = ("all", "correct", "class")


def part_file(index: int) -> str:
    return f"{PROFILES_DIR}/part-{index:05d}.parquet"


def part_stats_file(index: int) -> str:
    return f"{PART_STATS_DIR}/part-{index:05d}.parquet"


def tails_file(reference: str) -> str:
    """The file of the tails fitted on a named reference set ("all", "correct" or "class")."""
    return f"{TAILS_DIR}/{reference}.parquet"


def part_index(path: Path) -> int | None:
    """The index in a part file's name (``part-00012.parquet`` -> 12), or None for another name."""
    stem = path.name.removeprefix("part-").removesuffix(".parquet")
    return int(stem) if path.name.startswith("part-") and path.name.endswith(".parquet") and stem.isdigit() else None


__all__ = ["PART_STATS_DIR", "PROFILES_DIR", "STATS", "TAILS_DIR", "TAILS_FORMAT", "TAIL_REFERENCES", "UNITS",
           "part_file", "part_index", "part_stats_file", "tails_file"]
