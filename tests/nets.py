"""Small networks covering the layer features the engine must handle exactly."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torchvision
from torch import nn


class PlainCNN(nn.Module):
    """Convs with bias, ReLU(inplace) straight after a conv, max-pool, Linear head."""

    def __init__(self, classes: int = 5):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(6, 8, 3, stride=2), nn.ReLU(inplace=True), nn.MaxPool2d(2))
        self.fc = nn.Linear(8 * 3 * 3, classes)

    def forward(self, x):
        return self.fc(self.body(x).flatten(1))


class Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = None if stride == 1 and cin == cout else nn.Sequential(
            nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += x if self.down is None else self.down(x)  # in-place on a BN output, as torchvision does
        return torch.relu(out)


class TinyResNet(nn.Module):
    """ResNet-style with BatchNorm (running statistics set by ``warm_batchnorm``)."""

    def __init__(self, classes: int = 5):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU())
        self.layer1 = Block(4, 4, 1)
        self.layer2 = Block(4, 8, 2)
        self.fc = nn.Linear(8, classes)

    def forward(self, x):
        return self.fc(self.layer2(self.layer1(self.stem(x))).mean((2, 3)))


class GroupedDilated(nn.Module):
    """Grouped, depthwise, dilated, strided, 'same' and non-zero padding modes."""

    def __init__(self, classes: int = 5):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(4, 8, 3, padding=2, dilation=2, groups=2), nn.Tanh(),
            nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False), nn.ReLU(),  # depthwise
            nn.Conv2d(8, 6, (3, 2), stride=(2, 1), padding=1, padding_mode="reflect"),
            nn.ReLU(),
            nn.Conv2d(6, 6, 3, padding="same", dilation=(1, 2), padding_mode="circular"), nn.ReLU(),
            nn.Conv2d(6, 6, 2, padding="same"))
        self.fc = nn.Linear(6, classes)

    def forward(self, x):
        return self.fc(self.body(x).mean((2, 3)))


class Conv1dNet(nn.Module):
    def __init__(self, classes: int = 5):
        super().__init__()
        self.body = nn.Sequential(nn.Conv1d(3, 6, 5, stride=2, padding=2), nn.ReLU(),
                                  nn.Conv1d(6, 6, 3, dilation=2, groups=3), nn.ReLU())
        self.fc = nn.Linear(6, classes)

    def forward(self, x):
        return self.fc(self.body(x).mean(2))


class Conv3dNet(nn.Module):
    def __init__(self, classes: int = 5):
        super().__init__()
        self.body = nn.Sequential(nn.Conv3d(2, 4, 3, padding=1), nn.ReLU(),
                                  nn.Conv3d(4, 4, (2, 3, 3), stride=(1, 2, 2), dilation=(1, 1, 2), groups=2))
        self.fc = nn.Linear(4, classes)

    def forward(self, x):
        return self.fc(self.body(x).mean((2, 3, 4)))


class MLP(nn.Module):
    def __init__(self, classes: int = 5):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 10), nn.Tanh(), nn.Linear(10, classes))

    def forward(self, x):
        return self.net(x)


class TokenMixer(nn.Module):
    """Linear layers on N-D inputs ``[N, T, D]``, as in a transformer's MLP."""

    def __init__(self, classes: int = 5):
        super().__init__()
        self.up = nn.Linear(6, 12)
        self.down = nn.Linear(12, 6, bias=False)
        self.head = nn.Linear(6, classes)

    def forward(self, x):
        return self.head(self.down(torch.relu(self.up(x))).mean(1))


class SharedParameter(nn.Module):
    """Two Conv2d modules sharing one Parameter, with different strides and dilations."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 3, 3, padding=1)
        self.b = nn.Conv2d(3, 3, 3, padding=2, dilation=2, bias=False)
        self.b.weight = self.a.weight
        self.fc = nn.Linear(3, 5)

    def forward(self, x):
        return self.fc(self.b(torch.tanh(self.a(x))).mean((2, 3)))


@dataclass(frozen=True)
class Case:
    """A model, an input shape and the units to profile it with."""

    name: str
    make: Callable[[], nn.Module]
    input_shape: tuple[int, ...]
    units: str = "filters"
    classes: int = 5


def _mobilenet():
    return torchvision.models.mobilenet_v3_small(num_classes=5, width_mult=0.5)


def _densenet():
    # densenet121's layer structure at a reduced growth rate and width keeps CI fast
    return torchvision.models.DenseNet(growth_rate=8, block_config=(2, 3, 4, 2), num_init_features=16,
                                       num_classes=5)


SMALL_CASES = [
    Case("plain_cnn", PlainCNN, (3, 14, 14)),
    Case("plain_cnn_conv_linear", PlainCNN, (3, 14, 14), "conv+linear"),
    Case("tiny_resnet_bn", TinyResNet, (3, 10, 10)),
    Case("grouped_dilated", GroupedDilated, (4, 11, 9), "conv"),
    Case("conv1d", Conv1dNet, (3, 20), "conv"),
    Case("conv3d", Conv3dNet, (2, 4, 7, 9), "conv"),
    Case("mlp_conv_linear", MLP, (12,), "conv+linear"),
    Case("mlp_linear_columns", MLP, (12,), "linear-columns"),
    Case("token_mixer_nd_linear", TokenMixer, (4, 6), "conv+linear"),
]

TORCHVISION_CASES = [
    Case("resnet18", lambda: torchvision.models.resnet18(num_classes=5), (3, 32, 32)),
    Case("mobilenet_v3_small", _mobilenet, (3, 32, 32)),
    Case("densenet_small", _densenet, (3, 32, 32)),
]


def build(case: Case, dtype: torch.dtype, seed: int = 0) -> nn.Module:
    """The case's model with BatchNorm running statistics moved away from (0, 1), in eval mode."""
    torch.manual_seed(seed)
    model = case.make().to(dtype)
    warm_batchnorm(model, case.input_shape, dtype)
    return model.eval()


def warm_batchnorm(model: nn.Module, input_shape: tuple[int, ...], dtype: torch.dtype) -> None:
    if not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        return
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(8, *input_shape, dtype=dtype) * 2 + 0.5)
    model.eval()


def batch(case: Case, n: int, dtype: torch.dtype, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *case.input_shape, generator=g, dtype=dtype)
    y = torch.randint(0, case.classes, (n,), generator=g)
    return x, y


def rgb32_classifier() -> nn.Module:
    """A factory for the ``module.path:factory`` model spec: 3x32x32 images, 2 classes."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """Largest error of each row relative to that row's largest entry."""
    scale = want.abs().amax(1, keepdim=True).clamp_min(torch.finfo(want.dtype).tiny)
    return ((got - want).abs() / scale).max().item()


def settled(model: nn.Module, affine: bool = False) -> nn.Module:
    """Float64, eval mode, BatchNorm running statistics away from the identity (random but fixed by the seed);
    with ``affine``, the norms' weights and biases too."""
    torch.manual_seed(0)
    model = model.double().eval()
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.running_mean is not None:
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 1.5)
        if affine and isinstance(module, (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm)):
            with torch.no_grad():
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.2, 0.2)
    return model


def profiled_by_auto(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                     **options) -> tuple[torch.Tensor, str, list[str]]:
    """``backend="auto"``'s profiles of a batch, the backend it ended on, and the notes (ParamsalWarnings) it gave."""
    import warnings

    from paramsal import Profiler
    from paramsal.errors import ParamsalWarning

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        profiler = Profiler(model, **options)
        got = profiler(x, y).profiles
    return got, profiler.backend, [str(w.message) for w in caught if issubclass(w.category, ParamsalWarning)]
