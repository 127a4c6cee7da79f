"""Start-up checks of the files and folders a config names: a clear :class:`ConfigError` naming the
key and the path before anything is built (docs/ARCHITECTURE.md section 9). Shard URLs are checked in the data
layer, by :func:`pipeline.data.sources.check_shard_urls`."""

from __future__ import annotations

from pathlib import Path

from pipeline.config import ConfigError


def require_file(path: str | Path, key: str, hint: str = "") -> Path:
    """``path`` as a :class:`Path` when it is an existing file; else :class:`ConfigError` naming ``key``."""
    p = Path(path)
    if not p.is_file():
        what = "is a directory, not a file" if p.is_dir() else "does not exist"
        raise ConfigError(f"{key}: {p} {what}" + (f"; {hint}" if hint else ""))
    return p


def require_dir(path: str | Path, key: str, hint: str = "") -> Path:
    """``path`` as a :class:`Path` when it is an existing folder; else :class:`ConfigError` naming ``key``."""
    p = Path(path)
    if not p.is_dir():
        what = "is a file, not a folder" if p.exists() else "does not exist"
        raise ConfigError(f"{key}: {p} {what}" + (f"; {hint}" if hint else ""))
    return p
