"""``python -m momkit`` is the ``momkit`` command."""

import sys

from momkit.cli import main

if __name__ == "__main__":  # a child process started by "spawn" imports this module again: it must not run the command
    sys.exit(main())
