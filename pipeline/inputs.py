"""Start-up checks of the files and shard URLs a config names: a clear :class:`ConfigError` naming the
key and the path before anything is built (DESIGN section 9)."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

from pipeline.config import ConfigError
from pipeline.data.shards import expand_sources


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


def is_local(url: str) -> bool:
    """True for a plain file path (``pipe:``, ``http://``, ``s3://``... are opened by webdataset)."""
    return not url.startswith("pipe:") and "://" not in url


def check_shard_urls(urls: str, key: str) -> list[str]:
    """Expand ``urls`` (brace ranges, ``::`` sources) and check local shards exist; returns every URL.

    A source whose local shards all are missing is an error naming it (a typo in a path or a range
    would otherwise make a resampling reader wait forever or write empty outputs); some missing
    shards only warn, because readers skip unreadable shards by design. Remote URLs are not probed.
    Existence is read from one listing per folder, not one ``stat`` per shard, so every rank of a large
    job can afford it on a parallel file system.
    """
    try:
        sources = expand_sources(urls)
    except ValueError as e:
        raise ConfigError(f"{key}={urls!r}: {e}") from None
    listings: dict[str, set[str]] = {}
    out = []
    for source in sources:
        local = [u for u in source if is_local(u)]
        missing = [u for u in local if Path(u).name not in _listing(str(Path(u).parent), listings)]
        if local and len(missing) == len(local):
            raise ConfigError(f"{key}={urls!r}: none of the {len(local)} shard files exists (first: {local[0]}); "
                              "check the folder and the {first..last} range")
        if missing:
            warnings.warn(f"{key}: {len(missing)} of {len(local)} shard files do not exist (first: {missing[0]}); "
                          "they will be skipped", stacklevel=2)
        out.extend(source)
    return out


def _listing(folder: str, cache: dict[str, set[str]]) -> set[str]:
    if folder not in cache:
        try:
            cache[folder] = {e.name for e in os.scandir(folder) if e.is_file()}
        except OSError:  # missing or unreadable folder: nothing in it can be read either
            cache[folder] = set()
    return cache[folder]
