"""``python -m loralite ...`` (also what ``torchrun -m loralite train`` runs)."""

import sys

from loralite.cli import main

sys.exit(main())
