"""Fingerprints that tell one model, or one data set, from another without reading all of it.

A model's fingerprint hashes its whole state dict. A data set's fingerprint
hashes, cheaply:

* its class name and length;
* every label, when the data set exposes them without decoding inputs
  (:func:`dataset_labels`: ``targets``, ``labels``, ``samples``, a
  ``TensorDataset``'s last tensor, through ``Subset``);
* ``TensorDataset`` tensors whole (they are in memory already);
* for folder data sets (``samples`` of ``(path, label)``), every file's path
  relative to the folder and its size in bytes;
* the decoded inputs and labels of :data:`PROBES` samples: evenly spaced ones
  and seeded random ones, so that a change anywhere has a fair chance.

It cannot see a change confined to samples it does not probe when the data
set exposes no labels or file listing, nor, in a folder data set, an image
rewritten with the same name and size outside the probes.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from typing import cast

import numpy as np
import torch
from torch import nn
from torch.utils.data import Subset, TensorDataset

from paramsal._typing import MapDataset

#: Samples decoded for a data set's fingerprint (all of them when it has fewer).
PROBES = 64
_EVENLY = 8
_SEED = 20231017


def model_fingerprint(model: nn.Module) -> str:
    """A hash of the state dict: names, shapes, dtypes and values."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(_tensor_bytes(tensor))
    return digest.hexdigest()[:16]


def data_fingerprint(data: MapDataset) -> str:
    """A hash of the data set's size, labels, listing and probed samples (see the module docstring)."""
    digest = hashlib.sha256(f"{type(data).__name__}:{len(data)}".encode())
    labels = dataset_labels(data)
    if labels is not None:
        digest.update(b"labels:" + labels.tobytes())
    for part in _listing(data):
        digest.update(part)
    for i in probe_positions(len(data)):
        for value in data[int(i)]:
            digest.update(_value_bytes(value))
    return digest.hexdigest()[:16]


def probe_positions(n: int) -> np.ndarray:
    """Sorted positions of the probed samples: evenly spaced plus seeded random, :data:`PROBES` in all."""
    if n <= PROBES:
        return np.arange(n)
    evenly = np.linspace(0, n - 1, num=_EVENLY, dtype=np.int64)
    random = np.random.default_rng(_SEED).choice(n, PROBES - _EVENLY, replace=False)
    return np.unique(np.concatenate([evenly, random]))


def dataset_labels(data: MapDataset) -> np.ndarray | None:
    """Every sample's class index ``[N]`` (int64), if the data set holds them without decoding inputs."""
    if isinstance(data, Subset):
        base = dataset_labels(cast(MapDataset, data.dataset))
        return None if base is None else base[np.asarray(data.indices, dtype=np.int64)]
    if isinstance(data, TensorDataset):
        last = data.tensors[-1]
        return _as_labels(last, len(data)) if len(data.tensors) >= 2 else None
    for attr in ("targets", "labels"):
        values = getattr(data, attr, None)
        if values is not None:
            labels = _as_labels(values, len(data))
            if labels is not None:
                return labels
    samples = getattr(data, "samples", None)
    if isinstance(samples, Sequence) and len(samples) == len(data) and all(
            isinstance(s, tuple) and len(s) == 2 for s in samples[:1]):
        return _as_labels([label for _, label in samples], len(data))
    return None


def _as_labels(values: object, n: int) -> np.ndarray | None:
    try:
        labels = np.asarray(values.cpu() if isinstance(values, torch.Tensor) else values)
    except (TypeError, ValueError):
        return None
    if labels.shape != (n,) or not np.issubdtype(labels.dtype, np.integer):
        return None
    return labels.astype(np.int64)


def _listing(data: MapDataset) -> list[bytes]:
    """What identifies the data set's contents beyond its labels: in-memory tensors, or files and sizes."""
    if isinstance(data, Subset):
        return [np.asarray(data.indices, dtype=np.int64).tobytes(), *_listing(cast(MapDataset, data.dataset))]
    if isinstance(data, TensorDataset):
        return [_tensor_bytes(t) for t in data.tensors]
    samples = getattr(data, "samples", None)
    root = getattr(data, "root", None)
    if isinstance(samples, Sequence) and samples and isinstance(samples[0], tuple):
        entries = []
        for path, label in samples:
            name = os.path.relpath(path, root) if root else os.path.basename(path)
            size = os.path.getsize(path) if os.path.exists(path) else -1
            entries.append(f"{name}:{size}:{label}")
        return ["\n".join(entries).encode()]
    return []


def _value_bytes(value: object) -> bytes:
    """A sample's input or label as bytes, whatever it is (a tensor, an array, an int, a tuple, an image)."""
    if isinstance(value, torch.Tensor):
        return _tensor_bytes(value)
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return repr(int(value)).encode()
    if isinstance(value, (tuple, list)):
        return b"(" + b",".join(_value_bytes(v) for v in value) + b")"
    try:
        array = np.asarray(value)
    except (TypeError, ValueError):
        array = None
    if array is None or array.dtype == object:
        return type(value).__qualname__.encode()  # not its repr, which may hold a memory address
    return f"{array.dtype}{array.shape}".encode() + array.tobytes()


def _tensor_bytes(tensor: torch.Tensor) -> bytes:
    if not tensor.numel():
        return b""
    return tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
