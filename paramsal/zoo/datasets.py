"""Embedded demo dataset: Animal-MNIST silhouettes; the held-out split ships in the package, the rest is read from
an installed wheel.

Source
    The PyPI package ``animal-mnist`` version 0.4 (MIT licence, see
    ``LICENSES.md`` next to this file) ships 10,000 grayscale 28x28 animal
    silhouettes, 1,000 per class, in ``animal_mnist/data/Animal_MNIST/``:

    * ``animal_data_version_3.gz``  -- gzip of a pickled ``numpy.ndarray``,
      dtype ``uint8``, shape ``[10000, 28, 28]``, C order;
    * ``animal_label_version_3.gz`` -- gzip of a pickled ``numpy.ndarray``,
      dtype ``<i8`` (int64), shape ``[10000]``, values 0..9.

    Install it without its declared dependencies (it lists TensorFlow, which
    is only needed by the package's own helper modules)::

        pip install --no-deps animal-mnist==0.4

    Nothing is imported from ``animal_mnist`` and ``pickle`` is never called:
    the pickle stream is only *scanned* with :mod:`pickletools`, the raw array
    payload is taken out of it and wrapped with :func:`numpy.frombuffer`, and
    the result is checked against the SHA-256 digests recorded below. No
    code in the data files can run.

Class order
    Labels are the alphabetical order of the names in the package README
    (checked by eye on rendered samples): see :data:`CLASSES`.

Deterministic train/test split
    1. Exact duplicate images are removed (the file contains 284 byte-identical
       pairs, always with the same label); the first occurrence in file order
       is kept, leaving 9,716 unique images. This prevents the same picture
       from landing in both splits.
    2. Within each class, the unique images are ordered by the BLAKE2b digest
       of ``SPLIT_SALT + image bytes`` (a content hash, so the split depends
       neither on a random number generator implementation nor on the order
       of the file).
    3. The first :data:`TEST_PER_CLASS` (300) images of each class form the
       held-out ``"test"`` split (3,000 images, perfectly balanced); all the
       others form ``"train"`` (6,716 images, 512-700 per class). Both
       splits are returned sorted by original file index.

    The test split is deliberately large (about 30 % of the unique images):
    with 200 per class the demo model (8 epochs, ~94-95 % accuracy) made fewer
    than 100 held-out mistakes, too few for the error-analysis demo; 300 per
    class gives it 179 mistakes without weakening the model on purpose.

Normalization
    Pixels are scaled to [0, 1] and standardized with :data:`MEAN` and
    :data:`STD`, the mean and standard deviation of all pixels of the
    ``"train"`` split (``scripts/train_demo_model.py`` recomputes and checks
    them).
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import importlib.util
import pickletools
from collections.abc import Mapping
from pathlib import Path
from typing import List, Tuple

import numpy as np
import torch
from torch.utils.data import Dataset

__all__ = [
    "CLASSES",
    "MEAN",
    "STD",
    "SPLITS",
    "TEST_PER_CLASS",
    "ArrayDataset",
    "load_animal_mnist",
    "load_split",
    "split_indices",
]

#: Class names, index = label.
CLASSES: List[str] = [
    "bear", "bird", "cat", "cow", "dog",
    "elephant", "giraffe", "horse", "sheep", "zebra",
]

#: Mean / std of the [0, 1]-scaled pixels of the "train" split.
MEAN: float = 0.2742
STD: float = 0.4058

#: Names accepted by :func:`load_split`.
SPLITS: Tuple[str, ...] = ("train", "test")

#: Held-out images per class.
TEST_PER_CLASS: int = 300

#: Salt mixed into the content hash that orders images for the split.
SPLIT_SALT: bytes = b"paramsal-demo-split-v1"

_PIP_HINT = "pip install --no-deps animal-mnist==0.4"
_DATA_FILE = "animal_data_version_3.gz"
_LABEL_FILE = "animal_label_version_3.gz"
_N_IMAGES = 10_000
_IMAGE_SHAPE = (28, 28)

# SHA-256 of the raw array payloads of animal-mnist 0.4 (images uint8 C-order
# bytes, labels little-endian int64 bytes).
#: The held-out split inside the package (:func:`_bundled_test`), so that the demo needs no other package;
#: ``scripts/bundle_demo_data.py`` writes it from the wheel, and the tests check it against the wheel.
BUNDLED_TEST = "data/demo_test.npz"
_BUNDLED_SHA256 = "e374140dd378aceb432ea4c54301053c9145dd26746f6ad87339b451cc85c98d"

_IMAGES_SHA256 = "3d1bb93498a7f7cb5a4c0d5dc57d57d78adc2ac1722398921542a7515172c46f"
_LABELS_SHA256 = "c5575395e636cadcdfe5764ffc8d56f56d234a4dc687096f8fc2d975dd6a5597"


class ArrayDataset(Dataset):
    """In-memory image classification dataset backed by two tensors.

    Args:
        images: Float32 images, ``[N, 1, 28, 28]`` (already normalized).
        labels: Int64 labels, ``[N]``.
        classes: Class names; ``classes[k]`` is the name of label ``k``.
        indices: Optional int64 ``[N]`` original positions in the source
            arrays (provenance; defaults to ``arange(N)``).

    Attributes:
        images: ``[N, 1, 28, 28]`` float32 tensor.
        labels: ``[N]`` int64 tensor.
        classes: List of class names.
        indices: ``[N]`` int64 tensor of source indices.

    The tensors may be shared with other datasets returned by this module;
    treat them as read-only.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        classes: List[str],
        indices: torch.Tensor | None = None,
    ) -> None:
        if images.ndim != 4:
            raise ValueError(f"images must be [N, C, H, W], got shape {tuple(images.shape)}")
        if labels.shape != (images.shape[0],):
            raise ValueError(
                f"labels must be [N] with N={images.shape[0]}, got shape {tuple(labels.shape)}"
            )
        self.images = images
        self.labels = labels
        self.classes = list(classes)
        self.indices = torch.arange(images.shape[0]) if indices is None else indices

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __getitem__(self, i: int) -> Tuple[torch.Tensor, int]:
        """Return ``(image [1, 28, 28] float32, label int)``."""
        return self.images[i], int(self.labels[i])

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(n={len(self)}, image_shape={tuple(self.images.shape[1:])}, "
            f"classes={len(self.classes)})"
        )


def _package_dir() -> Path:
    """Locate the installed ``animal_mnist`` package without importing it."""
    spec = importlib.util.find_spec("animal_mnist")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "The demo dataset needs the 'animal-mnist' package, which is not installed. "
            f"Install it with:  {_PIP_HINT}"
        )
    return Path(list(spec.submodule_search_locations)[0])


def _read_pickled_ndarray(path: Path, dtype: str, shape: Tuple[int, ...]) -> np.ndarray:
    """Extract a C-ordered array from a gzipped numpy pickle without unpickling.

    The pickle stream of a plain ``numpy.ndarray`` stores its contents as one
    ``BINBYTES`` opcode; we scan the opcodes, check the dtype code and the
    shape recorded in the stream, and wrap that payload.

    Args:
        path: ``.gz`` file holding the pickle.
        dtype: Expected numpy dtype string, e.g. ``"u1"`` or ``"<i8"``.
        shape: Expected array shape.

    Returns:
        A read-only array of ``dtype`` and ``shape`` viewing the payload bytes.

    Raises:
        ValueError: If the stream does not look like the expected array.
    """
    with gzip.open(path, "rb") as fh:
        stream = fh.read()
    dt = np.dtype(dtype)
    nbytes = dt.itemsize * int(np.prod(shape))
    strings: List[str] = []
    ints: List[int] = []
    payloads: List[bytes] = []
    for _op, arg, _pos in pickletools.genops(stream):
        if isinstance(arg, str):
            strings.append(arg)
        elif isinstance(arg, int) and not isinstance(arg, bool):
            ints.append(arg)
        elif isinstance(arg, (bytes, bytearray)) and len(arg) == nbytes:
            payloads.append(bytes(arg))
    code = dt.str.lstrip("<>|=")
    if (
        len(payloads) != 1
        or "ndarray" not in strings
        or code not in strings
        or not _contains_run(ints, list(shape))
    ):
        raise ValueError(
            f"{path} is not a pickled {dtype} array of shape {shape}; "
            f"reinstall the data package with:  {_PIP_HINT}"
        )
    return np.frombuffer(payloads[0], dtype=dt).reshape(shape)


def _contains_run(seq: List[int], run: List[int]) -> bool:
    """True if ``run`` occurs as a contiguous sub-list of ``seq``."""
    n = len(run)
    return any(seq[i : i + n] == run for i in range(len(seq) - n + 1))


@functools.lru_cache(maxsize=1)
def load_animal_mnist() -> Tuple[np.ndarray, np.ndarray]:
    """Read the full Animal-MNIST arrays from the installed package.

    Returns:
        ``(images, labels)``: ``uint8 [10000, 28, 28]`` and ``int64 [10000]``
        read-only numpy arrays, in file order (cached).

    Raises:
        ModuleNotFoundError: If ``animal-mnist`` is not installed.
        ValueError: If the files are not the expected animal-mnist 0.4 data.
    """
    root = _package_dir() / "data" / "Animal_MNIST"
    for name in (_DATA_FILE, _LABEL_FILE):
        if not (root / name).is_file():
            raise FileNotFoundError(
                f"{root / name} is missing; reinstall the data package with:  {_PIP_HINT}"
            )
    images = _read_pickled_ndarray(root / _DATA_FILE, "u1", (_N_IMAGES, *_IMAGE_SHAPE))
    labels = _read_pickled_ndarray(root / _LABEL_FILE, "<i8", (_N_IMAGES,))
    for arr, want, what in ((images, _IMAGES_SHA256, "images"), (labels, _LABELS_SHA256, "labels")):
        got = hashlib.sha256(arr.tobytes()).hexdigest()
        if got != want:
            raise ValueError(
                f"animal-mnist {what} do not match version 0.4 (sha256 {got}); "
                f"install the pinned version with:  {_PIP_HINT}"
            )
    return images, labels.astype(np.int64, copy=False)


@functools.lru_cache(maxsize=1)
def split_indices() -> Tuple[np.ndarray, np.ndarray]:
    """Compute the deterministic train/test split (see the module docstring).

    Returns:
        ``(train_idx, test_idx)``: sorted int64 index arrays into the arrays of
        :func:`load_animal_mnist`, of lengths 6,716 and 3,000.
    """
    images, labels = load_animal_mnist()
    seen = set()
    keys: List[Tuple[int, bytes, int]] = []  # (label, hash, index) for unique images
    for i in range(images.shape[0]):
        raw = images[i].tobytes()
        if raw in seen:
            continue
        seen.add(raw)
        digest = hashlib.blake2b(SPLIT_SALT + raw, digest_size=16).digest()
        keys.append((int(labels[i]), digest, i))
    keys.sort()
    train: List[int] = []
    test: List[int] = []
    rank = {c: 0 for c in range(len(CLASSES))}
    for label, _digest, i in keys:
        (test if rank[label] < TEST_PER_CLASS else train).append(i)
        rank[label] += 1
    return np.array(sorted(train), dtype=np.int64), np.array(sorted(test), dtype=np.int64)


def _to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 ``[N, 28, 28]`` -> normalized float32 ``[N, 1, 28, 28]``."""
    x = torch.from_numpy(images.astype(np.float32) / 255.0).unsqueeze(1)
    return (x - MEAN) / STD


@functools.lru_cache(maxsize=len(SPLITS))
def _split_tensors(split: str) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if split == "test":
        images, labels, idx = _bundled_test()
    else:
        all_images, all_labels = load_animal_mnist()
        idx = split_indices()[0]
        images, labels = all_images[idx], all_labels[idx]
    return (
        _to_tensor(images).contiguous(),
        torch.from_numpy(labels.copy()),
        torch.from_numpy(idx.copy()),
    )


def bundled_digest(arrays: Mapping[str, np.ndarray]) -> str:
    """SHA-256 over the bundled arrays' names, dtypes, shapes and bytes (what :func:`_bundled_test` checks)."""
    digest = hashlib.sha256()
    for name in sorted(arrays):
        array = np.ascontiguousarray(arrays[name])
        digest.update(f"{name}:{array.dtype.str}:{array.shape};".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def _bundled_test() -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The held-out split as ``scripts/bundle_demo_data.py`` stored it in the package: images, labels and their
    indices in the wheel's file, checked against :data:`_BUNDLED_SHA256` (read with ``allow_pickle=False``)."""
    path = Path(__file__).with_name(BUNDLED_TEST.partition("/")[0]) / BUNDLED_TEST.partition("/")[2]
    with np.load(path, allow_pickle=False) as stored:
        arrays = {name: stored[name] for name in ("images", "labels", "indices")}
    if bundled_digest(arrays) != _BUNDLED_SHA256:
        raise ValueError(f"{path} is not the demo's held-out split this paramsal was built with; reinstall "
                         "paramsal")
    return arrays["images"], arrays["labels"], arrays["indices"]


def load_split(split: str = "test") -> ArrayDataset:
    """Return one split of the demo dataset as an in-memory dataset.

    Args:
        split: ``"train"`` (6,716 images) or ``"test"`` (3,000 held-out
            images, 300 per class).

    Returns:
        :class:`ArrayDataset` with ``images`` ``[N, 1, 28, 28]`` float32
        (normalized with :data:`MEAN` / :data:`STD`), ``labels`` ``[N]``
        int64, ``classes`` = :data:`CLASSES`. The underlying tensors are
        cached and shared between calls.

    Raises:
        ValueError: For an unknown split name.
        ModuleNotFoundError: For ``"train"``, if ``animal-mnist`` is not installed (``"test"`` ships with
            paramsal: ``paramsal/zoo/data/demo_test.npz``).
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    images, labels, indices = _split_tensors(split)
    return ArrayDataset(images, labels, CLASSES, indices)
