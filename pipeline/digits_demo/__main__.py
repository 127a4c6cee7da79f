"""``python -m pipeline.digits_demo``: the end-to-end digits demo (:mod:`pipeline.digits_demo.run`)."""

import sys

from pipeline.config import run_main
from pipeline.digits_demo.run import main

sys.exit(run_main(main))
