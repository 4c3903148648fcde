"""``python -m bench``: run every benchmark scenario (see :mod:`bench.run`)."""

import sys

from bench.run import main

sys.exit(main())
