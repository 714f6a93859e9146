"""What a bulk job sets up on its machine: the defaults that suit the device (batch size, DataLoader workers, writer
threads), the backend settings of the job, and the copies between host and device that must hold neither up."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

import torch

from paramsal.jobs.distributed import local_world_size

#: Samples per batch when none is asked for: a GPU stays busy only with large batches (the host's own work per
#: batch, about 20 ms, is the same for any size), a CPU gains nothing from them.
BATCH_SIZES = {"cuda": 256, "cpu": 64}
#: What cuBLAS needs to be deterministic (its documented setting), set for a ``deterministic`` job.
CUBLAS_DETERMINISTIC = ":4096:8"



def default_batch_size(device: torch.device) -> int:
    """:data:`BATCH_SIZES` for the device's type."""
    return BATCH_SIZES["cuda" if device.type == "cuda" else "cpu"]


def default_workers(device: torch.device) -> int:
    """DataLoader workers when none are asked for: on a GPU, every core of this machine but one per rank (its main
    process), shared by the ranks on it (``LOCAL_WORLD_SIZE``); none on a CPU, where workers would take the cores
    the computation uses."""
    if device.type != "cuda":
        return 0
    return max(1, (os.cpu_count() or 1) // local_world_size() - 1)


def writer_threads() -> int:
    """Threads that write a job's parts: one per four of this rank's cores, at least one, at most four (each holds
    a part in memory; Parquet, sha256 and the file writes release the GIL, so they run side by side)."""
    return max(1, min(4, (os.cpu_count() or 1) // local_world_size() // 4))


@contextmanager
def job_settings(device: torch.device, deterministic: bool) -> Iterator[None]:
    """The backend settings of one profiling job, each restored afterwards.

    On CUDA the job's device is made current, so that its streams and events
    are those of the device its tensors live on (a job on ``cuda:1`` would
    otherwise record its events on ``cuda:0``'s stream). cuDNN benchmarks its
    algorithms per shape unless ``deterministic``, which instead asks torch
    for deterministic algorithms only (``torch.use_deterministic_algorithms``,
    cuDNN's deterministic mode, cuBLAS's workspace setting: set it in the
    environment before the process first uses cuBLAS, as ``paramsal profile
    --deterministic`` does, or cuBLAS keeps the workspace it started with).
    """
    with ExitStack() as stack:
        if device.type == "cuda":
            stack.enter_context(torch.cuda.device(device))
            _set(stack, torch.backends.cudnn, "benchmark", not deterministic)
            if deterministic:
                _set(stack, torch.backends.cudnn, "deterministic", True)
        if deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_DETERMINISTIC)
            before = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
            torch.use_deterministic_algorithms(True)
            stack.callback(lambda: torch.use_deterministic_algorithms(before[0], warn_only=before[1]))
        yield


def _set(stack: ExitStack, owner: object, name: str, value: object) -> None:
    """Sets ``owner.name`` until the stack closes."""
    before = getattr(owner, name)
    setattr(owner, name, value)
    stack.callback(setattr, owner, name, before)


class DeviceFeed:
    """Copies between the host and the job's device that hold neither up.

    On CUDA, a batch's inputs go over on a stream of their own, so the copy
    of the next batch overlaps the computation of this one (the compute stream
    waits for the copy, and no more); results come back into pinned memory on
    the compute stream, with an event recorded on that device's stream after
    them, which :meth:`wait` waits for before the host reads them. On a CPU
    every method hands its tensors back as they are.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self._copies = torch.cuda.Stream(device) if device.type == "cuda" else None

    def to_device(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` on the device, its copy ordered before the compute stream's next work (pinned memory: async)."""
        if self._copies is None:
            return tensor
        compute = torch.cuda.current_stream(self.device)
        with torch.cuda.stream(self._copies):
            moved = tensor.to(self.device, non_blocking=True)
        compute.wait_stream(self._copies)
        moved.record_stream(compute)  # the allocator must not reuse it while compute still reads it
        return moved

    def to_host(self, tensor: torch.Tensor) -> torch.Tensor:
        """A copy on the host that the device makes in the background; read it only after :meth:`sent`'s event."""
        return tensor.detach().to("cpu", non_blocking=True)

    def sent(self) -> torch.cuda.Event | None:
        """An event after every copy to the host queued so far on the device's compute stream (None on a CPU)."""
        if self._copies is None:
            return None
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.device))
        return event


__all__ = ["BATCH_SIZES", "CUBLAS_DETERMINISTIC", "DeviceFeed", "default_batch_size", "default_workers",
           "job_settings", "writer_threads"]
