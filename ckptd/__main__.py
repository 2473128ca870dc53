"""``python -m ckptd`` is the ``ckptd`` command."""

import sys

from ckptd.cli import main

if __name__ == "__main__":  # not when a worker process re-imports the main module
    sys.exit(main())
