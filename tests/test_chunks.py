"""Chunk sizes follow the memory of the device the work runs on."""

from types import SimpleNamespace

import torch

from paramsal.kernels import chunks


def test_cpu_chunks_stay_cache_sized_and_vmap_gets_a_larger_share():
    like = torch.zeros(1)
    assert chunks.memory_budget(like) == chunks.DEFAULT_BUDGET
    assert chunks.memory_budget(like, "vmap") == chunks.DEFAULT_BUDGET * chunks.VMAP_FACTOR
    assert chunks.auto_chunk(chunks.DEFAULT_BUDGET // 3, 64, like) == 3
    assert chunks.auto_chunk(10 * chunks.DEFAULT_BUDGET, 64, like) == 1  # never below one sample
    assert chunks.auto_chunk(1, 64, like) == 64  # never above the batch


def test_gpu_chunks_scale_with_the_cards_total_memory_and_the_dtype(monkeypatch):
    cards = {0: 80 * 2**30, 1: 16 * 2**30}
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: SimpleNamespace(total_memory=cards[device]))

    def on_card(device: int, itemsize: int) -> SimpleNamespace:
        return SimpleNamespace(is_cuda=True, device=device, element_size=lambda: itemsize)

    assert chunks.memory_budget(on_card(0, 4)) == 80 * 2**30 // 32 // 4
    assert chunks.memory_budget(on_card(0, 2)) == 2 * chunks.memory_budget(on_card(0, 4))
    assert chunks.memory_budget(on_card(1, 4), "vmap") == 16 * 2**30 // 4 // 4
    per_sample = 2**24
    assert chunks.auto_chunk(per_sample, 512, on_card(0, 4)) == 80 * 2**30 // 32 // 4 // per_sample
