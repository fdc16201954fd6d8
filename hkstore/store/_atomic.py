"""Atomic, durable file replacement: temp file in the same folder, fsync, rename, fsync folder."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

__all__ = ["atomic_write", "fsync_folder"]


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike[str], *, mode: int = 0o644) -> Iterator[BinaryIO]:
    """Open a temp file beside ``path``; on success make it ``path`` atomically and durably.

    The temp file lives in the destination folder (so ``os.replace`` is a rename on one file
    system), is flushed and fsynced before the rename, and the folder is fsynced after it, so a
    crash leaves either the old file or the new one, never a mix. If the body raises, the temp
    file is removed and ``path`` is untouched.

    Args:
        path: the final file name.
        mode: permission bits of the new file (e.g. ``0o600`` for private keys).

    Yields:
        A binary file object, seekable, positioned at 0.

    Example:
        >>> with atomic_write(tmp / "x.bin") as f:  # doctest: +SKIP
        ...     f.write(b"data")
    """
    final = Path(path)
    folder = final.parent if str(final.parent) else Path(".")
    fd, tmp_name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=folder)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "w+b") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, final)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise
    fsync_folder(folder)


def fsync_folder(folder: str | os.PathLike[str]) -> None:
    """fsync a folder so that a new, renamed or removed name in it survives a power loss.

    POSIX only: where folders cannot be opened or fsynced (Windows), this does nothing.

    Args:
        folder: the folder whose entries changed.
    """
    try:
        dir_fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:  # e.g. platforms where directories cannot be opened
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)
