"""``python -m presets.oci push|pull ...`` (``python3 -m kaito_oci`` in the image)."""

import sys

from .cli import main

sys.exit(main())
