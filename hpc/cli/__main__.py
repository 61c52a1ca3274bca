"""``python -m hpc.cli`` is ``mt``."""

import sys

from hpc.cli import main

sys.exit(main())
