"""The tensor-digest table: which hash algorithms a tensor digest may use, and how to run them.

A manifest names each tensor's algorithm by the key holding its digest (``"sha256"`` or
``"blake3"``), so the choice is inside the signed bytes. This table is the only place a reader
looks algorithms up: a key that is not here is refused by the manifest parser, and there is no
weaker entry to fall back to. Both entries are 256-bit cryptographic hashes; a digest is 64
lower-case hex digits either way.

Measured (``tools/digest_speed.py``, 400 MB in memory, 2-core AMD EPYC with SHA-NI and
AVX-512): SHA-256 2.0 GB/s on one thread, 3.9 GB/s as 4 MiB chunks on two; BLAKE3 7.8 GB/s
on one thread, 12.8 GB/s on two. New archives use BLAKE3 (``DEFAULT``); SHA-256 stays
readable (every archive before hkstore 0.2 used it) and writable.

Example:
    >>> digest_hex("sha256", b"abc")[:16]
    'ba7816bf8f01cfea'
    >>> digest_hex("blake3", b"abc")[:16]
    '6437b3ac38465133'
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

from hkstore.errors import MissingDependencyError

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer

__all__ = ["ALGORITHMS", "DEFAULT", "Hasher", "check_algorithm", "digest_hex", "new_hasher"]

#: The tensor-digest algorithms a reader accepts, in the order FORMAT.md lists them.
ALGORITHMS: tuple[str, ...] = ("sha256", "blake3")
#: What a writer uses unless told otherwise.
DEFAULT = "blake3"


class Hasher(Protocol):
    """What :func:`new_hasher` returns: ``update`` in pieces, then ``hexdigest``."""

    def update(self, data: ReadableBuffer, /) -> object: ...

    def hexdigest(self) -> str: ...


def check_algorithm(algorithm: str) -> str:
    """Return ``algorithm`` if it is in the table.

    Raises:
        ValueError: it is not (the message lists the table).
    """
    if algorithm not in ALGORITHMS:
        raise ValueError(
            f"tensor digest algorithm {algorithm!r} is not one of {', '.join(ALGORITHMS)}"
        )
    return algorithm


def _blake3() -> Callable[..., Hasher]:
    try:
        from blake3 import blake3
    except ImportError as exc:  # a dependency of hkstore: only a broken install gets here
        raise MissingDependencyError(
            "BLAKE3 tensor digests need the 'blake3' package (pip install blake3)"
        ) from exc
    return blake3


def new_hasher(algorithm: str, *, threads: int = 1) -> Hasher:
    """Return an empty hasher for ``algorithm``.

    Args:
        algorithm: a name in :data:`ALGORITHMS`.
        threads: for BLAKE3, how many threads one large ``update`` may use (the package's own
            pool); SHA-256 always hashes on the calling thread.

    Raises:
        ValueError: ``algorithm`` is not in the table.
        MissingDependencyError: BLAKE3 without the ``blake3`` package.
    """
    check_algorithm(algorithm)
    if algorithm == "sha256":
        return hashlib.sha256()
    return _blake3()(max_threads=max(1, threads))


def digest_hex(algorithm: str, data: ReadableBuffer, *, threads: int = 1) -> str:
    """Return the lower-case hex digest of ``data`` with ``algorithm`` (see :func:`new_hasher`).

    ``data`` is any C-contiguous buffer (a float32 array's memory is hashed as its bytes; the
    ``blake3`` package itself takes byte buffers only).
    """
    view = memoryview(data)
    if view.format != "B" or view.ndim != 1:
        view = view.cast("B")
    hasher = new_hasher(algorithm, threads=threads)
    hasher.update(view)
    return hasher.hexdigest()
