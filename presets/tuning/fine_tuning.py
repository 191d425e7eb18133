"""Fine-tuning entry point (upstream's file name; the image copies it to /workspace/tfs/fine_tuning.py).

``python3 fine_tuning.py`` or ``accelerate launch --num_processes=N fine_tuning.py``; flags in README.md.
"""

import sys
from pathlib import Path

# Run as a script, the package beside this file must be importable whatever the working directory.
sys.path.insert(0, str(Path(__file__).resolve().parent))

from kaito_tuning.cli import main

if __name__ == "__main__":
    sys.exit(main())
