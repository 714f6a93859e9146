"""The loop of a bulk job: batches from the DataLoader through the Profiler on the device, results back to the host,
parts to the writers, so that the device never waits for the host.

Per batch the host only queues work: the inputs go to the device on a copy
stream of their own, the Profiler runs, the rows' finiteness and the float64
moments of the finite rows are computed on the device (:func:`device_moments`),
and every result is copied back into pinned memory behind an event. The batch
is looked at one batch later, once that event has passed, while the device
computes the next one; a part is handed to the writer threads
(:mod:`paramsal.rundir.writing`) as soon as its last batch lands. On a CPU the
same loop runs with nothing to overlap, and the writers compute the moments.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from paramsal._typing import MapDataset
from paramsal.engine.backends import BatchResult
from paramsal.engine.profile import LOSS_FLAG, Profiler
from paramsal.engine.tasks import first_labelled, is_sequence_task, sample_labels
from paramsal.errors import NonFiniteError
from paramsal.jobs.hardware import DeviceFeed
from paramsal.jobs.loading import BadBatch, Indexed, collate_samples
from paramsal.rundir.manifest import Manifest
from paramsal.rundir.writing import LandedBatch, PartBuffer, PartWriter

#: Batches the DataLoader's workers prepare ahead of the one being profiled, per worker.
PREFETCH = 4

#: The greedy answers' tokens of a batch where the loss was taken at them (task "answer", target "predicted").
Said = list[list[int]]
#: What judges a batch where the task judges samples otherwise (task "answer"):
#: ``(sample_ids, losses, said or None) -> {column: [b] values}``, ``correct`` and the answer columns
#: (:func:`paramsal.jobs.bulk.answer_judge`).
Judge = Callable[[np.ndarray, np.ndarray, Said | None], Mapping[str, np.ndarray]]
#: What makes a batch's samples of task "answer" with target "predicted": ``sample_ids -> (inputs, labels, said)``,
#: each question followed by the model's own greedy answer (:func:`paramsal.jobs.bulk.predicted_answers`).
Relabel = Callable[[np.ndarray], tuple[torch.Tensor, torch.Tensor, Said]]


def profile_parts(root: Any, manifest: Manifest, parts: list[int], data: MapDataset, profiler: Profiler,
                  device: torch.device, num_workers: int, on_nonfinite: str, progress: bool,
                  writer_threads: int = 1, judge: Judge | None = None, relabel: Relabel | None = None) -> None:
    """Profiles the given parts, batch by batch, and lists each in the manifest once it is written.

    Args:
        root: the run directory (prepared, its lock held).
        manifest: its manifest (part layout, batch size, aggregation).
        parts: the part indices this process profiles.
        num_workers: DataLoader worker processes.
        on_nonfinite: "skip" or "fail" (:func:`~paramsal.jobs.bulk.profile_dataset`).
        writer_threads: parts written side by side.
        judge: where the task judges a sample other than by the argmax at its first labelled position (task
            "answer": the greedy answer), the :data:`Judge` of the sample table's columns.
        relabel: where the loss is not the data set's labels' (task "answer", target "predicted"), what makes
            each batch's samples (:data:`Relabel`); the sample table keeps the data set's labels.
    """
    batch_size = manifest.config.batch_size
    batches = [list(range(s, min(s + batch_size, stop))) for i in parts
               for start, stop in [manifest.part_range(i)] for s in range(start, stop, batch_size)]
    loader = DataLoader(Indexed(data), batch_sampler=batches, num_workers=num_workers,
                        collate_fn=collate_samples, pin_memory=device.type == "cuda",
                        prefetch_factor=PREFETCH if num_workers else None)
    bar = tqdm(total=sum(len(b) for b in batches), unit="samples", disable=not progress, desc="profiling",
               dynamic_ncols=True)
    feed = DeviceFeed(device)
    parts_out = _Parts(root, manifest, profiler, on_nonfinite, writer_threads, judge)
    in_flight: _InFlight | None = None
    try:
        for batch in loader:
            try:
                if isinstance(batch, BadBatch):
                    raise batch.error()
                ids, inputs, targets = batch
                launched = _InFlight.launch(profiler, feed, ids, inputs, targets, relabel)
            except BaseException:
                if in_flight is not None:  # what was computed before the error is kept
                    parts_out.land(in_flight)
                raise
            if in_flight is not None:
                bar.update(parts_out.land(in_flight))
            in_flight = launched
        if in_flight is not None:
            bar.update(parts_out.land(in_flight))
    finally:
        bar.close()
        parts_out.close()


class _Parts:
    """Landed batches gathered into parts; each part, once whole, goes to the writers."""

    def __init__(self, root: Any, manifest: Manifest, profiler: Profiler, on_nonfinite: str, threads: int,
                 judge: Judge | None):
        self.manifest, self.profiler, self.on_nonfinite, self.judge = manifest, profiler, on_nonfinite, judge
        self.writer = PartWriter(root, manifest.aggregation, len(profiler.index), threads)
        self.buffer: PartBuffer | None = None

    def land(self, batch: _InFlight) -> int:
        """Adds a batch's results (writing its part when whole); returns its number of samples."""
        if self.buffer is None:
            self.buffer = PartBuffer(int(batch.ids[0]) // self.manifest.rows_per_part)
        landed = batch.land(self.profiler, self.on_nonfinite)
        if self.judge is not None:
            landed.judged = self.judge(landed.ids, landed.losses, batch.said)
        self.buffer.add(landed)
        if self.buffer.stop == self.manifest.part_range(self.buffer.index)[1]:
            self.writer.write(self.buffer, self.profiler.backend)
            self.buffer = None
        return len(batch.ids)

    def close(self) -> None:
        self.writer.close()


class _InFlight:
    """A batch whose results are on their way to the host: launched now, looked at one batch later."""

    def __init__(self, ids: torch.Tensor, inputs: torch.Tensor, targets: torch.Tensor, result: BatchResult,
                 feed: DeviceFeed, labels: torch.Tensor, said: Said | None):
        """``targets``: what the loss was taken at; ``labels``: ``[b]`` what the sample table records."""
        self.ids, self.inputs, self.targets, self.labels, self.said = ids, inputs, targets, labels, said
        on_device = result.profiles.is_cuda
        # rows whose profile sums and losses are finite: a screen (a sum may overflow), looked into on the host
        screen = torch.isfinite(result.profiles.sum(1)) & torch.isfinite(result.losses)
        moments = device_moments(result.profiles, screen) if on_device else None
        self.screen = feed.to_host(screen)
        self.moments = None if moments is None else tuple(feed.to_host(m) for m in moments)
        self.result = BatchResult(feed.to_host(result.profiles), feed.to_host(result.outputs),
                                  feed.to_host(result.losses),
                                  None if result.features is None else feed.to_host(result.features))
        self.sent = feed.sent()

    @classmethod
    def launch(cls, profiler: Profiler, feed: DeviceFeed, ids: torch.Tensor, inputs: torch.Tensor,
               targets: torch.Tensor, relabel: Relabel | None = None) -> _InFlight:
        """Queues the batch's copy and profiling; the targets stay on the host (the labels are checked there, and
        the Profiler copies them without a sync). With ``relabel``, the batch's samples are the ones it makes,
        and the table keeps the data set's labels."""
        labels, said = sample_labels(targets, profiler.task), None
        if relabel is not None:
            inputs, targets, said = relabel(ids.numpy())
        inputs = feed.to_device(inputs)
        return cls(ids, inputs, targets, _profiled(profiler, inputs, targets, check_finite=False), feed, labels,
                   said)

    def land(self, profiler: Profiler, on_nonfinite: str) -> LandedBatch:
        """The batch's results on the host, each sample flagged where its loss or gradient was not finite."""
        if self.sent is not None:
            self.sent.synchronize()
        flags = profiler.nonfinite(self.result, suspects=~self.screen)
        moments = None
        if self.moments is not None and all(flag is None for flag in flags) and bool(self.screen.all()):
            count, mean, m2 = self.moments
            moments = int(count), mean.numpy(), m2.numpy()
        result = _checked_finite(profiler, self.ids, self.inputs, self.targets, self.result, flags, on_nonfinite)
        return LandedBatch(self.ids.numpy(), self.labels.numpy(),
                           result.outputs.float().numpy(), result.losses.float().numpy(),
                           result.profiles.float().numpy(),  # float32 already: views, not copies
                           None if result.features is None else result.features.float().numpy(), flags, moments)


def device_moments(profiles: torch.Tensor, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two-pass float64 moments of the rows ``keep [N]`` selects of ``profiles [N, F]``, on their device and without
    a sync (no selection: rows not kept, NaN and inf included, contribute zeros): ``(count, mean [F], m2 [F])``,
    what :func:`paramsal.ranking.stats.finite_moments` gives on the host."""
    count, rows = keep.sum(), keep[:, None]
    values = torch.where(rows, profiles.double(), 0.0)
    mean = values.sum(0) / count.clamp_min(1)
    return count, mean, torch.where(rows, values - mean, 0.0).square_().sum(0)


def _profiled(profiler: Profiler, inputs: torch.Tensor, targets: torch.Tensor, check_finite: bool) -> BatchResult:
    """A batch's results with the logits the sample table describes: a sequence's at its first labelled position,
    taken on the device (a language model's ``[N, T, vocabulary]`` outputs never travel to the host)."""
    result = profiler(inputs, targets, check_finite=check_finite)
    if is_sequence_task(profiler.task):  # a classifier's are the table's already: no copy of its labels
        labels = targets.to(result.outputs.device, non_blocking=True)
        result.outputs = first_labelled(result.outputs, labels, profiler.task)[0]
    return result


def _checked_finite(profiler: Profiler, ids: torch.Tensor, inputs: torch.Tensor, targets: torch.Tensor,
                    result: BatchResult, flags: list[str | None], on_nonfinite: str) -> BatchResult:
    """A batch's results (on the host), its samples with a finite loss and gradient profiled again without the
    others where some were not, so that no kernel that works on several samples at once can carry a NaN into
    theirs (their moments are then the writer's to compute)."""
    bad = [row for row, flag in enumerate(flags) if flag is not None]
    if not bad:
        return result
    if on_nonfinite == "fail":
        row = bad[0]
        raise NonFiniteError(
            f"sample {int(ids[row])} (dataset index) has a non-finite loss or gradient "
            f"({'loss ' + str(float(result.losses[row])) if flags[row] == LOSS_FLAG else 'in ' + repr(flags[row])}); "
            "on_nonfinite='skip' (the default) flags such samples and goes on")
    good = torch.tensor([flag is None for flag in flags])
    if good.any():
        clean = _profiled(profiler, inputs[good.to(inputs.device)], targets[good], check_finite=True)
        result.profiles[good] = clean.profiles.cpu()
        result.outputs[good] = clean.outputs.cpu()
        result.losses[good] = clean.losses.cpu()
        if result.features is not None and clean.features is not None:
            result.features[good] = clean.features.cpu()
    return result


__all__ = ["profile_parts"]
