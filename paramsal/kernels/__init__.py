"""Per-layer reducers, reductions to units, streaming statistics and the reference loop."""

from paramsal.kernels.reduce import AGGREGATIONS, Aggregation, reduce_grad, scatter_reduce
from paramsal.kernels.registry import ReducerEntry, find_reducer, register_reducer, unregister_reducer

__all__ = ["AGGREGATIONS", "Aggregation", "ReducerEntry", "find_reducer", "reduce_grad",
           "register_reducer", "scatter_reduce", "unregister_reducer"]
