import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))  # the shared test networks in nets.py

# Without a GPU, the fused Triton kernel is checked through Triton's interpreter,
# which must be chosen before Triton is first imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
