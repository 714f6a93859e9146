"""nn.Embedding on the hooks backend (kernels/embedding.py) and the token and Linear-row unit schemes, against the
one-sample loop in float64."""

from __future__ import annotations

import warnings

import pytest
import torch
from nets import relative_error
from torch import nn

from paramsal import Profiler, UnsupportedModuleError, profile_batch, units_of
from paramsal.errors import ParamsalWarning

TOLERANCE = 1e-9


class Bag(nn.Module):
    """Token ids ``[N, T]`` -> embedding -> a Linear mix per token -> mean -> classes."""

    def __init__(self, padding_idx: int | None = 0, max_norm: float | None = None):
        super().__init__()
        self.embed = nn.Embedding(20, 6, padding_idx=padding_idx, max_norm=max_norm)
        self.mix = nn.Linear(6, 6)
        self.head = nn.Linear(6, 4)

    def forward(self, tokens):
        return self.head(torch.tanh(self.mix(self.embed(tokens))).mean(1))


def tokens() -> torch.Tensor:
    torch.manual_seed(1)
    ids = torch.randint(1, 20, (5, 7))
    ids[0, :3] = 4  # a token used three times by one sample: its gradients add before |.|
    ids[1, 5:] = 0  # padding
    return ids


def every_parameter(name: str, param: torch.Tensor) -> torch.Tensor:
    return torch.zeros(param.shape, dtype=torch.long)


@pytest.mark.parametrize("padding_idx", [0, -20, None])
@pytest.mark.parametrize("units", ["embedding-rows", "linear-rows", every_parameter], ids=str)
def test_embeddings_on_hooks_equal_the_loop(units, padding_idx):
    torch.manual_seed(0)
    model = Bag(padding_idx).double().eval()
    x, y = tokens(), torch.tensor([0, 1, 2, 3, 0])
    want = profile_batch(model, x, y, backend="loop", units=units)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ParamsalWarning)
        profiler = Profiler(model, units=units)
        got = profiler(x, y).profiles
    assert profiler.backend == "hooks"
    assert relative_error(got, want) <= TOLERANCE
    if units == "embedding-rows":
        assert got.shape[1] == 20
        unused = torch.ones(5, 20, dtype=torch.bool)
        unused[torch.arange(5)[:, None], x] = False
        assert (got[unused] == 0).all() and (got[~unused] > 0).any()  # a sample's saliency lives in its tokens
        if padding_idx is not None:
            assert (got[:, 0] == 0).all()


def test_the_schemes_pick_their_parameters():
    model = Bag()
    assert [g.param_name for g in units_of(model, "embedding-rows")] == ["embed.weight"]
    assert [g.param_name for g in units_of(model, "linear-rows")] == ["mix.weight", "head.weight"]
    attention = nn.MultiheadAttention(8, 2)
    assert [g.param_name for g in units_of(attention, "linear-rows")] == ["in_proj_weight", "out_proj.weight"]


def test_heads_are_the_rows_of_each_head_and_the_columns_its_values_feed():
    attention = nn.MultiheadAttention(8, 2)
    groups = {g.param_name: g for g in units_of(attention, "heads")}
    assert list(groups) == ["in_proj_weight", "out_proj.weight"]
    rows = groups["in_proj_weight"].assignment[:, 0]
    assert rows.tolist() == [0] * 4 + [1] * 4 + [2] * 4 + [3] * 4 + [4] * 4 + [5] * 4  # Q0 Q1 K0 K1 V0 V1
    assert groups["out_proj.weight"].assignment[0].tolist() == [0] * 4 + [1] * 4
    model = nn.Sequential()
    model.add_module("attention", attention)
    assert [g.param_name for g in units_of(model, "heads")] == ["attention.in_proj_weight",
                                                                 "attention.out_proj.weight"]


def test_a_max_norm_embedding_is_not_served():
    torch.manual_seed(0)
    model = Bag(max_norm=1.0).double().eval()
    x, y = tokens(), torch.tensor([0, 1, 2, 3, 0])
    with pytest.raises(UnsupportedModuleError, match="torch.nn.functional.embedding"):
        profile_batch(model, x, y, backend="hooks", units="embedding-rows")
