"""``python -m paramsal.cli``: the ``paramsal`` command."""

import sys

from paramsal.cli import main

sys.exit(main())
