"""The weights codec: named numpy arrays <-> one standard safetensors member, digests fused in.

Written by hand rather than with the ``safetensors`` library because that library cannot stream
into a ZIP member tensor by tensor, cannot fuse SHA-256/CRC-32 with its I/O on worker threads,
and its numpy loader fails on BF16 unless ``ml_dtypes`` was imported first. The bytes are plain
safetensors (tests check both directions against the real library); the parser is stricter.

Layout: ``u64 LE n`` + ``n`` bytes of JSON + tensor data. We write the JSON with sorted keys,
no whitespace and no ``__metadata__``, padded with spaces so that ``8 + n`` is a multiple of 64,
then the tensors back to back in spec (model) order (safetensors allows no gaps, so a tensor is
64-aligned in the file only if those before it are multiples of 64 bytes; readers here copy into
fresh aligned buffers anyway). ``header_sha256`` covers the ``8 + n`` header bytes; each tensor
digest covers that tensor's raw little-endian bytes; with the exact tiling the parser enforces,
together they cover every byte of the member.

BOOL tensors must hold bytes 0 or 1: the reader refuses any other byte (numpy and jax would
otherwise carry a "true" that compares unequal to True), and the writer refuses to produce one.

Speed (tools/weights_speed.py, 2-core dev box, 403 MB float32 on tmpfs, one thread each):
SHA-256 325 ms, file write 159 ms, pread into fresh buffers 108 ms, CRC-32 30 ms (isal; zlib
~200 ms). Save needs all of SHA + CRC + write (~515 ms of CPU), a verified load SHA + read
(~435 ms); both are spread over the two cores (measured 260-310 ms and 235-260 ms, within ~15%
of a perfect split). SHA-256 alone is then ~160 ms, about what raw safetensors takes for the
whole save or load here: that, not the I/O, is what a checked load costs.

The file stays whole (~800 lines, a third of them error messages and docstrings) because the
writer, the strict parser and the reader share the layout rules above; split, they would live
in three places.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NoReturn

import numpy as np

from hkstore.errors import (
    DigestMismatchError,
    LimitExceededError,
    WeightsFormatError,
    WeightsMismatchError,
)
from hkstore.store._crc32 import crc32 as _default_crc32
from hkstore.store._crc32 import crc32_combine
from hkstore.store._dtypes import DTYPES, dtype_for_code
from hkstore.store._limits import DEFAULT_LIMITS, Limits
from hkstore.store._members import WEIGHTS

if TYPE_CHECKING:
    import mmap

    from _typeshed import ReadableBuffer

__all__ = [
    "TensorEntry",
    "TensorSpec",
    "WeightsReader",
    "WeightsWritten",
    "aligned_empty",
    "encode_header",
    "parse_header",
    "write_weights",
]

MEMBER = WEIGHTS
ALIGN = 64
_METADATA = "__metadata__"
_TENSOR_KEYS = frozenset({"dtype", "shape", "data_offsets"})
# Work unit of the thread pools. Load: read a chunk, then hash it while it is still in the
# core's L2 (2 MiB here). Save: CRC-32 pieces that either core can take (combined afterwards).
# Tensors smaller than _SMALL are hashed inline (save) or batched (load): a thread-pool
# hand-off costs more than hashing them.
_READ_CHUNK = 1 << 20
_CRC_CHUNK = 4 << 20
_SMALL = 1 << 16
#: below this many bytes in all, read_all reads on the calling thread (measured on a 0.6 MB
#: member: 0.73-0.92 ms inline against 1.35-1.49 ms through a two-thread pool)
_INLINE_BYTES = 1 << 20


@dataclass(frozen=True)
class TensorSpec:
    """What will be written for one tensor: name, safetensors dtype code, shape."""

    name: str
    dtype: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a parsed header; ``begin``/``end`` are relative to the data start."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        """Size of the tensor's data in bytes."""
        return self.end - self.begin


@dataclass(frozen=True)
class WeightsWritten:
    """What :func:`write_weights` produced: sizes and digests for the manifest and ZIP."""

    size: int
    crc32: int | None
    header_sha256: str
    tensor_sha256: dict[str, str]


def aligned_empty(nbytes: int, align: int = ALIGN) -> np.ndarray:
    """Return an uninitialised, writeable uint8 array of ``nbytes`` starting ``align``-aligned.

    jax's CPU ``device_put`` aliases (does not copy) numpy buffers aligned to 64 bytes, so
    arrays read into these buffers reach jax with no further copy. (A zero-size result has no
    data of its own: numpy points it at the start of the allocation, which may be unaligned.)
    """
    raw = np.empty(nbytes + align, dtype=np.uint8)
    start = -raw.ctypes.data % align
    return raw[start : start + nbytes]


# --- writing --------------------------------------------------------------------------------


def _spec_nbytes(spec: TensorSpec) -> int:
    size = dtype_for_code(spec.dtype, where=f"tensor {spec.name!r}").itemsize
    for dim in spec.shape:
        size *= dim
    return size


def _check_specs(specs: Sequence[TensorSpec]) -> None:
    seen: set[str] = set()
    for spec in specs:
        if not isinstance(spec.name, str) or spec.name == _METADATA:
            raise WeightsFormatError(f"tensor name {spec.name!r} cannot be stored")
        if spec.name in seen:
            raise WeightsFormatError(f"tensor {spec.name!r} is listed twice")
        seen.add(spec.name)
        if not isinstance(spec.shape, tuple) or not all(
            type(d) is int and d >= 0 for d in spec.shape
        ):
            raise WeightsFormatError(
                f"tensor {spec.name!r}: shape {spec.shape!r} must be a tuple of ints >= 0"
            )


def encode_header(specs: Sequence[TensorSpec]) -> bytes:
    """Return the full header (``u64`` length + JSON) for tensors laid out in ``specs`` order.

    The JSON has sorted keys, no whitespace, no ``__metadata__``, and is padded with spaces so
    that the header length is a multiple of 64. Equal specs give equal bytes.

    Raises:
        UnsupportedDtypeError: a spec's dtype code is not in the dtype table.
        WeightsFormatError: duplicate or reserved names, names that are not valid UTF-8, or
            shapes that are not tuples of non-negative ints.
    """
    _check_specs(specs)
    header: dict[str, Any] = {}
    offset = 0
    for spec in specs:
        end = offset + _spec_nbytes(spec)
        header[spec.name] = {
            "data_offsets": [offset, end],
            "dtype": spec.dtype,
            "shape": list(spec.shape),
        }
        offset = end
    text = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    try:
        body = text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise WeightsFormatError(f"a tensor name is not valid UTF-8: {exc.reason}") from None
    body += b" " * (-(8 + len(body)) % ALIGN)
    return len(body).to_bytes(8, "little") + body


def _write_all(stream: Any, view: memoryview) -> None:
    while view.nbytes:
        n = stream.write(view)
        if n is None or n >= view.nbytes:  # None: a writer that always writes everything
            return
        view = view[n:]


def _checked_bytes(spec: TensorSpec, value: Any) -> memoryview:
    """The C-contiguous little-endian bytes of a fetched array, after checking it."""
    arr = np.asarray(value)
    want = DTYPES[spec.dtype].dtype
    problems = []
    if arr.dtype != want:
        problems.append(f"dtype {arr.dtype.str} ({arr.dtype}), expected {want.str} ({want})")
    if arr.shape != spec.shape:
        problems.append(f"shape {list(arr.shape)}, expected {list(spec.shape)}")
    if problems:
        raise WeightsMismatchError(
            f"tensor {spec.name!r}: fetched array has " + "; ".join(problems)
        )
    data = np.ascontiguousarray(arr).reshape(-1).view(np.uint8)
    if spec.dtype == "BOOL" and data.size and int(data.max()) > 1:
        raise WeightsFormatError(f"tensor {spec.name!r}: BOOL array holds bytes other than 0/1")
    return data.data


def _sha256_hex(view: memoryview) -> str:
    return hashlib.sha256(view).hexdigest()


def write_weights(
    stream: Any,
    specs: Sequence[TensorSpec],
    fetch: Callable[[str], Any],
    *,
    workers: int = 2,
    crc32: Callable[[ReadableBuffer, int], int] | None = _default_crc32,
    max_inflight: int = 2,
) -> WeightsWritten:
    """Stream a safetensors member to ``stream``, tensor by tensor, hashing on worker threads.

    ``fetch(name)`` is called once per tensor, in ``specs`` order, just before that tensor is
    written, so at most ``max_inflight`` fetched arrays are alive at once (the one being
    written and those still being hashed): with a ``fetch`` that copies (device to host) the
    extra memory is about ``max_inflight`` times the largest tensor, and with one that returns
    views it is nothing. SHA-256 of each tensor and the CRC-32 of the whole member run on
    ``workers`` threads while the calling thread writes (all three release the GIL).

    Args:
        stream: anything with ``write(buffer)`` returning the number of bytes it took (short
            writes are completed) or ``None``: a ZIP member stream, a file, a compressor.
        specs: the tensors, in the order their data is laid out.
        fetch: returns the array for a name (numpy, or anything ``np.asarray`` accepts).
        workers: hashing threads (>= 1).
        crc32: ``zlib.crc32``-compatible function for the member CRC, or ``None`` to skip it.
        max_inflight: fetched tensors alive at once (>= 1); 2 lets both cores hash.

    Returns:
        Size, CRC-32 (``None`` when skipped), header digest and per-tensor digests.

    Raises:
        UnsupportedDtypeError, WeightsFormatError: invalid specs (see :func:`encode_header`), or
            a BOOL array holding bytes other than 0/1.
        WeightsMismatchError: a fetched array's dtype or shape differs from its spec.
    """
    if workers < 1 or max_inflight < 1:
        raise ValueError(f"workers={workers} and max_inflight={max_inflight} must be >= 1")
    header = encode_header(specs)
    header_view = memoryview(header)
    _write_all(stream, header_view)
    size = len(header)
    crc_parts: list[Future[int] | int] = []
    lengths: list[int] = []
    if crc32 is not None:
        crc_parts.append(crc32(header_view, 0))
        lengths.append(size)
    digests: dict[str, Future[str] | str] = {}
    inflight: deque[list[Future[Any]]] = deque()
    with ThreadPoolExecutor(workers, thread_name_prefix="hkstore-weights") as pool:
        try:
            for spec in specs:
                while len(inflight) >= max_inflight:
                    for future in inflight.popleft():
                        future.result()
                data = _checked_bytes(spec, fetch(spec.name))
                if data.nbytes < _SMALL:
                    digests[spec.name] = _sha256_hex(data)
                    if crc32 is not None:
                        crc_parts.append(crc32(data, 0))
                        lengths.append(data.nbytes)
                else:
                    # The digest first: it is the longest task and cannot be split.
                    futures: list[Future[Any]] = [pool.submit(_sha256_hex, data)]
                    digests[spec.name] = futures[0]
                    if crc32 is not None:
                        for start in range(0, data.nbytes, _CRC_CHUNK):
                            piece = data[start : start + _CRC_CHUNK]
                            futures.append(pool.submit(crc32, piece, 0))
                            crc_parts.append(futures[-1])
                            lengths.append(piece.nbytes)
                    inflight.append(futures)
                _write_all(stream, data)
                size += data.nbytes
                del data
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)
            raise
    crc = None
    if crc32 is not None:
        crc = 0
        for part, length in zip(crc_parts, lengths, strict=True):
            value = part if isinstance(part, int) else part.result()
            crc = crc32_combine(crc, value, length)
    return WeightsWritten(
        size=size,
        crc32=crc,
        header_sha256=hashlib.sha256(header).hexdigest(),
        tensor_sha256={k: v if isinstance(v, str) else v.result() for k, v in digests.items()},
    )


# --- strict parsing -------------------------------------------------------------------------


def _fail(member: str, message: str) -> NoReturn:
    raise WeightsFormatError(f"{member}: {message}")


def _json_type(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    return "array" if isinstance(value, list) else "object"


def _brief(value: object, limit: int = 60) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _header_length(
    prefix: bytes | memoryview, member_size: int, limits: Limits, member: str
) -> int:
    """Check the 8-byte length prefix against the cap and the member size; return ``n``."""
    if len(prefix) < 8 or member_size < 8:
        _fail(
            member,
            f"truncated: {min(len(prefix), member_size)} bytes, shorter than the "
            "8-byte header length",
        )
    n = int.from_bytes(prefix[:8], "little")
    if n > limits.max_header_bytes:
        raise LimitExceededError(
            f"{member}: header length {n} bytes exceeds the limit of {limits.max_header_bytes}"
            " (Limits.max_header_bytes)"
        )
    if 8 + n > member_size:
        _fail(member, f"truncated: the header needs {8 + n} bytes, the member has {member_size}")
    return n


def _refuse_duplicates(member: str) -> Callable[[list[tuple[str, Any]]], dict[str, Any]]:
    def hook(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        result: dict[str, Any] = {}
        for key, value in pairs:
            if key in result:
                _fail(member, f"duplicate key {key!r} in the header JSON")
            result[key] = value
        return result

    return hook


def _refuse_constant(member: str) -> Callable[[str], NoReturn]:
    def hook(name: str) -> NoReturn:
        _fail(member, f"header JSON has the non-standard constant {name}")

    return hook


def _decode_json(raw: bytes, member: str) -> dict[str, Any]:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        _fail(member, f"header is not valid UTF-8 ({exc.reason} at byte {8 + exc.start})")
    try:
        obj = json.loads(
            text,
            object_pairs_hook=_refuse_duplicates(member),
            parse_constant=_refuse_constant(member),
        )
    except WeightsFormatError:
        raise
    except json.JSONDecodeError as exc:
        _fail(member, f"header is not valid JSON: {exc.msg} (line {exc.lineno} column {exc.colno})")
    except ValueError as exc:  # e.g. an integer longer than Python's digit limit
        _fail(member, f"header is not valid JSON: {exc}")
    except RecursionError:
        _fail(member, "header JSON nests too deeply")
    if not isinstance(obj, dict):
        _fail(member, f"header must be a JSON object, got {_json_type(obj)}")
    return obj


#: numpy's limits on array rank and on one dimension (checked here so that a zero-size tensor
#: with an absurd shape is refused as a format error rather than by numpy's reshape).
_MAX_NDIM = 64
_MAX_DIM = 2**63 - 1


def _is_count(value: object) -> bool:
    return type(value) is int and value >= 0


def _parse_entry(name: str, info: object, member: str) -> TensorEntry:
    where = f"tensor {name!r}"
    if not isinstance(info, dict):
        _fail(
            member,
            f"{where}: expected an object with dtype, shape and data_offsets, got "
            f"{_json_type(info)}",
        )
    if set(info) != _TENSOR_KEYS:
        missing = sorted(_TENSOR_KEYS - set(info))
        extra = sorted(set(info) - _TENSOR_KEYS)
        _fail(
            member,
            f"{where}: keys must be exactly data_offsets, dtype, shape (missing "
            f"{missing}, unexpected {extra})",
        )
    code, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if not isinstance(code, str):
        _fail(member, f"{where}: dtype must be a string, got {_json_type(code)}")
    itemsize = dtype_for_code(code, where=f"{member}: {where}").itemsize
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        _fail(member, f"{where}: shape must be a list of integers >= 0, got {_brief(shape)}")
    if len(shape) > _MAX_NDIM:
        _fail(member, f"{where}: {len(shape)} dimensions, more than numpy's {_MAX_NDIM}")
    if any(d > _MAX_DIM for d in shape):
        _fail(member, f"{where}: a dimension of shape {_brief(shape)} is larger than 2**63 - 1")
    if not (
        isinstance(offsets, list)
        and len(offsets) == 2
        and all(_is_count(o) for o in offsets)
        and offsets[0] <= offsets[1]
    ):
        _fail(
            member,
            f"{where}: data_offsets must be [begin, end] with 0 <= begin <= end, got "
            f"{_brief(offsets)}",
        )
    begin, end = offsets
    span = end - begin
    # Exact Python-int arithmetic, stopped as soon as it passes the span (a hostile header
    # could otherwise make us multiply enormous integers).
    need = 0 if 0 in shape else itemsize
    for dim in shape if need else ():
        need *= dim
        if need > span:
            break
    if need != span:
        size = f"{need} bytes" if need <= span else f"more than {span} bytes"
        _fail(
            member,
            f"{where}: shape {_brief(shape)} of {code} needs {size}, data_offsets "
            f"[{begin}, {end}] hold {span}",
        )
    return TensorEntry(name, code, tuple(shape), begin, end)


def _check_tiling(entries: list[TensorEntry], member: str) -> int:
    """Require the sorted ranges to cover ``[0, data_len)`` exactly; return ``data_len``."""
    expected = 0
    last: TensorEntry | None = None
    for entry in entries:
        if entry.begin > expected:
            _fail(
                member,
                f"bytes [{expected}, {entry.begin}) of the data belong to no tensor "
                f"(gap before tensor {entry.name!r})",
            )
        if entry.begin < expected:
            assert last is not None  # expected > 0 only once a non-empty tensor was seen
            if (entry.begin, entry.end) == (last.begin, last.end):
                _fail(
                    member,
                    f"tensor {entry.name!r} aliases tensor {last.name!r}: both at "
                    f"data_offsets [{entry.begin}, {entry.end}]",
                )
            _fail(
                member,
                f"tensor {entry.name!r} at data_offsets [{entry.begin}, {entry.end}] "
                f"overlaps tensor {last.name!r} at [{last.begin}, {last.end}]",
            )
        if entry.end > expected:
            expected, last = entry.end, entry
    return expected


def parse_header(
    buf: ReadableBuffer,
    limits: Limits = DEFAULT_LIMITS,
    *,
    member_size: int | None = None,
    member: str = MEMBER,
) -> tuple[list[TensorEntry], int, bytes]:
    """Parse and strictly validate a safetensors header.

    Args:
        buf: the member's bytes, or at least its first ``8 + n`` (the header).
        limits: caps applied before anything is allocated.
        member_size: the member's full size (default ``len(buf)``); the header plus the data
            its tensors declare must equal it exactly.
        member: the member's name, used in error messages.

    Returns:
        ``(entries sorted by offset, header length including the 8-byte prefix, header bytes)``.

    Raises:
        LimitExceededError: header length or tensor count over ``limits``.
        UnsupportedDtypeError: a dtype code that is not in the dtype table.
        WeightsFormatError: anything else: truncation, invalid UTF-8 or JSON, duplicate keys,
            a non-object, ``__metadata__`` that is not string to string, tensor objects with
            wrong keys or types, sizes that disagree with shapes, ranges with a gap, an overlap
            or aliasing, or bytes after the last tensor.
    """
    view = memoryview(buf).cast("B")
    size = view.nbytes if member_size is None else member_size
    n = _header_length(view[:8], size, limits, member)
    if 8 + n > view.nbytes:
        _fail(member, f"truncated: the header needs {8 + n} bytes, only {view.nbytes} given")
    header_bytes = bytes(view[: 8 + n])
    obj = _decode_json(header_bytes[8:], member)
    count = len(obj) - (_METADATA in obj)
    if count > limits.max_tensors:
        raise LimitExceededError(
            f"{member}: {count} tensors exceed the limit of {limits.max_tensors} "
            "(Limits.max_tensors)"
        )
    entries = []
    for name, info in obj.items():
        if name == _METADATA:
            if not isinstance(info, dict):
                _fail(member, f"__metadata__ must be an object of strings, got {_json_type(info)}")
            for key, value in info.items():
                if not isinstance(value, str):
                    _fail(
                        member, f"__metadata__[{key!r}] must be a string, got {_json_type(value)}"
                    )
            continue
        entries.append(_parse_entry(name, info, member))
    entries.sort(key=lambda e: (e.begin, e.end))
    data_len = _check_tiling(entries, member)
    total = 8 + n + data_len
    if size > total:
        _fail(
            member,
            f"{size - total} trailing bytes after the tensor data (header {8 + n} + "
            f"data {data_len} = {total}, member has {size})",
        )
    if size < total:
        _fail(
            member,
            f"truncated: header {8 + n} + data {data_len} = {total} bytes, member has {size}",
        )
    return entries, 8 + n, header_bytes


# --- reading --------------------------------------------------------------------------------


@dataclass
class _Loaded:
    array: np.ndarray
    sha256: str | None
    bad_bool: str | None


class WeightsReader:
    """Reads tensors of one safetensors member from memory or from a file descriptor.

    The header is read and strictly parsed on construction (see :func:`parse_header`). Each
    tensor is then read on demand straight into a fresh 64-byte-aligned buffer (the only copy:
    jax's CPU ``device_put`` aliases such buffers), its SHA-256 computed chunk by chunk while
    the bytes are still in cache. Returned arrays are owned by the caller, writeable, and never
    views of the source.

    Args:
        source: the archive as bytes, bytearray, memoryview or mmap, or an open file
            descriptor (read with ``os.preadv``; nothing is memory-mapped).
        offset: where the member starts in ``source``.
        size: the member's size (default: to the end of ``source``).
        limits: caps on header size and tensor count.
        member: the member's name, used in error messages.

    Attributes:
        entries: header entries by name, in data (offset) order, which is model order for
            members hkstore wrote; the manifest is the authority on model order.
        header_bytes: the header including its 8-byte length prefix.
        header_size: ``len(header_bytes)``; tensor data starts there.
        header_sha256: hex SHA-256 of ``header_bytes``.
        offset, size: where the member lies in ``source``.

    Raises:
        LimitExceededError, UnsupportedDtypeError, WeightsFormatError: as :func:`parse_header`;
            also when ``source`` is shorter than ``offset + size``.
    """

    def __init__(
        self,
        source: bytes | bytearray | memoryview | mmap.mmap | int,
        offset: int = 0,
        size: int | None = None,
        limits: Limits = DEFAULT_LIMITS,
        *,
        member: str = MEMBER,
    ) -> None:
        self._member = member
        self._fd: int | None = None
        self._src: np.ndarray | None = None
        if isinstance(source, int):
            self._fd = source
            info = os.fstat(source)
            available = info.st_size - offset if stat.S_ISREG(info.st_mode) else None
        else:
            self._src = np.frombuffer(source, dtype=np.uint8)
            available = self._src.size - offset
        if size is None:
            if available is None:
                raise ValueError("size is required for a file descriptor that is not a file")
            size = available
        if offset < 0 or size < 0:
            raise ValueError(f"offset={offset} and size={size} must be >= 0")
        if available is not None and available < size:
            _fail(
                member,
                f"truncated: {size} bytes declared at offset {offset}, only "
                f"{max(available, 0)} available",
            )
        self.offset = offset
        self.size = size
        prefix = self._read_bytes(0, min(8, size))
        n = _header_length(prefix, size, limits, member)
        entries, self.header_size, self.header_bytes = parse_header(
            prefix + self._read_bytes(8, n), limits, member_size=size, member=member
        )
        self.header_sha256 = hashlib.sha256(self.header_bytes).hexdigest()
        self.entries: dict[str, TensorEntry] = {e.name: e for e in entries}

    def close(self) -> None:
        """Drop the reference to an in-memory source (an mmap can then be closed)."""
        self._src = None

    def __enter__(self) -> WeightsReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- raw reads ------------------------------------------------------------------------

    def _read_into(self, dst: np.ndarray, pos: int) -> None:
        """Fill ``dst`` (uint8) from member position ``pos``."""
        start = self.offset + pos
        if self._fd is None:
            if self._src is None:
                raise ValueError(f"{self._member}: reader is closed")
            np.copyto(dst, self._src[start : start + dst.size])  # releases the GIL
            return
        done = 0
        while done < dst.size:
            n = os.preadv(self._fd, [dst[done:].data], start + done)
            if n == 0:
                _fail(
                    self._member,
                    f"truncated: the file ended at member byte {pos + done}, "
                    f"{dst.size - done} bytes short",
                )
            done += n

    def _read_bytes(self, pos: int, n: int) -> bytes:
        buf = np.empty(n, dtype=np.uint8)
        self._read_into(buf, pos)
        return buf.tobytes()

    def _load(self, entry: TensorEntry, digest: bool) -> _Loaded:
        raw = aligned_empty(entry.nbytes)
        pos = self.header_size + entry.begin
        hasher = hashlib.sha256() if digest else None
        for start in range(0, entry.nbytes, _READ_CHUNK):
            piece = raw[start : start + _READ_CHUNK]
            self._read_into(piece, pos + start)
            if hasher is not None:
                hasher.update(piece.data)
        bad_bool = None
        if entry.dtype == "BOOL" and raw.size and int(raw.max()) > 1:
            index = int(np.argmax(raw > 1))
            bad_bool = f"tensor {entry.name!r}: BOOL byte {int(raw[index])} at element {index}"
        array = raw.view(DTYPES[entry.dtype].dtype).reshape(entry.shape)
        return _Loaded(array, None if hasher is None else hasher.hexdigest(), bad_bool)

    def _load_batch(self, batch: list[TensorEntry], digest: bool) -> list[tuple[str, _Loaded]]:
        return [(entry.name, self._load(entry, digest)) for entry in batch]

    def _jobs(self) -> list[list[TensorEntry]]:
        """Largest tensors first (so the last job to finish is a short one); small ones batched."""
        jobs: list[list[TensorEntry]] = []
        batch: list[TensorEntry] = []
        batch_bytes = 0
        for entry in sorted(self.entries.values(), key=lambda e: e.nbytes, reverse=True):
            if entry.nbytes >= _SMALL:
                jobs.append([entry])
                continue
            batch.append(entry)
            batch_bytes += entry.nbytes
            if batch_bytes >= _READ_CHUNK or len(batch) >= 1024:
                jobs.append(batch)
                batch, batch_bytes = [], 0
        if batch:
            jobs.append(batch)
        return jobs

    def _entry(self, name: str) -> TensorEntry:
        try:
            return self.entries[name]
        except KeyError:
            raise WeightsMismatchError(f"{self._member}: no tensor named {name!r}") from None

    # -- public reads ---------------------------------------------------------------------

    def tensor(self, name: str, *, expected_sha256: str | None = None) -> np.ndarray:
        """Read one tensor (only its bytes), checking its digest when one is given.

        Raises:
            WeightsMismatchError: no tensor ``name`` in the member.
            DigestMismatchError: its bytes do not hash to ``expected_sha256``.
            WeightsFormatError: the source ends early, or a BOOL byte is neither 0 nor 1.
        """
        loaded = self._load(self._entry(name), expected_sha256 is not None)
        if expected_sha256 is not None and loaded.sha256 != expected_sha256:
            raise DigestMismatchError(
                _mismatch_message(self._member, [(name, expected_sha256, loaded.sha256 or "")])
            )
        if loaded.bad_bool:
            _fail(self._member, loaded.bad_bool + " (only 0 and 1 are valid)")
        return loaded.array

    def read_all(
        self, expected: Mapping[str, str] | None, *, workers: int = 2
    ) -> dict[str, np.ndarray]:
        """Read every tensor, checking every digest in ``expected`` (skip checks with ``None``).

        Tensors are read and hashed on ``workers`` threads, largest first, each chunk hashed
        right after it is read. Every digest mismatch is collected before raising.

        Args:
            expected: hex SHA-256 per tensor name, covering exactly the member's tensors; or
                ``None`` to read without checking (only for data already trusted).
            workers: reading/hashing threads (>= 1).

        Returns:
            Arrays by name, in data (offset) order.

        Raises:
            WeightsFormatError: ``expected`` names other tensors than the member holds, the
                source ends early, or a BOOL byte is neither 0 nor 1.
            DigestMismatchError: one or more tensors do not match (all are named).
        """
        if workers < 1:
            raise ValueError(f"workers={workers} must be >= 1")
        if expected is not None and set(expected) != set(self.entries):
            missing = sorted(set(self.entries) - set(expected))
            extra = sorted(set(expected) - set(self.entries))
            _fail(
                self._member,
                f"expected digests do not match the tensors: no digest for "
                f"{missing}, digest for absent {extra}",
            )
        check = expected is not None
        jobs = self._jobs()
        if workers == 1 or sum(e.nbytes for e in self.entries.values()) < _INLINE_BYTES:
            # small members (typical federated messages): threads would cost more than they save
            done = dict(item for job in jobs for item in self._load_batch(job, check))
        else:
            with ThreadPoolExecutor(workers, thread_name_prefix="hkstore-weights") as pool:
                futures = [pool.submit(self._load_batch, job, check) for job in jobs]
                try:
                    done = dict(item for future in futures for item in future.result())
                except BaseException:
                    pool.shutdown(wait=True, cancel_futures=True)
                    raise
        loaded = {name: done[name] for name in self.entries}
        if expected is not None:
            bad = [
                (name, expected[name], got.sha256 or "")
                for name, got in loaded.items()
                if got.sha256 != expected[name]
            ]
            if bad:
                raise DigestMismatchError(_mismatch_message(self._member, bad))
        bad_bools = [got.bad_bool for got in loaded.values() if got.bad_bool]
        if bad_bools:
            _fail(self._member, "; ".join(bad_bools) + " (only 0 and 1 are valid)")
        return {name: got.array for name, got in loaded.items()}


def _mismatch_message(member: str, bad: list[tuple[str, str, str]]) -> str:
    lines = [f"{member}: {len(bad)} tensor(s) do not match their SHA-256 digest:"]
    for name, want, got in bad:
        lines.append(f"  {name!r}: expected {want}, got {got}")
    return "\n".join(lines)
