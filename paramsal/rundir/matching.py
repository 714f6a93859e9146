"""Whether a job's manifest describes the run already in its folder, and what to say where it does not."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from paramsal.errors import RunMismatchError
from paramsal.options import UNRECORDED_DECODE
from paramsal.rundir.manifest import Manifest, Source

#: Manifest fields that must agree before a job may continue a run.
IDENTITY_KEYS = ("model_fingerprint", "data_fingerprint", "units_fingerprint", "num_units", "num_samples",
                 "aggregation", "features")
#: Config fields a resume must repeat: another value could change the numbers (rounding, batch composition).
NUMERIC_CONFIG = ("backend", "batch_size", "chunk_size", "device", "dtype", "features_module", "precision",
                  "channels_last", "target", "task", "deterministic")

def mismatches(existing: Manifest, planned: Manifest) -> list[str]:
    """The identity fields on which two manifests differ."""
    return [k for k in IDENTITY_KEYS if getattr(existing, k) != getattr(planned, k)]


def mismatch_details(existing: Manifest, planned: Manifest, names: tuple[str, str] = ("run", "this job")) -> str:
    """The identity fields on which two manifests differ, in words ("another num_units (num_units: run has 5, this
    job 6)"), or "" when they are one run's."""
    differ = mismatches(existing, planned)
    if not differ:
        return ""
    details = "; ".join(f"{k}: {names[0]} has {getattr(existing, k)!r}, {names[1]} {getattr(planned, k)!r}"
                        for k in differ)
    return f"another {', '.join(differ)} ({details})"


def check_same_run(root: Path, existing: Manifest, planned: Manifest) -> None:
    """Raises :class:`RunMismatchError` naming every identity field that differs."""
    details = mismatch_details(existing, planned)
    if details:
        raise RunMismatchError(f"{root} holds a run made with {details}. Choose another directory, or pass "
                               "overwrite=True to replace it")


def config_mismatches(existing: Manifest, planned: Manifest) -> list[str]:
    """The fields of :data:`NUMERIC_CONFIG` on which two manifests differ."""
    return [k for k in NUMERIC_CONFIG if getattr(existing.config, k) != getattr(planned.config, k)]


def resume_notes(root: Path, existing: Manifest, planned: Manifest) -> list[str]:
    """What a resume keeps from the run although this job asked otherwise; raises where numbers could change.

    Raises:
        RunMismatchError: naming a field of :data:`NUMERIC_CONFIG` that differs.
    """
    old, new = existing.config, planned.config
    differ = config_mismatches(existing, planned)
    if differ:
        details = "; ".join(f"{k}: run has {getattr(old, k)!r}, this job {getattr(new, k)!r}" for k in differ)
        raise RunMismatchError(
            f"{root} was profiled with another {', '.join(differ)} ({details}), which could change the "
            f"numbers of the samples still to do; resume with the run's own settings, or start over with "
            "resume=False, overwrite=True")
    notes = []
    for key in ("model", "data", "batches_per_part"):
        if getattr(old, key) != getattr(new, key):
            notes.append(f"config {key}: the run keeps {getattr(old, key)!r} (this job said {getattr(new, key)!r})")
    if existing.source != planned.source and planned.source != Source():
        notes.append(f"source: the run keeps {_plain_source(existing.source)!r}")
    return notes


def _plain_source(source: Source) -> dict[str, Any]:
    return {k: v for k, v in dataclasses.asdict(source).items() if k != "extra" and v is not None}


def repair_hint(root: Path, manifest: Manifest) -> str:
    """How to make the run whole again: its own profile command with ``--repair``."""
    source = manifest.source
    if not (source.model and source.data):
        return "call profile_dataset(...) as the run was made, with repair=True"
    words = ["paramsal", "profile", "--model", source.model, "--data", source.data, "--out", str(root),
             "--batch-size", str(manifest.config.batch_size)]
    decode = source.decode or (UNRECORDED_DECODE if source.data.startswith("imagefolder:") else None)
    for flag, value in (("--weights", source.weights), ("--num-classes", source.num_classes),
                        ("--transform", source.transform), ("--decode", decode), ("--limit", source.limit)):
        if value is not None:
            words += [flag, str(value)]
    return f"run `{' '.join(words)} --repair`"


__all__ = ["IDENTITY_KEYS", "NUMERIC_CONFIG", "check_same_run", "config_mismatches", "mismatch_details",
           "mismatches", "repair_hint", "resume_notes"]
