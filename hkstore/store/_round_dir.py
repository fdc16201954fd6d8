"""A checkpoint directory on the local file system: every file operation checkpoints make.

Layout (``docs/FORMAT.md`` section 13)::

    DIR/
      round-00000003/             a complete round (round.json, the record, is written last)
        model.hkz  state.safetensors  round.json
      history/00000003.json       one small document per round ever saved (retention keeps them)
      .lock                       the writer lock (flock), holding the writer's pid and host
      .tmp-round-00000004-<hex>/  a round being written
      .del-round-00000001-<hex>/  a round being removed
      .old-round-00000003-<hex>/  a round being replaced (``overwrite=True``), where the
                                  file system cannot swap two folders atomically

A round is *complete* when its folder ``round-N`` holds the record ``round.json``. Here that is
also the moment it appears: a round is written in a temp folder (each file fsynced, then the
folder), renamed into place, and the parent fsynced; removal renames the folder away and
deletes the record first, so a crash never leaves a half-deleted round that looks complete.
Temp, removal and replacement folders are cleaned by the next writer (under the lock).

This class is the only code that touches a checkpoint directory's files: the object-store
backend (``_round_objects.ObjectRoundDirectory``) implements the same methods, and nothing
above it changes.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import json
import os
import re
import secrets
import shutil
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from hkstore.errors import (
    CheckpointExistsError,
    CheckpointFormatError,
    CheckpointLockedError,
    CheckpointNotFoundError,
    CheckpointWriteError,
    ContainerError,
    LimitExceededError,
)
from hkstore.store._atomic import atomic_write, fsync_folder
from hkstore.store._fileio import open_regular
from hkstore.store._limits import Limits

if TYPE_CHECKING:
    from hkstore.store._archive import Archive

__all__ = [
    "HISTORY_FOLDER",
    "LOCK_FILE",
    "MODEL_MEMBER",
    "RECORD_MEMBER",
    "ROUND_MEMBERS",
    "STATE_MEMBER",
    "RoundDirectory",
    "Staging",
    "WriterLock",
    "parse_round_folder",
    "round_folder_name",
]

MODEL_MEMBER = "model.hkz"
STATE_MEMBER = "state.safetensors"
RECORD_MEMBER = "round.json"
#: The files a round folder may hold (the state only when the round has one).
ROUND_MEMBERS = (MODEL_MEMBER, STATE_MEMBER, RECORD_MEMBER)
HISTORY_FOLDER = "history"
LOCK_FILE = ".lock"
_ROUND_RE = re.compile(r"round-([0-9]{8,})")
_HISTORY_RE = re.compile(r"([0-9]{8,})\.json")
_TEMP = ".tmp-"
_DELETING = ".del-"
_REPLACED = ".old-"
_REPLACED_RE = re.compile(r"\.old-(round-[0-9]{8,})-[0-9a-f]+")
#: Largest history document read (they are a round number, a time and the metrics).
_MAX_HISTORY_BYTES = 1 << 20


def round_folder_name(round_: int) -> str:
    """The folder of round ``round_``: ``round-`` and at least 8 digits (``round-00000003``)."""
    return f"round-{round_:08d}"


def parse_round_folder(name: str) -> int | None:
    """The round a folder name stands for, or ``None`` (non-canonical names included)."""
    match = _ROUND_RE.fullmatch(name)
    if match is None:
        return None
    value = int(match.group(1))
    return value if round_folder_name(value) == name else None


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


class RoundDirectory:
    """A checkpoint directory (which need not exist yet: it is created by the first save).

    Args:
        path: the directory.

    Example:
        >>> folder = RoundDirectory("runs/exp1")
        >>> folder.rounds()
        [3, 4]
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RoundDirectory({str(self.path)!r})"

    # -- reading ----------------------------------------------------------------------------

    def exists(self) -> bool:
        """Whether the directory exists."""
        return self.path.is_dir()

    def _entries(self) -> list[os.DirEntry[str]]:
        try:
            with os.scandir(self.path) as it:
                return list(it)
        except FileNotFoundError:
            return []
        except NotADirectoryError:
            raise CheckpointNotFoundError(f"{self.path}: not a directory") from None

    def rounds(self) -> list[int]:
        """The complete rounds (a ``round-N`` folder holding ``round.json``), ascending.

        A round whose replacement (``overwrite=True``) was interrupted between moving the old
        folder aside and renaming the new one into place is listed too, read from the folder
        aside (only where folders cannot be swapped atomically: see :meth:`Staging.publish`).
        """
        found = set()
        for entry in self._entries():
            n = parse_round_folder(entry.name)
            if n is not None and entry.is_dir(follow_symlinks=False):
                if os.path.isfile(os.path.join(entry.path, RECORD_MEMBER)):
                    found.add(n)
        found.update(self._replaced())
        return sorted(found)

    def _replaced(self) -> dict[int, Path]:
        """Rounds only present aside (``.old-round-N-*`` with a record, no ``round-N``)."""
        out: dict[int, Path] = {}
        for entry in self._entries():
            match = _REPLACED_RE.fullmatch(entry.name)
            if match is None or (self.path / match.group(1)).exists():
                continue
            n = parse_round_folder(match.group(1))
            if n is not None and os.path.isfile(os.path.join(entry.path, RECORD_MEMBER)):
                out[n] = Path(entry.path)
        return out

    def incomplete(self) -> list[str]:
        """Names of folders that are not complete rounds: temp, removal, record-less rounds."""
        out = []
        for entry in self._entries():
            if entry.name.startswith((_TEMP, _DELETING, _REPLACED)):
                out.append(entry.name)
                continue
            n = parse_round_folder(entry.name)
            if n is not None and not os.path.isfile(os.path.join(entry.path, RECORD_MEMBER)):
                out.append(entry.name)
        return sorted(out)

    def needs_cleaning(self) -> bool:
        """Whether an interrupted writer left something: a temp, removal or replaced folder,
        or a complete round without its history entry (a cheap listing, nothing read)."""
        if any(name.startswith((_TEMP, _DELETING, _REPLACED)) for name in self.incomplete()):
            return True
        try:
            logged = {entry.name for entry in os.scandir(self.path / HISTORY_FOLDER)}
        except OSError:
            logged = set()
        return any(f"{n:08d}.json" not in logged for n in self.rounds())

    def round_path(self, round_: int) -> Path:
        """The folder of a round."""
        return self.path / round_folder_name(round_)

    def member_path(self, round_: int, member: str) -> Path:
        """The path of one file of a round (aside, while an interrupted replacement left the
        round only there: see :meth:`rounds`)."""
        folder = self.round_path(round_)
        if not folder.exists():
            folder = self._replaced().get(round_, folder)
        return folder / member

    def has_member(self, round_: int, member: str) -> bool:
        """Whether the round's folder holds ``member``."""
        return self.member_path(round_, member).is_file()

    def member_size(self, round_: int, member: str) -> int:
        """The size of one file of a round.

        Raises:
            CheckpointNotFoundError: the file does not exist.
        """
        try:
            return self.member_path(round_, member).stat().st_size
        except FileNotFoundError:
            raise CheckpointNotFoundError(
                f"{self.member_path(round_, member)}: no such file"
            ) from None

    def open_archive(
        self, round_: int, member: str, *, limits: Limits, workers: int | None = None
    ) -> Archive:
        """Open a round's archive (see :func:`~hkstore.store.open_archive`)."""
        from hkstore.store._archive import Archive

        return Archive(self.member_path(round_, member), limits=limits, workers=workers)

    @contextlib.contextmanager
    def open_source(self, round_: int, member: str) -> Iterator[tuple[int, int]]:
        """Yield an open descriptor of one file of a round (regular files only) and its size.

        Raises:
            FileNotFoundError: the file does not exist.
            ContainerError: it is a folder, FIFO, device or socket.
        """
        fd = open_regular(self.member_path(round_, member))
        try:
            yield fd, os.fstat(fd).st_size
        finally:
            os.close(fd)

    def read_member(self, round_: int, member: str, *, max_bytes: int) -> bytes:
        """Read one (small) file of a round, refusing one larger than ``max_bytes``.

        Raises:
            CheckpointNotFoundError: the round or the file does not exist.
            LimitExceededError: the file is larger than ``max_bytes``.
        """
        path = self.member_path(round_, member)
        try:
            with os.fdopen(open_regular(path), "rb") as handle:
                size = os.fstat(handle.fileno()).st_size
                if size > max_bytes:
                    raise LimitExceededError(
                        f"{path}: {size} bytes, more than the limit of {max_bytes}"
                    )
                return handle.read(max_bytes + 1)
        except (FileNotFoundError, NotADirectoryError):
            raise CheckpointNotFoundError(f"{path}: no such file") from None
        except ContainerError as exc:  # a FIFO, device or folder: never opened for reading
            raise CheckpointFormatError(str(exc)) from None

    def read_history(self, round_: int) -> bytes | None:
        """One round's history document, or ``None`` (missing, unreadable or oversized)."""
        try:
            with os.fdopen(open_regular(self.path / HISTORY_FOLDER / f"{round_:08d}.json"),
                           "rb") as handle:
                data = handle.read(_MAX_HISTORY_BYTES + 1)
        except (OSError, ContainerError):  # ContainerError: not a regular file
            return None
        return data if len(data) <= _MAX_HISTORY_BYTES else None

    def history(self) -> dict[int, bytes]:
        """The history documents, by round (unreadable or oversized ones are left out)."""
        folder = self.path / HISTORY_FOLDER
        out: dict[int, bytes] = {}
        try:
            entries = list(os.scandir(folder))
        except (FileNotFoundError, NotADirectoryError):
            return out
        for entry in entries:
            match = _HISTORY_RE.fullmatch(entry.name)
            if match is None or f"{int(match.group(1)):08d}.json" != entry.name:
                continue
            try:
                with os.fdopen(open_regular(entry.path), "rb") as handle:
                    data = handle.read(_MAX_HISTORY_BYTES + 1)
            except (OSError, ContainerError):  # ContainerError: not a regular file
                continue
            if len(data) <= _MAX_HISTORY_BYTES:
                out[int(match.group(1))] = data
        return out

    # -- writing (only under the writer lock) ----------------------------------------------

    def create(self) -> None:
        """Create the directory (and its parents) when missing, durably.

        Raises:
            CheckpointWriteError: it cannot be created (the message names it).
        """
        if self.path.is_dir():
            return
        missing = []
        folder = self.path
        while not folder.exists():
            missing.append(folder)
            folder = folder.parent
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise _write_error(self.path, "cannot create the checkpoint directory", exc) from exc
        for made in reversed(missing):
            fsync_folder(made.parent)

    @contextlib.contextmanager
    def stage(self, round_: int, *, overwrite: bool = False) -> Iterator[Staging]:
        """Write a round in a temp folder; :meth:`Staging.publish` makes it appear.

        Leaving the block without publishing (an error) removes the temp folder. (An existing
        round is checked when publishing: ``overwrite`` is for the object-store directory's
        signature.)

        Raises:
            CheckpointWriteError: the temp folder cannot be created.
        """
        name = f"{_TEMP}{round_folder_name(round_)}-{secrets.token_hex(4)}"
        staging = Staging(self, round_, self.path / name)
        try:
            staging.folder.mkdir()
        except OSError as exc:
            raise _write_error(staging.folder, "cannot create the temp folder", exc) from exc
        try:
            yield staging
        finally:
            if not staging.published:
                _remove_tree(staging.folder)

    def remove(self, round_: int) -> None:
        """Remove a round: rename it away (it stops being listed), delete its record, then the rest.

        Raises:
            CheckpointWriteError: the folder cannot be renamed.
        """
        source = self.round_path(round_)
        target = self.path / f"{_DELETING}{source.name}-{secrets.token_hex(4)}"
        try:
            os.rename(source, target)
        except FileNotFoundError:
            return
        except OSError as exc:
            raise _write_error(source, "cannot remove the round", exc) from exc
        fsync_folder(self.path)
        _remove_tree(target)

    def write_history(self, round_: int, data: bytes) -> None:
        """Write (atomically, durably) the history document of a round.

        Raises:
            CheckpointWriteError: naming the file.
        """
        folder = self.path / HISTORY_FOLDER
        path = folder / f"{round_:08d}.json"
        try:
            if not folder.is_dir():
                folder.mkdir(exist_ok=True)
                fsync_folder(self.path)
            with atomic_write(path) as handle:
                handle.write(data)
        except OSError as exc:
            raise _write_error(path, "cannot write the history entry", exc) from exc

    def clean(self) -> list[str]:
        """Remove what interrupted writers left; return the names handled.

        Temp and removal folders are deleted. A replaced round (``.old-round-N-*``) whose
        replacement never appeared is renamed back to ``round-N``; otherwise it is deleted.
        Call only while holding the writer lock (another writer's temp folder is live).
        """
        handled = []
        for entry in sorted(self._entries(), key=lambda e: e.name):
            name = entry.name
            if not name.startswith((_TEMP, _DELETING, _REPLACED)):
                continue
            match = _REPLACED_RE.fullmatch(name)
            if (match is not None and not (self.path / match.group(1)).exists()
                    and os.path.isfile(os.path.join(entry.path, RECORD_MEMBER))):
                try:  # the replacement never appeared: put the old round back
                    os.rename(entry.path, self.path / match.group(1))
                except OSError:
                    continue  # keep it rather than lose the only copy
                fsync_folder(self.path)
            else:
                _remove_tree(Path(entry.path))
            handled.append(name)
        return handled

    def lock(self) -> WriterLock:
        """Take the writer lock (see :class:`WriterLock`)."""
        return WriterLock.acquire(self.path)

    def writer(self) -> dict[str, Any] | None:
        """Who holds the writer lock now (pid, host, since), or ``None`` when free."""
        return WriterLock.holder(self.path)


class Staging:
    """A round being written in a temp folder (made by :meth:`RoundDirectory.stage`)."""

    def __init__(self, directory: RoundDirectory, round_: int, folder: Path) -> None:
        self.directory = directory
        self.round = round_
        self.folder = folder
        self.published = False

    @contextlib.contextmanager
    def open(self, member: str) -> Iterator[BinaryIO]:
        """Create ``member`` in the temp folder; on success it is flushed, fsynced and closed.

        Raises:
            CheckpointWriteError: any OS error while writing it (disk full, file too large,
                read-only folder), naming the file; chained to the OS error.
        """
        path = self.folder / member
        try:
            handle = open(path, "xb", buffering=0)
        except OSError as exc:
            raise _write_error(path, "cannot create", exc) from exc
        try:
            with handle:
                yield handle
                os.fsync(handle.fileno())
        except OSError as exc:
            if isinstance(exc, CheckpointWriteError):
                raise
            raise _write_error(path, "cannot write", exc) from exc

    def write(self, member: str, data: bytes) -> None:
        """Write a small file whole (see :meth:`open`)."""
        with self.open(member) as handle:
            view = memoryview(data)
            while view.nbytes:
                view = view[handle.write(view) :]

    def publish(self, *, overwrite: bool = False) -> None:
        """Make the round appear: fsync the temp folder, rename it to ``round-N``, fsync DIR.

        With ``overwrite``, the new folder and the existing round are swapped in one atomic
        step where the file system can (Linux ``renameat2(RENAME_EXCHANGE)``), and the old
        round, now under the temp name, is removed: at every moment ``round-N`` is the old or
        the new round, never missing. Elsewhere the old round is first renamed aside
        (``.old-round-N-*``); a crash before the new one is in place leaves it there, where
        readers still find it (:meth:`RoundDirectory.rounds`) and the next writer puts it
        back.

        Raises:
            CheckpointExistsError: the round exists and ``overwrite`` is false.
            CheckpointWriteError: a rename fails.
        """
        target = self.directory.round_path(self.round)
        fsync_folder(self.folder)
        aside: Path | None = None
        if target.exists():
            if not overwrite:
                raise CheckpointExistsError(
                    f"round {self.round} is already saved in {self.directory.path} "
                    "(pass overwrite=True to replace it)"
                )
            if _exchange(self.folder, target):  # now: target is new, self.folder is old
                self.published = True
                fsync_folder(self.directory.path)
                _remove_tree(self.folder)
                return
            aside = self.directory.path / f"{_REPLACED}{target.name}-{secrets.token_hex(4)}"
            try:
                os.rename(target, aside)
            except OSError as exc:
                raise _write_error(target, "cannot move the old round aside", exc) from exc
        try:
            os.rename(self.folder, target)
        except OSError as exc:
            if aside is not None:
                with contextlib.suppress(OSError):
                    os.rename(aside, target)
            raise _write_error(target, "cannot rename the round into place", exc) from exc
        self.published = True
        fsync_folder(self.directory.path)
        if aside is not None:
            _remove_tree(aside)


_RENAME_EXCHANGE = 2  # linux/fs.h
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Swap two folders atomically (Linux ``renameat2(RENAME_EXCHANGE)``); ``False`` when the
    platform or the file system cannot (the caller then falls back to two renames)."""
    renameat2 = _renameat2()
    if renameat2 is None:
        return False
    result = renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    if result == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM):
        return False  # not supported here: the two-rename fallback
    raise _write_error(b, "cannot swap the new round into place", OSError(err, os.strerror(err)))


@functools.cache
def _renameat2() -> Any:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        function = libc.renameat2  # glibc >= 2.28, musl >= 1.2.4
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p,
                         ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


def _remove_tree(folder: Path) -> None:
    """Delete a round-like folder: its record first (so it never looks complete), then the rest."""
    with contextlib.suppress(OSError):
        (folder / RECORD_MEMBER).unlink()
    shutil.rmtree(folder, ignore_errors=True)


def _write_error(path: Path, what: str, exc: OSError) -> CheckpointWriteError:
    reason = exc.strerror or str(exc)
    if exc.errno == errno.EFBIG:
        reason += " (the file size limit was reached)"
    return CheckpointWriteError(f"{path}: {what}: {reason}")


class WriterLock:
    """The one-writer lock of a checkpoint directory: ``flock`` on ``DIR/.lock``.

    The kernel releases it when the holder's file is closed, which includes the holder dying
    (SIGKILL too), so a lock left by a killed process never blocks the next writer. The file
    holds the holder's pid, host and start time, for the error another writer gets.
    Two Checkpointers in one process conflict as well (each opens the file itself).
    """

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self._fd: int | None = fd

    @classmethod
    def acquire(cls, folder: Path) -> WriterLock:
        """Take the lock of ``folder`` (which must exist) without waiting.

        Raises:
            CheckpointLockedError: another writer holds it; the message names its pid and host.
            CheckpointWriteError: the lock file cannot be created.
        """
        import fcntl

        path = folder / LOCK_FILE
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise _write_error(path, "cannot open the lock file", exc) from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _describe_holder(_read_holder(fd))
            os.close(fd)
            raise CheckpointLockedError(
                f"{folder}: another Checkpointer is saving into this directory ({holder}); "
                "close it first (a lock left by a process that died is released by the system)"
            ) from None
        except OSError as exc:
            os.close(fd)
            raise _write_error(path, "cannot lock", exc) from exc
        info = {"host": socket.gethostname(), "pid": os.getpid(), "since": _now()}
        data = json.dumps(info, sort_keys=True).encode("utf-8")
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
            os.pwrite(fd, data, 0)
        return cls(path, fd)

    @staticmethod
    def holder(folder: Path) -> dict[str, Any] | None:
        """Who holds the lock of ``folder`` now (pid, host, since), or ``None`` when free."""
        import fcntl

        try:
            fd = open_regular(folder / LOCK_FILE)
        except (OSError, ContainerError):  # ContainerError: not a regular file
            return None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                return _read_holder(fd) or {}
            fcntl.flock(fd, fcntl.LOCK_UN)
            return None
        finally:
            os.close(fd)

    def __del__(self) -> None:  # a writer dropped without close() must not keep the lock
        with contextlib.suppress(Exception):
            self.release()

    @property
    def held(self) -> bool:
        """Whether this object still holds the lock."""
        return self._fd is not None

    def renew(self) -> None:
        """Nothing to do: a ``flock`` lasts as long as its holder's file is open."""

    def release(self) -> None:
        """Release the lock (idempotent); the file stays, emptied."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
        os.close(fd)  # closing the last descriptor releases the flock


def _read_holder(fd: int) -> dict[str, Any] | None:
    try:
        raw = os.pread(fd, 4096, 0)
        value = json.loads(raw.decode("utf-8")) if raw else None
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _describe_holder(info: dict[str, Any] | None) -> str:
    if not info:
        return "holder unknown"
    return (f"held by pid {info.get('pid', '?')} on host {info.get('host', '?')} "
            f"since {info.get('since', '?')}")
