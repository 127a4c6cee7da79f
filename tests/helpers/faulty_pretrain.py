"""``pipeline/pretrain.py`` with one injected fault, for the fault tests (run under ``accelerate launch``).

Environment: ``FAULT`` = ``die`` (the rank kills itself with SIGKILL, like the OOM killer or a lost
node: no cleanup, no Python exception) or ``hang`` (the rank stops responding, like a stuck filesystem
read); ``FAULT_RANK``: which rank; ``FAULT_AFTER``: how many meta-steps (tasks) that rank computes first.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import pipeline.pretrain_loop as loop  # noqa: E402
from pipeline import pretrain  # noqa: E402

_real_meta_step = loop.meta_step
_calls = 0


def _faulty_meta_step(*args, **kwargs):
    global _calls
    _calls += 1
    if int(os.environ.get("RANK", "0")) == int(os.environ["FAULT_RANK"]) and _calls > int(os.environ["FAULT_AFTER"]):
        print(f"injecting fault {os.environ['FAULT']!r} on rank {os.environ.get('RANK')}", file=sys.stderr, flush=True)
        if os.environ["FAULT"] == "die":
            os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(3600)
    return _real_meta_step(*args, **kwargs)


loop.meta_step = _faulty_meta_step

if __name__ == "__main__":
    sys.exit(pretrain.main(sys.argv[1:]))
