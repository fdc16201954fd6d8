"""Archives in object storage (``s3://``, ``gs://``, ``memory://``...) through fsspec.

A source or destination that is a URL with a scheme (``s3://bucket/key.hkz``) is reached
through `fsspec <https://filesystem-spec.readthedocs.io>`_, which the ``cloud`` extra installs
with s3fs; ``file://`` URLs are turned into plain paths and take the local code path (pread,
atomic rename), as do plain paths.

Reads go by range: :class:`RemoteSource` is a :class:`~hkstore.store._fileio.ByteSource` whose
every read is one ranged request (``fs.cat_file(path, start, end)``), so opening an archive
fetches only its end records, central directory, local headers and manifest, and a tensor
only its own bytes. Every check a local archive gets runs on the bytes received, unchanged.

Writes never rename (object stores cannot): :func:`remote_write` spools the archive into a
local temporary file (the container writer goes back to fill in each member's header) and
uploads it under its final key only once complete; an S3 upload (multipart for large files)
becomes visible only when it completes, so a reader sees the old object or the new one.

Example:
    >>> is_url("s3://bucket/model.hkz"), is_url("model.hkz"), is_url("C:/model.hkz")
    (True, False, False)
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
import threading
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any, BinaryIO
from urllib.parse import unquote, urlsplit

from hkstore.errors import ContainerError, MissingDependencyError

if TYPE_CHECKING:
    from fsspec import AbstractFileSystem

__all__ = [
    "CLOUD_EXTRA",
    "RangeStream",
    "RemoteSource",
    "destination",
    "is_url",
    "local_path",
    "remote_filesystem",
    "remote_write",
]

#: what to install for URLs
CLOUD_EXTRA = "pip install 'hkstore[cloud]'"
# a scheme of two characters or more, so a Windows drive ("C:/x") is never a URL
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]+://")
#: bytes per ranged request when a whole tensor is read (a request costs a round trip)
REMOTE_CHUNK = 8 << 20
#: bytes fetched at once at either end of an object (see :class:`RemoteSource`)
EDGE = 64 << 10


def is_url(source: object) -> bool:
    """Whether ``source`` is a URL string with a scheme (``s3://...``, ``file://...``)."""
    return isinstance(source, str) and _URL.match(source) is not None


def local_path(url: str) -> str | None:
    """The local path a ``file://`` URL names, or ``None`` for any other URL.

    Example:
        >>> local_path("file:///srv/run/model.hkz"), local_path("s3://b/k")
        ('/srv/run/model.hkz', None)
    """
    parts = urlsplit(url)
    if parts.scheme.lower() != "file":
        return None
    if parts.netloc not in ("", "localhost"):
        raise ContainerError(f"{url}: a file:// URL names a host ({parts.netloc!r}); use a path")
    return unquote(parts.path)


def remote_filesystem(
    url: str, storage_options: Mapping[str, Any] | None = None
) -> tuple[AbstractFileSystem, str]:
    """Resolve ``url`` to ``(filesystem, path)`` through fsspec.

    Args:
        url: ``protocol://...``; fsspec picks the implementation (s3fs for ``s3://``).
        storage_options: keyword arguments for the filesystem (``endpoint_url``, ``key``,
            ``anon``...); s3fs also reads the usual ``AWS_*`` environment variables.

    Raises:
        MissingDependencyError: fsspec, or the protocol's implementation, is not installed
            (the message names the ``cloud`` extra).
        ContainerError: fsspec knows no such protocol.
    """
    try:
        import fsspec
    except ImportError:
        raise MissingDependencyError(
            f"{url}: URLs need fsspec and s3fs, which the cloud extra installs: {CLOUD_EXTRA}"
        ) from None
    try:
        fs, path = fsspec.core.url_to_fs(url, **dict(storage_options or {}))
    except ImportError as exc:
        raise MissingDependencyError(
            f"{url}: the filesystem for this URL is not installed ({exc}); for s3:// the cloud "
            f"extra installs it: {CLOUD_EXTRA}"
        ) from None
    except ValueError as exc:
        raise ContainerError(f"{url}: not a URL fsspec can open ({exc})") from None
    return fs, path


class RemoteSource:
    """A :class:`~hkstore.store._fileio.ByteSource` over one object, read by ranged requests.

    ``size`` is the object's size when the source was made. A read is one request for
    exactly the bytes asked (``fs.cat_file`` with ``start``/``end``), copied into memory the
    reader owns; a reply of another length (the object was replaced or shortened since)
    raises :class:`~hkstore.errors.ContainerError`. Reads may come from several threads.

    The first read within the last (or first) :data:`EDGE` bytes fetches that whole edge in
    one request and serves later reads there from it: opening an archive reads its end
    records, central directory, manifest and signature (all at the end) and the local
    header and safetensors header of its weights (at the start), so two requests instead of
    five or more, each a round trip.

    Attributes:
        read_chunk: bytes per request when a whole tensor is read.
    """

    read_chunk = REMOTE_CHUNK

    def __init__(self, fs: AbstractFileSystem, path: str, *, name: str) -> None:
        self.fs = fs
        self.path = path
        self.name = name
        self._edges: dict[str, tuple[int, bytes]] = {}
        self._lock = threading.Lock()
        try:
            info = fs.info(path)
        except FileNotFoundError:
            raise ContainerError(f"{name}: cannot open archive: no such object") from None
        except OSError as exc:
            raise ContainerError(f"{name}: cannot open archive: {exc}") from None
        if info.get("type") != "file":
            raise ContainerError(f"{name}: is a {info.get('type')}, not an object")
        self.size = int(info["size"])

    def read(self, offset: int, n: int) -> bytes:
        """Return exactly ``n`` bytes from ``offset`` (one ranged request)."""
        if offset < 0 or n < 0 or offset + n > self.size:
            raise ContainerError(
                f"read of {n} bytes at offset {offset} runs past the end of the "
                f"{self.size}-byte input"
            )
        if n == 0:
            return b""
        for edge, start in (("tail", max(0, self.size - EDGE)), ("head", 0)):
            if start <= offset and offset + n <= start + min(EDGE, self.size):
                begin, data = self._edge(edge, start)
                return data[offset - begin : offset - begin + n]
        return self._fetch(offset, n)

    def _edge(self, edge: str, start: int) -> tuple[int, bytes]:
        with self._lock:
            if edge not in self._edges:
                self._edges[edge] = (start, self._fetch(start, min(EDGE, self.size - start)))
            return self._edges[edge]

    def _fetch(self, offset: int, n: int) -> bytes:
        data = self.fs.cat_file(self.path, start=offset, end=offset + n)
        if len(data) != n:
            raise ContainerError(
                f"{self.name}: {len(data)} bytes came back for a read of {n} bytes at offset "
                f"{offset}; the object was {self.size} bytes when opened (replaced since?)"
            )
        return bytes(data)

    def readinto(self, offset: int, buffer: memoryview) -> None:
        """Fill ``buffer`` with the bytes at ``offset`` (one ranged request)."""
        buffer[:] = self.read(offset, buffer.nbytes)

    def stream(self, offset: int, n: int) -> RangeStream:
        """The bytes ``[offset, offset + n)`` as a stream read front to back (one request
        where the filesystem can stream a reply: s3fs; ranged reads otherwise)."""
        if offset < 0 or n < 0 or offset + n > self.size:
            raise ContainerError(
                f"stream of {n} bytes at offset {offset} runs past the end of the "
                f"{self.size}-byte input"
            )
        return RangeStream(self, offset, n)


async def _fill(body: Any, buffer: memoryview) -> int:
    """Read a streamed reply into ``buffer`` until it is full or the reply ends (one hop to
    the event loop per buffer, not per network chunk); return the bytes read."""
    done = 0
    while done < buffer.nbytes:
        chunk = await body.read(buffer.nbytes - done)
        if not chunk:
            break
        buffer[done : done + len(chunk)] = chunk
        done += len(chunk)
    return done


class RangeStream:
    """A byte range of an object arriving in order: :meth:`readinto` fills buffers in turn.

    With s3fs the range is one ``GetObject`` whose body is read as it arrives (the client
    buffers a little; memory stays bounded); with other filesystems each :meth:`readinto`
    is one ranged read. Either way a reply shorter than the range raises
    :class:`~hkstore.errors.ContainerError`.
    """

    def __init__(self, source: RemoteSource, offset: int, n: int) -> None:
        self._source = source
        self._pos = offset
        self._end = offset + n
        self._body: Any = None
        fs = source.fs
        if n and hasattr(fs, "set_session") and hasattr(fs, "split_path"):  # s3fs
            from fsspec.asyn import sync

            client = sync(fs.loop, fs.set_session)
            bucket, key, version = fs.split_path(source.path)
            extra = {"VersionId": version} if version else {}
            reply = sync(fs.loop, client.get_object, Bucket=bucket, Key=key,
                         Range=f"bytes={offset}-{offset + n - 1}", **extra)
            self._body = reply["Body"]

    def readinto(self, buffer: memoryview) -> int:
        """Fill ``buffer`` with the next bytes of the range; return its size."""
        want = buffer.nbytes
        if self._pos + want > self._end:
            raise ContainerError(f"{self._source.name}: read past the end of the stream")
        if self._body is None:
            self._source.readinto(self._pos, buffer)
        else:
            from fsspec.asyn import sync

            done = sync(self._source.fs.loop, _fill, self._body, buffer)
            if done < want:
                raise ContainerError(
                    f"{self._source.name}: the reply ended at offset {self._pos + done}, "
                    f"before {self._end} (the object was replaced or cut short?)"
                )
        self._pos += want
        return want

    def close(self) -> None:
        """Drop the reply (what is left of it is not read)."""
        body, self._body = self._body, None
        if body is not None:
            with contextlib.suppress(Exception):
                body.close()


@contextlib.contextmanager
def remote_write(
    url: str, storage_options: Mapping[str, Any] | None = None
) -> Iterator[BinaryIO]:
    """Yield a local temporary file; when the body succeeds, upload it as the object ``url``.

    Nothing is written under ``url`` before the body has finished: if it raises, the temp
    file is dropped and the object (old or absent) is untouched. The upload is one
    ``fs.put_file`` (s3fs: one request, or a multipart upload for large files, which S3
    makes visible only when it completes).

    Raises:
        MissingDependencyError, ContainerError: as :func:`remote_filesystem`.
        OSError: the upload failed (nothing new is visible under ``url``).
    """
    fs, path = remote_filesystem(url, storage_options)
    fd, tmp = tempfile.mkstemp(suffix=".hkstore-upload")
    try:
        with os.fdopen(fd, "w+b") as handle:
            yield handle
            handle.flush()
        fs.put_file(tmp, path)
    finally:
        os.unlink(tmp)


@contextlib.contextmanager
def destination(
    target: str | os.PathLike[str], storage_options: Mapping[str, Any] | None = None
) -> Iterator[BinaryIO]:
    """Where a whole file is written: a path (or ``file://`` URL) or an object URL.

    A path gets :func:`~hkstore.store._atomic.atomic_write` (temp file, fsync, rename), an
    object URL :func:`remote_write` (uploaded once complete). Either way nothing new is
    visible under ``target`` unless the body succeeds.

    Example:
        >>> with destination("memory://docs/x.bin") as f:
        ...     f.write(b"data")
        4
        >>> import fsspec
        >>> fsspec.filesystem("memory").cat_file("/docs/x.bin")
        b'data'
    """
    from hkstore.store._atomic import atomic_write

    if is_url(target):
        assert isinstance(target, str)
        local = local_path(target)
        if local is None:
            with remote_write(target, storage_options) as handle:
                yield handle
            return
        target = local
    with atomic_write(target) as handle:
        yield handle
