"""``python -m models.cli``: the same as the ``edge-models`` command."""

import sys

from models.cli import main

sys.exit(main())
