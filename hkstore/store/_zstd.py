"""zstd frames: writing them with content size and checksum, and reading them with bounded output.

zstd's own output cap does not protect a reader: when a frame header declares a content size,
``ZstdDecompressor.decompress()`` allocates that size whatever ``max_output_size`` says. So every
frame is checked *before* decompression: one frame only (its blocks are walked to find its end,
so trailing data is refused), content size recorded in the header and equal to the size the
manifest declares, declared size within the caller's cap, window within the limit, no
dictionary. Only then is it decompressed, and the output length is checked again.

Example:
    >>> frame = compress(b"weights" * 100)
    >>> decompress_bounded(frame, declared_size=700, cap=1 << 20, what="demo") == b"weights" * 100
    True
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from types import TracebackType
from typing import Protocol

import zstandard

from hkstore.errors import ArchiveFormatError, LimitExceededError
from hkstore.store._limits import DEFAULT_LIMITS

__all__ = [
    "BoundedReader",
    "CompressWriter",
    "Compressed",
    "check_declared_size",
    "compress",
    "decompress_bounded",
    "stream_writer",
]

_MAGIC = zstandard.MAGIC_NUMBER.to_bytes(4, "little")
_UNKNOWN = {-1, zstandard.CONTENTSIZE_UNKNOWN, zstandard.CONTENTSIZE_ERROR}
_CHUNK = 4 << 20  # bytes handed to the compressor at a time (bounds its output per call)
_DEFAULT_WINDOW = DEFAULT_LIMITS.max_zstd_window_bytes


def compress(data: bytes | bytearray | memoryview, level: int = 3) -> bytes:
    """Compress ``data`` as one zstd frame that records its content size and a checksum.

    Example:
        >>> zstandard.frame_content_size(compress(b"abc"))
        3
    """
    cctx = zstandard.ZstdCompressor(level=level, write_checksum=True, write_content_size=True)
    return cctx.compress(data)


@dataclass(frozen=True)
class Compressed:
    """What :meth:`CompressWriter.finish` wrote: frame size and SHA-256 of the frame."""

    size: int
    sha256: str


class _Sink(Protocol):
    def write(self, data: bytes, /) -> object: ...


class CompressWriter:
    """Stream one zstd frame of a known content size into ``sink``, chunk by chunk.

    Memory stays bounded by the chunks written (a tensor at a time), not the whole content.
    The frame records ``content_size`` and a checksum; :meth:`finish` returns the frame's
    size and SHA-256, as the manifest needs them.

    Example:
        >>> import io
        >>> out = io.BytesIO()
        >>> w = CompressWriter(out, content_size=6)
        >>> w.write(b"abc"); w.write(b"def")
        3
        3
        >>> w.finish().size == len(out.getvalue())
        True
    """

    def __init__(self, sink: _Sink, *, content_size: int, level: int = 3, threads: int = 0):
        cctx = zstandard.ZstdCompressor(
            level=level, write_checksum=True, write_content_size=True, threads=threads
        )
        self._obj = cctx.compressobj(size=content_size)
        self._sink = sink
        self._content_size = content_size
        self._raw = 0
        self._size = 0
        self._hash = hashlib.sha256()
        self._done = False

    def write(self, data: bytes | bytearray | memoryview) -> int:
        """Compress ``data`` (any C-contiguous buffer) and pass the output to the sink.

        Raises:
            ValueError: more than ``content_size`` bytes in total, or after :meth:`finish`.
        """
        view = memoryview(data).cast("B")
        if self._done:
            raise ValueError("CompressWriter.write() after finish()")
        if self._raw + view.nbytes > self._content_size:
            raise ValueError(
                f"CompressWriter: {self._raw + view.nbytes} bytes written, more than the "
                f"content size {self._content_size} the frame declares"
            )
        self._raw += view.nbytes
        for start in range(0, view.nbytes, _CHUNK):
            self._emit(self._obj.compress(view[start : start + _CHUNK]))
        return view.nbytes

    def finish(self) -> Compressed:
        """End the frame and return its size and digest.

        Raises:
            ValueError: fewer bytes were written than ``content_size``.
        """
        if self._raw != self._content_size:
            raise ValueError(
                f"CompressWriter: {self._raw} bytes written, but the frame declares "
                f"{self._content_size}"
            )
        if not self._done:
            self._emit(self._obj.flush())
            self._done = True
        return Compressed(size=self._size, sha256=self._hash.hexdigest())

    def close(self) -> None:
        """Same as :meth:`finish`, for code that treats this as a file (idempotent)."""
        self.finish()

    def _emit(self, out: bytes) -> None:
        if out:
            self._hash.update(out)
            self._size += len(out)
            self._sink.write(out)


def stream_writer(
    sink: _Sink, *, raw_size: int, level: int = 3, threads: int = 0
) -> CompressWriter:
    """Return a :class:`CompressWriter` for a frame of ``raw_size`` bytes of content."""
    return CompressWriter(sink, content_size=raw_size, level=level, threads=threads)


# --- reading ------------------------------------------------------------------------------------


#: The largest block a v1 frame may hold (RFC 8878: Block_Maximum_Size, 128 KiB at most).
_MAX_BLOCK = 128 << 10


def _frame_extent(frame: memoryview, what: str, window: int) -> tuple[int, int]:
    """Return the first zstd frame's byte length and the most content its blocks can hold.

    Walking the 3-byte block headers costs one step per block and decompresses nothing. A raw
    or RLE block holds exactly its size field; a compressed block at most the block maximum
    (``min(window, 128 KiB)``); a larger size field is refused. So a frame that declares more
    content than its blocks can produce is refused before a byte is decompressed: a small
    frame cannot make a decoder allocate or produce much (at most 32768 times its size, the
    ratio of a 4-byte RLE block of 128 KiB).
    """
    try:
        pos = zstandard.frame_header_size(frame)
    except zstandard.ZstdError as exc:
        raise ArchiveFormatError(f"{what}: malformed zstd frame header ({exc})") from None
    checksum = frame[4] & 0x04
    block_max = min(window, _MAX_BLOCK)
    capacity = 0
    while True:
        if pos + 3 > len(frame):
            raise ArchiveFormatError(f"{what}: zstd frame is truncated (block header at {pos})")
        header = int.from_bytes(frame[pos : pos + 3], "little")
        last, kind, size = header & 1, (header >> 1) & 3, header >> 3
        if kind == 3:
            raise ArchiveFormatError(f"{what}: zstd frame has a reserved block type at {pos}")
        if size > block_max:
            raise ArchiveFormatError(
                f"{what}: zstd block at {pos} declares {size} bytes, more than the block "
                f"maximum of {block_max} bytes"
            )
        capacity += block_max if kind == 2 else size
        pos += 3 + (1 if kind == 1 else size)  # RLE blocks carry one byte
        if last:
            break
    end = pos + (4 if checksum else 0)
    if end > len(frame):
        raise ArchiveFormatError(
            f"{what}: zstd frame is truncated ({len(frame)} bytes, the frame needs {end})"
        )
    return end, capacity


def check_declared_size(declared_size: int, *, cap: int, what: str) -> None:
    """Refuse a declared decompressed size that is not a size or is over ``cap`` (5.2 step 1).

    Raises:
        ArchiveFormatError: not a non-negative int.
        LimitExceededError: larger than ``cap``.
    """
    if type(declared_size) is not int or declared_size < 0:
        raise ArchiveFormatError(f"{what}: declared size {declared_size!r} is not a size")
    if declared_size > cap:
        raise LimitExceededError(
            f"{what}: declared size {declared_size} bytes is more than the limit of {cap} bytes"
        )


def _check_frame(
    frame: memoryview, *, declared_size: int, cap: int, what: str, max_window: int
) -> None:
    """Every check that must pass before a byte is decompressed."""
    check_declared_size(declared_size, cap=cap, what=what)
    if bytes(frame[:4]) != _MAGIC:
        raise ArchiveFormatError(f"{what}: not a zstd frame (magic bytes {bytes(frame[:4])!r})")
    try:
        content_size = zstandard.frame_content_size(frame)
        params = zstandard.get_frame_parameters(frame)
    except zstandard.ZstdError as exc:
        raise ArchiveFormatError(f"{what}: malformed zstd frame header ({exc})") from None
    if content_size in _UNKNOWN:
        raise ArchiveFormatError(
            f"{what}: zstd frame does not record its content size; refused (frames must "
            "declare it so that output can be bounded before decompressing)"
        )
    if content_size > declared_size:
        raise LimitExceededError(
            f"{what}: zstd frame declares {content_size} bytes of content, more than the "
            f"{declared_size} bytes declared for it"
        )
    if content_size < declared_size:
        raise ArchiveFormatError(
            f"{what}: zstd frame declares {content_size} bytes of content, but "
            f"{declared_size} bytes are declared for it"
        )
    if params.dict_id:
        raise ArchiveFormatError(f"{what}: zstd frame needs dictionary {params.dict_id}")
    if params.window_size > max_window:
        raise LimitExceededError(
            f"{what}: zstd window of {params.window_size} bytes is more than the limit of "
            f"{max_window} bytes"
        )
    if not params.has_checksum:
        raise ArchiveFormatError(
            f"{what}: zstd frame has no content checksum; v1 frames must carry one"
        )
    end, capacity = _frame_extent(frame, what, params.window_size)
    if end != len(frame):
        raise ArchiveFormatError(
            f"{what}: {len(frame) - end} bytes of trailing data after the zstd frame"
        )
    if content_size > capacity:
        raise ArchiveFormatError(
            f"{what}: zstd frame declares {content_size} bytes of content, but its blocks can "
            f"hold at most {capacity}"
        )


def decompress_bounded(
    frame: bytes | bytearray | memoryview,
    *,
    declared_size: int,
    cap: int,
    what: str,
    max_window: int = _DEFAULT_WINDOW,
) -> bytes:
    """Decompress one zstd frame whose output size is known and bounded, checking first.

    Args:
        frame: exactly one zstd frame (no trailing bytes, no skippable frames).
        declared_size: the decompressed size the manifest declares.
        cap: the largest decompressed size the caller accepts (a ``Limits`` field).
        what: names the member in error messages (e.g. ``"functions.pkl.zst"``).
        max_window: the largest zstd window accepted.

    Returns:
        Exactly ``declared_size`` bytes.

    Raises:
        LimitExceededError: ``declared_size > cap``, the frame declares more content than
            ``declared_size``, or its window is over ``max_window`` (all before decompressing).
        ArchiveFormatError: not a zstd frame, content size not recorded or smaller than
            declared, a dictionary needed, trailing data, corrupt data or checksum.
    """
    view = memoryview(frame).cast("B")
    _check_frame(view, declared_size=declared_size, cap=cap, what=what, max_window=max_window)
    dctx = zstandard.ZstdDecompressor(max_window_size=max_window)
    try:
        out = dctx.decompress(view, allow_extra_data=False)
    except zstandard.ZstdError as exc:
        raise ArchiveFormatError(f"{what}: corrupt zstd frame ({exc})") from None
    if len(out) != declared_size:  # zstd checks this too; never trust one layer alone
        raise ArchiveFormatError(
            f"{what}: zstd frame decompressed to {len(out)} bytes; {declared_size} declared"
        )
    return out


class BoundedReader:
    """Read one checked zstd frame incrementally (e.g. straight into tensor buffers).

    The frame is checked like :func:`decompress_bounded` when the reader is created. Reads
    never return more than ``declared_size`` bytes in total; :meth:`close` (or leaving the
    ``with`` block without an error) checks that exactly ``declared_size`` bytes were there
    and that the frame's checksum verified.

    Raises:
        LimitExceededError, ArchiveFormatError: as :func:`decompress_bounded`, at creation or
            during reads.

    Example:
        >>> with BoundedReader(compress(b"abcdef"), declared_size=6, cap=100, what="x") as r:
        ...     r.read(4), r.read(4)
        (b'abcd', b'ef')
    """

    def __init__(
        self,
        frame: bytes | bytearray | memoryview,
        *,
        declared_size: int,
        cap: int,
        what: str,
        max_window: int = _DEFAULT_WINDOW,
    ):
        view = memoryview(frame).cast("B")
        _check_frame(view, declared_size=declared_size, cap=cap, what=what, max_window=max_window)
        dctx = zstandard.ZstdDecompressor(max_window_size=max_window)
        self._reader = dctx.stream_reader(view, read_across_frames=False)
        self._declared = declared_size
        self._what = what
        self._count = 0

    @property
    def remaining(self) -> int:
        """Bytes still to read."""
        return self._declared - self._count

    def readinto(self, buffer: bytearray | memoryview) -> int:
        """Fill ``buffer`` (up to :attr:`remaining` bytes); return how many bytes were read."""
        target = memoryview(buffer).cast("B")[: self.remaining]
        total = 0
        while total < target.nbytes:
            n = self._read_some(target[total:])
            if n == 0:
                raise ArchiveFormatError(
                    f"{self._what}: zstd frame ended after {self._count} bytes; "
                    f"{self._declared} declared"
                )
            total += n
        return total

    def read(self, size: int) -> bytes:
        """Read up to ``size`` bytes (fewer only at the end of the declared content)."""
        out = bytearray(min(size, self.remaining))
        n = self.readinto(out)
        return bytes(out[:n])

    def close(self) -> None:
        """Check the frame was read to its end (size and checksum), then release it.

        Raises:
            ArchiveFormatError: bytes were left unread, or the frame holds more bytes than
                declared, or its checksum fails.
        """
        try:
            if self._count != self._declared:
                raise ArchiveFormatError(
                    f"{self._what}: {self._declared - self._count} declared bytes left unread"
                )
            if self._read_some(memoryview(bytearray(1))) != 0:  # frame end + checksum
                raise LimitExceededError(
                    f"{self._what}: zstd frame holds more than the {self._declared} bytes declared"
                )
        finally:
            self._reader.close()

    def abandon(self) -> None:
        """Release the frame without the end checks of :meth:`close` (after an error, or
        when only a prefix was wanted)."""
        self._reader.close()

    def _read_some(self, target: memoryview) -> int:
        try:
            n = self._reader.readinto(target)
        except zstandard.ZstdError as exc:
            raise ArchiveFormatError(f"{self._what}: corrupt zstd frame ({exc})") from None
        self._count += n
        return n

    def __enter__(self) -> BoundedReader:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.close()
        else:
            self._reader.close()
