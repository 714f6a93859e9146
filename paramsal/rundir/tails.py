"""POT tails stored in a run: ``tails/<reference>.parquet``, written by one explicit step only.

Fitting the tails of every unit reads every reference value, so a run keeps
them once fitted (``paramsal tails RUN``, :func:`store_tails`; a run reads
them back with :meth:`~paramsal.rundir.run.Run.stored_tails`). Reading a
score never writes the run: :mod:`paramsal.ranking.scoring` fits in memory
what is not stored. Each file is listed in the manifest with the checksum of
the statistics it was fitted with: a run whose statistics changed since (a
repair, a rewrite) reads as having no tails, and they are fitted again.
"""

from __future__ import annotations

import dataclasses
import os

import pyarrow.parquet as pq

from paramsal._io import atomic_path, file_record
from paramsal.errors import InputError, check_choice
from paramsal.ranking.scoring import fit_reference_tails, reference_set
from paramsal.ranking.tails import Tails
from paramsal.rundir.layout import STATS, TAIL_REFERENCES, TAILS_DIR, TAILS_FORMAT, tails_file
from paramsal.rundir.lock import RunLock, manifest_update
from paramsal.rundir.manifest import FileRecord, read_manifest, write_manifest
from paramsal.rundir.ownership import folder, inside
from paramsal.rundir.run import Run, open_run


def store_tails(run: Run | str | os.PathLike, reference: str = "all", budget_mb: int = 256) -> Tails:
    """Fits the POT tails of a named reference set of a complete run and stores them in it, under the run's lock.

    Args:
        run: the run (or its directory).
        reference: "all", "correct" or "class" (:mod:`paramsal.ranking.scoring`).
        budget_mb: memory for the reference values of a block of units while fitting.

    Returns:
        The tails, as scores then read them.

    Raises:
        RunLockedError: another job is writing the run.
        InputError: the run changed since it was opened, or is unfinished, or ``reference`` is not a name.
    """
    run = open_run(run) if isinstance(run, (str, os.PathLike)) else run
    check_choice("reference", reference, TAIL_REFERENCES)  # another run's tails are stored in that run
    tails = fit_reference_tails(reference_set(run, reference), budget_mb)
    with RunLock(run.path), manifest_update(run.path):
        manifest = read_manifest(run.path)
        stats = None if manifest is None else manifest.files.get(STATS)
        if manifest is None or stats is None or stats != run.manifest.files.get(STATS):
            raise InputError(f"{run.path} changed since it was opened; open it again and store the tails then")
        folder(run.path, TAILS_DIR, create=True)
        with atomic_path(inside(run.path, tails_file(reference))) as tmp:
            pq.write_table(tails.to_arrow(), tmp)
            written = FileRecord.from_json(file_record(tmp))
        manifest.files[tails_file(reference)] = dataclasses.replace(written, format=TAILS_FORMAT,
                                                                    fitted_on=stats.sha256)
        write_manifest(run.path, manifest)
    run.manifest = manifest
    run.derived[("tails", reference)] = tails
    return tails


__all__ = ["store_tails"]
