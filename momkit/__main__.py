"""``python -m momkit`` is the ``momkit`` command."""

import sys

from momkit.cli import main

sys.exit(main())
