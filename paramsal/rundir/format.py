"""The run format's version, and the check of a ``manifest.json`` document before it is read as a
:class:`~paramsal.rundir.manifest.Manifest`.

Every field a reader or an analysis uses is checked here for its type, so that
a hand-edited, truncated or foreign manifest is named once, on opening,
instead of failing somewhere downstream.
"""

from __future__ import annotations

import json
import re
from typing import Any

from paramsal.options import AGGREGATIONS
from paramsal.rundir.layout import STATS, TAIL_REFERENCES, UNITS, part_file, tails_file

#: The format of the manifests this version writes and reads.
FORMAT = "paramsal-run/2"

_SHA256 = re.compile(r"[0-9a-f]{64}")


def document_problem(document: dict[str, Any]) -> str | None:
    """What makes a manifest document unusable, in words; None when it is sound."""
    for key, kind in (("num_samples", int), ("num_units", int), ("parts", list), ("config", dict),
                      ("complete", bool), ("aggregation", str), ("features", bool)):
        if not _is(document.get(key), kind):
            return f"{key!r} is missing or not a {kind.__name__}"
    for key in ("num_samples", "num_units"):
        if document[key] < 1:
            return f"{key!r} is {document[key]}, not a positive integer"
    if document["aggregation"] not in AGGREGATIONS:
        return f"'aggregation' is {document['aggregation']!r}, not one of {', '.join(AGGREGATIONS)}"
    for key in ("model_fingerprint", "data_fingerprint", "units_fingerprint", "created", "updated", "run_id"):
        if key in document and not isinstance(document[key], str):
            return f"{key!r} is not a string"
    for key in ("source", "versions"):
        if document.get(key) is not None and not isinstance(document[key], dict):
            return f"{key!r} is not an object"
    for key in ("merged_from", "merge_of"):
        if document.get(key) is not None and not (isinstance(document[key], list)
                                                  and all(isinstance(v, str) for v in document[key])):
            return f"{key!r} is not a list of paths"
    problem = _config_problem(document["config"])
    if problem:
        return problem
    files = document.get("files")
    if not isinstance(files, dict) or UNITS not in files or (document["complete"] and STATS not in files):
        return f"'files' does not record {UNITS}" + (f" and {STATS}" if document["complete"] else "")
    for name, record in files.items():
        if name not in (UNITS, STATS, *map(tails_file, TAIL_REFERENCES)) or not _is_record(record):
            return f"'files' has a bad entry for {name!r}"
    seen: set[int] = set()
    for entry in document["parts"]:
        problem = _part_problem(document, entry)
        if problem:
            return problem
        if entry["index"] in seen:
            return f"part {entry['index']} is listed twice"
        seen.add(entry["index"])
    if document["complete"] and len(seen) != _part_count(document):
        return f"it says complete but lists {len(seen)} of {_part_count(document)} parts"
    return None


def _config_problem(config: dict[str, Any]) -> str | None:
    for key in ("batch_size", "batches_per_part"):
        if not _is(config.get(key), int) or config[key] < 1:
            return f"config {key!r} is missing or not a positive integer"
    for key in ("model", "data", "units", "backend", "device", "dtype", "precision", "task", "features_module"):
        if config.get(key) is not None and not isinstance(config[key], str):
            return f"config {key!r} is not a string"
    for key in ("channels_last", "deterministic"):
        if key in config and not isinstance(config[key], bool):
            return f"config {key!r} is not true or false"
    for key in ("chunk_size", "world_size"):
        if config.get(key) is not None and not (_is(config[key], int) and config[key] >= 1):
            return f"config {key!r} is not a positive integer"
    target = config.get("target", "label")
    if not (isinstance(target, str) or (_is(target, int) and target >= 0)):
        return "config 'target' is neither a name nor a class index"
    return None


def _rows_per_part(document: dict[str, Any]) -> int:
    return int(document["config"]["batches_per_part"]) * int(document["config"]["batch_size"])


def _part_count(document: dict[str, Any]) -> int:
    return -(-int(document["num_samples"]) // _rows_per_part(document))


def _part_problem(document: dict[str, Any], entry: object) -> str | None:
    if not isinstance(entry, dict):
        return f"a part entry is a {type(entry).__name__}, not an object"
    for key in ("index", "start", "stop", "bytes", "stats_bytes", "nonfinite"):
        if not _is(entry.get(key), int) or entry[key] < 0:
            return f"part entry {_short(entry)} has no non-negative integer {key!r}"
    index, rows = entry["index"], _rows_per_part(document)
    expected = index * rows, min((index + 1) * rows, int(document["num_samples"]))
    if index >= _part_count(document) or (entry["start"], entry["stop"]) != expected:
        return (f"part {index} covers samples {entry['start']}..{entry['stop'] - 1}, but a run of "
                f"{document['num_samples']} samples in parts of {rows} has no such part")
    if not _is_record(entry) or not _is_record({"bytes": entry["stats_bytes"], "sha256": entry.get("stats_sha256")}):
        return f"part {index} has no valid sizes and sha256"
    if not isinstance(entry.get("backend"), str):
        return f"part {index} names no backend"
    if entry.get("file", part_file(index)) != part_file(index):
        return f"part {index} names the file {entry['file']!r}, not {part_file(index)!r}"
    return None


def _is_record(record: object) -> bool:
    """``{"bytes": size, "sha256": hex}``, as :func:`paramsal._io.file_record` makes."""
    return (isinstance(record, dict) and _is(record.get("bytes"), int) and isinstance(record.get("sha256"), str)
            and bool(_SHA256.fullmatch(record["sha256"])))


def _is(value: object, kind: type) -> bool:
    """``isinstance`` that does not take a bool for an int (JSON ``true`` is no index)."""
    return isinstance(value, kind) and (kind is bool or not isinstance(value, bool))


def _short(entry: dict[str, Any]) -> str:
    text = json.dumps(entry)
    return text if len(text) <= 60 else text[:57] + "..."


__all__ = ["FORMAT", "document_problem"]
