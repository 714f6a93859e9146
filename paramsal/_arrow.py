"""The one Arrow layout of a vector per row (a profile, a feature vector, a tail's levels): a fixed-size list."""

from __future__ import annotations

import numpy as np
import pyarrow as pa


def fixed_size_list(values: np.ndarray) -> pa.FixedSizeListArray:
    """``[n, w]`` values as ``n`` float32 lists of ``w`` (no copy when they are float32 and contiguous already)."""
    values = np.ascontiguousarray(values, dtype=np.float32)
    return pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), values.shape[1])


def list_values(column: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """A fixed-size-list column back as ``[n, w]`` numpy values."""
    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    return array.flatten().to_numpy().reshape(len(array), -1)


__all__ = ["fixed_size_list", "list_values"]
