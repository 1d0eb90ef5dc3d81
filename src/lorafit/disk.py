"""Writing files so that nothing already written is lost: atomic replacement and free space.

A file is written under a temporary name in its own folder and renamed over the final name
(``os.replace``, atomic on POSIX and Windows): a reader, a crash or a kill sees the old file or
the whole new one, never half of one. Imports nothing of lorafit but its error type.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from lorafit.errors import LorafitError

MiB = 1 << 20


def atomic_write(path: str | os.PathLike, write: Callable[[str], object]) -> Path:
    """Call ``write(tmp)`` with a temporary path beside ``path``, then rename it to ``path``.

    On any failure (an exception, a full disk, Ctrl-C) the temporary file is removed and
    ``path`` is left as it was. Returns ``path``.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write UTF-8 ``text`` to ``path`` atomically (see :func:`atomic_write`)."""
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def existing_ancestor(path: Path) -> Path:
    """``path`` or its nearest parent that exists (where a new folder would be created)."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def require_free_space(path: Path, needed: int, what: str, hint: str, why: str = "") -> None:
    """Raise unless the disk that holds (or will hold) ``path`` has ``needed`` bytes free.

    The message reads "``path``: only F MiB free on its disk, and ``what`` needs about N MiB
    (``why``). ``hint``".
    """
    free = shutil.disk_usage(existing_ancestor(path)).free
    if free < needed:
        because = f" ({why})" if why else ""
        raise LorafitError(
            f"{path}: only {free / MiB:.1f} MiB free on its disk, and {what} needs about "
            f"{needed / MiB:.1f} MiB{because}. {hint}"
        )
