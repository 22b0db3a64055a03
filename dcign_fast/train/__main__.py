import sys

from dcign_fast.train.cli import main

sys.exit(main())
