"""Jobs under ``torchrun``: which rank does what, and how the ranks agree, over torch.distributed.

paramsal has no scheduler of its own. Inside an initialized process group
(``torchrun`` sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and the
rendezvous; :func:`init_from_environment` joins it) every rank runs the same
job on a contiguous share of the work, and the ranks meet only where they
must: rank 0 prepares the run and the others wait for its verdict, and at the
end every rank learns whether any other failed. Coordination goes through a
gloo group of its own (objects on the CPU), whatever backend the user's group
uses for tensors, so the same code runs over NCCL on GPUs and gloo on CPUs.
"""

from __future__ import annotations

import datetime as _dt
import os
import pickle
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from paramsal.errors import EngineError, InputError, ParamsalError, RunMismatchError
from paramsal.rundir.lock import job_of
from paramsal.rundir.manifest import Manifest
from paramsal.rundir.matching import config_mismatches, mismatches

T = TypeVar("T")

#: How long a rank waits for the others at a meeting point: a shard may take hours on a slow rank.
MEETING_TIMEOUT = _dt.timedelta(hours=24)

_groups: dict[int, Any] = {}


@dataclass(frozen=True)
class Ranks:
    """This process's place among the ranks of a job (rank 0 of 1 outside torch.distributed)."""

    rank: int = 0
    world_size: int = 1
    group: Any = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def share(self, items: Sequence[T]) -> list[T]:
        """This rank's contiguous share of ``items``: sizes differ by at most one, rank order follows item order."""
        size, extra = divmod(len(items), self.world_size)
        start = self.rank * size + min(self.rank, extra)
        return list(items[start:start + size + (self.rank < extra)])

    def on_main(self, work: Callable[[], T]) -> T:
        """Runs ``work`` on rank 0 only; every rank returns its result, or raises the error it raised."""
        if self.world_size == 1:
            return work()
        outcome: list[Any] = [None]
        if self.is_main:
            try:
                outcome[0] = (True, work())
            except Exception as exc:  # every rank must learn of it, or the others would wait forever
                outcome[0] = (False, _portable(exc))
        dist.broadcast_object_list(outcome, src=0, group=self.group)
        succeeded, value = outcome[0]
        if not succeeded:
            raise value
        return value

    def gather(self, value: T) -> list[T]:
        """Every rank's ``value``, in rank order, on every rank (picklable objects)."""
        if self.world_size == 1:
            return [value]
        values: list[Any] = [None] * self.world_size
        dist.all_gather_object(values, value, group=self.group)
        return values

    def gather_columns(self, columns: dict[str, list[Any]]) -> dict[str, list[Any]]:
        """Every rank's ``{name: [values...]}`` joined, lists in rank order (on every rank)."""
        joined: dict[str, list[Any]] = {}
        for rank_columns in self.gather(columns):
            for name, values in rank_columns.items():
                joined.setdefault(name, []).extend(values)
        return joined

    def all_succeed(self, error: BaseException | None) -> None:
        """Meets every rank; raises on each the first error any rank had (``error`` is this rank's, or None)."""
        if self.world_size == 1:
            if error is not None:
                raise error
            return
        errors: list[Any] = [None] * self.world_size
        dist.all_gather_object(errors, None if error is None else _portable(error), group=self.group)
        if error is not None:
            raise error
        for rank, other in enumerate(errors):
            if other is not None:
                raise type(other)(f"rank {rank} of {self.world_size} failed: {other}") if isinstance(
                    other, ParamsalError) else EngineError(f"rank {rank} of {self.world_size} failed: {other!r}")


def check_ranks_agree(ranks: Ranks, planned: Manifest) -> None:
    """Every rank has the model, data, units and settings rank 0 has: ranks that differ would mix their rows."""
    if ranks.world_size == 1:
        return
    everyone = ranks.gather(planned)
    for rank, theirs in enumerate(everyone):
        differ = mismatches(everyone[0], theirs) + config_mismatches(everyone[0], theirs)
        if differ:
            raise RunMismatchError(f"rank {rank} of {ranks.world_size} has another {', '.join(differ)} than rank 0: "
                                   "every rank must profile the same model and data with the same settings")


def check_ranks_share(ranks: Ranks, root: Path, job: str | None) -> None:
    """Every rank sees the run directory rank 0 prepared (its lock holds this job's token): ranks on machines that
    share no filesystem would each write a run of their own, or list their parts in another job's run."""
    if ranks.world_size == 1:
        return
    blind = [rank for rank, sees in enumerate(ranks.gather(job_of(root) == job)) if not sees]
    if blind:
        problem = (f"rank(s) {', '.join(map(str, blind))} of {ranks.world_size} do not see the run directory "
                   f"{root} that rank 0 prepared: the ranks of one torchrun job must share it (one filesystem)")
        raise InputError(f"{problem}; on machines without one, profile each machine's share into a folder of its own "
                         "(shard=(i, n)) and join them with paramsal.rundir.merge.merge_runs",
                         command_line=f"{problem}; on machines without one, profile each machine's share into a "
                                      "folder of its own with --shard I/N and join them with `paramsal merge`")


def rank_device(device: torch.device, ranks: Ranks) -> torch.device:
    """Under torchrun, a bare "cuda" (or the default) means this rank's own GPU, ``cuda:LOCAL_RANK``."""
    if device.type == "cuda" and device.index is None and ranks.world_size > 1:
        return torch.device("cuda", local_rank())
    return device


def current_ranks() -> Ranks:
    """The ranks of the initialized default process group (one rank when there is none)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return Ranks()
    world = dist.get_world_size()
    key = id(dist.group.WORLD)
    if key not in _groups:
        # Every rank creates it at the same call, as new_group requires.
        _groups[key] = dist.new_group(backend="gloo", timeout=MEETING_TIMEOUT)
    return Ranks(dist.get_rank(), world, _groups[key])


def is_main_process() -> bool:
    """Rank 0 of the initialized process group, or a process outside one (no meeting: safe to call anywhere)."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def init_from_environment() -> bool:
    """Joins the process group ``torchrun`` describes in the environment; True when this process did.

    NCCL when CUDA is available (each rank on the GPU ``LOCAL_RANK``), gloo
    otherwise. Nothing happens outside torchrun (no ``WORLD_SIZE`` above 1) or
    when the caller initialized a group already.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not dist.is_available() or dist.is_initialized():
        return False
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank())
        dist.init_process_group("nccl", timeout=MEETING_TIMEOUT)
    else:
        dist.init_process_group("gloo", timeout=MEETING_TIMEOUT)
    return True


def local_rank() -> int:
    """This process's rank on its own machine (``LOCAL_RANK``), 0 outside torchrun."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def local_world_size() -> int:
    """Ranks on this machine (``LOCAL_WORLD_SIZE``), 1 outside torchrun: they share its CPUs and GPUs."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


def leave() -> None:
    """Leaves the process group (after :func:`init_from_environment`)."""
    _groups.clear()
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _portable(exc: BaseException) -> BaseException:
    """``exc`` if it survives pickling to another rank, else an :class:`EngineError` with its text."""
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:
        return EngineError(f"{type(exc).__name__}: {exc}")


__all__ = ["Ranks", "check_ranks_agree", "check_ranks_share", "current_ranks", "init_from_environment",
           "is_main_process", "leave", "local_rank", "local_world_size", "rank_device"]
