"""Run directories written straight from arrays, for tests of the readers and analyses."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa

from paramsal import SaliencyStats, open_run
from paramsal.rundir.format import FORMAT
from paramsal.rundir.layout import STATS, UNITS
from paramsal.rundir.ownership import MANIFEST
from paramsal.rundir.run import Run
from paramsal.rundir.writing import profile_table, write_part, write_stats, write_units


def make_run(root: Path, profiles: np.ndarray, targets: np.ndarray, preds: np.ndarray, layer_of_unit,
             features: np.ndarray | None = None, part_rows: int = 37, reverse_parts: bool = False) -> Run:
    """Writes a valid, complete run directory holding exactly these rows (sample ids 0..n-1).

    ``preds`` become logits with a margin of 5; ``reverse_parts`` lists the
    parts in the manifest backwards (readers must sort them).
    """
    root.mkdir(parents=True, exist_ok=True)
    n, num_units = profiles.shape
    logits = np.zeros((n, int(max(targets.max(), preds.max())) + 1))
    logits[np.arange(n), preds] = 5.0
    parts = []
    for index, start in enumerate(range(0, n, part_rows)):
        rows = slice(start, min(start + part_rows, n))
        table = profile_table(np.arange(n)[rows], targets[rows], logits[rows], np.ones(rows.stop - start),
                              profiles[rows], None if features is None else features[rows])
        parts.append(write_part(root, index, table, SaliencyStats(num_units).update(profiles[rows]), "hooks"))
    units = pa.table({"unit_id": np.arange(num_units), "param": ["w"] * num_units, "module": ["m"] * num_units,
                      "layer": np.asarray(layer_of_unit, np.int32), "channel": np.arange(num_units),
                      "size": np.ones(num_units, np.int64)})
    files = {UNITS: write_units(root, units), STATS: write_stats(root, SaliencyStats(num_units).update(profiles))}
    document = {"format": FORMAT, "parts": [p.to_json() for p in (parts[::-1] if reverse_parts else parts)],
                "num_units": num_units, "num_samples": n, "complete": True, "features": features is not None,
                "aggregation": "mean_abs", "config": {"batch_size": part_rows, "batches_per_part": 1},
                "files": {name: record.to_json() for name, record in files.items()}}
    (root / MANIFEST).write_text(json.dumps(document))  # as written, parts in the order given: readers sort them
    return open_run(root)
