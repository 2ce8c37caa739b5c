"""The one atomic-write rule for every file the project writes (results, figures, checkpoints).

Write to a temporary file in the target's folder, flush and fsync, ``os.replace`` onto the target (a crash
leaves the old file or the new one, never half of one), and give the file the usual mode (``0666`` minus the
umask; ``mkstemp`` creates ``0600``).
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable

__all__ = ["atomic_write"]


def atomic_write(path, write: Callable, binary: bool = False) -> Path:
    """Call ``write(f)`` on a temporary file beside ``path`` (text, or bytes with ``binary``), then move it
    onto ``path``; the parent folder is created. Returns ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        with os.fdopen(fd, "wb" if binary else "w", **({} if binary else {"newline": ""})) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
