"""A test double of the transport only: fsspec's in-memory filesystem, counting and logging.

:class:`CountingMemoryFS` is fsspec's own ``MemoryFileSystem`` (every byte really stored and
returned) registered under ``countmem://``, with its own store; it adds up what each ranged
read returns and logs each write and delete, in order, so that tests can see what crossed
the "network" and in which order objects appeared and vanished.

Example:
    >>> fs = fsspec.filesystem("countmem")
    >>> fs.reset()
    >>> fs.pipe_file("/doc/a.bin", b"0123456789")
    >>> fs.cat_file("/doc/a.bin", start=2, end=5), fs.transferred, fs.requests
    (b'234', 3, 1)
    >>> fs.rm("/doc/a.bin")
    >>> fs.log
    [('put', '/doc/a.bin'), ('rm', '/doc/a.bin')]
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, ClassVar

import fsspec
import pytest
from fsspec.implementations.memory import MemoryFileSystem

__all__ = ["CountingMemoryFS", "countmem_fs"]


class CountingMemoryFS(MemoryFileSystem):
    """fsspec's memory filesystem, counting read bytes and logging writes and deletes."""

    protocol = "countmem"
    store: ClassVar[dict[str, Any]] = {}  # its own objects, apart from memory://
    pseudo_dirs: ClassVar[list[str]] = [""]

    # class-wide, like the store: fsspec makes one instance per thread
    transferred: ClassVar[int] = 0
    requests: ClassVar[int] = 0
    log: ClassVar[list[tuple[str, str]]] = []

    @classmethod
    def _strip_protocol(cls, path: str) -> str:
        prefix = "countmem://"
        return super()._strip_protocol(path[len(prefix) :] if path.startswith(prefix) else path)

    def cat_file(self, path: str, start: int | None = None, end: int | None = None,
                 **kwargs: Any) -> bytes:
        data = super().cat_file(path, start=start, end=end, **kwargs)
        CountingMemoryFS.transferred += len(data)
        CountingMemoryFS.requests += 1
        return bytes(data)

    def put_file(self, lpath: str, rpath: str, *args: Any, **kwargs: Any) -> None:
        super().put_file(lpath, rpath, *args, **kwargs)
        self.log.append(("put", self._strip_protocol(rpath)))

    def pipe_file(self, path: str, value: bytes, *args: Any, **kwargs: Any) -> None:
        super().pipe_file(path, value, *args, **kwargs)
        self.log.append(("put", self._strip_protocol(path)))

    def rm_file(self, path: str) -> None:
        super().rm_file(path)
        self.log.append(("rm", self._strip_protocol(path)))

    def reset(self) -> None:
        CountingMemoryFS.transferred = CountingMemoryFS.requests = 0
        CountingMemoryFS.log.clear()


fsspec.register_implementation("countmem", CountingMemoryFS, clobber=True)


@pytest.fixture(name="fs")
def countmem_fs() -> Iterator[CountingMemoryFS]:
    """The fixture ``fs``: the ``countmem://`` filesystem, empty, its counters and log reset
    (import ``countmem_fs`` into a test module to use it)."""
    filesystem = fsspec.filesystem("countmem")
    assert isinstance(filesystem, CountingMemoryFS)
    filesystem.reset()
    yield filesystem
    CountingMemoryFS.store.clear()
