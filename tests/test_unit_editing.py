"""Per-sample unit surgery: hooks in one batched pass equal one really edited model copy per sample."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from nets import SMALL_CASES, TORCHVISION_CASES, batch, build
from torch import nn

from paramsal.analyses.noise import gaussian_deltas
from paramsal.analyses.unit_editing import UnitEditor, unit_mask
from paramsal.errors import InputError
from paramsal.reference import pruned_copy
from paramsal.zoo import demo_dataset, demo_model

EDITABLE_CASES = [c for c in SMALL_CASES if c.units != "linear-columns"]


@pytest.fixture(scope="module")
def demo():
    model = demo_model().eval()
    data = demo_dataset("test")
    images = torch.stack([data[i][0] for i in range(8)])
    return model, images, UnitEditor.locate(model, images[:1])


def random_units(num_units: int, sizes, seed: int) -> list[np.ndarray]:
    """One set of distinct random units per size (all of them where a size exceeds the count)."""
    rng = np.random.default_rng(seed)
    return [rng.choice(num_units, size=min(k, num_units), replace=False) for k in sizes]


def _following_bn_by_name(conv_name: str) -> str:
    """The demo model's BatchNorm after each conv, from its source (independent of the probe)."""
    if conv_name.endswith("shortcut.0"):
        return conv_name[:-1] + "1"
    head, _, tail = conv_name.rpartition(".")
    return f"{head}.bn{tail[len('conv'):]}"


def _zero_by_hand(model: nn.Module, editor: UnitEditor, units) -> None:
    """Zeroes what the masks claim to: the conv filter and the following BN's scale and shift."""
    with torch.no_grad():
        for unit in units:
            site = next(s for s in editor.sites if s.group.offset <= unit < s.group.stop)
            channel = unit - site.group.offset
            conv = model.get_submodule(site.module)
            bn = model.get_submodule(_following_bn_by_name(site.module))
            conv.weight[channel] = 0
            bn.weight[channel] = 0
            bn.bias[channel] = 0


def test_probe_finds_the_batchnorm_after_every_demo_conv(demo):
    _, _, editor = demo
    assert len(editor.index) == 560
    assert all(s.followers == (_following_bn_by_name(s.module),) for s in editor.sites)


def test_every_demo_filter_off_equals_a_copy_with_it_zeroed(demo):
    model, images, editor = demo
    units = np.arange(len(editor.index))
    inputs = images[units % len(images)]
    with torch.no_grad(), editor.switched_off(unit_mask(units[:, None], len(units))):
        masked = model(inputs)
    reference = copy.deepcopy(model)
    saved = {k: v.clone() for k, v in reference.state_dict().items()}
    with torch.no_grad():
        for unit in units:
            _zero_by_hand(reference, editor, [unit])
            expected = reference(inputs[unit:unit + 1])[0]
            torch.testing.assert_close(masked[unit], expected, atol=2e-5, rtol=1e-5, msg=f"unit {unit}")
            reference.load_state_dict(saved)
    with torch.no_grad():
        assert (masked - model(inputs)).abs().amax(1).gt(1e-4).float().mean() > 0.5  # the edits matter


def test_the_channel_after_the_batchnorm_is_zero(demo):
    model, images, editor = demo
    site = editor.sites[6]  # layer2.0.conv2, whose BatchNorm output is added to the shortcut
    seen = {}
    off = torch.zeros(2, len(editor.index), dtype=torch.bool)
    off[0, site.group.offset + 3] = True
    with torch.no_grad(), editor.switched_off(off):
        handle = model.get_submodule(site.followers[0]).register_forward_hook(
            lambda m, i, o: seen.setdefault("out", o.clone()))
        try:
            model(images[:2])
        finally:
            handle.remove()
    assert seen["out"][0, 3].abs().max() == 0
    assert seen["out"][1, 3].abs().max() > 0
    assert seen["out"][0, [0, 1, 2, 4]].abs().max() > 0


def test_each_sample_its_own_units_in_one_batch(demo):
    model, images, editor = demo
    units = random_units(len(editor.index), (1, 5, 20, 50, 100, 0, 20, 300), seed=0)
    with torch.no_grad(), editor.switched_off(unit_mask(units, len(editor.index))):
        masked = model(images)
    with torch.no_grad():
        for n, chosen in enumerate(units):
            reference = copy.deepcopy(model)
            _zero_by_hand(reference, editor, chosen)
            torch.testing.assert_close(masked[n], reference(images[n:n + 1])[0], atol=2e-5, rtol=1e-5)
            torch.testing.assert_close(pruned_copy(editor, chosen)(images[n:n + 1])[0], masked[n],
                                       atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("case", EDITABLE_CASES + TORCHVISION_CASES[:2], ids=lambda c: c.name)
def test_masks_equal_pruned_copies_on_other_layers(case):
    model = build(case, torch.float64)
    inputs, _ = batch(case, 4, torch.float64)
    editor = UnitEditor.locate(model, inputs[:1], case.units)
    units = random_units(len(editor.index), (1, 3, 8, 2), seed=1)
    with torch.no_grad(), editor.switched_off(unit_mask(units, len(editor.index))):
        masked = model(inputs)
        with pytest.raises(InputError, match="outside"):
            pruned_copy(editor, units[0])
    with torch.no_grad():
        for n, chosen in enumerate(units):
            torch.testing.assert_close(masked[n], pruned_copy(editor, chosen)(inputs[n:n + 1])[0])


class ConvBNVariants(nn.Module):
    """Ways a BatchNorm may or may not follow a conv, for the probe."""

    def __init__(self):
        super().__init__()
        self.direct, self.direct_bn = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.inplace, self.inplace_bn = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.shared, self.shared_bn = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.summed, self.summed_bn = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.fc, self.fc_bn = nn.Linear(4, 4), nn.BatchNorm1d(4)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        x = torch.relu(self.direct_bn(self.direct(x)))
        x = self.inplace_bn(torch.relu_(self.inplace(x)))    # changed in place before the BatchNorm
        y = self.shared(x)
        x = self.shared_bn(y) + y                            # the conv output also goes elsewhere
        x = self.summed_bn(self.summed(x) + x)               # the BatchNorm sees a sum, not the conv
        return self.head(self.fc_bn(self.fc(x.mean((2, 3)))))


def _warm(model: nn.Module, shape) -> nn.Module:
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(8, *shape, dtype=torch.float64) * 2 + 0.5)
    return model.eval()


def test_probe_follows_only_batchnorms_fed_by_the_untouched_conv_output():
    torch.manual_seed(0)
    model = _warm(ConvBNVariants().double(), (3, 6, 6))
    inputs = torch.randn(5, 3, 6, 6, dtype=torch.float64)
    editor = UnitEditor.locate(model, inputs[:1], "conv+linear")
    followers = {s.module: s.followers for s in editor.sites}
    assert followers == {"direct": ("direct_bn",), "inplace": (), "shared": ("shared_bn",), "summed": (),
                         "fc": ("fc_bn",), "head": ()}
    units = [[0], [5, 9], [13, 16], [17, 18, 19], [8, 20, 22]]
    with torch.no_grad(), editor.switched_off(unit_mask(units, len(editor.index))):
        masked = model(inputs)
    with torch.no_grad():
        for n, chosen in enumerate(units):
            torch.testing.assert_close(masked[n], pruned_copy(editor, chosen)(inputs[n:n + 1])[0])


def test_hooks_are_gone_after_the_block_even_when_the_forward_raises(demo):
    model, images, editor = demo
    state = {k: v.clone() for k, v in model.state_dict().items()}
    attributes = {name: set(vars(m)) for name, m in model.named_modules()}
    off = unit_mask([[0, 100, 400]] * 2, len(editor.index))
    with pytest.raises(RuntimeError), torch.no_grad(), editor.switched_off(off):
        model(images[:2].repeat(1, 2, 1, 1))  # two channels for a one-channel network: conv1 raises
    with pytest.raises(InputError, match="per-sample mask of 2 samples"), editor.switched_off(off):
        model(images[:3])
    deltas = gaussian_deltas(editor.index, [[0, 100]] * 2, 0.1, [0, 1])
    with torch.no_grad(), editor.perturbed(deltas):
        model(images[:2])
    for name, module in model.named_modules():
        assert not module._forward_hooks and not module._forward_pre_hooks, name
        assert set(vars(module)) == attributes[name], name
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key


def test_units_that_are_not_output_channels_are_refused():
    case = next(c for c in SMALL_CASES if c.units == "linear-columns")
    with pytest.raises(InputError, match="whole output channels"):
        UnitEditor.locate(build(case, torch.float32), batch(case, 1, torch.float32)[0], case.units)
    transposed = nn.Sequential(nn.ConvTranspose2d(2, 3, 3), nn.Flatten())
    with pytest.raises(InputError, match="ConvTranspose2d"):
        UnitEditor.locate(transposed, torch.randn(1, 2, 4, 4))
    model = demo_model()
    editor = UnitEditor.locate(model, torch.zeros(1, 1, 28, 28))
    with pytest.raises(InputError, match="out of range"):
        unit_mask([[560]], 560)
    with pytest.raises(InputError, match="off must be"), editor.switched_off(torch.zeros(2, 10, dtype=torch.bool)):
        pass


def _perturbed_copy(model: nn.Module, deltas, row: int) -> nn.Module:
    copied = copy.deepcopy(model)
    with torch.no_grad():
        for delta in deltas:
            weight = copied.get_parameter(delta.param)
            for sample, channel, value in zip(delta.samples, delta.channels, delta.values):
                if sample == row:
                    weight[channel] += value
    return copied


def test_noise_equals_a_copy_with_that_samples_filters_perturbed(demo):
    model, images, editor = demo
    units = random_units(len(editor.index), (1, 5, 20, 50, 100, 0, 7, 300), seed=2)
    deltas = gaussian_deltas(editor.index, units, 0.05, seeds=range(8))
    with torch.no_grad(), editor.perturbed(deltas):
        noisy = model(images)
    with torch.no_grad():
        clean = model(images)
        for n in range(8):
            expected = _perturbed_copy(model, deltas, n)(images[n:n + 1])[0]
            torch.testing.assert_close(noisy[n], expected, atol=5e-5, rtol=1e-5)
    moved = (noisy - clean).abs().amax(1)
    assert moved[5] == 0 and (moved[[0, 1, 2, 3, 4, 6, 7]] > 1e-3).all()


@pytest.mark.parametrize("case", EDITABLE_CASES + TORCHVISION_CASES[:1], ids=lambda c: c.name)
def test_noise_on_grouped_dilated_padded_and_linear_layers(case):
    model = build(case, torch.float64)
    inputs, _ = batch(case, 3, torch.float64)
    editor = UnitEditor.locate(model, inputs[:1], case.units)
    units = random_units(len(editor.index), (2, 6, 4), seed=3)
    deltas = gaussian_deltas(editor.index, units, 0.3, seeds=[5, 6, 7], dtype=torch.float64)
    with torch.no_grad(), editor.perturbed(deltas):
        noisy = model(inputs)
    with torch.no_grad():
        for n in range(3):
            torch.testing.assert_close(noisy[n], _perturbed_copy(model, deltas, n)(inputs[n:n + 1])[0])


def test_gaussian_deltas_are_seeded_per_sample_and_have_the_asked_std(demo):
    _, _, editor = demo
    index = editor.index
    first = gaussian_deltas(index, [[3, 500], [3, 500]], 0.001, seeds=[11, 12])
    again = gaussian_deltas(index, [[3, 500]], 0.001, seeds=[11])  # alone in its batch
    by_param = {d.param: d for d in first}
    for delta in again:
        other = by_param[delta.param]
        torch.testing.assert_close(other.values[other.samples == 0], delta.values, rtol=0, atol=0)
        assert not torch.equal(other.values[other.samples == 0], other.values[other.samples == 1])
    many = gaussian_deltas(index, [np.arange(400, 560)], 0.001, seeds=[0])
    values = torch.cat([d.values.flatten() for d in many])
    assert values.numel() > 50_000
    assert abs(values.std().item() - 0.001) < 2e-5 and abs(values.mean().item()) < 2e-5
