"""``paramsal`` with an ``--out`` of its own per rank: the ranks of one torchrun job on machines without a shared
filesystem, each seeing a different directory under the same name (``--out DIR`` becomes ``DIR-rank<RANK>``).

Run by the torchrun tests as ``-m rank_dirs ARGS`` (``PYTHONPATH`` names this folder).
"""

import os
import sys

from paramsal.cli import main

if __name__ == "__main__":
    args = sys.argv[1:]
    at = args.index("--out") + 1
    args[at] = f"{args[at]}-rank{os.environ['RANK']}"
    sys.exit(main(args))
