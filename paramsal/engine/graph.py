"""Reading what a forward pass left: the autograd graph's edges into parameters, and where a call came from."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import torch

#: Where a call is reported from: the first frame outside torch and this package.
_SKIPPED_FILES = (str(Path(torch.__file__).parent), str(Path(__file__).parents[1]))


def parameter_edges(root, params: dict[int, torch.Tensor]) -> list[tuple[int, int, str]]:
    """``(id, node number, node name)`` of every edge into one of ``params`` (by id) reachable from ``root``."""
    edges = []
    seen = {root}
    stack = [root]
    while stack:
        node = stack.pop()
        for child, _ in node.next_functions:
            if child is None:
                continue
            variable = getattr(child, "variable", None)
            if variable is not None:
                if params.get(id(variable)) is variable:
                    edges.append((id(variable), node._sequence_nr(), node.name()))
            elif child not in seen:
                seen.add(child)
                stack.append(child)
    return edges


def caller_outside() -> str:
    """`` at file:line`` of the innermost caller outside torch and paramsal (the model's code), if any."""
    frame: types.FrameType | None = sys._getframe(1)
    while frame is not None and frame.f_code.co_filename.startswith(_SKIPPED_FILES):
        frame = frame.f_back
    return f" at {Path(frame.f_code.co_filename).name}:{frame.f_lineno}" if frame is not None else ""
