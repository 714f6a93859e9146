"""A data set for the torchrun tests: the demo's first samples; rank 1 kills itself once at a chosen sample,
or reads other samples.

Imported by ``paramsal profile --data killing_data:samples`` in the ranks
torchrun starts (``PYTHONPATH`` names this folder). The kill happens only
while the DataLoader reads the sample for profiling (not while the data
set's fingerprint probes it) and only while the marker file is absent; the
marker is written first, so the same command run again goes through.
"""

import os
import signal
import sys
from pathlib import Path

from torch.utils.data import Dataset

from paramsal.zoo import demo_dataset

SAMPLES = 384
MARKER = "PARAMSAL_TEST_KILL_MARKER"
KILL_AT = "PARAMSAL_TEST_KILL_AT"
#: Set: rank 1 reads other samples than rank 0 (a job whose ranks do not see the same data).
OTHER_DATA = "PARAMSAL_TEST_OTHER_DATA"


class Samples(Dataset):
    def __init__(self):
        other = os.environ.get(OTHER_DATA) and os.environ.get("RANK") == "1"
        self.data = demo_dataset("train" if other else "test")

    def __len__(self):
        return SAMPLES

    def __getitem__(self, i):
        if self._kill_here(i):
            Path(os.environ[MARKER]).write_text("killed once")
            os.kill(os.getpid(), signal.SIGKILL)
        return self.data[i]

    @staticmethod
    def _kill_here(i: int) -> bool:
        marker = os.environ.get(MARKER)
        return (marker is not None and not Path(marker).exists() and os.environ.get("RANK") == "1"
                and i == int(os.environ[KILL_AT]) and sys._getframe(2).f_code.co_filename.endswith("loading.py"))


def samples():
    return Samples()
