"""The bottom of the package: per-layer reducers that turn a layer's activations and backpropagated gradients into
per-sample unit numbers (convolutions, linear, embedding, norms, attention), the reduction of a gradient to units,
the fused Triton kernel and its tiles, TF32 control, and the registry that maps a module or call to its reducer.
Pure functions of tensors: nothing here imports the rest of paramsal."""

from paramsal.kernels.reduce import AGGREGATIONS, Aggregation, reduce_grad, scatter_reduce
from paramsal.kernels.registry import ReducerEntry, find_reducer, register_reducer, unregister_reducer

__all__ = ["AGGREGATIONS", "Aggregation", "ReducerEntry", "find_reducer", "reduce_grad",
           "register_reducer", "scatter_reduce", "unregister_reducer"]
