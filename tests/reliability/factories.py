"""Model and data factories the reliability tests name in specs (``reliability.factories:NAME``).

``evil_model`` and ``evil_data`` stand for code a tampered run directory names
in its manifest: calling one leaves a sentinel file (its path from the
environment, as an attacker's payload would read anything it likes), so a test
can tell whether analysing the run called it. ``relabelled_data`` is the demo
test split with every class shifted by one: the same images, not the same
data set.
"""

import os
from pathlib import Path

from torch.utils.data import Dataset

SENTINEL_ENV = "PARAMSAL_TEST_SENTINEL"


def _leave_sentinel(what: str) -> None:
    Path(os.environ[SENTINEL_ENV]).write_text(f"{what} factory was called\n")


def evil_model():
    """Leaves the sentinel, then returns the demo model (so that a trusted run still works)."""
    from paramsal.zoo import demo_model

    _leave_sentinel("model")
    return demo_model()


def evil_data():
    """Leaves the sentinel, then returns the demo test split."""
    from paramsal.zoo import demo_dataset

    _leave_sentinel("data")
    return demo_dataset("test")


class _Relabelled(Dataset):
    def __init__(self, data: Dataset, num_classes: int = 10):
        self.data, self.num_classes = data, num_classes

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int):
        x, y = self.data[index]
        return x, (int(y) + 1) % self.num_classes


def relabelled_data():
    """The demo test split, every label shifted by one class."""
    from paramsal.zoo import demo_dataset

    return _Relabelled(demo_dataset("test"))
