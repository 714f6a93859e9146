"""Small ResNet-style classifier used by the ``paramsal`` demo.

The network is deliberately tiny (about 175k parameters, ~0.7 MB of float32
weights) so that it trains in a few minutes on a laptop CPU and so that
per-parameter analyses stay cheap, while still having the ingredients that
matter for attribution work: convolutions without bias, BatchNorm layers,
residual additions, a global average pool and a linear classifier head.

Layout (for the default ``width=16``, ``blocks=(2, 2, 2)`` and 28x28 inputs)::

    features:
      conv1   3x3, in_channels -> 16, stride 1      [N, 16, 28, 28]
      bn1, relu
      layer1  2 x BasicBlock(16 -> 16, stride 1)     [N, 16, 28, 28]
      layer2  2 x BasicBlock(16 -> 32, first s=2)    [N, 32, 14, 14]
      layer3  2 x BasicBlock(32 -> 64, first s=2)    [N, 64, 7, 7]
      avgpool (global), flatten                      [N, 64]
    fc        Linear(64 -> num_classes)              [N, num_classes]

``model.features(x)`` therefore returns the penultimate embedding and
``model.fc`` is the classifier applied to it.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Sequence

import torch
from torch import nn

__all__ = ["BasicBlock", "SmallResNet"]


def _conv3x3(in_ch: int, out_ch: int, stride: int = 1) -> nn.Conv2d:
    """3x3 convolution with padding 1 and no bias (BatchNorm follows it)."""
    return nn.Conv2d(in_ch, out_ch, kernel_size=3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 conv/BN layers with a residual connection.

    ``out = relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))`` where the
    shortcut is the identity when the shape is unchanged and a strided 1x1
    convolution followed by BatchNorm otherwise.

    Every ReLU is its own (non in-place) module so forward hooks can be
    attached to each activation independently.

    Args:
        in_ch: Number of input channels C_in.
        out_ch: Number of output channels C_out.
        stride: Stride of the first convolution (and of the projection
            shortcut); 2 halves the spatial size.

    Shape:
        Input ``[N, C_in, H, W]`` -> output ``[N, C_out, H / stride, W / stride]``
        (rounded up).
    """

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = _conv3x3(in_ch, out_ch, stride)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.relu1 = nn.ReLU(inplace=False)
        self.conv2 = _conv3x3(out_ch, out_ch)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.shortcut: nn.Module
        if stride != 1 or in_ch != out_ch:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_ch, out_ch, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(out_ch),
            )
        else:
            self.shortcut = nn.Identity()
        self.relu2 = nn.ReLU(inplace=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the block.

        Args:
            x: Input feature map, ``[N, C_in, H, W]``.

        Returns:
            Output feature map, ``[N, C_out, H', W']``.
        """
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class SmallResNet(nn.Module):
    """Compact ResNet for 28x28 single-channel images.

    Args:
        num_classes: Number of output logits K.
        in_channels: Number of input image channels C.
        width: Channel count of the stem and first stage; stage ``i`` uses
            ``width * 2**i`` channels.
        blocks: Number of :class:`BasicBlock` per stage; its length is the
            number of stages (every stage after the first downsamples by 2).

    Attributes:
        features: ``nn.Sequential`` mapping ``[N, C, 28, 28]`` images to the
            ``[N, D]`` embedding (stem, residual stages, global average pool,
            flatten).
        fc: Final ``nn.Linear(D, K)`` classifier.
        feature_dim: Embedding size D (``width * 2**(len(blocks) - 1)``).
        num_classes: K.

    Shape:
        Input ``[N, C, H, W]`` (designed for H = W = 28, works for any size)
        -> logits ``[N, K]``.
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 1,
        width: int = 16,
        blocks: Sequence[int] = (2, 2, 2),
    ) -> None:
        super().__init__()
        if not blocks or any(b < 1 for b in blocks):
            raise ValueError(f"blocks must be a non-empty sequence of positive ints, got {blocks!r}")
        self.num_classes = int(num_classes)

        layers: "OrderedDict[str, nn.Module]" = OrderedDict()
        layers["conv1"] = _conv3x3(in_channels, width)
        layers["bn1"] = nn.BatchNorm2d(width)
        layers["relu"] = nn.ReLU(inplace=False)
        in_ch = width
        for stage, n_blocks in enumerate(blocks):
            out_ch = width * 2**stage
            stage_blocks = []
            for b in range(n_blocks):
                stride = 2 if (stage > 0 and b == 0) else 1
                stage_blocks.append(BasicBlock(in_ch, out_ch, stride))
                in_ch = out_ch
            layers[f"layer{stage + 1}"] = nn.Sequential(*stage_blocks)
        layers["avgpool"] = nn.AdaptiveAvgPool2d(1)
        layers["flatten"] = nn.Flatten(1)
        self.features = nn.Sequential(layers)
        self.feature_dim = in_ch
        self.fc = nn.Linear(in_ch, num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        """Kaiming init for convs; the last BN of each residual branch starts
        at zero so every block is initially the identity (eases training)."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        for m in self.modules():
            if isinstance(m, BasicBlock):
                nn.init.zeros_(m.bn2.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Compute class logits.

        Args:
            x: Images, ``[N, C, H, W]`` float32 (normalized as in
                :mod:`paramsal.zoo.datasets`).

        Returns:
            Logits, ``[N, K]``.
        """
        return self.fc(self.features(x))
