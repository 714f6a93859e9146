"""Reading a data set for a bulk job: each sample with its dataset index, checked before it is batched.

A sample that cannot be read, has another shape than its batch or a label
that is not a class index is named by its index in a one-line error; a
failure inside a DataLoader worker reaches the main process as data
(:class:`BadBatch`), so its message stays one line.
"""

from __future__ import annotations

import traceback
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset
from torch.utils.data._utils.collate import default_collate

from paramsal._typing import MapDataset
from paramsal.errors import InputError


class BadBatch:
    """A batch that could not be assembled, carried out of a worker process as data (its message intact).

    ``detail``: the traceback of the data set's own failure, shown with ``--debug``.
    """

    def __init__(self, message: str, detail: str = ""):
        self.message = message
        self.detail = detail

    def error(self) -> InputError:
        error = InputError(self.message)
        if self.detail:
            error.__cause__ = RuntimeError(self.detail)
        return error


class Indexed(Dataset):
    """``(index, input, label)``: the dataset index travels with each sample, for messages and the rows' ids."""

    def __init__(self, data: MapDataset):
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int):
        try:
            item = self.data[i]
        except Exception as exc:  # the user's data set: its failure is reported with the sample's index
            return i, BadBatch(f"reading sample {i} of the data set failed: {type(exc).__name__}: {exc}",
                               traceback.format_exc()), None
        if not isinstance(item, (tuple, list)) or len(item) != 2:
            return i, BadBatch(f"sample {i} of the data set is a {type(item).__name__}, not an "
                               "(input, class index) pair"), None
        return i, item[0], item[1]


def collate_samples(samples: list[tuple[int, Any, Any]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | BadBatch:
    """Stacks ``(index, input, label)`` samples, or names the first sample that does not fit the others."""
    for i, x, y in samples:
        if isinstance(x, BadBatch):
            return x
        if not isinstance(x, (torch.Tensor, np.ndarray)):
            return BadBatch(f"sample {i} has an input of type {type(x).__name__}, not a tensor: give the data set "
                            "a transform that returns tensors")
        if _labels_per_position(y):
            continue
        if isinstance(y, torch.Tensor) and y.dim() == 0:
            y = y.item()
        if isinstance(y, bool) or not isinstance(y, (int, np.integer)):
            return BadBatch(f"sample {i} has the label {y!r} ({type(y).__name__}); expected a class index (an int), "
                            "or an integer tensor of labels per position for a sequence task")
    first = samples[0][0]
    for what, column in (("an input", 1), ("labels", 2)):
        shape = tuple(np.shape(samples[0][column]))
        for i, *sample in samples[1:]:
            if tuple(np.shape(sample[column - 1])) != shape:
                return BadBatch(f"sample {i} has {what} of shape {tuple(np.shape(sample[column - 1]))} but sample "
                                f"{first} has {shape}: every sample must have the same shape (resize, crop or pad "
                                "in the data set's transform)")
    ids = torch.tensor([i for i, _, _ in samples])
    inputs = default_collate([torch.as_tensor(x) for _, x, _ in samples])
    if _labels_per_position(samples[0][2]):
        return ids, inputs, torch.stack([torch.as_tensor(y).long() for _, _, y in samples])
    targets = torch.tensor([int(y.item() if isinstance(y, torch.Tensor) else y) for _, _, y in samples])
    return ids, inputs, targets


def _labels_per_position(y: Any) -> bool:
    """A sequence task's sample label: an integer tensor of one or more dimensions."""
    return isinstance(y, torch.Tensor) and y.dim() >= 1 and not y.is_floating_point() and y.dtype != torch.bool
