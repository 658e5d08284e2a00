"""Run the ``busseg`` command: ``python -m busseg.cli ...``."""

import sys

from busseg.cli import main

if __name__ == "__main__":  # not when a package walk imports this module
    sys.exit(main())
