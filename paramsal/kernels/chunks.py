"""Chunk sizes that bound the memory of per-sample work."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Literal

import torch

#: Elements of a reducer's per-sample intermediates one chunk may hold on a
#: CPU. 2**23 float32 elements are 32 MiB: small next to a batch's activations,
#: large enough that each matmul stays efficient; larger chunks measured no
#: faster on CPU, so the host's memory size does not change it.
DEFAULT_BUDGET = 2**23

#: How much more a vmap chunk may hold than a reducer's: it keeps its samples'
#: activations and whole gradients, and fewer, larger chunks amortize vmap's
#: per-call overhead.
VMAP_FACTOR = 16

#: Shares of a GPU's memory one chunk may take. They scale with the card's
#: total memory, not its free memory, so a card always picks the same chunks
#: and a resumed run computes exactly what an uninterrupted one would.
GPU_SHARE = {"reducer": 1 / 32, "vmap": 1 / 4}

Kind = Literal["reducer", "vmap"]


def memory_budget(like: torch.Tensor, kind: Kind = "reducer") -> int:
    """Elements one chunk may hold for work on ``like``'s device and dtype."""
    if like.is_cuda:
        total = torch.cuda.get_device_properties(like.device).total_memory
        return max(DEFAULT_BUDGET, int(total * GPU_SHARE[kind]) // like.element_size())
    return DEFAULT_BUDGET * (VMAP_FACTOR if kind == "vmap" else 1)


def auto_chunk(per_sample_elements: int, batch: int, like: torch.Tensor, kind: Kind = "reducer") -> int:
    """Largest chunk (>= 1, <= batch) whose intermediates fit in :func:`memory_budget`."""
    return max(1, min(batch, memory_budget(like, kind) // max(1, per_sample_elements)))


def chunk_slices(batch: int, chunk: int) -> Iterator[slice]:
    """Consecutive slices of ``range(batch)`` of length ``chunk`` (the last may be shorter)."""
    for start in range(0, batch, chunk):
        yield slice(start, min(batch, start + chunk))
