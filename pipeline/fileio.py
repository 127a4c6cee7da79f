"""Atomic file writes: the one way this package writes a result, checkpoint, marker, cache or report.

Why: jobs here are killed at any moment (SLURM preemption, time limits, OOM, Ctrl-C). A plain
``open(path, "w")`` killed midway leaves half a file under the final name, which the next run or
another rank then reads as if it were complete. :func:`atomic_write` writes to a temp file in the same
folder, flushes and fsyncs it, then ``os.replace``-s it over ``path`` (atomic within one filesystem) and
fsyncs the folder, so a reader or a killed job sees the old file or the complete new one, never half a
file. Temp files are named ``.<name>.<pid>.<random>.tmp``: hidden, and never matching a result glob
such as ``*.npz`` or ``step_*.pt``; one left by a SIGKILLed writer is harmless and may be deleted.

Only the standard library is imported, so every layer of the package can use this module.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

__all__ = ["atomic_write", "atomic_write_bytes", "atomic_write_json", "atomic_write_text"]


def atomic_write(path: str | Path, write: Callable[[BinaryIO], None]) -> Path:
    """Write ``path`` through ``write(file)`` so that readers see the old file or the complete new one.

    ``write`` gets a binary file object opened on a temp file in the same folder (``os.replace`` is
    atomic only within one filesystem); it must not close it. The temp file starts with a dot and ends in
    ``.tmp`` so listings of results never mistake it for one. It is flushed and fsynced before the rename,
    the folder is fsynced after it where the OS allows, and it is removed if anything raises (the old file,
    if any, is then left untouched). Missing parent folders are created. The new file gets the usual
    permissions of a newly created file (``0o666`` minus the umask), not ``mkstemp``'s private ``0o600``.
    Returns ``path`` as a :class:`~pathlib.Path`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            if hasattr(os, "fchmod"):
                os.fchmod(f.fileno(), 0o666 & ~_umask())
            write(f)
            f.flush()
            os.fsync(f.fileno())  # data on disk before the rename makes it visible
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)  # persist the rename itself (the directory entry)
    return path


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Atomically write ``data`` to ``path`` (see :func:`atomic_write`); returns ``path``."""
    return atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path: str | Path, text: str, encoding: str = "utf-8") -> Path:
    """Atomically write ``text`` encoded with ``encoding`` to ``path``; no newline translation.

    Returns ``path``. Like :meth:`pathlib.Path.write_text` on POSIX, but never leaves half a file.
    """
    return atomic_write_bytes(path, text.encode(encoding))


def atomic_write_json(path: str | Path, obj: Any, indent: int | None = 1) -> Path:
    """Atomically write ``json.dumps(obj, indent=indent)`` (UTF-8, no trailing newline) to ``path``.

    Returns ``path``. ``indent=None`` gives the compact one-line form.
    """
    return atomic_write_text(path, json.dumps(obj, indent=indent))


def _fsync_dir(folder: Path) -> None:
    """fsync ``folder`` so a rename inside it survives a power loss; a no-op where the OS refuses.

    Some filesystems (and Windows) do not allow opening or fsyncing a directory; the rename is atomic
    for readers either way, only its durability across a crash is weaker there.
    """
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _umask() -> int:
    """The process umask, read without changing it where possible (``/proc`` on Linux).

    Elsewhere it is read by setting and restoring it, which is racy only against another thread
    creating files in that instant.
    """
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
