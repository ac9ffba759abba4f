"""``python -m amb_core``: the ``amb`` command, for when its console script is not on PATH."""

import sys

from amb_core.cli import main

sys.exit(main())
