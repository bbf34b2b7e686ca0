"""Atomic file writes: a crash or an error never leaves a half-written trace or summary."""

from __future__ import annotations

import contextlib
import json
import os
import stat
import tempfile
from pathlib import Path
from typing import Any


def write_atomic(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file, an fsync and a rename.

    The temporary file lives in the same directory, so the rename replaces ``path`` in one step;
    on any error it is removed and ``path`` keeps its previous content. An existing file's
    permissions are kept (new files get 0644, not mkstemp's 0600).
    """
    path = Path(path)
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
    except OSError:
        mode = 0o644
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        with contextlib.suppress(OSError):
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    if hasattr(os, "O_DIRECTORY"):  # make the rename itself durable (POSIX)
        with contextlib.suppress(OSError):
            dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)


def write_json_atomic(data: Any, path: str | os.PathLike[str]) -> None:
    """``data`` as JSON (indented, finite numbers only), written atomically to ``path``."""
    text = json.dumps(data, indent=1, allow_nan=False) + "\n"
    write_atomic(path, text.encode("utf-8"))
