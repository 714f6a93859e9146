"""The run directory as data: its typed manifest and layout, the read-only :class:`Run`, the part writer, integrity
checks, the lock, resume and merge, and what paramsal may touch in a folder (:mod:`~paramsal.rundir.ownership`).

It takes arrays and tables, never engine objects, and never follows a symbolic link out of a run."""

from paramsal.rundir.integrity import units_table, verify_run
from paramsal.rundir.merge import merge_runs
from paramsal.rundir.run import Run, open_run

__all__ = ["Run", "merge_runs", "open_run", "units_table", "verify_run"]
