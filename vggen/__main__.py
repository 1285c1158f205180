"""``python -m vggen``: the command line (see :mod:`vggen.tools.cli`)."""

import sys

from vggen.tools.cli import main

if __name__ == "__main__":
    sys.exit(main())
