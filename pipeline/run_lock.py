"""A run folder belongs to one run at a time (docs/ARCHITECTURE.md section 9).

Every training or evaluation run holds ``<run_dir>/run.lock`` for its whole life: a small JSON file naming
the holder (pid, host, SLURM job id, start time). A second run on the same folder refuses to start with
:class:`RunDirLocked`, naming the folder and the holder, instead of deleting the first run's metrics or
interleaving checkpoints with it.

The lock file is created complete or not at all (written under a temporary name, then hard-linked to
``run.lock``, which fails when the name exists), so a reader never sees a half-written holder. A lock
left behind is taken over, with a warning naming it, when

- its holder ran on this host and that process no longer exists (a killed or crashed run), or
- it belongs to the same SLURM job as this process (``SLURM_JOB_ID``): a requeued job resumes its own run,
  possibly on another node.

Any other existing lock is live as far as this process can tell (a process on another host cannot be
probed): the message says how to remove it once the user knows the holder is gone.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import tempfile
import time
from pathlib import Path
from typing import Any

from pipeline.config import ConfigError

log = logging.getLogger(__name__)

LOCK_FILE = "run.lock"


class RunDirLocked(ConfigError):
    """Another live run holds the run folder."""


def _holder() -> dict[str, Any]:
    return {"pid": os.getpid(), "host": socket.gethostname(), "slurm_job_id": os.environ.get("SLURM_JOB_ID", ""),
            "started": time.time()}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _describe(holder: dict[str, Any]) -> str:
    job = f", SLURM job {holder['slurm_job_id']}" if holder.get("slurm_job_id") else ""
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("started", 0)))
    return f"pid {holder.get('pid')} on host {holder.get('host')!r}{job}, since {since}"


class RunLock:
    """Exclusive hold of ``run_dir`` for the life of a ``with`` block (see the module docstring)."""

    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_FILE
        self.holder = _holder()
        self.took_over: dict[str, Any] | None = None

    def acquire(self) -> RunLock:
        """Take the lock or raise :class:`RunDirLocked` naming the folder and the live holder."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        for _ in range(3):  # a stale lock removed by us (or a concurrent taker) is retried
            if self._create():
                return self
            current = self._read()
            if current is None:  # vanished between our attempt and the read: try again
                continue
            reason = self._stale(current)
            if reason is None:
                raise RunDirLocked(
                    f"run folder {self.run_dir} is in use by another run ({_describe(current)}); wait for it to "
                    f"finish or use another folder. If that process is gone (e.g. on another host), delete {self.path}")
            log.warning("%s: taking over the lock of %s (%s)", self.run_dir, _describe(current), reason)
            self.took_over = current
            self.path.unlink(missing_ok=True)
        raise RunDirLocked(f"run folder {self.run_dir}: could not take {self.path} (other runs keep taking it)")

    def _create(self) -> bool:
        fd, tmp = tempfile.mkstemp(dir=self.run_dir, prefix=f".{LOCK_FILE}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(self.holder, f)
            os.link(tmp, self.path)  # atomic and exclusive: fails when run.lock exists
            return True
        except FileExistsError:
            return False
        finally:
            Path(tmp).unlink(missing_ok=True)

    def _read(self) -> dict[str, Any] | None:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (ValueError, OSError) as e:
            raise RunDirLocked(f"run folder {self.run_dir}: {self.path} exists but is unreadable ({e}); if no run "
                               "uses this folder, delete it") from None
        if not isinstance(data, dict):
            raise RunDirLocked(f"run folder {self.run_dir}: {self.path} does not hold a lock record; if no run uses "
                               "this folder, delete it")
        return data

    def _stale(self, holder: dict[str, Any]) -> str | None:
        """Why ``holder``'s lock may be taken over, or ``None`` when it may be live."""
        if holder.get("slurm_job_id") and holder.get("slurm_job_id") == self.holder["slurm_job_id"]:
            return "same SLURM job: a requeued run resumes"
        if holder.get("host") == self.holder["host"] and isinstance(holder.get("pid"), int):
            if holder["pid"] == self.holder["pid"]:
                return None  # this very process holds it: a nested run on the same folder is a bug
            if not _alive(holder["pid"]):
                return "stale: that process no longer exists on this host"
        return None

    def release(self) -> None:
        """Remove the lock file if it is still ours."""
        try:
            current = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return
        if isinstance(current, dict) and (current.get("pid"), current.get("host")) == (
                self.holder["pid"], self.holder["host"]):
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()
