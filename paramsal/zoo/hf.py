"""Models of ``transformers`` and ``timm`` from local files: the ``hf:DIR``, ``gguf:FILE`` and ``timm:NAME``
model specs.

Nothing is downloaded: a ``transformers`` model comes from a local directory
(its ``config.json`` and safetensors or ``pytorch_model.bin`` weights, read
with ``HF_HUB_OFFLINE=1`` and without remote code) or from a GGUF file (a
quantized causal LM, which transformers dequantizes to float32), a ``timm``
architecture is built with random weights that ``--weights FILE`` replaces.

Paramsal profiles one tensor per batch, so a text model is wrapped as
:class:`TextModel`: token ids ``[N, T]`` in, logits out, the attention mask
made from the padding id (a padded position is masked out for its own sample
only).
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from paramsal.errors import InputError, first_line

#: What a transformers architecture's class name ends with, and the task its head is trained for.
_HEADS = (("ForSequenceClassification", "classification"), ("ForTokenClassification", "token-classification"),
          ("ForMaskedLM", "masked-lm"), ("ForCausalLM", "causal-lm"), ("LMHeadModel", "causal-lm"))
_AUTO_CLASSES = {"classification": "AutoModelForSequenceClassification",
                 "token-classification": "AutoModelForTokenClassification",
                 "masked-lm": "AutoModelForMaskedLM", "causal-lm": "AutoModelForCausalLM"}


class TextModel(nn.Module):
    """A ``transformers`` model as paramsal profiles it: ``forward(ids [N, T]) -> logits``.

    Attributes:
        model: the wrapped ``transformers`` model (its parameters are named ``model.<name>``).
        pad_token_id: the id whose positions are masked out of attention; None masks nothing.
        task: what its head is trained for (:data:`~paramsal.options.TASKS`).
    """

    def __init__(self, model: nn.Module, pad_token_id: int | None, task: str, *, additive_mask: bool = False,
                 tokenizer: Callable[[], Any] | None = None):
        """``additive_mask``: pass the mask as the 4-D float mask ``[N, 1, 1, T]`` an encoder adds to its attention
        scores, which ``torch.func.vmap`` can run (the 2-D mask goes through a branch on its values). Only for
        bidirectional encoders: a causal model takes a 4-D mask as its whole mask, without its causality.
        ``tokenizer``: loads the model's tokenizer, on first use of :attr:`tokenizer` (``qa:`` data needs it)."""
        super().__init__()
        self.model = model
        self.pad_token_id = pad_token_id
        self.task = task
        self.additive_mask = additive_mask
        self._tokenizer_loader = tokenizer
        self._tokenizer: Any = None

    @property
    def tokenizer(self) -> Any:
        """The model's tokenizer (None where it was loaded without one)."""
        if self._tokenizer is None and self._tokenizer_loader is not None:
            self._tokenizer = self._tokenizer_loader()
        return self._tokenizer

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.pad_token_id is None:
            return self.model(input_ids=ids).logits
        kept = ids != self.pad_token_id
        if not self.additive_mask:
            return self.model(input_ids=ids, attention_mask=kept.long()).logits
        dtype = next(self.model.parameters()).dtype
        scores = torch.zeros(kept.shape, dtype=dtype, device=ids.device).masked_fill(~kept, torch.finfo(dtype).min)
        return self.model(input_ids=ids, attention_mask=scores[:, None, None, :]).logits


def task_of(config) -> str:
    """The task of a transformers config's architecture, "classification" when it names none."""
    for architecture in getattr(config, "architectures", None) or ():
        for suffix, task in _HEADS:
            if architecture.endswith(suffix):
                return task
    return "classification"


def load_hf_model(directory: str | os.PathLike, task: str | None = None, num_classes: int | None = None, *,
                  weights_follow: bool = False) -> TextModel:
    """A local ``transformers`` model directory as a :class:`TextModel` in eval mode.

    Args:
        directory: holds ``config.json`` and the weights (a sentence-transformers package's ``model`` folder too).
        task: the head to build (:data:`~paramsal.options.TASKS`); None: the one the config's architecture names.
        num_classes: the classification head's size, where the config gives none.
        weights_follow: a weights file will be loaded into the model afterwards, so parameters the directory
            lacks (a new head) are allowed.

    Raises:
        InputError: when the directory is not a model directory, lacks weights for some parameters (a base
            encoder without the task's head: random weights explain no mistakes), or transformers is not installed.
    """
    root = Path(directory)
    if not (root / "config.json").is_file():
        raise InputError(f"model spec 'hf:{directory}': {root} holds no config.json (a local transformers model "
                         "directory is needed; nothing is downloaded)")
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        import transformers
    except ModuleNotFoundError as exc:
        raise InputError("model spec 'hf:DIR' needs the transformers package: pip install 'paramsal[models]'") from exc
    try:
        config = transformers.AutoConfig.from_pretrained(root, local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise InputError(f"model spec 'hf:{directory}': {root / 'config.json'} is not a config transformers can use "
                         f"({_first_sentence(exc)}); give a directory written by save_pretrained") from None
    task = task or task_of(config)
    if num_classes is not None:
        config.num_labels = num_classes
    auto = getattr(transformers, _AUTO_CLASSES[task])
    try:
        model, loading = auto.from_pretrained(root, config=config, local_files_only=True, trust_remote_code=False,
                                              output_loading_info=True)
    except pickle.UnpicklingError:
        raise InputError(f"model spec 'hf:{directory}': its weights are a pickle holding objects other than tensors, "
                         "which torch.load(weights_only=True) refuses; paramsal never unpickles such a file, which "
                         "could run code: save the weights as safetensors (save_pretrained) from a copy you trust"
                         ) from None
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as exc:
        raise InputError(f"model spec 'hf:{directory}': transformers cannot build a {task} model from it "
                         f"({_first_sentence(exc)})") from None
    missing = sorted(loading.get("missing_keys", ()))
    if missing and not weights_follow:
        raise InputError(f"model spec 'hf:{directory}': the directory has no weights for {len(missing)} parameter(s) "
                         f"of a {task} model ({missing[0]}, ...), which would start random and explain no mistakes; "
                         "give a directory with the trained head, or --weights FILE")
    return TextModel(model, getattr(config, "pad_token_id", None), task).eval()


def load_gguf_model(path: str | os.PathLike, spec: str | None = None) -> TextModel:
    """A GGUF file's causal LM (dequantized to float32 by transformers) as a :class:`TextModel` in eval mode.

    No padding mask: a chat model's padding id is usually its end-of-turn token, which its prompts contain. Give
    prompts of one length, or pad them on the right with their labels ``-100`` there (a causal model's earlier
    positions never see later ones).

    Raises:
        InputError: when the file is missing or is not a GGUF model transformers can dequantize (it reads the
            Llama, Mistral, Qwen2, Gemma, Phi-3, ... families), or the ``gguf`` package is not installed.
    """
    file = Path(path)
    spec = spec or f"gguf:{path}"
    if not file.is_file():
        raise InputError(f"model spec {spec!r}: {file} is not a file (a local .gguf file is needed; nothing is "
                         "downloaded)")
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        import gguf  # noqa: F401  # transformers reads GGUF files through it
        import transformers
    except ModuleNotFoundError as exc:
        raise InputError(f"model spec {spec!r} needs the {exc.name} package: pip install 'paramsal[models]'") from None
    bars = transformers.utils.logging.is_progress_bar_enabled()
    transformers.utils.logging.disable_progress_bar()  # a bar per weight loaded (its GGUF reader's plain tqdm stays)
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(file.parent, gguf_file=file.name,
                                                                  dtype=torch.float32, local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError, RuntimeError, NotImplementedError) as exc:
        raise InputError(f"model spec {spec!r}: transformers cannot build a causal LM from it "
                         f"({_first_sentence(exc)}); give a GGUF file of an architecture it dequantizes "
                         "(Llama, Mistral, Qwen2, ...)") from None
    finally:
        if bars:
            transformers.utils.logging.enable_progress_bar()
    return TextModel(model, None, "causal-lm", tokenizer=lambda: gguf_tokenizer(file)).eval()


def gguf_tokenizer(path: str | os.PathLike):
    """The tokenizer (and chat template) stored in a GGUF file."""
    import transformers

    file = Path(path)
    return transformers.AutoTokenizer.from_pretrained(file.parent, gguf_file=file.name, local_files_only=True)


def _first_sentence(exc: BaseException) -> str:
    """A library's message cut to its first sentence: transformers and torch follow it with paragraphs of advice
    (torch's includes retrying with ``weights_only=False``, which would run whatever code a file holds)."""
    line = first_line(exc)
    return line.split(". ")[0].rstrip(".")


def timm_model(name: str, num_classes: int | None = None) -> nn.Module:
    """A ``timm`` architecture with random weights (``pretrained=False``: nothing is downloaded)."""
    try:
        import timm
    except ModuleNotFoundError as exc:
        raise InputError("model spec 'timm:NAME' needs the timm package: pip install 'paramsal[models]'") from exc
    if not timm.is_model(name):
        raise InputError(f"model spec 'timm:{name}': timm has no model {name!r} (timm.list_models() lists them)")
    kwargs: dict[str, Any] = {"num_classes": num_classes} if num_classes else {}
    return timm.create_model(name, pretrained=False, **kwargs)
