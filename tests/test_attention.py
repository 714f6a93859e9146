"""nn.MultiheadAttention on the hooks backend (kernels/attention.py), against the one-sample loop in float64."""

from __future__ import annotations

import warnings

import pytest
import torch
from nets import relative_error
from torch import nn

from paramsal import Profiler, UnsupportedModuleError, profile_batch
from paramsal.errors import ParamsalWarning

TOLERANCE = 1e-9


def rows_of_every_matrix(name: str, param: torch.Tensor) -> torch.Tensor | None:
    """A unit per row of every 2-D parameter (in_proj_weight's rows are Q, K and V's output features)."""
    if param.dim() != 2:
        return None
    return torch.arange(param.shape[0])[:, None].expand_as(param).contiguous()


def every_parameter(name: str, param: torch.Tensor) -> torch.Tensor:
    """One unit per parameter tensor, biases too."""
    return torch.zeros(param.shape, dtype=torch.long)


class Encoder(nn.Module):
    """Tokens through one attention block, time-major or batch-first, with optional masks or a second source."""

    def __init__(self, batch_first: bool, cross: bool = False, causal: bool = False, padding: bool = False,
                 need_weights: bool = False, bias_kv: bool = False):
        super().__init__()
        self.batch_first, self.cross, self.causal, self.padding = batch_first, cross, causal, padding
        self.need_weights = need_weights
        self.embed = nn.Linear(3, 8)
        self.attention = nn.MultiheadAttention(8, 2, batch_first=batch_first, add_bias_kv=bias_kv)
        self.head = nn.Linear(8, 4)

    def forward(self, x):  # x [N, T, 3]
        h = torch.tanh(self.embed(x))
        source = torch.flip(h, dims=(1,)) * 0.5 if self.cross else h
        if not self.batch_first:
            h, source = h.transpose(0, 1), source.transpose(0, 1)
        steps = x.shape[1]
        mask = torch.triu(torch.full((steps, steps), float("-inf"), dtype=x.dtype), 1) if self.causal else None
        padding = (x[..., 0] > 1.2) if self.padding else None  # per sample: some positions left out
        key = source if self.cross else h
        out, _ = self.attention(h, key, key, attn_mask=mask, key_padding_mask=padding,
                                need_weights=self.need_weights)
        out = out if self.batch_first else out.transpose(0, 1)
        return self.head(out.mean(1))


SERVED = {
    "batch_first": dict(batch_first=True),
    "time_major": dict(batch_first=False),
    "cross_attention": dict(batch_first=True, cross=True),
    "causal_mask": dict(batch_first=False, causal=True),
    "key_padding": dict(batch_first=True, padding=True),
    "bias_kv": dict(batch_first=True, bias_kv=True),
}


def build(**options):
    torch.manual_seed(0)
    model = Encoder(**options).double().eval()
    x = torch.randn(5, 6, 3, dtype=torch.float64)
    x[:, 0, 0] = 0.0  # every sample keeps its first position under the padding mask
    return model, x, torch.tensor([0, 1, 2, 3, 1])


@pytest.mark.parametrize("units", [rows_of_every_matrix, every_parameter, "conv+linear", "heads", "linear-rows"],
                         ids=str)
@pytest.mark.parametrize("name", SERVED)
def test_served_attention_equals_the_loop(name, units):
    model, x, y = build(**SERVED[name])
    want = profile_batch(model, x, y, backend="loop", units=units)
    assert want.abs().max() > 0
    with warnings.catch_warnings():
        warnings.simplefilter("error", ParamsalWarning)  # no fallback: hooks serves the call
        profiler = Profiler(model, units=units)
        got = profiler(x, y).profiles
    assert profiler.backend == "hooks"
    assert relative_error(got, want) <= TOLERANCE
    in_proj = [g for g in profiler.index if g.attr == "in_proj_weight"]
    if in_proj and units is rows_of_every_matrix:
        assert in_proj[0].num_units == 24  # Q, K and V's 8 rows each


def test_returned_attention_weights_are_not_served():
    model, x, y = build(batch_first=True, need_weights=True)
    with pytest.raises(UnsupportedModuleError, match="multi_head_attention_forward"):
        profile_batch(model, x, y, backend="hooks", units=rows_of_every_matrix)
    want = profile_batch(model, x, y, backend="loop", units=rows_of_every_matrix)
    with pytest.warns(ParamsalWarning, match="multi_head_attention_forward"):
        got = profile_batch(model, x, y, units=rows_of_every_matrix)
    assert relative_error(got, want) <= TOLERANCE


def test_a_chunk_of_samples_at_a_time_gives_the_same_numbers():
    model, x, y = build(batch_first=False, causal=True)
    whole = profile_batch(model, x, y, backend="hooks", units=rows_of_every_matrix)
    chunked = profile_batch(model, x, y, backend="hooks", units=rows_of_every_matrix, chunk_size=2)
    assert relative_error(chunked, whole) <= TOLERANCE


@pytest.mark.parametrize("name", ["batch_first", "time_major", "causal_mask", "key_padding"])
def test_plain_self_attention_takes_the_batched_path(name, monkeypatch):
    from paramsal.kernels import attention

    def per_sample_vjp(*args, **kwargs):
        raise AssertionError("the per-sample vjp path ran")

    monkeypatch.setattr(attention, "_grads", per_sample_vjp)
    model, x, y = build(**SERVED[name])
    want = profile_batch(model, x, y, backend="loop", units="linear-rows")
    assert relative_error(profile_batch(model, x, y, backend="hooks", units="linear-rows"), want) <= TOLERANCE
