"""Chunk sizes that bound the memory of per-sample work."""

from __future__ import annotations

from collections.abc import Iterator

#: Elements of per-sample intermediates (in the parameters' dtype) one chunk may
#: hold. 2**23 float32 elements are 32 MiB: small next to a batch's
#: activations, large enough that each matmul stays efficient.
DEFAULT_BUDGET = 2**23


def auto_chunk(per_sample_elements: int, batch: int, budget: int = DEFAULT_BUDGET) -> int:
    """Largest chunk (>= 1, <= batch) whose intermediates fit in ``budget`` elements."""
    return max(1, min(batch, budget // max(1, per_sample_elements)))


def chunk_slices(batch: int, chunk: int) -> Iterator[slice]:
    """Consecutive slices of ``range(batch)`` of length ``chunk`` (the last may be shorter)."""
    for start in range(0, batch, chunk):
        yield slice(start, min(batch, start + chunk))
