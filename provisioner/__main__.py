"""``python -m provisioner``: run the gpu-provisioner (see :mod:`provisioner.cmd`)."""

import sys

from provisioner.cmd import main

if __name__ == "__main__":
    sys.exit(main())
