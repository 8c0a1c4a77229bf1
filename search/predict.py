"""``python -m search.predict RUN_DIR IMAGES_DIR``: kept for the commands users know; the command lives with
the other stages, in ``analysis.predict``."""

import sys

from analysis.predict import main

if __name__ == "__main__":
    sys.exit(main())
