"""``python -m medseg`` (also what ``torchrun -m medseg train ...`` runs)."""

import sys

from medseg.cli import main

sys.exit(main())
