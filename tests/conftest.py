import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))  # the shared test networks in nets.py

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
