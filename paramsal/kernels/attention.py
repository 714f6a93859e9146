"""Per-sample reductions for ``F.multi_head_attention_forward``, the computation of ``nn.MultiheadAttention``.

The projections inside the function run on time-major tensors ``[L, N, E]``
(whatever the module's ``batch_first``), and its packed ``in_proj_weight``
serves Q, K and V at once, so the Linear reducers cannot serve them. This rule
serves the whole call instead. A plain self-attention (ViT,
``nn.TransformerEncoderLayer``) is run as its parts in the forward pass
(:func:`decomposed_attention`): its projections become batch-first Linear
calls, served as such. Any other call keeps the function: each sample's
gradients of its parameters are the vector-Jacobian product of that sample's
own attention (``torch.func.vjp`` under ``vmap``, a chunk of samples at a
time) with its output gradient, then reduced to units like any whole gradient.

Served calls: batched (3-D) inputs, no dropout in effect, ``need_weights=False``
(otherwise the returned attention weights are a second output a loss could
use, which this rule would not see), no ``static_k``/``static_v``, and masks
that are shared (``attn_mask`` 2-D, which a causal call must pass) or per sample
(``key_padding_mask`` 2-D).
Other calls are not served, so the hooks backend refuses them by name and
``auto`` falls back to vmap.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import torch
import torch.nn.functional as F

from paramsal.kernels.chunks import chunk_slices
from paramsal.kernels.reduce import Aggregation, ParamUnits, reduce_grad

#: The call's parameters, by their names in its signature.
PARAMETERS = ("in_proj_weight", "in_proj_bias", "bias_k", "bias_v", "out_proj_weight", "out_proj_bias",
              "q_proj_weight", "k_proj_weight", "v_proj_weight")
_SIGNATURE = inspect.signature(F.multi_head_attention_forward)
#: Samples whose whole gradients are formed at once (each holds every parameter of the call).
_CHUNK = 16


@dataclass(frozen=True)
class AttentionCall:
    """One served call: everything but the query, batch-first and detached, and its parameters by role."""

    key: torch.Tensor
    value: torch.Tensor
    self_attention: bool
    settings: dict[str, Any]
    key_padding_mask: torch.Tensor | None
    params: dict[str, torch.Tensor | None] = field(repr=False)


def attention_call(args: tuple, kwargs: dict[str, Any]
                   ) -> tuple[AttentionCall, torch.Tensor, dict[str, torch.Tensor | None]]:
    """Parses a call: ``(call, query [N, L, E], parameters by role)``; no roles for a call this rule cannot serve."""
    bound = _SIGNATURE.bind(*args, **kwargs)
    bound.apply_defaults()
    given = dict(bound.arguments)
    query, key, value = given["query"], given["key"], given["value"]
    mask, attn_mask = given["key_padding_mask"], given["attn_mask"]
    served = (query.dim() == 3 and not (given["training"] and given["dropout_p"] > 0) and not given["need_weights"]
              and given["static_k"] is None and given["static_v"] is None
              and (mask is None or mask.dim() == 2) and (attn_mask is None or attn_mask.dim() == 2)
              and not (given["is_causal"] and attn_mask is None))
    roles = {name: given[name] for name in PARAMETERS} if served else {}
    settings = {name: given[name] for name in ("embed_dim_to_check", "num_heads", "add_zero_attn",
                                                 "use_separate_proj_weight")}
    settings["attn_mask"] = None if attn_mask is None else attn_mask.detach()
    call = AttentionCall(key.detach().transpose(0, 1), value.detach().transpose(0, 1),
                         key is query and value is query, settings,
                         None if mask is None else mask.detach(),
                         {name: given[name] for name in PARAMETERS})
    return call, query.transpose(0, 1), roles


def decomposed_attention(args: tuple, kwargs: dict[str, Any], linear: Callable[..., torch.Tensor]) -> Any:
    """A plain self-attention call (:func:`_projections_suffice`) run as its parts, or None for any other call.

    The two projections go through ``linear`` on batch-first tensors, where
    the hooks backend serves them as Linear layers (rows are samples), and the
    attention between them through ``F.scaled_dot_product_attention``. Nothing
    is computed twice then: the batch's own backward pass gives each
    projection's output gradient. The output equals the call's up to rounding.
    """
    call, query, roles = attention_call(args, kwargs)
    if not roles or not _projections_suffice(call, list(PARAMETERS[:2]) + list(PARAMETERS[4:6])):
        return None
    params, heads = call.params, call.settings["num_heads"]
    batch, steps, width = query.shape
    packed = linear(query, params["in_proj_weight"], params["in_proj_bias"])  # [N, L, 3E]
    q, k, v = (t.reshape(batch, steps, heads, width // heads).transpose(1, 2) for t in packed.chunk(3, dim=-1))
    mixed = F.scaled_dot_product_attention(q, k, v, attn_mask=_additive_mask(call, query, steps))
    out = linear(mixed.transpose(1, 2).reshape(batch, steps, width), params["out_proj_weight"],
                 params["out_proj_bias"])
    return out.transpose(0, 1), None  # time-major, as the call returns it; no weights (need_weights=False)


def _additive_mask(call: AttentionCall, query: torch.Tensor, steps: int) -> torch.Tensor | None:
    """The call's ``attn_mask [L, S]`` and ``key_padding_mask [N, S]`` as one float mask ``[N or 1, 1, L, S]``."""
    masks = [call.settings["attn_mask"], call.key_padding_mask]
    if all(m is None for m in masks):
        return None
    total = query.new_zeros(1, 1, steps, steps)
    for mask, shape in zip(masks, ((1, 1, steps, steps), (-1, 1, 1, steps))):
        if mask is not None:
            mask = mask.reshape(shape)
            total = total + (mask.to(query.dtype) if mask.is_floating_point()
                             else torch.zeros_like(mask, dtype=query.dtype).masked_fill(mask, float("-inf")))
    return total


def attention_grad_sample(call: AttentionCall, activations: torch.Tensor, backprops: torch.Tensor,
                          attr: str) -> torch.Tensor:
    """Each sample's whole gradient of the parameter in role ``attr``: ``[B, *shape]``."""
    if _projections_suffice(call, [attr]):
        return _projection_grads(call, activations, backprops, [attr], slice(None))[attr]
    return _grads(call, activations, backprops, [attr], None)[attr]


def _projections_suffice(call: AttentionCall, attrs: Sequence[str]) -> bool:
    """Whether the units sit in the two projections of a plain self-attention (ViT, ``nn.TransformerEncoderLayer``):
    then the batch's own backward through the attention gives each projection's output gradient, per sample."""
    return (call.self_attention and call.params["in_proj_weight"] is not None and call.params["bias_k"] is None
            and not call.settings["add_zero_attn"] and not call.settings["use_separate_proj_weight"]
            and set(attrs) <= {"in_proj_weight", "in_proj_bias", "out_proj_weight", "out_proj_bias"})


def _projection_grads(call: AttentionCall, query: torch.Tensor, backprops: torch.Tensor, attrs: Sequence[str],
                      rows: slice) -> dict[str, torch.Tensor]:
    """Per-sample gradients of the two projections from one batched pass, no per-sample autograd.

    The packed input projection ``P = x W_in^T + b_in`` is formed as the call
    formed it, then the call runs again on ``P`` with identity projections
    (a product with an identity is exact), which gives the attention's output
    ``O`` before ``out_proj``. Attention keeps samples apart, so autograd on
    the batch gives each sample's gradient of ``P``; with ``O`` and the output
    gradient ``G`` the per-sample gradients are those of two Linear layers.
    """
    dtype = query.dtype
    params, settings = _in_dtype(call, dtype)
    x = query[rows].transpose(0, 1)  # [L, B, E], time-major as the call saw it
    steps, batch, width = x.shape
    grad_out = backprops[:, rows].to(dtype)  # [L, B, E]
    identity = torch.eye(width, dtype=dtype, device=x.device)
    mask = call.key_padding_mask
    attn_mask = settings["attn_mask"]
    with torch.enable_grad():
        packed = F.linear(x, cast(torch.Tensor, params["in_proj_weight"]), params["in_proj_bias"])
        packed = packed.detach().requires_grad_(True)
        q, k, v = packed.chunk(3, dim=-1)
        mixed, _ = F.multi_head_attention_forward(
            q, k, v, width, settings["num_heads"], None, None, None, None, False, 0.0, identity, None,
            training=False, key_padding_mask=None if mask is None else mask[rows], need_weights=False,
            attn_mask=attn_mask, use_separate_proj_weight=True, q_proj_weight=identity, k_proj_weight=identity,
            v_proj_weight=identity)
        grad_packed, = torch.autograd.grad(mixed, [packed], grad_out @ cast(torch.Tensor, params["out_proj_weight"]))
    sides = {"in_proj": (x.transpose(0, 1), grad_packed.transpose(0, 1)),
             "out_proj": (mixed.detach().transpose(0, 1), grad_out.transpose(0, 1))}
    grads = {}
    for attr in attrs:
        inputs, grad = sides[attr.rpartition("_")[0]]
        grads[attr] = grad.sum(1) if attr.endswith("bias") else torch.bmm(grad.transpose(1, 2), inputs)
    return grads


def reduce_attention(call: AttentionCall, activations: torch.Tensor, backprops: torch.Tensor,
                     groups: Sequence[ParamUnits], aggregation: Aggregation,
                     chunk_size: int | None = None) -> list[torch.Tensor]:
    """Per-sample, per-unit saliency of the call's unit parameters (``groups`` by role).

    Args:
        call: the parsed call.
        activations: the query ``[B, L, E]`` (batch-first).
        backprops: the gradient of the summed losses w.r.t. the attention output ``[L, B, E]``.
    """
    attrs = list(dict.fromkeys(g.attr for g in groups))
    out: dict[str, list[torch.Tensor]] = {g.attr: [] for g in groups}
    fast = _projections_suffice(call, attrs)
    for rows in chunk_slices(len(activations), chunk_size or _CHUNK):
        grads = (_projection_grads if fast else _grads)(call, activations, backprops, attrs, rows)
        for group in groups:
            out[group.attr].append(reduce_grad(grads[group.attr], group, aggregation))
    return [torch.cat(out[g.attr]) for g in groups]


def _in_dtype(call: AttentionCall, dtype: torch.dtype) -> tuple[dict[str, torch.Tensor | None], dict[str, Any]]:
    """The call's parameters (detached) and settings with a float ``attn_mask``, in ``dtype``: under autocast the
    reducers take float32 copies of what the forward pass saw in bf16."""
    params = {name: (None if p is None else p.detach().to(dtype)) for name, p in call.params.items()}
    settings = dict(call.settings)
    if settings["attn_mask"] is not None and settings["attn_mask"].is_floating_point():
        settings["attn_mask"] = settings["attn_mask"].to(dtype)
    return params, settings


def _grads(call: AttentionCall, query: torch.Tensor, backprops: torch.Tensor, attrs: list[str],
           rows: slice | None) -> dict[str, torch.Tensor]:
    rows = rows or slice(None)
    dtype = query.dtype
    params, settings = _in_dtype(call, dtype)

    def one(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
            grad: torch.Tensor) -> tuple[torch.Tensor, ...]:
        k, v = (q, q) if call.self_attention else (k, v)

        def attention(*chosen: torch.Tensor) -> torch.Tensor:
            used = {**params, **dict(zip(attrs, chosen))}
            # need_weights=True takes the explicit softmax path, which vmap batches (the fused kernel it
            # replaces has no batching rule for its backward); the values are the same
            out, _ = F.multi_head_attention_forward(
                q[:, None], k[:, None], v[:, None], settings["embed_dim_to_check"], settings["num_heads"],
                used["in_proj_weight"], used["in_proj_bias"], used["bias_k"], used["bias_v"],
                settings["add_zero_attn"], 0.0, cast(torch.Tensor, used["out_proj_weight"]), used["out_proj_bias"],
                training=False,
                key_padding_mask=None if mask is None else mask[None], need_weights=True,
                attn_mask=settings["attn_mask"], use_separate_proj_weight=settings["use_separate_proj_weight"],
                q_proj_weight=used["q_proj_weight"], k_proj_weight=used["k_proj_weight"],
                v_proj_weight=used["v_proj_weight"])  # a causal call's attn_mask holds its causality
            return out[:, 0]

        pullback = torch.func.vjp(attention, *(params[a] for a in attrs))[1]
        return tuple(pullback(grad))

    mask = call.key_padding_mask
    with torch.enable_grad():
        grads = torch.func.vmap(one, in_dims=(0, 0, 0, None if mask is None else 0, 0))(
            query[rows], call.key[rows].to(dtype), call.value[rows].to(dtype), None if mask is None else mask[rows],
            backprops.transpose(0, 1)[rows].to(dtype))
    return dict(zip(attrs, grads))
