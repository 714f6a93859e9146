"""Types shared across the package (no torch import: a protocol says what paramsal needs of an object)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np

#: Which samples of a run: "misclassified", "correct" (or "nonfinite", for a run's rows), sample ids, or None (every
#: finite sample, or the default an analysis names).
Rows = str | Sequence[int] | np.ndarray | None


class MapDataset(Protocol):
    """A map-style data set, as paramsal reads one: ``len(data)`` samples, ``data[i] = (input, target)``.

    ``torch.utils.data.Dataset`` subclasses with a ``__len__`` (``TensorDataset``,
    ``Subset``, ``ImageFolder``, ...) are ones; torch's base class declares no
    length, so it is not.
    """

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> Any: ...
