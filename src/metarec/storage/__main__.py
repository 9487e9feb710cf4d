"""``python -m metarec.storage COMMAND ...``: the command line of :mod:`metarec.storage.cli`."""

import sys

from metarec.storage.cli import main

if __name__ == "__main__":
    sys.exit(main())
