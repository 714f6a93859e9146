"""Bulk profiling: a whole data set through the engine into a resumable, checked run directory.

A job holds the run's lock while it writes (:mod:`paramsal.rundir.lock`),
writes each part durably and lists it in the manifest only then, so that a
job killed at any point (SIGKILL included) and started again with the same
arguments ends with the same bytes as one that never stopped. A resume keeps
the run's identity and config, checks the finished parts against the data
set's labels, and profiles only the parts the run lacks.

Under ``torchrun`` (:mod:`paramsal.jobs.distributed`) rank 0 holds the
lock and prepares the run, and the ranks share the missing parts. The device
never waits for the host: results are copied back while the next batch
computes, and parts are written by a thread (:mod:`paramsal.rundir.writing`).
"""

from __future__ import annotations

import dataclasses
import os
import platform
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Subset

from paramsal._io import writable_folder
from paramsal._typing import MapDataset
from paramsal._version import __version__
from paramsal.config import JobOptions, ProfileOptions, configured, split_options
from paramsal.engine.devices import resolve_device
from paramsal.engine.profile import Profiler
from paramsal.errors import InputError, ParamsalError, ParamsalWarning
from paramsal.jobs.distributed import Ranks, check_ranks_agree, check_ranks_share, current_ranks, rank_device
from paramsal.jobs.fingerprints import data_fingerprint, dataset_labels, model_fingerprint
from paramsal.jobs.hardware import default_batch_size, default_workers, job_settings, writer_threads
from paramsal.jobs.pipeline import Judge, Relabel, Said, profile_parts
from paramsal.rundir.integrity import units_table
from paramsal.rundir.lock import RunLock
from paramsal.rundir.manifest import Manifest, RunConfig, Source, new_run_id, read_manifest
from paramsal.rundir.ownership import claim
from paramsal.rundir.resume import prepare_run
from paramsal.rundir.run import Run
from paramsal.rundir.writing import finish_run, now

#: The argument that names the run directory, for messages.
OUT_OPTION = "out_dir"
#: Rows per part aimed at when ``part_size`` is not given (rounded to whole batches).
DEFAULT_PART_ROWS = 2048
#: Under torchrun, parts are made smaller until each rank has at least this many: ranks share whole parts,
#: so with fewer the last ones would idle while one rank finishes a part more than the others.
PARTS_PER_RANK = 8


__all__ = ["DEFAULT_PART_ROWS", "data_fingerprint", "default_workers", "model_fingerprint", "profile_dataset"]


def profile_dataset(model: nn.Module, data: MapDataset, out_dir: str | os.PathLike,
                    options: ProfileOptions | None = None, job: JobOptions | None = None, **overrides: Any) -> Run:
    """Profiles every sample of a data set and writes a run directory.

    Each sample's raw profile (the gradient of its own loss, reduced to
    units: see :class:`paramsal.Profiler`) is written with its prediction and
    confidences, and the per-unit statistics are streamed. A job that stops
    part-way can be started again with the same arguments: it profiles only
    the parts the run lacks, and the run ends with every sample exactly once,
    bit for bit as if it had never stopped.

    Inside an initialized ``torch.distributed`` process group (``torchrun``)
    every rank calls it with the same arguments: rank 0 prepares the run, each
    rank profiles a contiguous share of the parts still missing and lists them
    in the shared manifest, and rank 0 merges the statistics in part order,
    so the run is the one a single process makes with the same part size.

    Args:
        model: the trained network; moved to the job's device and profiled in eval mode.
        data: a map-style data set of ``(input, label)``: a class index for classification, ``[T]`` labels
            per position for a sequence task (``task=``).
        out_dir: the run directory (created if needed); one job at a time may write it.
        options: how each sample is profiled (:class:`~paramsal.config.ProfileOptions`).
        job: how the job runs (:class:`~paramsal.config.JobOptions`: batch size, device, workers, resume,
            repair, shards, ...).
        **overrides: any field of either by name, set over ``options`` and ``job``.

    Returns:
        The finished run, opened for reading.

    Raises:
        RunLockedError: another job is writing ``out_dir``.
        RunMismatchError: ``out_dir`` holds a run of another model, data set,
            units or numeric config (batch size, backend, device, ...).
        RunCorruptError: a finished part is damaged (``repair=True`` mends it).

    Examples:
        >>> import tempfile, torch, paramsal
        >>> from torch.utils.data import TensorDataset
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
        >>> data = TensorDataset(torch.randn(40, 4), torch.arange(40) % 3)
        >>> run = paramsal.profile_dataset(model, data, tempfile.mkdtemp(), units="linear-rows", batch_size=8,
        ...                                progress=False)
        >>> run.num_samples, run.num_units, run.complete
        (40, 11, True)
    """
    given, given_job = split_options(overrides, ProfileOptions, JobOptions, where="profile_dataset")
    options = configured(ProfileOptions, options, given, where="profile_dataset")
    job = configured(JobOptions, job, given_job, where="profile_dataset")
    if len(data) == 0:
        raise InputError(f"the data set ({type(data).__name__}) is empty: there is nothing to profile")
    ranks = current_ranks()
    root = Path(out_dir)
    device = rank_device(resolve_device(job.device), ranks)
    own = _resumed_config(root) if job.resume else {}
    batch_size = job.batch_size or own.get("batch_size") or default_batch_size(device)
    if options.channels_last is None and "channels_last" in own:
        options = dataclasses.replace(options, channels_last=own["channels_last"])
    model = model.to(device)
    relabel = predicted_answers(model, data) if options.task == "answer" and options.target == "predicted" else None
    # the model's own answers are the labels relabel makes: the profiler takes the loss at its labels
    profiler = Profiler(model, options if relabel is None else dataclasses.replace(options, target="label"))
    judge = answer_judge(model, data) if options.task == "answer" else None
    planned = _manifest(model, data, profiler, job, batch_size, device, ranks.world_size, options.target)
    check_ranks_agree(ranks, planned)
    lock = RunLock(root, job=ranks.on_main(new_run_id))
    missing = ranks.on_main(lambda: _prepare(lock, root, planned, data, profiler, job, ranks.world_size))
    try:
        error = None
        try:
            check_ranks_share(ranks, root, lock.job)
            manifest = read_manifest(root)
            assert manifest is not None  # rank 0 wrote it before anyone got here
            workers = default_workers(device) if job.num_workers is None else job.num_workers
            with job_settings(device, job.deterministic):
                profile_parts(root, manifest, ranks.share(missing), data, profiler, device, workers,
                              job.on_nonfinite, job.progress and ranks.is_main, writer_threads(), judge, relabel)
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


def answer_judge(model: nn.Module, data: MapDataset) -> Judge:
    """What task "answer" records of each sample: the data set's judgement of the model's greedy answer and the
    columns that go with it (``data.sample_columns(model, ids, losses, said)``,
    :meth:`paramsal.zoo.qa.QADataset.sample_columns`), through a ``--limit``'s subset too."""
    columns = _qa_method(data, "sample_columns", "judges each sample's greedy answer against a reference answer")

    def judge(ids: np.ndarray, losses: np.ndarray, said: Said | None = None) -> Mapping[str, np.ndarray]:
        return columns(model, ids, losses, said)
    return judge


def predicted_answers(model: nn.Module, data: MapDataset) -> Relabel:
    """The samples of task "answer" with target "predicted": each question followed by the model's own greedy
    answer (``data.predicted(model, ids)``, :meth:`paramsal.zoo.qa.QADataset.predicted`)."""
    predicted = _qa_method(data, "predicted", "takes the loss at each sample's greedy answer")
    return lambda ids: predicted(model, ids)


def _qa_method(data: MapDataset, name: str, what: str) -> Callable[..., Any]:
    """``data``'s method ``name`` as ``method(model, ids, ...)``; through a ``Subset`` (``--limit``), whose ids are
    positions in it, with the ids mapped to the data set's own."""
    method = getattr(data, name, None)
    if method is None and isinstance(data, Subset) and hasattr(data.dataset, name):
        inner, indices = getattr(data.dataset, name), np.asarray(data.indices)
        method = lambda model, ids, *rest: inner(model, indices[ids], *rest)  # noqa: E731
    if method is None:
        raise InputError(f"task 'answer' {what}, which {type(data).__name__} does not give (it has no "
                         f"{name}(model, ids, ...)); use qa:FILE.jsonl data (paramsal.zoo.qa.QADataset), or task "
                         "'causal-lm'")
    return method


def _prepare(lock: RunLock, root: Path, planned: Manifest, data: MapDataset, profiler: Profiler, job: JobOptions,
             world_size: int) -> list[int]:
    """Rank 0: claims the folder, takes the run's lock for the whole job and prepares the run (``planned`` is the
    manifest this job would start); returns the parts still to profile."""
    claim(root, OUT_OPTION)  # before anything is made there: no lock file in a folder that is not paramsal's
    writable_folder(root, OUT_OPTION)
    lock.acquire()
    try:
        manifest, notes = prepare_run(root, planned, units_table(profiler.index.columns()), dataset_labels(data),
                                      resume=job.resume, overwrite=job.overwrite, repair=job.repair)
    except BaseException:
        lock.release()
        raise
    finished = {p.index for p in manifest.parts}
    parts = range(manifest.part_count)
    missing = [i for i in (parts if job.shard is None else Ranks(*job.shard).share(parts)) if i not in finished]
    started_by = manifest.config.world_size
    if missing and started_by != world_size:
        notes.append(f"the run was started by {started_by} rank(s); this job's {world_size} share its "
                     f"{len(missing)} remaining part(s)")
    for note in notes:
        warnings.warn(note, ParamsalWarning, stacklevel=4)
    return missing


def _resumed_config(root: Path) -> dict[str, Any]:
    """The config of the run a job would resume in ``root`` (what it keeps when the job names no value), or {}: a
    damaged manifest is the job's to report, once it holds the lock."""
    try:
        manifest = read_manifest(root)
    except ParamsalError:
        return {}
    return dataclasses.asdict(manifest.config) if manifest is not None else {}


def _batches_per_part(part_size: int | None, batch_size: int, num_samples: int, world_size: int) -> int:
    rows = part_size or DEFAULT_PART_ROWS
    if part_size is None and world_size > 1:
        rows = min(rows, -(-num_samples // (PARTS_PER_RANK * world_size)))
    return max(1, rows // batch_size)


def _warn_nonfinite(run: Run) -> None:
    if not any(part.nonfinite for part in run.parts):  # the manifest counts them: no part need be read again
        return
    skipped = run.nonfinite_ids()
    if len(skipped):
        shown = ", ".join(map(str, skipped[:10])) + (", ..." if len(skipped) > 10 else "")
        warnings.warn(f"{len(skipped)} sample(s) had a non-finite loss or gradient and were skipped: their rows "
                      f"in {run.path} are flagged (nonfinite, nonfinite_param) and left out of the statistics and "
                      f"of the analyses' default samples; ids {shown}", ParamsalWarning, stacklevel=3)


def _manifest(model: nn.Module, data: MapDataset, profiler: Profiler, job: JobOptions, batch_size: int,
              device: torch.device, world_size: int, target: str | int) -> Manifest:
    """The manifest this job starts a run with (a resume checks it against the run's own); ``target`` is the job's
    (the profiler's differs where the job makes the labels: task "answer", target "predicted")."""
    batches_per_part = _batches_per_part(job.part_size, batch_size, len(data), world_size)
    options = profiler.options
    config = RunConfig(batch_size, batches_per_part, model=job.model_name or type(model).__name__,
                       data=job.data_name or type(data).__name__, units=profiler.index.scheme,
                       backend=options.backend, chunk_size=options.chunk_size, device=device.type,
                       dtype=str(next(iter(model.parameters())).dtype).removeprefix("torch."),
                       features_module=profiler.features, precision=profiler.precision,
                       channels_last=profiler.channels_last, target=target, task=profiler.task,
                       world_size=world_size, deterministic=job.deterministic)
    return Manifest(config, num_samples=len(data), num_units=len(profiler.index), aggregation=profiler.aggregation,
                    features=profiler.features is not None, created=now(), updated=now(),
                    model_fingerprint=model_fingerprint(model), data_fingerprint=data_fingerprint(data),
                    units_fingerprint=profiler.index.fingerprint(), source=Source(**(job.source or {})),
                    versions={"paramsal": __version__, "torch": torch.__version__, "numpy": np.__version__,
                              "python": platform.python_version()})
