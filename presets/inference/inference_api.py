"""KAITO transformers inference server: ``python /workspace/tfs/inference_api.py --pipeline=text-generation ...``.

Kept at upstream's path and with upstream's flags; see README.md in this directory for the launch command.
"""

from __future__ import annotations

import sys
from pathlib import Path

# The image copies this file and the kaito_inference package side by side into /workspace/tfs; make the
# package importable however the script is launched (python, accelerate launch, torchrun).
sys.path.insert(0, str(Path(__file__).resolve().parent))

from kaito_inference.cli import main

if __name__ == "__main__":
    sys.exit(main())
