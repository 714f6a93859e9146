"""The float64 oracles every fast path is checked against, public so that users can check theirs.

* :func:`reference_profiles`: raw profiles, one sample and one unit at a time (the paper's semantics);
* :func:`check_reducer`: a registered reducer against it, in one call;
* :func:`stepped_copy`: a deep copy after one real ``torch.optim.SGD`` step on one sample (fine-tuning);
* :func:`pruned_copy`: a deep copy with units really zeroed (pruning);
* :func:`zeroed_copy`: a deep copy with every weight of some units zeroed, for units of any partition (neurons, heads);
* :func:`attribution_loop`: input-space saliency one sample at a time with ``autograd.grad`` (double backward).
"""

from __future__ import annotations

from paramsal._lazy import lazy_getattr

_LAZY = {"reference_profiles": "profiles", "check_reducer": "reducers", "stepped_copy": "steps",
         "pruned_copy": "editing", "zeroed_copy": "editing", "attribution_loop": "input_saliency"}

__all__ = ["attribution_loop", "check_reducer", "pruned_copy", "reference_profiles", "stepped_copy", "zeroed_copy"]


__getattr__ = lazy_getattr(__name__, _LAZY)
