import pytest
import torch
import torchvision
from torch import nn

from paramsal import InputError, load_reference_stats, units_of
from paramsal.ranking.stats import REFERENCE_MODELS
from paramsal.rundir import units_table

TORCHVISION_FACTORIES = {
    "resnet50": lambda: torchvision.models.resnet50(),
    "vgg19": lambda: torchvision.models.vgg19(),
    "densenet121": lambda: torchvision.models.densenet121(),
    "inception_v3": lambda: torchvision.models.inception_v3(init_weights=False, aux_logits=True),
}


@pytest.mark.parametrize("name", REFERENCE_MODELS)
def test_filter_units_of_torchvision_models_match_the_authors_statistics(name):
    with torch.device("meta"):
        model = TORCHVISION_FACTORIES[name]()
    index = units_of(model)
    assert len(index) == load_reference_stats(name).num_units
    assert len(index) == sum(p.shape[0] for p in model.parameters() if p.dim() == 4)


def test_filter_units_follow_named_parameters_order():
    with torch.device("meta"):
        model = torchvision.models.resnet18()
    index = units_of(model)
    four_dim = [n for n, p in model.named_parameters() if p.dim() == 4]
    assert index.param_names == four_dim
    table = units_table(index.columns())
    assert table.column("unit_id").to_pylist() == list(range(len(index)))
    first = index.groups[0]
    assert table.slice(0, 1).to_pylist()[0] == {
        "unit_id": 0, "param": "conv1.weight", "module": "conv1", "layer": 0, "channel": 0,
        "size": 3 * 7 * 7}
    assert first.num_units == 64 and index.groups[1].offset == 64


def test_schemes_select_the_documented_parameters():
    model = nn.Sequential(nn.Conv1d(2, 3, 3), nn.Conv2d(3, 4, 3), nn.Conv3d(4, 5, 1), nn.Linear(5, 6),
                          nn.ConvTranspose2d(6, 7, 2))
    assert [g.param_name for g in units_of(model, "filters")] == ["1.weight", "4.weight"]
    assert [g.param_name for g in units_of(model, "conv")] == ["0.weight", "1.weight", "2.weight"]
    conv_linear = units_of(model, "conv+linear")
    assert [g.param_name for g in conv_linear] == ["0.weight", "1.weight", "2.weight", "3.weight"]
    assert len(conv_linear) == 3 + 4 + 5 + 6
    columns = units_of(model, "linear-columns")
    assert [(g.param_name, g.num_units, int(g.sizes[0])) for g in columns] == [("3.weight", 5, 6)]


def test_custom_units_count_elements_and_reject_bad_assignments():
    model = nn.Linear(4, 2)
    index = units_of(model, lambda name, p: torch.tensor([[0, 0, 1, -1], [1, 1, 1, 0]]) if name == "weight" else None)
    (group,) = index.groups
    assert group.num_units == 2 and group.sizes.tolist() == [3, 4]
    with pytest.raises(InputError, match="empty units"):
        units_of(model, lambda name, p: torch.full(p.shape, 2) if name == "weight" else None)
    with pytest.raises(InputError, match="shape"):
        units_of(model, lambda name, p: torch.zeros(3, dtype=torch.long))


def test_unknown_scheme_and_empty_selection_are_errors():
    with pytest.raises(InputError, match="unknown units 'filter'"):
        units_of(nn.Conv2d(1, 1, 1), "filter")
    with pytest.raises(InputError, match="selects no parameter"):
        units_of(nn.Linear(2, 2), "filters")


def test_fingerprint_tells_partitions_apart():
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.Linear(3, 2))
    assert units_of(model).fingerprint() == units_of(model).fingerprint()
    assert units_of(model).fingerprint() != units_of(model, "conv+linear").fingerprint()
