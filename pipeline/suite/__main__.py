"""``python -m pipeline.suite``: the style-shifted base-to-new suite (:mod:`pipeline.suite.grid`)."""

from pipeline.config import run_main
from pipeline.suite.grid import main

if __name__ == "__main__":
    raise SystemExit(run_main(main))
