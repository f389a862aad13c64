"""``python -m paca_lightning.bench``: same as ``paca-lightning bench``."""

import sys

from . import main

sys.exit(main())
