"""``python -m paramsal`` (and ``torchrun -m paramsal``): the ``paramsal`` command."""

import sys

from paramsal.cli import main

sys.exit(main())
