"""``python -m torchdefects``: the same as the ``torchdefects`` command."""

import sys

from torchdefects.cli import main

if __name__ == "__main__":
    sys.exit(main())
