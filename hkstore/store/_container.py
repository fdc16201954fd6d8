"""The ZIP container: a streaming writer of stored members and THE one strict reader.

Written by hand rather than with :mod:`zipfile` because the format needs three things zipfile
does not give: members streamed from a generator with their data start aligned (a zipalign-style
padding extra field) so the weights can be memory-mapped; local headers patched in place once a
streamed member's size and CRC are known; and a fail-closed parser that accounts for every byte
of the file (zipfile tolerates prepended data, gaps, unknown members, duplicates and header
mismatches -- the parser differences that let scanners be bypassed). The output is plain ZIP
(stored, ZIP64 when needed) that :mod:`zipfile` and ``unzip`` read.

**One encoding.** For a given list of members (names, sizes, CRC-32s) there is exactly one
container: members in :data:`MEMBER_ORDER`, local header + data back to back from offset 0,
then the central directory, then (only when an offset or size needs it) the ZIP64 end record
and locator, then the end record with comment :data:`ARCHIVE_COMMENT`. Every header field has
one allowed value -- version made by 0x032D (Unix, 4.5), version needed 20 (45 for an entry
using ZIP64), flags 0x0800 (UTF-8), method 0, DOS time 0, date 1980-01-01, internal attributes
0, external attributes 0o100644 << 16, no comments -- and every extra field is determined by
:data:`MEMBER_LAYOUT`: the streamed weights members reserve 20 bytes for a ZIP64 field, which
become padding when the member is small, and ``weights.safetensors``' data starts 64-aligned
(a padding field, id 0xD935: u16 alignment, then zeros). The writer can only produce that
encoding and the reader renders it from the members it found and requires the file's headers
to equal it byte for byte (:func:`canonical_headers`), so every byte of an archive is either
member data (covered by the manifest's digests, or the CRC-32 of the JSON members) or checked
exactly: no byte of a signed archive can change unnoticed.

The file stays whole (writer + reader, ~1000 lines) because both halves share the byte layout
defined at the top; splitting them would put the layout in two places. CRC-32 lives in
``_crc32.py`` and is re-exported here.
"""

from __future__ import annotations

import stat
import struct
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING, cast

if TYPE_CHECKING:
    import mmap

    from _typeshed import ReadableBuffer

    from hkstore.store._crc32 import BytesLike

from hkstore.errors import (
    ContainerError,
    LimitExceededError,
    UnsupportedContainerVersionError,
)
from hkstore.store._crc32 import CRC32_IMPLEMENTATION, crc32, crc32_combine
from hkstore.store._fileio import BufferSource, ByteSource
from hkstore.store._limits import DEFAULT_LIMITS, Limits
from hkstore.store._members import (
    CRC_CHECKED,
    FUNCTIONS,
    MANIFEST,
    MEMBER_LAYOUT,
    MEMBER_NAMES,
    MEMBER_ORDER,
    SIGNATURE,
    WEIGHTS_ZSTD,
)

__all__ = [
    "ARCHIVE_COMMENT",
    "CRC32_IMPLEMENTATION",
    "MEMBER_LAYOUT",
    "MEMBER_NAMES",
    "MEMBER_ORDER",
    "Container",
    "ContainerWriter",
    "MemberInfo",
    "MemberStream",
    "crc32",
    "crc32_combine",
    "parse_container",
    "read_container",
]

#: End-of-central-directory comment: magic + container version. Must end the file exactly.
ARCHIVE_COMMENT = b"hkstore/1"

# --- byte layout (PKWARE APPNOTE 6.3.x), all little-endian ---------------------------------
_LOCAL = struct.Struct("<IHHHHHIIIHH")  # 30 bytes: sig .. extra length
_CENTRAL = struct.Struct("<IHHHHHHIIIHHHHHII")  # 46 bytes: sig .. local header offset
_EOCD = struct.Struct("<IHHHHIIH")  # 22 bytes + comment
_ZIP64_EOCD = struct.Struct("<IQHHIIQQQQ")  # 56 bytes, no extensible data
_ZIP64_LOCATOR = struct.Struct("<IIQI")  # 20 bytes
_EXTRA_HEAD = struct.Struct("<HH")
_U16 = struct.Struct("<H")
_U64 = struct.Struct("<Q")
# Field names, for messages that say which header field differs from its one allowed value.
_LOCAL_FIELDS = ("signature", "version needed", "flags", "compression method", "DOS time",
                 "DOS date", "CRC-32", "compressed size", "uncompressed size", "name length",
                 "extra field length")  # fmt: skip
_CENTRAL_FIELDS = ("signature", "version made by", "version needed", "flags",
                   "compression method", "DOS time", "DOS date", "CRC-32", "compressed size",
                   "uncompressed size", "name length", "extra field length",
                   "file comment length", "disk number start", "internal attributes",
                   "external attributes", "local header offset")  # fmt: skip
_EOCD_FIELDS = ("signature", "disk number", "central directory disk", "entries on this disk",
                "entries", "central directory size", "central directory offset",
                "comment length")  # fmt: skip
_ZIP64_EOCD_FIELDS = ("signature", "record size", "version made by", "version needed",
                      "disk number", "central directory disk", "entries on this disk",
                      "entries", "central directory size", "central directory offset")  # fmt: skip
_ZIP64_LOCATOR_FIELDS = ("signature", "end record disk", "end record offset", "disks")

_SIG_LOCAL = 0x04034B50
_SIG_CENTRAL = 0x02014B50
_SIG_EOCD = 0x06054B50
_SIG_ZIP64_EOCD = 0x06064B50
_SIG_ZIP64_LOCATOR = 0x07064B50
_ZIP64_EOCD_RECORD_SIZE = _ZIP64_EOCD.size - 12  # "size of zip64 end record" field value

_EXTRA_ZIP64 = 0x0001
_EXTRA_PAD = 0xD935  # zipalign's id: u16 alignment then zero bytes
_ZIP64_RESERVE = _EXTRA_HEAD.size + 16  # local ZIP64 field: uncompressed + compressed sizes
_PAD_MIN = _EXTRA_HEAD.size + _U16.size

_U32_MAX = 0xFFFFFFFF
_U16_MAX = 0xFFFF
_FLAG_UTF8 = 0x0800
_FLAG_ENCRYPTED = 0x0001 | 0x0040 | 0x2000  # traditional, strong, central-directory encryption
_FLAG_DATA_DESCRIPTOR = 0x0008
_METHOD_STORED = 0
_VERSION_NEEDED = 20
_VERSION_NEEDED_ZIP64 = 45
_VERSION_MADE_BY = (3 << 8) | _VERSION_NEEDED_ZIP64  # host 3 = Unix, so attributes are st_mode
_DOS_TIME = 0
_DOS_DATE = (0 << 9) | (1 << 5) | 1  # 1980-01-01: fixed, so equal inputs give equal bytes
_EXTERNAL_ATTR = (stat.S_IFREG | 0o644) << 16
_DOS_ATTR_REFUSED = 0x08 | 0x10  # volume label, directory
_HOST_UNIX = 3
#: Largest canonical central directory entry: 46 bytes, the longest name, a full ZIP64 field.
_MAX_CENTRAL_ENTRY = _CENTRAL.size + max(map(len, MEMBER_NAMES)) + _EXTRA_HEAD.size + 24


# --- the one layout: what every header must hold ---------------------------------------------


@dataclass(frozen=True)
class MemberInfo:
    """Where one member lives in the container (offsets from the start of the file)."""

    name: str
    header_offset: int
    data_offset: int
    size: int
    crc32: int


def _zip64_from(force_zip64: bool) -> int:
    """Values at or above this are written through ZIP64 (every value when forced, in tests)."""
    return 0 if force_zip64 else _U32_MAX


def _extra_length(name: str, header_offset: int, size: int | None, zip64_at: int) -> int:
    """Length of the local extra field of ``name`` at ``header_offset``: ZIP64 reserve + padding.

    ``size`` is ``None`` for a member whose size is not known yet (a streamed one).
    """
    align, streamed = MEMBER_LAYOUT[name]
    reserve = streamed or size is None or size >= zip64_at
    fixed = _ZIP64_RESERVE if reserve else 0
    base = header_offset + _LOCAL.size + len(name.encode()) + fixed
    pad = (-base) % align
    while 0 < pad < _PAD_MIN:  # a padding field needs at least its head and alignment value
        pad += align
    return fixed + pad


def _extra_lengths(name: str, header_offset: int, size: int, zip64_at: int) -> tuple[int, ...]:
    """The local extra lengths a reader accepts: the one encoding, and one older form.

    hkstore 0.1.0's ``hkstore sign`` streamed ``functions.pkl.zst`` when it copied it, so the
    archives it re-signed carry a 20-byte padding field (alignment 1) there: still accepted,
    so that archives already out in the world keep verifying. (That padding's bytes are fixed
    too: only its presence is a second choice, and no single-byte change can make it.)
    """
    canonical = _extra_length(name, header_offset, size, zip64_at)
    if name == FUNCTIONS and size < zip64_at:
        legacy = _extra_length(WEIGHTS_ZSTD, header_offset, None, zip64_at)  # 20, align 1
        if legacy != canonical:
            return canonical, legacy
    return (canonical,)


def _padding_field(total: int, align: int) -> bytes:
    return _EXTRA_HEAD.pack(_EXTRA_PAD, total - 4) + _U16.pack(align) + bytes(total - _PAD_MIN)


def _local_header(
    name: str, header_offset: int, size: int, crc: int, extra_len: int, zip64_at: int
) -> bytes:
    """The canonical local header (30 bytes, name, extra field) of one member."""
    align = MEMBER_LAYOUT[name][0]
    zip64 = size >= zip64_at
    extra = b""
    rest = extra_len
    if zip64:
        extra = _EXTRA_HEAD.pack(_EXTRA_ZIP64, 16) + _U64.pack(size) * 2
        rest -= _ZIP64_RESERVE
    if rest:
        extra += _padding_field(rest, align)
    needed = _VERSION_NEEDED_ZIP64 if zip64 or header_offset >= zip64_at else _VERSION_NEEDED
    size32 = _U32_MAX if zip64 else size
    encoded = name.encode()
    return (
        _LOCAL.pack(
            _SIG_LOCAL, needed, _FLAG_UTF8, _METHOD_STORED, _DOS_TIME, _DOS_DATE, crc,
            size32, size32, len(encoded), len(extra),
        )
        + encoded
        + extra
    )  # fmt: skip


def _central_entry(info: MemberInfo, zip64_at: int) -> bytes:
    """The canonical central directory entry of one member."""
    name = info.name.encode()
    sizes_zip64 = info.size >= zip64_at
    offset_zip64 = info.header_offset >= zip64_at
    values = ([info.size, info.size] if sizes_zip64 else []) + (
        [info.header_offset] if offset_zip64 else []
    )
    extra = b""
    if values:
        extra = _EXTRA_HEAD.pack(_EXTRA_ZIP64, 8 * len(values)) + b"".join(
            _U64.pack(v) for v in values
        )
    size32 = _U32_MAX if sizes_zip64 else info.size
    needed = _VERSION_NEEDED_ZIP64 if sizes_zip64 or offset_zip64 else _VERSION_NEEDED
    return (
        _CENTRAL.pack(
            _SIG_CENTRAL, _VERSION_MADE_BY, needed, _FLAG_UTF8, _METHOD_STORED, _DOS_TIME,
            _DOS_DATE, info.crc32, size32, size32, len(name), len(extra), 0, 0, 0,
            _EXTERNAL_ATTR, _U32_MAX if offset_zip64 else info.header_offset,
        )
        + name
        + extra
    )  # fmt: skip


def _end_records(count: int, cd_offset: int, cd_size: int, zip64_at: int) -> bytes:
    """The canonical ZIP64 end record and locator (when needed) and end record with comment."""
    out = b""
    if cd_offset >= zip64_at or cd_size >= zip64_at:
        zip64_offset = cd_offset + cd_size
        out += _ZIP64_EOCD.pack(
            _SIG_ZIP64_EOCD, _ZIP64_EOCD_RECORD_SIZE, _VERSION_MADE_BY, _VERSION_NEEDED_ZIP64,
            0, 0, count, count, cd_size, cd_offset,
        )  # fmt: skip
        out += _ZIP64_LOCATOR.pack(_SIG_ZIP64_LOCATOR, 0, zip64_offset, 1)
    return (
        out
        + _EOCD.pack(
            _SIG_EOCD, 0, 0, min(count, _U16_MAX), min(count, _U16_MAX),
            min(cd_size, _U32_MAX), min(cd_offset, _U32_MAX), len(ARCHIVE_COMMENT),
        )
        + ARCHIVE_COMMENT
    )  # fmt: skip


# --- writer --------------------------------------------------------------------------------


@dataclass
class _Pending:
    name: str
    header_offset: int
    extra_len: int  # fixed at begin; the patched header keeps the same length
    expected_size: int | None = None


def _byte_view(data: BytesLike) -> memoryview:
    view = memoryview(cast("ReadableBuffer", data))
    if view.ndim != 1 or view.itemsize != 1:
        view = view.cast("B")  # raises TypeError for non-contiguous buffers
    return view


class MemberStream:
    """A member being written: call :meth:`write` any number of times, then :meth:`finish`."""

    def __init__(self, writer: ContainerWriter, pending: _Pending, *, compute_crc: bool) -> None:
        self._writer = writer
        self._pending = pending
        self._crc: int | None = 0 if compute_crc else None
        self._size = 0
        self._done = False

    def write(self, buf: BytesLike) -> int:
        """Append ``buf`` (bytes-like; large memoryviews are passed through, not copied).

        Returns:
            The number of bytes written.
        """
        if self._done:
            raise ValueError("write() on a finished member stream")
        view = _byte_view(buf)
        if self._crc is not None:
            self._crc = crc32(view, self._crc)
        self._writer._write(view)
        self._size += view.nbytes
        return view.nbytes

    def finish(self, *, crc32: int | None = None) -> MemberInfo:
        """Patch the local header with the final size and CRC; the writer may go on.

        Args:
            crc32: the member's CRC-32 when the caller computed it (``compute_crc=False``);
                ``None`` to use the one computed while writing.

        Returns:
            Where the member landed.

        Raises:
            ValueError: no CRC available, the given one differs from the computed one, or
                the size differs from the one announced to ``begin_member``.
        """
        if self._done:
            raise ValueError("finish() called twice")
        crc = self._crc if crc32 is None else crc32
        if crc is None:
            raise ValueError("begin_member(compute_crc=False) needs finish(crc32=...)")
        if self._crc is not None and crc != self._crc:
            raise ValueError(
                f"finish(crc32={crc:#010x}) but the data written has {self._crc:#010x}"
            )
        expected = self._pending.expected_size
        if expected is not None and expected != self._size:
            raise ValueError(
                f"member {self._pending.name!r}: {self._size} bytes written, "
                f"begin_member(size={expected}) announced"
            )
        self._done = True
        return self._writer._finish(self._pending, self._size, crc)


class ContainerWriter:
    """Write an archive's members (stored, canonical bytes) into a seekable binary file.

    Members are written one at a time, in :data:`MEMBER_ORDER` (any subset, ``manifest.json``
    required); each member's alignment and extra field come from :data:`MEMBER_LAYOUT`, so
    equal members always give equal bytes and the reader accepts exactly what this writes.
    The caller owns the file: :meth:`close` writes the central directory but does not close it.

    Args:
        fileobj: seekable binary file (or ``io.BytesIO``) positioned at 0.
        force_zip64: write every size and offset through ZIP64 records (tests only: such a
            container is read back only by ``read_container(..., force_zip64=True)``).

    Example:
        >>> import io
        >>> out = io.BytesIO()
        >>> writer = ContainerWriter(out)
        >>> info = writer.add_member("manifest.json", b"{}")
        >>> writer.close()
        >>> read_container(out.getvalue())["manifest.json"].size
        2
    """

    def __init__(self, fileobj: IO[bytes], *, force_zip64: bool = False) -> None:
        if fileobj.tell() != 0:
            raise ValueError("ContainerWriter needs a file positioned at offset 0")
        self._file = fileobj
        self._zip64_at = _zip64_from(force_zip64)
        self._pos = 0
        self._members: list[MemberInfo] = []
        self._stream: MemberStream | None = None
        self._closed = False

    def add_member(self, name: str, data: BytesLike) -> MemberInfo:
        """Write a whole member whose bytes are in memory.

        Args:
            name: one of :data:`MEMBER_ORDER`, after those already written.
            data: the member's bytes (any bytes-like object).

        Returns:
            Where the member landed.

        Raises:
            ValueError: bad name, duplicate or out of order, a member still open, or closed.
        """
        view = _byte_view(data)
        size = view.nbytes
        pending = self._begin(name, size)
        crc = crc32(view)
        self._write(self._header(pending, size, crc))
        self._write(view)
        return self._record(pending, size, crc)

    def begin_member(
        self, name: str, *, size: int | None = None, compute_crc: bool = True
    ) -> MemberStream:
        """Start a member streamed in pieces; sizes may pass 4 GiB.

        Args:
            name: one of :data:`MEMBER_ORDER`, after those already written.
            size: the member's final size; required for a member that is not streamed in
                :data:`MEMBER_LAYOUT` (its header has no room reserved for ZIP64 sizes).
            compute_crc: CRC the data inline; pass False when the caller supplies the CRC to
                :meth:`MemberStream.finish` (e.g. combined from per-tensor CRCs).

        Returns:
            The stream; finish it before starting another member.

        Raises:
            ValueError: bad name, duplicate or out of order, a member still open, closed, or
                ``size`` missing for a member that needs it.
        """
        if size is None and not MEMBER_LAYOUT.get(name, (1, True))[1]:
            raise ValueError(f"begin_member({name!r}) needs size=: that member is not streamed")
        pending = self._begin(name, size)
        pending.expected_size = size
        self._write(self._header(pending, 0 if size is None else size, 0))
        self._stream = MemberStream(self, pending, compute_crc=compute_crc)
        return self._stream

    def close(self) -> None:
        """Write the central directory, the ZIP64 records when needed, and the end record.

        Raises:
            ValueError: a member is still open, or ``manifest.json`` was never written.
        """
        if self._closed:
            return
        self._check_no_open_stream()
        if not any(m.name == MANIFEST for m in self._members):
            raise ValueError("container has no manifest.json (every archive needs one)")
        cd_offset = self._pos
        self._write(b"".join(_central_entry(m, self._zip64_at) for m in self._members))
        cd_size = self._pos - cd_offset
        self._write(_end_records(len(self._members), cd_offset, cd_size, self._zip64_at))
        self._file.flush()
        self._closed = True

    # -- internals --

    def _write(self, view: bytes | memoryview) -> None:
        self._write_raw(view, self._pos)
        self._pos += len(view)

    def _write_raw(self, view: bytes | memoryview, offset: int) -> None:
        done = 0
        while done < len(view):
            n = self._file.write(view[done:] if done else view)
            if not n:  # None (would block) or 0: never a silent short write
                raise OSError(f"short write to the container at offset {offset + done}")
            done += n

    def _check_no_open_stream(self) -> None:
        if self._stream is not None and not self._stream._done:
            raise ValueError(f"member {self._stream._pending.name!r} is not finished")

    def _begin(self, name: str, size: int | None) -> _Pending:
        if self._closed:
            raise ValueError("container is closed")
        self._check_no_open_stream()
        if name not in MEMBER_NAMES:
            raise ValueError(f"member name {name!r} is not one of {list(MEMBER_ORDER)}")
        if any(m.name == name for m in self._members):
            raise ValueError(f"member {name!r} written twice")
        if self._members and MEMBER_ORDER.index(name) < MEMBER_ORDER.index(
            self._members[-1].name
        ):
            raise ValueError(
                f"member {name!r} after {self._members[-1].name!r}: members are written in "
                f"the order {list(MEMBER_ORDER)}"
            )
        return _Pending(name, self._pos, _extra_length(name, self._pos, size, self._zip64_at))

    def _header(self, pending: _Pending, size: int, crc: int) -> bytes:
        if size >= self._zip64_at and pending.extra_len < _ZIP64_RESERVE:
            raise AssertionError("ZIP64 member without reserved extra space")
        return _local_header(
            pending.name, pending.header_offset, size, crc, pending.extra_len, self._zip64_at
        )

    def _finish(self, pending: _Pending, size: int, crc: int) -> MemberInfo:
        header = self._header(pending, size, crc)
        self._file.seek(pending.header_offset)
        self._write_raw(header, pending.header_offset)
        self._file.seek(self._pos)
        return self._record(pending, size, crc)

    def _record(self, pending: _Pending, size: int, crc: int) -> MemberInfo:
        data_offset = (
            pending.header_offset + _LOCAL.size + len(pending.name.encode()) + pending.extra_len
        )
        info = MemberInfo(pending.name, pending.header_offset, data_offset, size, crc)
        self._members.append(info)
        return info


# --- reader --------------------------------------------------------------------------------


@dataclass
class _Central:
    """A parsed central directory entry (sizes and offset already resolved through ZIP64)."""

    offset: int  # of the central entry itself, for messages
    raw_name: bytes
    name: str
    flags: int
    method: int
    time: int
    date: int
    crc: int
    size: int
    compressed_size: int
    header_offset: int


@dataclass(frozen=True)
class Container:
    """What :func:`parse_container` found: where each member lies, and the small members.

    Attributes:
        members: member name -> :class:`MemberInfo`, in file order.
        payloads: the bytes of ``manifest.json`` and ``signature.json`` (when present), read
            once and CRC-checked: callers use these very bytes, never a second read.
    """

    members: dict[str, MemberInfo]
    payloads: dict[str, bytes]


def read_container(
    buf: bytes | bytearray | memoryview | mmap.mmap,
    limits: Limits = DEFAULT_LIMITS,
    *,
    force_zip64: bool = False,
) -> dict[str, MemberInfo]:
    """Parse and check an archive's ZIP structure; nothing is decompressed or interpreted.

    Fails closed on anything but the one encoding the writer produces (see the module
    docstring): the end record must end the file with comment :data:`ARCHIVE_COMMENT`;
    members must have known, unique names (with ``manifest.json`` present) in
    :data:`MEMBER_ORDER`, be stored, unencrypted, without data descriptors; each local header
    must agree with its central entry; local headers + data, central directory, ZIP64 records
    and end record must tile the file exactly from byte 0 (no gaps, overlaps, prepended or
    trailing bytes); and finally every header byte must equal its canonical value. The CRC-32
    of ``manifest.json`` and ``signature.json`` is checked; the other members are covered by
    the manifest's digests.

    Args:
        buf: the whole archive (bytes, memoryview or mmap); read, not copied whole.
        limits: size limits (total, per member, manifest, signature).
        force_zip64: expect the all-ZIP64 encoding of ``ContainerWriter(force_zip64=True)``
            (tests only).

    Returns:
        Member name -> :class:`MemberInfo`, in file order.

    Raises:
        ContainerError: malformed or truncated container; names the member, offset and what
            was expected (every problem with the members at once).
        LimitExceededError: the file or a member is larger than ``limits`` allow.
    """
    view = memoryview(buf)
    try:
        return parse_container(BufferSource(view), limits, force_zip64=force_zip64).members
    finally:
        view.release()


def parse_container(
    source: ByteSource, limits: Limits = DEFAULT_LIMITS, *, force_zip64: bool = False
) -> Container:
    """Check a container read from ``source`` (see :func:`read_container`).

    Reads only the end records, the central directory, the local headers and the two JSON
    members, each into memory it owns, each bounded before it is read.

    Returns:
        A :class:`Container`.

    Raises:
        ContainerError, LimitExceededError: as :func:`read_container`; also when the file
            ends early while it is read (changed on disk after it was opened).
    """
    return _Reader(source, limits, _zip64_from(force_zip64)).read()


def _fail(problems: list[str]) -> ContainerError:
    if len(problems) == 1:
        return ContainerError(f"container: {problems[0]}")
    listed = "; ".join(f"({i}) {p}" for i, p in enumerate(problems, 1))
    return ContainerError(f"container: {len(problems)} problems: {listed}")


def _member(name: str | bytes, offset: int, kind: str = "central directory entry") -> str:
    shown = repr(name) if isinstance(name, str) else repr(name)[1:]
    return f"member {shown} ({kind} at offset {offset})"


def _differences(
    where: str, layout: struct.Struct, fields: tuple[str, ...], actual: bytes, expected: bytes
) -> list[str]:
    """Name each field of a fixed-layout record (and its tail) that differs from its value."""
    out = []
    if len(actual) >= layout.size and len(expected) >= layout.size:
        got = layout.unpack_from(actual)
        want = layout.unpack_from(expected)
        for field, a, b in zip(fields, got, want, strict=True):
            if a != b:
                out.append(f"{where}: {field} is {a:#x}; the only allowed value is {b:#x}")
    if actual[layout.size :] != expected[layout.size :] and not out:
        out.append(
            f"{where}: name or extra field bytes {actual[layout.size:].hex()} differ from the "
            f"only allowed bytes {expected[layout.size:].hex()}"
        )
    if not out and actual != expected:  # pragma: no cover - lengths differ with equal fields
        out.append(f"{where}: differs from its only allowed encoding")
    return out


class _Reader:
    def __init__(self, source: ByteSource, limits: Limits, zip64_at: int) -> None:
        self._src = source
        self._limits = limits
        self._size = source.size
        self._zip64_at = zip64_at

    def _unpack(self, layout: struct.Struct, offset: int, end: int, what: str) -> tuple[int, ...]:
        if offset < 0 or offset + layout.size > end:
            raise _fail([f"{what} at offset {offset} runs past offset {end} (truncated?)"])
        return layout.unpack(self._src.read(offset, layout.size))

    def read(self) -> Container:
        if self._size > self._limits.max_total_bytes:
            raise LimitExceededError(
                f"container: file is {self._size} bytes, limit max_total_bytes is "
                f"{self._limits.max_total_bytes}"
            )
        count, cd_offset, cd_end = self._end_records()
        entries = self._central_directory(count, cd_offset, cd_end)
        self._check_limits(entries)
        members, payloads = self._local_headers(entries, cd_offset)
        self._check_canonical(members, cd_offset, cd_end)
        return Container(members, payloads)

    # -- end records --

    def _end_records(self) -> tuple[int, int, int]:
        """Return (entry count, central directory offset, central directory end)."""
        expected_tail = _EOCD.size + len(ARCHIVE_COMMENT)
        eocd_offset = self._size - expected_tail
        tail = self._src.read(max(eocd_offset, 0), min(self._size, expected_tail))
        if (
            eocd_offset >= 0
            and struct.unpack_from("<I", tail)[0] == _SIG_EOCD
            and tail[_EOCD.size : _EOCD.size + 8] == ARCHIVE_COMMENT[:8]
            and tail[_EOCD.size :] != ARCHIVE_COMMENT
            and tail[_EOCD.size + 8 :].isdigit()
        ):
            raise UnsupportedContainerVersionError(
                f"container magic {tail[_EOCD.size:].decode('ascii')!r}: this reader "
                f"implements {ARCHIVE_COMMENT.decode('ascii')!r} only; upgrade hkstore"
            )
        if (
            eocd_offset < 0
            or _U16.unpack_from(tail, _EOCD.size - 2)[0] != len(ARCHIVE_COMMENT)
            or struct.unpack_from("<I", tail)[0] != _SIG_EOCD
            or tail[_EOCD.size :] != ARCHIVE_COMMENT
        ):
            raise _fail(
                [
                    f"no end-of-central-directory record with comment {ARCHIVE_COMMENT!r} in the "
                    f"last {expected_tail} bytes of the {self._size}-byte file (not an hkstore "
                    "archive, truncated, or trailing bytes after the end record)"
                ]
            )
        _, disk, cd_disk, disk_count, count, cd_size, cd_offset, _ = _EOCD.unpack_from(tail)
        if disk != 0 or cd_disk != 0 or disk_count != count:
            raise _fail(
                [
                    f"end record at offset {eocd_offset} describes a multi-disk archive (disk "
                    f"{disk}, central directory disk {cd_disk}, {disk_count} of {count} entries "
                    "here); only single-file archives are allowed"
                ]
            )
        locator_offset = eocd_offset - _ZIP64_LOCATOR.size
        has_locator = (
            locator_offset >= 0
            and struct.unpack("<I", self._src.read(locator_offset, 4))[0] == _SIG_ZIP64_LOCATOR
        )
        if not has_locator:
            if count == _U16_MAX or cd_size == _U32_MAX or cd_offset == _U32_MAX:
                raise _fail(
                    [
                        f"end record at offset {eocd_offset} holds ZIP64 placeholder values but "
                        f"no ZIP64 locator precedes it at offset {locator_offset}"
                    ]
                )
            return count, cd_offset, self._span_end(cd_offset, cd_size, eocd_offset)
        _, z_disk, z_offset, disks = self._unpack(
            _ZIP64_LOCATOR, locator_offset, eocd_offset, "ZIP64 locator"
        )
        record_offset = locator_offset - _ZIP64_EOCD.size
        if z_disk != 0 or disks != 1:
            raise _fail(
                [f"ZIP64 locator at offset {locator_offset} describes {disks} disks; expected 1"]
            )
        if z_offset != record_offset:
            raise _fail(
                [
                    f"ZIP64 locator at offset {locator_offset} points to offset {z_offset}; the "
                    f"ZIP64 end record must sit right before it, at offset {record_offset}"
                ]
            )
        fields = self._unpack(_ZIP64_EOCD, record_offset, locator_offset, "ZIP64 end record")
        sig, record_size, _, _, disk64, cd_disk64, disk_count64, count64, cd_size64, cd_offset64 = (
            fields
        )
        if sig != _SIG_ZIP64_EOCD or record_size != _ZIP64_EOCD_RECORD_SIZE:
            raise _fail(
                [
                    f"ZIP64 end record at offset {record_offset}: expected signature "
                    f"{_SIG_ZIP64_EOCD:#010x} and size {_ZIP64_EOCD_RECORD_SIZE}, found "
                    f"{sig:#010x} and {record_size}"
                ]
            )
        if disk64 != 0 or cd_disk64 != 0 or disk_count64 != count64:
            raise _fail(
                [f"ZIP64 end record at offset {record_offset} describes a multi-disk archive"]
            )
        if (count, cd_size, cd_offset) != (
            min(count64, _U16_MAX),
            min(cd_size64, _U32_MAX),
            min(cd_offset64, _U32_MAX),
        ):
            raise _fail(
                [
                    f"end record at offset {eocd_offset} (entries {count}, central directory "
                    f"size {cd_size}, offset {cd_offset}) disagrees with the ZIP64 end record "
                    f"(entries {count64}, size {cd_size64}, offset {cd_offset64})"
                ]
            )
        return count64, cd_offset64, self._span_end(cd_offset64, cd_size64, record_offset)

    def _span_end(self, cd_offset: int, cd_size: int, next_record: int) -> int:
        if cd_offset + cd_size != next_record:
            raise _fail(
                [
                    f"central directory (offset {cd_offset}, size {cd_size}) must end exactly "
                    f"where the end records start, at offset {next_record}"
                ]
            )
        return next_record

    # -- central directory --

    def _central_directory(self, count: int, cd_offset: int, cd_end: int) -> list[_Central]:
        if count == 0:
            raise _fail(["archive has no members; manifest.json is required"])
        if count > len(MEMBER_NAMES):
            raise _fail(
                [f"central directory lists {count} entries; at most {len(MEMBER_NAMES)} allowed"]
            )
        entries: list[_Central] = []
        problems: list[str] = []
        pos = cd_offset
        for index in range(count):
            fields = self._unpack(_CENTRAL, pos, cd_end, f"central directory entry {index}")
            (sig, made_by, needed, flags, method, time, date, crc, csize32, usize32, name_len,
             extra_len, comment_len, disk, _internal, external, offset32) = fields  # fmt: skip
            if sig != _SIG_CENTRAL:
                raise _fail(
                    [
                        f"central directory entry {index} at offset {pos}: expected signature "
                        f"{_SIG_CENTRAL:#010x}, found {sig:#010x}"
                    ]
                )
            name_start = pos + _CENTRAL.size
            end = name_start + name_len + extra_len + comment_len
            if end > cd_end:
                raise _fail(
                    [
                        f"central directory entry {index} at offset {pos} runs past the end of "
                        f"the central directory at offset {cd_end}"
                    ]
                )
            tail = self._src.read(name_start, name_len + extra_len)  # < 128 KiB
            raw_name, extra = tail[:name_len], tail[name_len:]
            where = _member(raw_name, pos)
            name, problem = _check_name(raw_name)
            if problem:
                problems.append(f"{where}: {problem}")
            else:
                where = _member(name, pos)
            problems += [f"{where}: {p}" for p in _check_entry(flags, method, needed)]
            if comment_len:
                problems.append(f"{where}: has a {comment_len}-byte file comment; expected none")
            if disk != 0:
                problems.append(f"{where}: starts on disk {disk}; expected disk 0")
            problems += [f"{where}: {p}" for p in _check_attributes(made_by, external)]
            zip64 = _parse_extra(extra, allowed={_EXTRA_ZIP64}, problems=problems, where=where)
            usize, csize, offset = _resolve_zip64(
                zip64.get(_EXTRA_ZIP64), [usize32, csize32, offset32], problems, where
            )
            if usize != csize:
                problems.append(
                    f"{where}: compressed size {csize} != uncompressed size {usize}; a stored "
                    "member has equal sizes"
                )
            entries.append(
                _Central(pos, raw_name, name, flags, method, time, date, crc, usize, csize, offset)
            )
            pos = end
        if pos != cd_end:
            problems.append(
                f"central directory has {cd_end - pos} unaccounted bytes at offset {pos} after "
                f"its {count} entries"
            )
        seen: dict[str, int] = {}
        for entry in entries:
            if entry.name and entry.name in seen:
                problems.append(
                    f"{_member(entry.name, entry.offset)}: duplicate of the entry at offset "
                    f"{seen[entry.name]}"
                )
            seen.setdefault(entry.name, entry.offset)
        if MANIFEST not in seen:
            problems.append("no manifest.json member; it is required")
        if problems:
            raise _fail(problems)
        return entries

    def _check_limits(self, entries: list[_Central]) -> None:
        caps = {
            MANIFEST: ("max_manifest_bytes", self._limits.max_manifest_bytes),
            SIGNATURE: ("max_signature_bytes", self._limits.max_signature_bytes),
        }
        over = []
        for entry in entries:
            field, cap = caps.get(entry.name, ("max_member_bytes", self._limits.max_member_bytes))
            cap = min(cap, self._limits.max_member_bytes)
            if entry.size > cap:
                over.append(f"member {entry.name!r} is {entry.size} bytes, limit {field} is {cap}")
        if over:
            raise LimitExceededError("container: " + "; ".join(over))

    # -- local headers and tiling --

    def _local_headers(
        self, entries: list[_Central], cd_offset: int
    ) -> tuple[dict[str, MemberInfo], dict[str, bytes]]:
        problems: list[str] = []
        infos: list[MemberInfo] = []
        for entry in sorted(entries, key=lambda e: e.header_offset):
            info = self._local_header(entry, cd_offset, problems)
            if info is not None:
                infos.append(info)
        if problems:
            raise _fail(problems)
        expected = 0
        for info in infos:
            where = _member(info.name, info.header_offset, "local header")
            if info.header_offset > expected:
                gap = info.header_offset - expected
                what = "prepended data" if expected == 0 else "a gap"
                problems.append(f"{where}: {gap} bytes of {what} at offset {expected} before it")
            elif info.header_offset < expected:
                problems.append(
                    f"{where}: overlaps the previous member, whose data ends at offset {expected}"
                )
            expected = max(expected, info.data_offset + info.size)
        if expected < cd_offset:
            problems.append(
                f"{cd_offset - expected} unaccounted bytes at offset {expected} between the last "
                f"member's data and the central directory at offset {cd_offset}"
            )
        payloads: dict[str, bytes] = {}
        for info in infos:
            # The small JSON members have no digest of their own: their CRC catches corruption.
            # (The weights and function members are covered by the manifest's SHA-256 digests.)
            if info.name in CRC_CHECKED and not problems:
                data = self._src.read(info.data_offset, info.size)  # capped by _check_limits
                actual = crc32(data)
                if actual != info.crc32:
                    problems.append(
                        f"{_member(info.name, info.data_offset, 'data')}: CRC-32 of its "
                        f"{info.size} bytes is {actual:#010x}; its headers say {info.crc32:#010x}"
                    )
                payloads[info.name] = data
        if problems:
            raise _fail(problems)
        return {info.name: info for info in infos}, payloads

    def _local_header(
        self, entry: _Central, cd_offset: int, problems: list[str]
    ) -> MemberInfo | None:
        offset = entry.header_offset
        where = _member(entry.name, offset, "local header")
        if offset + _LOCAL.size > cd_offset:
            problems.append(
                f"{where}: a {_LOCAL.size}-byte local header there would run into the central "
                f"directory at offset {cd_offset}"
            )
            return None
        (sig, needed, flags, method, time, date, crc, csize32, usize32, name_len,
         extra_len) = _LOCAL.unpack(self._src.read(offset, _LOCAL.size))  # fmt: skip
        if sig != _SIG_LOCAL:
            problems.append(f"{where}: expected signature {_SIG_LOCAL:#010x}, found {sig:#010x}")
            return None
        name_start = offset + _LOCAL.size
        data_offset = name_start + name_len + extra_len
        if data_offset > cd_offset:
            problems.append(f"{where}: name and extra field run into the central directory")
            return None
        tail = self._src.read(name_start, name_len + extra_len)  # < 128 KiB
        raw_name, extra = tail[:name_len], tail[name_len:]
        fields = _parse_extra(
            extra, allowed={_EXTRA_ZIP64, _EXTRA_PAD}, problems=problems, where=where
        )
        if _EXTRA_PAD in fields:
            padding = fields[_EXTRA_PAD]
            if len(padding) < _U16.size or any(padding[_U16.size :]):
                problems.append(f"{where}: padding extra field must be a u16 then zero bytes")
        if needed > _VERSION_NEEDED_ZIP64:
            problems.append(
                f"{where}: needs ZIP version {needed / 10:.1f}; at most 4.5 is supported"
            )
        usize, csize = _resolve_local_sizes(
            fields.get(_EXTRA_ZIP64), usize32, csize32, problems, where
        )
        found = {"name": raw_name, "flags": flags, "method": method, "time": time, "date": date,
                 "crc32": crc, "compressed size": csize, "uncompressed size": usize}  # fmt: skip
        wanted = {"name": entry.raw_name, "flags": entry.flags, "method": entry.method,
                  "time": entry.time, "date": entry.date, "crc32": entry.crc,
                  "compressed size": entry.compressed_size,
                  "uncompressed size": entry.size}  # fmt: skip
        for key, value in found.items():
            if value != wanted[key]:
                problems.append(
                    f"{where}: {key} is {value!r} in the local header but {wanted[key]!r} in the "
                    f"central directory entry at offset {entry.offset}"
                )
        if data_offset + entry.size > cd_offset:
            problems.append(
                f"{where}: data of {entry.size} bytes at offset {data_offset} runs into the "
                f"central directory at offset {cd_offset}"
            )
            return None
        return MemberInfo(entry.name, offset, data_offset, entry.size, entry.crc)

    # -- one encoding --

    def _check_canonical(
        self, members: dict[str, MemberInfo], cd_offset: int, cd_end: int
    ) -> None:
        """Require every byte outside member data to equal the writer's one encoding."""
        names = list(members)
        order = [name for name in MEMBER_ORDER if name in members]
        if names != order:
            raise _fail([f"members are in the order {names}; the format's order is {order}"])
        problems: list[str] = []
        for info in members.values():
            have = self._src.read(info.header_offset, info.data_offset - info.header_offset)
            allowed = [
                _local_header(info.name, info.header_offset, info.size, info.crc32, extra_len,
                              self._zip64_at)
                for extra_len in _extra_lengths(info.name, info.header_offset, info.size,
                                                self._zip64_at)
            ]  # fmt: skip
            want = next((a for a in allowed if len(a) == len(have)), allowed[0])
            if have not in allowed:
                where = _member(info.name, info.header_offset, "local header")
                problems += _differences(where, _LOCAL, _LOCAL_FIELDS, have, want)
        if problems:
            raise _fail(problems)
        pos = cd_offset
        for info in members.values():  # central entries are in file order (checked above)
            want = _central_entry(info, self._zip64_at)
            have = self._src.read(pos, min(cd_end - pos, _MAX_CENTRAL_ENTRY))[: len(want)]
            if have != want:
                where = _member(info.name, pos)
                problems += _differences(where, _CENTRAL, _CENTRAL_FIELDS, have, want)
                raise _fail(problems)  # entries after a differing one are misaligned
            pos += len(want)
        want_end = _end_records(len(members), cd_offset, cd_end - cd_offset, self._zip64_at)
        if pos != cd_end or self._size - cd_end != len(want_end):
            raise _fail(
                [
                    f"central directory and end records span offsets {cd_offset}..{self._size}; "
                    f"their only allowed encoding spans {cd_offset}..{pos + len(want_end)}"
                ]
            )
        have_end = self._src.read(cd_end, len(want_end))
        if have_end != want_end:
            at = cd_end
            if len(want_end) > _EOCD.size + len(ARCHIVE_COMMENT):
                problems += _differences(
                    f"ZIP64 end record at offset {at}", _ZIP64_EOCD, _ZIP64_EOCD_FIELDS,
                    have_end[: _ZIP64_EOCD.size], want_end[: _ZIP64_EOCD.size],
                )  # fmt: skip
                at += _ZIP64_EOCD.size
                problems += _differences(
                    f"ZIP64 locator at offset {at}", _ZIP64_LOCATOR, _ZIP64_LOCATOR_FIELDS,
                    have_end[_ZIP64_EOCD.size : at - cd_end + _ZIP64_LOCATOR.size],
                    want_end[_ZIP64_EOCD.size : at - cd_end + _ZIP64_LOCATOR.size],
                )  # fmt: skip
                at += _ZIP64_LOCATOR.size
            problems += _differences(
                f"end record at offset {at}", _EOCD, _EOCD_FIELDS,
                have_end[at - cd_end :], want_end[at - cd_end :],
            )  # fmt: skip
            raise _fail(problems or [f"end records at offset {cd_end} differ from their encoding"])


def _check_name(raw: bytes) -> tuple[str, str | None]:
    """Return (name, problem or None); traversal-style names get their own message."""
    try:
        name = raw.decode("utf-8")
    except UnicodeDecodeError:
        return "", "name is not valid UTF-8"
    parts = name.replace("\\", "/").split("/")
    if (
        not name
        or "\x00" in name
        or name.startswith("/")
        or "\\" in name
        or (len(name) >= 2 and name[1] == ":")
        or ".." in parts
    ):
        return "", "unsafe name (empty, absolute, drive, backslash, NUL or '..' path)"
    if name not in MEMBER_NAMES:
        return "", f"unknown member name; expected one of {sorted(MEMBER_NAMES)}"
    return name, None


def _check_entry(flags: int, method: int, needed: int) -> list[str]:
    problems = []
    if flags & _FLAG_ENCRYPTED:
        problems.append(f"is encrypted (flags {flags:#06x}); encryption is not allowed")
    if flags & _FLAG_DATA_DESCRIPTOR:
        problems.append(f"uses a data descriptor (flags {flags:#06x}); sizes must be in headers")
    other = flags & ~(_FLAG_UTF8 | _FLAG_ENCRYPTED | _FLAG_DATA_DESCRIPTOR)
    if other:
        problems.append(f"has unsupported flag bits {other:#06x}")
    if method != _METHOD_STORED:
        problems.append(f"uses compression method {method}; expected 0 (stored)")
    if needed > _VERSION_NEEDED_ZIP64:
        problems.append(f"needs ZIP version {needed / 10:.1f}; at most 4.5 is supported")
    return problems


def _check_attributes(made_by: int, external: int) -> list[str]:
    if external & _DOS_ATTR_REFUSED:
        return [f"external attributes {external:#010x} mark a directory or volume label"]
    mode = external >> 16
    if made_by >> 8 == _HOST_UNIX and stat.S_IFMT(mode) not in (0, stat.S_IFREG):
        return [f"external attributes {external:#010x} mark a symlink, directory or device"]
    return []


def _parse_extra(
    extra: bytes, *, allowed: set[int], problems: list[str], where: str
) -> dict[int, bytes]:
    fields: dict[int, bytes] = {}
    pos = 0
    while pos < len(extra):
        if pos + _EXTRA_HEAD.size > len(extra):
            problems.append(f"{where}: extra field has {len(extra) - pos} stray bytes at its end")
            break
        header_id, length = _EXTRA_HEAD.unpack_from(extra, pos)
        start = pos + _EXTRA_HEAD.size
        if start + length > len(extra):
            problems.append(f"{where}: extra field {header_id:#06x} runs past the extra area")
            break
        if header_id not in allowed:
            problems.append(f"{where}: unexpected extra field {header_id:#06x}")
        elif header_id in fields:
            problems.append(f"{where}: extra field {header_id:#06x} appears twice")
        else:
            fields[header_id] = extra[start : start + length]
        pos = start + length
    return fields


def _resolve_zip64(
    zip64: bytes | None, values: list[int], problems: list[str], where: str
) -> list[int]:
    """Replace each 0xFFFFFFFF in (uncompressed, compressed, offset) by its ZIP64 value."""
    wanted = [i for i, value in enumerate(values) if value == _U32_MAX]
    resolved = list(values)
    if zip64 is None:
        if wanted:
            problems.append(f"{where}: holds ZIP64 placeholders but no ZIP64 extra field")
        return resolved
    if len(zip64) != 8 * len(wanted):
        problems.append(
            f"{where}: ZIP64 extra field is {len(zip64)} bytes; expected {8 * len(wanted)}"
        )
        return resolved
    for slot, index in enumerate(wanted):
        resolved[index] = _U64.unpack_from(zip64, 8 * slot)[0]
    return resolved


def _resolve_local_sizes(
    zip64: bytes | None, usize32: int, csize32: int, problems: list[str], where: str
) -> tuple[int, int]:
    """A local ZIP64 field holds both sizes, and is there exactly when both are placeholders."""
    placeholders = (usize32 == _U32_MAX, csize32 == _U32_MAX)
    if zip64 is None and not any(placeholders):
        return usize32, csize32
    if zip64 is None or not all(placeholders) or len(zip64) != 16:
        problems.append(
            f"{where}: a local ZIP64 extra field (16 bytes: both sizes) must be present exactly "
            f"when both 32-bit sizes are 0xffffffff (sizes {usize32:#x}/{csize32:#x}, ZIP64 "
            f"field {'absent' if zip64 is None else f'{len(zip64)} bytes'})"
        )
        return usize32, csize32
    usize, csize = struct.unpack("<QQ", zip64)
    return usize, csize
