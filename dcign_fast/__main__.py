"""``python -m dcign_fast``: the ``dcign-fast`` command, for environments whose scripts folder is not on PATH."""

import sys

from dcign_fast.cli import main

sys.exit(main())
