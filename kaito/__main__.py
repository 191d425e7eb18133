"""``python -m kaito``: the workspace controller (same as the ``kaito-controller`` console script)."""

import sys

from kaito.cmd import main

sys.exit(main())
