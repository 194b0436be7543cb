"""`python -m sadag ...` (and `torchrun -m sadag ...`): the `sadag` command."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
