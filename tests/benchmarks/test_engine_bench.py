"""pytest-benchmark suite of the engine (``make bench``); not part of ``make test``.

Each backend and both baselines (plain forward+backward, one-sample loop) run
on the same case in one session, so their medians can be compared directly;
``paramsal bench`` prints the same comparison as a table of ratios.
"""

import pytest
import torch

from paramsal.bench.harness import CASES, METHODS, VMAP_WHOLE, method

pytestmark = pytest.mark.bench


@pytest.fixture(scope="module")
def resnet18_cifar_batch():
    torch.set_num_threads(2)
    return CASES["resnet18-cifar"].build()


@pytest.mark.parametrize("name", (*METHODS, VMAP_WHOLE))
def test_resnet18_cifar_batch64(benchmark, resnet18_cifar_batch, name):
    model, x, y = resnet18_cifar_batch
    fn = method(name, model, x, y)
    benchmark.group = "resnet18-cifar batch 64"
    benchmark.extra_info["samples"] = len(x)
    benchmark.pedantic(fn, rounds=3, warmup_rounds=1)
