"""A checkpoint directory in object storage: the same operations as on a local file system.

Layout under a prefix (``s3://bucket/runs/exp1``; ``docs/FORMAT.md`` section 13)::

    PREFIX/round-00000003/model.hkz          uploaded once complete
    PREFIX/round-00000003/state.safetensors  uploaded once complete
    PREFIX/round-00000003/round.json         the record: uploaded last
    PREFIX/history/00000003.json
    PREFIX/.lease                            the writer's lease (owner, host, pid, expiry)

Object stores have no rename and no folders, so a round is written in place and made
*complete* by its record, uploaded only after every other file of the round exists in full: a
round is listed, restored and verified only once ``round-N/round.json`` exists. Removal
deletes the record first, so a half-deleted round never looks complete. Files of a round left
without a record (a writer killed mid-round) are deleted by the next writer, under the lease.
Replacing a round (``overwrite=True``) writes the new round completely under
``.tmp-round-N-<hex>/`` first, and copies it into place only after the old record is gone;
readers list round N from that complete replacement meanwhile, so one complete round N is
listed at every moment.

One writer at a time: there is no ``flock``, so a writer holds a lease object created with an
exclusive create (S3 ``If-None-Match: *``) and renewed at each round; another writer is
refused while it is live. A lease expires after :data:`LEASE_SECONDS` without renewal, or at
once when its holder ran on this host and its process is gone (a killed writer restarted on
the same machine); an expired lease is taken over with a conditional replace (S3
``If-Match`` on its ETag) where the store offers one.

Example:
    >>> folder = ObjectRoundDirectory("memory://bucket/runs/exp1")
    >>> folder.rounds()  # nothing saved there yet
    []
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import socket
import time
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any, BinaryIO

from hkstore.errors import (
    CheckpointExistsError,
    CheckpointLockedError,
    CheckpointNotFoundError,
    CheckpointWriteError,
    LimitExceededError,
)
from hkstore.store._limits import Limits
from hkstore.store._remote import (
    RemoteSource,
    is_url,
    local_path,
    remote_filesystem,
    remote_write,
)
from hkstore.store._round_dir import (
    HISTORY_FOLDER,
    MODEL_MEMBER,
    RECORD_MEMBER,
    STATE_MEMBER,
    RoundDirectory,
    parse_round_folder,
    round_folder_name,
)

if TYPE_CHECKING:
    from hkstore.store._archive import Archive

__all__ = [
    "LEASE_FILE",
    "LEASE_SECONDS",
    "Lease",
    "ObjectRoundDirectory",
    "ObjectStaging",
    "round_directory",
]

LEASE_FILE = ".lease"
_TEMP = ".tmp-"
_TEMP_RE = re.compile(r"\.tmp-(round-[0-9]{8,})-[0-9a-f]+")
#: A lease not renewed for this long may be taken over by another writer.
LEASE_SECONDS = 600.0
_MAX_HISTORY_BYTES = 1 << 20
_MAX_LEASE_BYTES = 4096


class ObjectRoundDirectory:
    """A checkpoint directory under an object-store prefix (see the module docstring).

    Args:
        url: the prefix, ``protocol://bucket/path``.
        storage_options: the filesystem's options (``endpoint_url``...).
    """

    def __init__(self, url: str, storage_options: Mapping[str, Any] | None = None) -> None:
        self.path = url.rstrip("/")
        self.storage_options = dict(storage_options or {})
        self.fs, key = remote_filesystem(self.path, self.storage_options)
        self._key = key.rstrip("/")

    def __repr__(self) -> str:
        return f"ObjectRoundDirectory({self.path!r})"

    # -- names ------------------------------------------------------------------------------

    def _object(self, *parts: str) -> str:
        return "/".join((self._key, *parts))

    def _prefix_of(self, round_: int) -> str:
        """Where round ``round_``'s files are: ``round-N``, or a complete replacement
        ``.tmp-round-N-<hex>`` while ``round-N`` has no record (13.11)."""
        name = round_folder_name(round_)
        record = self._object(name, RECORD_MEMBER)
        self.fs.invalidate_cache(record)
        if self.fs.exists(record):
            return name
        return self._replacements().get(round_, name)

    def _member_key(self, round_: int, member: str) -> str:
        return self._object(self._prefix_of(round_), member)

    def member_path(self, round_: int, member: str) -> str:
        """The URL of one file of a round."""
        return f"{self.path}/{self._prefix_of(round_)}/{member}"

    def round_path(self, round_: int) -> str:
        """The URL prefix of a round."""
        return f"{self.path}/{round_folder_name(round_)}"

    # -- reading ----------------------------------------------------------------------------

    def _listing(self) -> dict[str, int]:
        """Every object under the prefix (fresh: the listing cache is dropped): name -> size."""
        self.fs.invalidate_cache()  # every listing below the prefix, not only its own
        try:
            found = self.fs.find(self._key, detail=True)
        except FileNotFoundError:
            return {}
        out = {}
        start = len(self._key) + 1
        for name, info in found.items():
            name = name.rstrip("/")
            if name.startswith(self._key + "/") and info.get("type", "file") == "file":
                out[name[start:]] = int(info.get("size") or 0)
        return out

    def _folders(self) -> dict[str, set[str]]:
        """The first-level prefixes and the objects in each (``history`` included)."""
        folders: dict[str, set[str]] = {}
        for name in self._listing():
            folder, _, member = name.partition("/")
            if member and "/" not in member:
                folders.setdefault(folder, set()).add(member)
        return folders

    def _round_files(self) -> dict[int, set[str]]:
        rounds: dict[int, set[str]] = {}
        for folder, members in self._folders().items():
            n = parse_round_folder(folder)
            if n is not None:
                rounds[n] = members
        return rounds

    def _temps(self) -> dict[str, tuple[int, bool]]:
        """``.tmp-round-N-<hex>`` prefixes: ``{name: (N, holds a record)}``."""
        out = {}
        for folder, members in self._folders().items():
            match = _TEMP_RE.fullmatch(folder)
            n = None if match is None else parse_round_folder(match.group(1))
            if n is not None:
                out[folder] = (n, RECORD_MEMBER in members)
        return out

    def _replacements(self) -> dict[int, str]:
        """Complete replacements of rounds whose own folder has no record: ``{N: prefix}``."""
        complete = {n for n, files in self._round_files().items() if RECORD_MEMBER in files}
        return {n: name for name, (n, recorded) in sorted(self._temps().items())
                if recorded and n not in complete}

    def names_an_object(self) -> bool:
        """Whether the URL itself is an object (an archive, say), not a prefix."""
        return bool(self.fs.isfile(self._key))

    def exists(self) -> bool:
        """Whether any object lies under the prefix."""
        return bool(self._listing())

    def rounds(self) -> list[int]:
        """The complete rounds (``round-N/round.json`` exists), ascending; a round whose
        replacement was interrupted after its record was deleted is listed from the complete
        replacement (13.11)."""
        complete = {n for n, files in self._round_files().items() if RECORD_MEMBER in files}
        return sorted(complete | set(self._replacements()))

    def incomplete(self) -> list[str]:
        """What is not a complete round: record-less round prefixes (a writer stopped
        mid-round) and replacement prefixes."""
        names = [round_folder_name(n) for n, files in self._round_files().items()
                 if RECORD_MEMBER not in files]
        return sorted(names + list(self._temps()))

    def needs_cleaning(self) -> bool:
        """Whether a writer left a record-less round or a replacement, or a complete round
        lacks its history."""
        if self.incomplete():
            return True
        names = self._listing()
        return any(f"{HISTORY_FOLDER}/{n:08d}.json" not in names for n in self.rounds())

    def has_member(self, round_: int, member: str) -> bool:
        """Whether the round holds ``member``."""
        self.fs.invalidate_cache(self._member_key(round_, member))
        return bool(self.fs.exists(self._member_key(round_, member)))

    def member_size(self, round_: int, member: str) -> int:
        """The size of one file of a round.

        Raises:
            CheckpointNotFoundError: the object does not exist.
        """
        try:
            return int(self.fs.info(self._member_key(round_, member))["size"])
        except FileNotFoundError:
            raise CheckpointNotFoundError(
                f"{self.member_path(round_, member)}: no such object"
            ) from None

    def _read_small(self, key: str, where: str, max_bytes: int) -> bytes:
        size = int(self.fs.info(key)["size"])
        if size > max_bytes:
            raise LimitExceededError(f"{where}: {size} bytes, more than the limit of {max_bytes}")
        return RemoteSource(self.fs, key, name=where).read(0, size)

    def read_member(self, round_: int, member: str, *, max_bytes: int) -> bytes:
        """Read one (small) file of a round, refusing one larger than ``max_bytes``.

        Raises:
            CheckpointNotFoundError: the object does not exist.
            LimitExceededError: it is larger than ``max_bytes``.
        """
        where = self.member_path(round_, member)
        try:
            return self._read_small(self._member_key(round_, member), where, max_bytes)
        except FileNotFoundError:
            raise CheckpointNotFoundError(f"{where}: no such object") from None

    def open_archive(
        self, round_: int, member: str, *, limits: Limits, workers: int | None = None
    ) -> Archive:
        """Open a round's archive, read by range (see :func:`~hkstore.store.open_archive`)."""
        from hkstore.store._archive import Archive

        return Archive(self.member_path(round_, member), limits=limits, workers=workers,
                       storage_options=self.storage_options)

    @contextlib.contextmanager
    def open_source(self, round_: int, member: str) -> Iterator[tuple[RemoteSource, int]]:
        """Yield a ranged-read source of one file of a round and its size.

        Raises:
            ContainerError: the object does not exist.
        """
        source = RemoteSource(self.fs, self._member_key(round_, member),
                              name=self.member_path(round_, member))
        yield source, source.size

    def read_history(self, round_: int) -> bytes | None:
        """One round's history document, or ``None`` (missing, unreadable or oversized)."""
        key = self._object(HISTORY_FOLDER, f"{round_:08d}.json")
        try:
            return self._read_small(key, key, _MAX_HISTORY_BYTES)
        except (OSError, LimitExceededError, ValueError):
            return None

    def history(self) -> dict[int, bytes]:
        """The history documents, by round (unreadable or oversized ones are left out)."""
        out: dict[int, bytes] = {}
        for name in self._listing():
            folder, _, leaf = name.partition("/")
            if folder != HISTORY_FOLDER or not leaf.endswith(".json"):
                continue
            stem = leaf[: -len(".json")]
            if not stem.isdigit() or f"{int(stem):08d}" != stem:
                continue
            data = self.read_history(int(stem))
            if data is not None:
                out[int(stem)] = data
        return out

    # -- writing (only under the lease) ------------------------------------------------------

    def create(self) -> None:
        """Nothing to create: a prefix exists once an object is under it."""

    @contextlib.contextmanager
    def stage(self, round_: int, *, overwrite: bool = False) -> Iterator[ObjectStaging]:
        """Write a round's files in place; :meth:`ObjectStaging.publish` uploads its record.

        An existing complete round is refused unless ``overwrite``; with ``overwrite`` the
        new files go to a replacement prefix ``.tmp-round-N-<hex>`` until
        :meth:`ObjectStaging.publish`. Leaving the block without publishing deletes what was
        uploaded.

        Raises:
            CheckpointExistsError: the round is complete and ``overwrite`` is false.
        """
        record = self._object(round_folder_name(round_), RECORD_MEMBER)
        self.fs.invalidate_cache(record)
        prefix = round_folder_name(round_)
        if self.fs.exists(record):
            if not overwrite:
                raise CheckpointExistsError(
                    f"round {round_} is already saved in {self.path} "
                    "(pass overwrite=True to replace it)"
                )
            prefix = f"{_TEMP}{round_folder_name(round_)}-{secrets.token_hex(4)}"
        staging = ObjectStaging(self, round_, prefix)
        try:
            yield staging
        finally:
            if not staging.published:
                self._remove_prefix(prefix)

    def _delete(self, key: str) -> None:
        try:
            self.fs.rm_file(key)
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise CheckpointWriteError(f"{key}: cannot delete: {exc}") from exc

    def _remove_prefix(self, prefix: str) -> None:
        """Delete a round's (or replacement's) files: the record first, so it never looks
        complete."""
        self._delete(self._object(prefix, RECORD_MEMBER))
        for member in (MODEL_MEMBER, STATE_MEMBER):
            self._delete(self._object(prefix, member))
        for name in [name for name in self._listing() if name.startswith(prefix + "/")]:
            self._delete(self._object(name))

    def _promote(self, prefix: str, round_: int) -> None:
        """Copy a complete replacement into ``round-N`` (its record last), then delete it."""
        target = round_folder_name(round_)
        members = self._folders().get(prefix, set())
        try:
            for member in (MODEL_MEMBER, STATE_MEMBER):
                if member in members:
                    self.fs.copy(self._object(prefix, member), self._object(target, member))
            self.fs.copy(self._object(prefix, RECORD_MEMBER), self._object(target, RECORD_MEMBER))
        except OSError as exc:
            raise CheckpointWriteError(
                f"{self.path}/{target}: cannot put the new round in place: {exc}"
            ) from exc
        self._remove_prefix(prefix)

    def remove(self, round_: int) -> None:
        """Remove a round: its record first (it stops being listed), then its other files.

        Raises:
            CheckpointWriteError: an object cannot be deleted.
        """
        self._remove_prefix(round_folder_name(round_))

    def write_history(self, round_: int, data: bytes) -> None:
        """Upload the history document of a round.

        Raises:
            CheckpointWriteError: naming the object.
        """
        key = self._object(HISTORY_FOLDER, f"{round_:08d}.json")
        try:
            self.fs.pipe_file(key, data)
        except OSError as exc:
            raise CheckpointWriteError(f"{key}: cannot write the history entry: {exc}") from exc

    def clean(self) -> list[str]:
        """Finish or drop what interrupted writers left; return the prefixes handled.

        A complete replacement of a round whose own record is gone is copied into place (its
        record last); every other replacement, and every record-less round, is deleted.
        Call only while holding the lease (another writer's round in progress has no record
        yet either).
        """
        handled = []
        replacements = self._replacements()
        for name, (number, _) in sorted(self._temps().items()):
            if replacements.get(number) == name:
                self._promote(name, number)
            else:
                self._remove_prefix(name)
            handled.append(name)
        for number, files in sorted(self._round_files().items()):
            if RECORD_MEMBER not in files:
                self._remove_prefix(round_folder_name(number))
                handled.append(round_folder_name(number))
        return handled

    def lock(self) -> Lease:
        """Take the writer lease (see :class:`Lease`)."""
        return Lease.acquire(self)

    def writer(self) -> dict[str, Any] | None:
        """Who holds a live lease now (pid, host, since), or ``None``."""
        found = Lease.holder(self)
        if found is None or Lease._stale(found[0]):
            return None
        return dict(found[0])


class ObjectStaging:
    """A round being written in place (made by :meth:`ObjectRoundDirectory.stage`)."""

    def __init__(self, directory: ObjectRoundDirectory, round_: int, prefix: str) -> None:
        self.directory = directory
        self.round = round_
        self.prefix = prefix  # round-N, or a replacement's .tmp-round-N-<hex>
        self.published = False
        self._record: bytes | None = None

    def _url(self, member: str) -> str:
        return f"{self.directory.path}/{self.prefix}/{member}"

    @contextlib.contextmanager
    def open(self, member: str) -> Iterator[BinaryIO]:
        """Yield a local temp file; on success it is uploaded as the round's ``member``.

        Raises:
            CheckpointWriteError: the upload (or the temp file) failed, naming the object.
        """
        url = self._url(member)
        try:
            with remote_write(url, self.directory.storage_options) as handle:
                yield handle
        except OSError as exc:
            if isinstance(exc, CheckpointWriteError):
                raise
            raise CheckpointWriteError(f"{url}: cannot write: {exc}") from exc

    def write(self, member: str, data: bytes) -> None:
        """Write a small file whole; the record is kept for :meth:`publish`."""
        if member == RECORD_MEMBER:
            self._record = bytes(data)
            return
        with self.open(member) as handle:
            handle.write(data)

    def publish(self, *, overwrite: bool = False) -> None:
        """Upload the record, last: the round becomes complete.

        A replacement (the round existed: its files went to ``.tmp-round-N-<hex>``) is made
        complete there first, then the old record is deleted (readers now find round N in
        the replacement), then its files are copied into ``round-N``, the record last, and
        the replacement deleted: at every moment one complete round N is listed.

        Raises:
            CheckpointExistsError: the round became complete meanwhile and not ``overwrite``.
            CheckpointWriteError: an upload or copy failed (the old round is still listed,
                or the complete replacement is, until the next writer puts it in place).
        """
        assert self._record is not None, "the record is written before publish()"
        directory = self.directory
        key = directory._object(self.prefix, RECORD_MEMBER)
        try:
            directory.fs.pipe_file(key, self._record, mode="create")
        except FileExistsError:
            raise CheckpointExistsError(
                f"round {self.round} is already saved in {directory.path}"
            ) from None
        except OSError as exc:
            raise CheckpointWriteError(f"{self._url(RECORD_MEMBER)}: cannot write: {exc}") from exc
        self.published = True
        if self.prefix != round_folder_name(self.round):
            directory._delete(directory._object(round_folder_name(self.round), RECORD_MEMBER))
            directory._promote(self.prefix, self.round)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Lease:
    """The one-writer lease of a checkpoint prefix: the object ``PREFIX/.lease``.

    It holds a random owner token, the holder's host and pid and an expiry time. Taking it
    is an exclusive create; a live lease of another owner is refused; an expired one (or one
    whose holder ran on this host and is gone) is replaced conditionally on its ETag where
    the store supports it. The holder renews it (:meth:`renew`) before each round and checks
    it still owns it; :meth:`release` deletes it.
    """

    def __init__(self, directory: ObjectRoundDirectory, token: str) -> None:
        self.directory = directory
        self.token = token
        self._held = True

    @staticmethod
    def _key(directory: ObjectRoundDirectory) -> str:
        return directory._object(LEASE_FILE)

    @classmethod
    def _document(cls, token: str) -> bytes:
        info = {"expires": time.time() + LEASE_SECONDS, "host": socket.gethostname(),
                "owner": token, "pid": os.getpid(),
                "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        return json.dumps(info, sort_keys=True).encode("utf-8")

    @staticmethod
    def holder(directory: ObjectRoundDirectory) -> tuple[dict[str, Any], str | None] | None:
        """The lease document and its ETag, or ``None`` when there is none."""
        key = Lease._key(directory)
        directory.fs.invalidate_cache(key)
        try:
            info = directory.fs.info(key)
            raw = directory.fs.cat_file(key) if int(info["size"]) <= _MAX_LEASE_BYTES else b""
        except FileNotFoundError:
            return None
        try:
            value = json.loads(bytes(raw).decode("utf-8"))
        except ValueError:
            value = {}
        return (value if isinstance(value, dict) else {}), info.get("ETag")

    @staticmethod
    def _stale(doc: Mapping[str, Any]) -> bool:
        expires = doc.get("expires")
        if not isinstance(expires, (int, float)) or expires < time.time():
            return True
        pid = doc.get("pid")
        return (doc.get("host") == socket.gethostname() and isinstance(pid, int)
                and pid != os.getpid() and not _pid_alive(pid))

    @classmethod
    def acquire(cls, directory: ObjectRoundDirectory) -> Lease:
        """Take the lease of ``directory``.

        Raises:
            CheckpointLockedError: another writer holds a live lease (names its host and pid).
            CheckpointWriteError: the lease object cannot be written.
        """
        token = secrets.token_hex(16)
        key = cls._key(directory)
        fs = directory.fs
        try:
            fs.pipe_file(key, cls._document(token), mode="create")
        except FileExistsError:
            found = cls.holder(directory)
            doc, etag = found if found is not None else ({}, None)
            if found is not None and not cls._stale(doc):
                raise CheckpointLockedError(
                    f"{directory.path}: another Checkpointer is saving under this prefix "
                    f"(lease held by pid {doc.get('pid', '?')} on host {doc.get('host', '?')} "
                    f"since {doc.get('since', '?')}, until it expires or is released)"
                ) from None
            try:
                if etag is not None and found is not None:  # replace only the stale lease
                    fs.pipe_file(key, cls._document(token), IfMatch=etag)
                else:
                    with contextlib.suppress(FileNotFoundError):
                        fs.rm_file(key)
                    fs.pipe_file(key, cls._document(token), mode="create")
            except OSError as exc:
                raise CheckpointLockedError(
                    f"{directory.path}: another Checkpointer took the expired lease first "
                    f"({exc})"
                ) from None
        except OSError as exc:
            raise CheckpointWriteError(f"{key}: cannot write the lease: {exc}") from exc
        lease = cls(directory, token)
        lease.check()
        return lease

    @property
    def held(self) -> bool:
        """Whether this object still holds the lease."""
        return self._held

    def check(self) -> None:
        """Raise unless the lease object is still this holder's.

        Raises:
            CheckpointLockedError: another writer has taken it over (this one stopped renewing
                it for longer than :data:`LEASE_SECONDS`).
        """
        found = Lease.holder(self.directory)
        if found is None or found[0].get("owner") != self.token:
            self._held = False
            raise CheckpointLockedError(
                f"{self.directory.path}: this Checkpointer's lease was taken over by another "
                "writer (not renewed for longer than it lasts); nothing more is written"
            )

    def renew(self) -> None:
        """Check the lease is still ours, then push its expiry forward.

        Raises:
            CheckpointLockedError: as :meth:`check`.
        """
        self.check()
        key = Lease._key(self.directory)
        try:
            self.directory.fs.pipe_file(key, Lease._document(self.token))
        except OSError as exc:
            raise CheckpointWriteError(f"{key}: cannot renew the lease: {exc}") from exc

    def release(self) -> None:
        """Delete the lease if it is still ours (idempotent)."""
        if not self._held:
            return
        self._held = False
        with contextlib.suppress(OSError, CheckpointLockedError):
            found = Lease.holder(self.directory)
            if found is not None and found[0].get("owner") == self.token:
                self.directory.fs.rm_file(Lease._key(self.directory))


def round_directory(
    target: str | os.PathLike[str], storage_options: Mapping[str, Any] | None = None
) -> RoundDirectory | ObjectRoundDirectory:
    """The checkpoint directory ``target`` names: a local folder (a path or ``file://``
    URL) or an object-store prefix (any other URL).

    Example:
        >>> round_directory("runs/exp1")
        RoundDirectory('runs/exp1')
    """
    if is_url(target):
        assert isinstance(target, str)
        local = local_path(target)
        if local is None:
            return ObjectRoundDirectory(target, storage_options)
        target = local
    return RoundDirectory(target)
