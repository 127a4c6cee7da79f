"""``python -m pipeline.digits_demo``: the end-to-end digits demo (:mod:`pipeline.digits_demo.run`)."""

import sys

from pipeline.digits_demo.run import main

sys.exit(main())
