"""Bulk profiling: a whole data set through the engine into a resumable, checked run directory.

A job holds the run's lock while it writes (:mod:`paramsal.engine.lock`),
writes each part durably and lists it in the manifest only then, so that a
job killed at any point (SIGKILL included) and started again with the same
arguments ends with the same bytes as one that never stopped. A resume keeps
the run's identity and config, checks the finished parts against the data
set's labels, and profiles only the parts the run lacks.

Under ``torchrun`` (:mod:`paramsal.engine.distributed`) rank 0 holds the
lock and prepares the run, and the ranks share the missing parts. The device
never waits for the host: results are copied back while the next batch
computes, and parts are written by a thread (:mod:`paramsal.engine.writing`).
"""

from __future__ import annotations

import os
import platform
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from paramsal._io import writable_folder
from paramsal._typing import MapDataset
from paramsal._version import __version__
from paramsal.engine.devices import default_batch_size, default_workers, job_settings, resolve_device, writer_threads
from paramsal.engine.distributed import (Ranks, check_ranks_agree, check_ranks_share, current_ranks,
                                         rank_device)
from paramsal.engine.fingerprints import data_fingerprint, model_fingerprint
from paramsal.engine.lock import RunLock
from paramsal.engine.manifest import FORMAT, new_run_id, part_count, parts_of, read_manifest
from paramsal.engine.ownership import claim
from paramsal.engine.profile import Profiler
from paramsal.engine.resume import prepare_run
from paramsal.engine.rundir import Run
from paramsal.engine.units import UnitsSpec
from paramsal.engine.pipeline import profile_parts
from paramsal.engine.writing import finish_run, now
from paramsal.errors import InputError, ParamsalError, ParamsalWarning, check_choice
from paramsal.kernels.reduce import Aggregation
from paramsal.options import NONFINITE_POLICIES

#: How a user names another run directory, for messages.
OUT_OPTION = "--out DIR (out_dir= in Python)"
#: Rows per part aimed at when ``part_size`` is not given (rounded to whole batches).
DEFAULT_PART_ROWS = 2048
#: Under torchrun, parts are made smaller until each rank has at least this many: ranks share whole parts,
#: so with fewer the last ones would idle while one rank finishes a part more than the others.
PARTS_PER_RANK = 8


__all__ = ["DEFAULT_PART_ROWS", "data_fingerprint", "default_workers", "model_fingerprint", "profile_dataset"]


def profile_dataset(model: nn.Module, data: MapDataset, out_dir: str | os.PathLike, *, batch_size: int | None = None,
                    backend: str = "auto", units: UnitsSpec = "filters", aggregation: Aggregation = "mean_abs",
                    device: str | torch.device | None = None, num_workers: int | None = None,
                    features: bool | str = False, resume: bool = True, overwrite: bool = False,
                    repair: bool = False, on_nonfinite: str = "skip", progress: bool = True,
                    part_size: int | None = None, chunk_size: int | None = None, model_name: str | None = None,
                    data_name: str | None = None, source: dict[str, Any] | None = None,
                    shard: tuple[int, int] | None = None, precision: str = "float32",
                    channels_last: bool | None = None, target: str | int = "label", task: str = "classification",
                    deterministic: bool = False) -> Run:
    """Profiles every sample of a classification data set and writes a run directory.

    Each sample's raw profile (the gradient of its own cross-entropy loss,
    reduced to units; see :func:`paramsal.profile_batch`) is written with its
    prediction and confidences, and the per-unit statistics are streamed. A
    job that stops part-way can be started again with the same arguments: it
    profiles only the parts the run lacks, and the run ends with every sample
    exactly once, bit for bit as if it had never stopped.

    Inside an initialized ``torch.distributed`` process group (``torchrun``)
    every rank calls it with the same arguments: rank 0 prepares the run, each
    rank profiles a contiguous share of the parts still missing and lists them
    in the shared manifest, and rank 0 merges the statistics in part order,
    so the run is the one a single process makes with the same part size.

    Args:
        model: a trained classifier; moved to ``device`` and profiled in eval mode.
        data: a map-style data set of ``(input, class index)``.
        out_dir: the run directory (created if needed); one job at a time may write it.
        batch_size: samples per batch; default the run's own when it resumes one, else 256 on a GPU and 64 on
            the CPU (:data:`~paramsal.engine.devices.BATCH_SIZES`).
        backend: "auto", "hooks", "vmap" or "loop".
        units: see :func:`paramsal.units_of`.
        aggregation: "mean_abs" (the paper) or "abs_mean".
        device: where to compute; default CUDA when available (under
            torchrun the GPU ``LOCAL_RANK``), else CPU.
        num_workers: DataLoader worker processes; default :func:`~paramsal.engine.devices.default_workers`
            (every core but one per rank on a GPU machine, none on the CPU, where they would take the cores the
            computation uses).
        features: also record penultimate features (the input of the last
            ``nn.Linear``, or of the named module), for the feature-space baseline.
        resume: continue a run found in ``out_dir``; False starts over only with ``overwrite``.
        overwrite: replace a run in ``out_dir`` made with another model, data
            set or units (or any run, with ``resume=False``).
        repair: check every finished part's checksum, rows and ids, and profile the damaged or missing ones
            again (stray part files are removed).
        on_nonfinite: a sample whose loss or gradient is NaN/inf: "skip" keeps its row, flagged (``nonfinite``,
            ``nonfinite_param``), leaves it out of the statistics and warns at the end; "fail" stops, naming its
            dataset index.
        progress: show a progress bar (samples/s, time left; rank 0's share under torchrun).
        part_size: rows per Parquet part, a multiple of ``batch_size`` (default about 2,048, fewer where that
            leaves a rank under :data:`PARTS_PER_RANK` parts); a resumed run keeps its own.
        chunk_size: samples per chunk of per-sample work (memory bound).
        model_name, data_name: descriptions stored in the manifest.
        source: how to load the model and data again (the command line's specs: model, weights, num_classes,
            data, transform), stored in the manifest so that analyses can rebuild them from the run alone.
        precision: "float32", or "bf16"/"fp16": forward and backward under autocast, reductions and statistics
            in float32/float64 (see :class:`paramsal.Profiler`; the README states the error).
        channels_last: the model and the image batches in ``torch.channels_last`` (faster convolutions on GPUs);
            default the run's own when it resumes one, else on for a CUDA device (:class:`paramsal.Profiler`).
        deterministic: the same bits from every run on a GPU too: deterministic algorithms only, no cuDNN
            benchmarking (:func:`~paramsal.engine.devices.job_settings`); slower. On a CPU every run gives the
            same bits either way.
        target: the class each sample's loss is taken at (:class:`paramsal.Profiler`): "label", "predicted" or a
            class index; the run records the labels either way.
        task: "classification" (the default) or a sequence task (:mod:`paramsal.engine.tasks`: labels ``[T]``
            per sample; the sample table describes each sample's first labelled position).
        shard: ``(i, n)``: profile only the i-th of n contiguous shares of the
            parts (0 <= i < n), for machines that share no filesystem: each
            writes its own directory, and :func:`paramsal.engine.merge.merge_runs`
            (``paramsal merge``) makes them one run.

    Returns:
        The finished run, opened for reading.

    Raises:
        RunLockedError: another job is writing ``out_dir``.
        RunMismatchError: ``out_dir`` holds a run of another model, data set,
            units or numeric config (batch size, backend, device, ...).
        RunCorruptError: a finished part is damaged (``repair=True`` mends it).
    """
    ranks = current_ranks()
    root = Path(out_dir)
    device = rank_device(resolve_device(device), ranks)
    own = _resumed_config(root) if resume else {}
    if batch_size is None:
        batch_size = own.get("batch_size") or default_batch_size(device)
    channels_last = own.get("channels_last") if channels_last is None else channels_last
    _check_arguments(data, batch_size, num_workers, part_size, on_nonfinite, shard)
    model = model.to(device)
    profiler = Profiler(model, units=units, backend=backend, aggregation=aggregation, chunk_size=chunk_size,
                        features=features or None, precision=precision, channels_last=channels_last, target=target,
                        task=task)
    wanted = _manifest(model, data, profiler, backend, batch_size, _batches_per_part(part_size, batch_size,
                       len(data), ranks.world_size), chunk_size, device, model_name, data_name, ranks.world_size)
    wanted["config"]["deterministic"] = bool(deterministic)
    wanted["source"] = dict(source or {})
    check_ranks_agree(ranks, wanted)
    lock = RunLock(root, job=ranks.on_main(new_run_id))
    todo = ranks.on_main(lambda: _start(lock, root, wanted, data, profiler, resume, overwrite, repair,
                                        ranks.world_size, shard))
    try:
        error = None
        try:
            check_ranks_share(ranks, root, lock.job)
            manifest = read_manifest(root)
            assert manifest is not None  # rank 0 wrote it before anyone got here
            workers = default_workers(device) if num_workers is None else num_workers
            with job_settings(device, deterministic):
                profile_parts(root, manifest, ranks.share(todo), data, profiler, device, workers, on_nonfinite,
                              progress and ranks.is_main, writer_threads())
        except Exception as exc:  # the other ranks must hear of it before they wait for this one
            error = exc
        ranks.all_succeed(error)
        ranks.on_main(lambda: finish_run(root))
    finally:
        lock.release()
    run = Run(root)
    if ranks.is_main:
        _warn_nonfinite(run)
    return run


def _start(lock: RunLock, root: Path, wanted: dict[str, Any], data: MapDataset, profiler: Profiler, resume: bool,
           overwrite: bool, repair: bool, world_size: int, shard: tuple[int, int] | None) -> list[int]:
    """Rank 0: claims the folder and takes the run's lock for the whole job, prepares the run; returns the parts still
    to profile."""
    claim(root, OUT_OPTION)  # before anything is made there: no lock file in a folder that is not paramsal's
    writable_folder(root, OUT_OPTION)
    lock.acquire()
    try:
        manifest, notes = prepare_run(root, wanted, data, profiler, resume=resume, overwrite=overwrite,
                                      repair=repair)
    except BaseException:
        lock.release()
        raise
    finished = {p.index for p in parts_of(manifest)}
    wanted_parts = range(part_count(manifest)) if shard is None else Ranks(*shard).share(range(part_count(manifest)))
    todo = [i for i in wanted_parts if i not in finished]
    started_by = manifest["config"].get("world_size", 1)
    if todo and started_by != world_size:
        notes.append(f"the run was started by {started_by} rank(s); this job's {world_size} share its "
                     f"{len(todo)} remaining part(s)")
    for note in notes:
        warnings.warn(note, ParamsalWarning, stacklevel=4)
    return todo


def _resumed_config(root: Path) -> dict[str, Any]:
    """The config of the run a job would resume in ``root`` (what it keeps when the job names no value), or {}: a
    damaged manifest is the job's to report, once it holds the lock."""
    try:
        manifest = read_manifest(root)
    except ParamsalError:
        return {}
    return manifest["config"] if manifest is not None else {}


def _batches_per_part(part_size: int | None, batch_size: int, num_samples: int, world_size: int) -> int:
    rows = part_size or DEFAULT_PART_ROWS
    if part_size is None and world_size > 1:
        rows = min(rows, -(-num_samples // (PARTS_PER_RANK * world_size)))
    return max(1, rows // batch_size)


def _check_arguments(data: MapDataset, batch_size: int, num_workers: int | None, part_size: int | None,
                     on_nonfinite: str, shard: tuple[int, int] | None) -> None:
    for name, value, least in (("batch_size", batch_size, 1), ("num_workers", num_workers, 0),
                               ("part_size", part_size, 1)):
        if value is not None and (not isinstance(value, int) or value < least):
            raise InputError(f"{name} must be an integer >= {least}, got {value!r}")
    if shard is not None and not (len(shard) == 2 and 0 <= shard[0] < shard[1]):
        raise InputError(f"shard={shard!r}: expected (i, n) with 0 <= i < n (--shard I/N)")
    check_choice("on_nonfinite", on_nonfinite, NONFINITE_POLICIES)
    if len(data) == 0:
        raise InputError(f"the data set ({type(data).__name__}) is empty: there is nothing to profile")


def _warn_nonfinite(run: Run) -> None:
    if not any(part.nonfinite for part in run.parts):  # the manifest counts them: no part need be read again
        return
    skipped = run.nonfinite_ids()
    if len(skipped):
        shown = ", ".join(map(str, skipped[:10])) + (", ..." if len(skipped) > 10 else "")
        warnings.warn(f"{len(skipped)} sample(s) had a non-finite loss or gradient and were skipped: their rows "
                      f"in {run.path} are flagged (nonfinite, nonfinite_param) and left out of the statistics and "
                      f"of the analyses' default samples; ids {shown}", ParamsalWarning, stacklevel=3)


def _manifest(model: nn.Module, data: MapDataset, profiler: Profiler, backend: str, batch_size: int,
              batches_per_part: int, chunk_size: int | None, device: torch.device, model_name: str | None,
              data_name: str | None, world_size: int) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "created": now(),
        "updated": now(),
        "complete": False,
        "config": {"model": model_name or type(model).__name__, "data": data_name or type(data).__name__,
                   "units": profiler.index.scheme, "backend": backend, "batch_size": batch_size,
                   "batches_per_part": batches_per_part, "chunk_size": chunk_size, "device": device.type,
                   "dtype": str(next(iter(model.parameters())).dtype).removeprefix("torch."),
                   "features_module": profiler.features, "precision": profiler.precision,
                   "channels_last": profiler.channels_last, "target": profiler.target, "task": profiler.task,
                   "world_size": world_size},
        "aggregation": profiler.aggregation, "features": profiler.features is not None,
        "num_units": len(profiler.index), "num_samples": len(data),
        "model_fingerprint": model_fingerprint(model),
        "data_fingerprint": data_fingerprint(data),
        "units_fingerprint": profiler.index.fingerprint(),
        "versions": {"paramsal": __version__, "torch": torch.__version__, "numpy": np.__version__,
                     "python": platform.python_version()},
        "files": {},
        "parts": [],
    }
