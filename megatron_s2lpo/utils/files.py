"""Crash-safe small-file writes."""

from __future__ import annotations

import os


def write_atomic(path: str | os.PathLike, data: str | bytes) -> None:
    """Write `data` to `path` through a temporary sibling, fsynced, then renamed over `path`:
    a reader (or a run resumed after a kill) sees the old file or the new one, never a part."""
    tmp = f"{os.fspath(path)}.tmp"
    try:
        with open(tmp, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:  # a full disk leaves no half-written sibling behind (the file itself is untouched)
            os.remove(tmp)
        except OSError:
            pass
        raise
