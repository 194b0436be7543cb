"""`python -m sadag ...` (and `torchrun -m sadag ...`): the `sadag` command."""

import sys

from .cli import main

sys.exit(main())
