"""Bulk profiling: a whole data set through the engine into a resumable, checked run directory.

A job holds the run's lock while it writes (:mod:`paramsal.engine.lock`),
writes each part durably and lists it in the manifest only then, so that a
job killed at any point (SIGKILL included) and started again with the same
arguments ends with the same bytes as one that never stopped. A resume keeps
the run's identity and config, checks the finished parts against the data
set's labels, and profiles only the parts the run lacks.
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from paramsal._io import writable_folder
from paramsal._typing import MapDataset
from paramsal._version import __version__
from paramsal.engine.backends import BatchResult
from paramsal.engine.devices import resolve_device
from paramsal.engine.fingerprints import data_fingerprint, model_fingerprint
from paramsal.engine.integrity import check_file
from paramsal.engine.loading import BadBatch, Indexed, collate_samples
from paramsal.engine.lock import RunLock
from paramsal.engine.manifest import FORMAT, STATS, part_count, part_range, parts_of, rows_per_part, write_manifest
from paramsal.engine.profile import LOSS_FLAG, Profiler
from paramsal.engine.resume import prepare_run
from paramsal.engine.rundir import Run, profile_table, write_part, write_stats
from paramsal.engine.units import UnitsSpec
from paramsal.engine.stats import SaliencyStats
from paramsal.errors import InputError, NonFiniteError, ParamsalWarning, check_choice
from paramsal.kernels.reduce import Aggregation
from paramsal.options import NONFINITE_POLICIES

#: Rows per part aimed at when ``part_size`` is not given (rounded to whole batches).
DEFAULT_PART_ROWS = 2048


__all__ = ["DEFAULT_PART_ROWS", "data_fingerprint", "model_fingerprint", "profile_dataset"]


def profile_dataset(model: nn.Module, data: MapDataset, out_dir: str | os.PathLike, *, batch_size: int = 64,
                    backend: str = "auto", units: UnitsSpec = "filters", aggregation: Aggregation = "mean_abs",
                    device: str | torch.device | None = None, num_workers: int = 0, features: bool | str = False,
                    resume: bool = True, overwrite: bool = False, repair: bool = False,
                    on_nonfinite: str = "skip", progress: bool = True, part_size: int | None = None,
                    chunk_size: int | None = None, model_name: str | None = None, data_name: str | None = None,
                    source: dict[str, Any] | None = None) -> Run:
    """Profiles every sample of a classification data set and writes a run directory.

    Each sample's raw profile (the gradient of its own cross-entropy loss,
    reduced to units; see :func:`paramsal.profile_batch`) is written with its
    prediction and confidences, and the per-unit statistics are streamed. A
    job that stops part-way can be started again with the same arguments: it
    profiles only the parts the run lacks, and the run ends with every sample
    exactly once, bit for bit as if it had never stopped.

    Args:
        model: a trained classifier; moved to ``device`` and profiled in eval mode.
        data: a map-style data set of ``(input, class index)``.
        out_dir: the run directory (created if needed); one job at a time may write it.
        batch_size: samples per batch.
        backend: "auto", "hooks", "vmap" or "loop".
        units: see :func:`paramsal.units_of`.
        aggregation: "mean_abs" (the paper) or "abs_mean".
        device: where to compute; default CUDA when available, else CPU.
        num_workers: DataLoader worker processes.
        features: also record penultimate features (the input of the last
            ``nn.Linear``, or of the named module), for the feature-space baseline.
        resume: continue a run found in ``out_dir``; False starts over only
            with ``overwrite``.
        overwrite: replace a run in ``out_dir`` made with another model, data
            set or units (or any run, with ``resume=False``).
        repair: check every finished part's checksum, rows and ids, and
            profile the damaged or missing ones again (stray part files are
            removed).
        on_nonfinite: a sample whose loss or gradient is NaN/inf: "skip" keeps
            its row, flagged (``nonfinite``, ``nonfinite_param``), leaves it out
            of the statistics and warns at the end; "fail" stops, naming its
            dataset index.
        progress: show a progress bar (samples/s, time left).
        part_size: rows per Parquet part, a multiple of ``batch_size``
            (default about 2,048); a resumed run keeps its own.
        chunk_size: samples per chunk of per-sample work (memory bound).
        model_name, data_name: descriptions stored in the manifest.
        source: how to load the model and data again (the command line's
            specs: model, weights, num_classes, data, transform), stored in the
            manifest so that analyses can rebuild them from the run alone.

    Returns:
        The finished run, opened for reading.

    Raises:
        RunLockedError: another job is writing ``out_dir``.
        RunMismatchError: ``out_dir`` holds a run of another model, data set,
            units or numeric config (batch size, backend, device, ...).
        RunCorruptError: a finished part is damaged (``repair=True`` mends it).
    """
    _check_arguments(data, batch_size, num_workers, part_size, on_nonfinite)
    root = writable_folder(out_dir, "--out DIR (out_dir= in Python)")
    with RunLock(root):
        device = resolve_device(device)
        model = model.to(device)
        profiler = Profiler(model, units=units, backend=backend, aggregation=aggregation, chunk_size=chunk_size,
                            features=features or None)
        batches_per_part = max(1, (part_size or DEFAULT_PART_ROWS) // batch_size)
        wanted = _manifest(model, data, profiler, backend, batch_size, batches_per_part, chunk_size, device,
                           model_name, data_name)
        wanted["source"] = dict(source or {})
        manifest, notes = prepare_run(root, wanted, data, profiler, resume=resume, overwrite=overwrite, repair=repair)
        for note in notes:
            warnings.warn(note, ParamsalWarning, stacklevel=2)
        _profile_missing_parts(root, manifest, data, profiler, device, num_workers, on_nonfinite, progress)
        _finish(root, manifest)
    run = Run(root)
    _warn_nonfinite(run)
    return run


def _check_arguments(data: MapDataset, batch_size: int, num_workers: int, part_size: int | None,
                     on_nonfinite: str) -> None:
    for name, value, least in (("batch_size", batch_size, 1), ("num_workers", num_workers, 0),
                               ("part_size", part_size, 1)):
        if value is not None and (not isinstance(value, int) or value < least):
            raise InputError(f"{name} must be an integer >= {least}, got {value!r}")
    check_choice("on_nonfinite", on_nonfinite, NONFINITE_POLICIES)
    if len(data) == 0:
        raise InputError(f"the data set ({type(data).__name__}) is empty: there is nothing to profile")


def _profile_missing_parts(root: Path, manifest: dict[str, Any], data: MapDataset, profiler: Profiler,
                           device: torch.device, num_workers: int, on_nonfinite: str, progress: bool) -> None:
    finished = {p.index for p in parts_of(manifest)}
    todo = [i for i in range(part_count(manifest)) if i not in finished]
    batch_size = manifest["config"]["batch_size"]
    batches = [list(range(s, min(s + batch_size, stop))) for i in todo
               for start, stop in [part_range(manifest, i)] for s in range(start, stop, batch_size)]
    loader = DataLoader(Indexed(data), batch_sampler=batches, num_workers=num_workers,
                        collate_fn=collate_samples, pin_memory=device.type == "cuda")
    done = int(manifest["num_samples"]) - sum(len(b) for b in batches)
    bar = tqdm(total=int(manifest["num_samples"]), initial=done, unit="samples", disable=not progress,
               desc="profiling", dynamic_ncols=True)
    buffer: _PartBuffer | None = None
    try:
        for batch in loader:
            if isinstance(batch, BadBatch):
                raise batch.error()
            ids, inputs, targets = batch
            if buffer is None:
                buffer = _PartBuffer(int(ids[0]) // rows_per_part(manifest))
            buffer.add(ids, targets, *_profile_batch(profiler, ids, inputs, targets, on_nonfinite))
            bar.update(len(ids))
            if buffer.stop == part_range(manifest, buffer.index)[1]:
                _flush(root, manifest, buffer, profiler)
                buffer = None
    finally:
        bar.close()


def _profile_batch(profiler: Profiler, ids: torch.Tensor, inputs: torch.Tensor, targets: torch.Tensor,
                   on_nonfinite: str) -> tuple[BatchResult, list[str | None]]:
    """The batch's results and, per sample, None or the parameter whose gradient was not finite.

    The samples of a batch with a bad one are profiled again without it, so
    that no kernel that works on several samples at once can carry its NaN
    into theirs.
    """
    result = profiler(inputs, targets, check_finite=False)
    flags = profiler.nonfinite(result)
    bad = [row for row, flag in enumerate(flags) if flag is not None]
    if not bad:
        return result, flags
    if on_nonfinite == "fail":
        row = bad[0]
        raise NonFiniteError(
            f"sample {int(ids[row])} (dataset index) has a non-finite loss or gradient "
            f"({'loss ' + str(float(result.losses[row])) if flags[row] == LOSS_FLAG else 'in ' + repr(flags[row])}); "
            "--on-nonfinite skip (on_nonfinite='skip', the default) flags such samples and goes on")
    good = torch.tensor([flag is None for flag in flags])
    if good.any():
        clean = profiler(inputs[good], targets[good])
        rows = good.to(result.profiles.device)
        result.profiles[rows] = clean.profiles
        result.outputs[rows] = clean.outputs
        result.losses[rows] = clean.losses
        if result.features is not None and clean.features is not None:
            result.features[rows] = clean.features
    return result, flags


class _PartBuffer:
    """The batches of the part being filled, moved off the device as they arrive."""

    def __init__(self, index: int):
        self.index = index
        self.stop = -1
        self.columns: dict[str, list[torch.Tensor]] = {k: [] for k in
                                                       ("ids", "targets", "profiles", "outputs", "losses", "features")}
        self.flags: list[str | None] = []

    def add(self, ids: torch.Tensor, targets: torch.Tensor, result: BatchResult, flags: list[str | None]) -> None:
        for name, values in (("ids", ids), ("targets", targets), ("profiles", result.profiles),
                             ("outputs", result.outputs), ("losses", result.losses), ("features", result.features)):
            if values is not None:
                self.columns[name].append(values.detach().cpu())
        self.flags += flags
        self.stop = int(ids[-1]) + 1

    def cat(self, name: str) -> np.ndarray:
        return torch.cat(self.columns[name]).float().numpy()

    def features(self) -> np.ndarray | None:
        return self.cat("features") if self.columns["features"] else None


def _flush(root: Path, manifest: dict[str, Any], buffer: _PartBuffer, profiler: Profiler) -> None:
    """Writes the buffered rows as their part, then lists it in the manifest."""
    profiles = buffer.cat("profiles")
    table = profile_table(torch.cat(buffer.columns["ids"]).numpy(), torch.cat(buffer.columns["targets"]).numpy(),
                          buffer.cat("outputs"), buffer.cat("losses"), profiles, buffer.features(),
                          buffer.flags)
    finite = np.array([flag is None for flag in buffer.flags])
    stats = SaliencyStats(len(profiler.index), manifest["aggregation"]).update(
        torch.cat(buffer.columns["profiles"])[torch.from_numpy(finite)])
    part = write_part(root, buffer.index, table, stats, profiler.backend)
    manifest["parts"] = sorted(manifest["parts"] + [part.to_json()], key=lambda p: p["index"])
    manifest["updated"] = _now()
    write_manifest(root, manifest)


def _finish(root: Path, manifest: dict[str, Any]) -> None:
    """Once every part is there: the merged statistics, then ``complete``."""
    parts = parts_of(manifest)
    if manifest["complete"] or len(parts) < part_count(manifest):
        return
    stats = SaliencyStats(int(manifest["num_units"]))
    for part in parts:
        check_file(root, part.stats_file, part.records[part.stats_file], manifest)
        stats = stats.merge(SaliencyStats.load(root / part.stats_file))
    stats.aggregation = manifest["aggregation"]
    manifest["files"][STATS] = write_stats(root, stats)
    manifest["complete"] = True
    manifest["updated"] = _now()
    write_manifest(root, manifest)


def _warn_nonfinite(run: Run) -> None:
    skipped = run.nonfinite_ids()
    if len(skipped):
        shown = ", ".join(map(str, skipped[:10])) + (", ..." if len(skipped) > 10 else "")
        warnings.warn(f"{len(skipped)} sample(s) had a non-finite loss or gradient and were skipped: their rows "
                      f"in {run.path} are flagged (nonfinite, nonfinite_param) and left out of the statistics and "
                      f"of the analyses' default samples; ids {shown}", ParamsalWarning, stacklevel=3)


def _manifest(model: nn.Module, data: MapDataset, profiler: Profiler, backend: str, batch_size: int,
              batches_per_part: int, chunk_size: int | None, device: torch.device, model_name: str | None,
              data_name: str | None) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "created": _now(),
        "updated": _now(),
        "complete": False,
        "config": {"model": model_name or type(model).__name__, "data": data_name or type(data).__name__,
                   "units": profiler.index.scheme, "backend": backend, "batch_size": batch_size,
                   "batches_per_part": batches_per_part, "chunk_size": chunk_size, "device": device.type,
                   "dtype": str(next(iter(model.parameters())).dtype).removeprefix("torch."),
                   "features_module": profiler.features},
        "aggregation": profiler.aggregation,
        "features": profiler.features is not None,
        "num_units": len(profiler.index),
        "num_samples": len(data),
        "model_fingerprint": model_fingerprint(model),
        "data_fingerprint": data_fingerprint(data),
        "units_fingerprint": profiler.index.fingerprint(),
        "versions": {"paramsal": __version__, "torch": torch.__version__, "numpy": np.__version__,
                     "python": platform.python_version()},
        "files": {},
        "parts": [],
    }


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
