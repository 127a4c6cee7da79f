"""What every benchmark script shares: min/median/max and the command-line wrapper that writes results."""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Callable
from pathlib import Path


def spread(xs: list[float]) -> dict[str, float]:
    """``{"min", "median", "max"}`` of repeated measurements."""
    return {"min": min(xs), "median": statistics.median(xs), "max": max(xs)}


def cli(run: Callable[[list[str]], dict], markdown: Callable[[dict], str], argv: list[str] | None = None) -> dict:
    """Run a benchmark from the command line: ``--json-out`` / ``--markdown-out`` write the result (what
    ``bench/run_all.py`` reads back), the markdown table also goes to stdout."""
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--json-out", default="")
    p.add_argument("--markdown-out", default="")
    known, rest = p.parse_known_args(argv)
    result = run(rest)
    if known.json_out:
        Path(known.json_out).write_text(json.dumps(result, indent=1))
    text = markdown(result)
    if known.markdown_out:
        Path(known.markdown_out).write_text(text + "\n")
    print(text)
    return result
