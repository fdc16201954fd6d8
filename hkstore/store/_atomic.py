"""Atomic, durable file replacement: temp file in the same folder, fsync, rename, fsync folder.

A writer killed mid-write (``SIGKILL``, power loss) leaves its temp file behind: it is never
visible under the final name, but it holds disk space. Temp files are therefore named
``.NAME.XXXXXXXX.hkstore-tmp`` and locked (``flock``) by the process writing them for as long
as it writes; every :func:`atomic_write` first removes the temp files of its folder whose
lock it can take, which are exactly those whose writer is gone (the kernel drops a dead
process's locks). A live writer's temp file is never touched: it holds its lock until its
file has been renamed to its final name.

Example:
    >>> with atomic_write(tmp / "x.bin") as f:
    ...     f.write(b"data")
    4
    >>> (tmp / "x.bin").read_bytes()
    b'data'
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: temp files are removed on errors only
    fcntl = None  # type: ignore[assignment]

__all__ = ["TEMP_SUFFIX", "atomic_write", "fsync_folder", "remove_stale_temps"]

#: Suffix of every temp file :func:`atomic_write` creates (the name starts with a dot).
TEMP_SUFFIX = ".hkstore-tmp"


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike[str], *, mode: int = 0o644) -> Iterator[BinaryIO]:
    """Open a temp file beside ``path``; on success make it ``path`` atomically and durably.

    The temp file lives in the destination folder (so ``os.replace`` is a rename on one file
    system), is locked while it is written, flushed and fsynced before the rename, and the
    folder is fsynced after it, so a crash leaves either the old file or the new one, never a
    mix. If the body raises, the temp file is removed and ``path`` is untouched. Temp files
    left in the folder by killed writers are removed first (:func:`remove_stale_temps`).

    Args:
        path: the final file name.
        mode: permission bits of the new file (e.g. ``0o600`` for private keys).

    Yields:
        A binary file object, seekable, positioned at 0.

    Raises:
        OSError: the folder or the file cannot be written (the temp file is removed).

    Example:
        >>> with atomic_write(tmp / "x.bin") as f:
        ...     f.write(b"data")
        4
    """
    final = Path(path)
    folder = final.parent if str(final.parent) else Path(".")
    remove_stale_temps(folder)
    fd, tmp_name, lock_fd = _locked_temp(folder, final.name)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "w+b") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, final)  # still locked (lock_fd): no cleaner can take it first
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise
    finally:
        if lock_fd is not None:
            os.close(lock_fd)
    fsync_folder(folder)


def _locked_temp(folder: Path, name: str) -> tuple[int, str, int | None]:
    """Create and lock a temp file; return ``(fd, path, lock fd)``.

    The lock is taken on a duplicate descriptor, so it outlives the file object the caller
    writes through and is held until the rename is done. A cleaner that raced us between the
    creation and the lock (and removed the file) is detected by comparing inodes; then a new
    temp file is made.
    """
    while True:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{name}.", suffix=TEMP_SUFFIX, dir=folder)
        if fcntl is None:
            return fd, tmp_name, None
        lock_fd = os.dup(fd)
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if os.stat(tmp_name).st_ino == os.fstat(fd).st_ino:
                return fd, tmp_name, lock_fd
        except FileNotFoundError:
            pass  # removed by a cleaner before we locked it: try another name
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                os.close(lock_fd)  # no locks on this file system: write unlocked
                return fd, tmp_name, None
        os.close(lock_fd)
        os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)


def remove_stale_temps(folder: str | os.PathLike[str]) -> list[str]:
    """Remove the temp files of killed :func:`atomic_write` calls in ``folder``.

    A temp file is stale when its lock can be taken: its writer is gone. Files that are not
    ours (another name pattern), not regular files, or locked by a live writer are left
    alone; errors (permissions, a file vanishing meanwhile) skip the file.

    Returns:
        The names removed.

    Example:
        >>> left = tmp / ".round-3.hkz.k2j1x9qa.hkstore-tmp"  # a killed writer's temp file
        >>> left.write_bytes(b"half")
        4
        >>> remove_stale_temps(tmp)
        ['.round-3.hkz.k2j1x9qa.hkstore-tmp']
    """
    if fcntl is None:  # pragma: no cover - not POSIX: cannot tell stale from live
        return []
    removed = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return []
    for entry in entries:
        if not (entry.name.startswith(".") and entry.name.endswith(TEMP_SUFFIX)):
            continue
        flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
        try:
            fd = os.open(entry.path, flags | getattr(os, "O_CLOEXEC", 0))
        except OSError:
            continue
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                continue
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            # the name must still be this file (not renamed into place meanwhile)
            if os.stat(entry.path, follow_symlinks=False).st_ino == info.st_ino:
                os.unlink(entry.path)
                removed.append(entry.name)
        except OSError:
            continue  # locked by a live writer, vanished, or not ours to remove: leave it
        finally:
            os.close(fd)
    return removed


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
