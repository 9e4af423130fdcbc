"""``python -m mlipuq.cli``."""

import sys

from mlipuq.cli import main

sys.exit(main())
