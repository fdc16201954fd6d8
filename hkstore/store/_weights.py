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

Tensor digests use the algorithm the manifest names (``_digests``: BLAKE3 for new archives,
SHA-256 for archives from hkstore 0.1); every thread pool is a ``_workers.Scheduler`` sized
to the cores the process may use. Speed (tools/weights_speed.py --breakdown, 2-core AMD EPYC,
400 MB float32 on tmpfs, one thread each): SHA-256 ~200 ms, BLAKE3 ~52 ms, file write
~140 ms, pread into fresh buffers ~48 ms, CRC-32 ~30 ms (isal). With BLAKE3 a save is the
write with the hashing beside it, and a verified load ~1.5x the bare copy.

The file stays whole (~800 lines, a third of them error messages and docstrings) because the
writer, the strict parser and the reader share the layout rules above; split, they would live
in three places.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import threading
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NoReturn

import numpy as np

from hkstore.errors import (
    DigestMismatchError,
    LimitExceededError,
    WeightsFormatError,
    WeightsMismatchError,
)
from hkstore.store._canonical import count_values_bound
from hkstore.store._crc32 import crc32 as _default_crc32
from hkstore.store._crc32 import crc32_combine
from hkstore.store._digests import DEFAULT as DEFAULT_DIGEST
from hkstore.store._digests import check_algorithm, digest_hex, new_hasher
from hkstore.store._dtypes import DTYPES, dtype_for_code
from hkstore.store._limits import DEFAULT_LIMITS, Limits
from hkstore.store._members import WEIGHTS
from hkstore.store._remote import RemoteSource
from hkstore.store._workers import Scheduler

if TYPE_CHECKING:
    import mmap

    from _typeshed import ReadableBuffer

    from hkstore.store._fileio import ByteSource

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
# A tensor bigger than its share of the work (total / workers) and than _SPLIT_MIN would leave
# the other threads idle: its copy is cut into _SPLIT_CHUNK pieces for every thread, then it is
# hashed by BLAKE3's own threads while the pool is idle (SHA-256 cannot be split: such tensors
# stay whole on one thread). ``verify`` hashes them _SEGMENT bytes at a time through one buffer.
_SPLIT_MIN = 16 << 20
_SPLIT_CHUNK = 8 << 20
_SEGMENT = 64 << 20


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
    digest: str
    tensor_digests: dict[str, str]


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


def write_weights(
    stream: Any,
    specs: Sequence[TensorSpec],
    fetch: Callable[[str], Any],
    *,
    workers: int | None = None,
    digest: str = DEFAULT_DIGEST,
    crc32: Callable[[ReadableBuffer, int], int] | None = _default_crc32,
    max_inflight: int = 2,
) -> WeightsWritten:
    """Stream a safetensors member to ``stream``, tensor by tensor, hashing on worker threads.

    ``fetch(name)`` is called once per tensor, in ``specs`` order, just before that tensor is
    written, so at most ``max_inflight`` fetched arrays are alive at once (the one being
    written and those still being hashed): with a ``fetch`` that copies (device to host) the
    extra memory is about ``max_inflight`` times the largest tensor, and with one that returns
    views it is nothing. Each tensor's digest and the CRC-32 of the whole member run on the
    :class:`~hkstore.store._workers.Scheduler`'s threads while the calling thread writes (all
    of them release the GIL).

    Args:
        stream: anything with ``write(buffer)`` returning the number of bytes it took (short
            writes are completed) or ``None``: a ZIP member stream, a file, a compressor.
        specs: the tensors, in the order their data is laid out.
        fetch: returns the array for a name (numpy, or anything ``np.asarray`` accepts).
        workers: hashing threads; ``None`` for every available core, 1 to hash inline.
        digest: the tensor-digest algorithm (``"blake3"`` or ``"sha256"``).
        crc32: ``zlib.crc32``-compatible function for the member CRC, or ``None`` to skip it.
        max_inflight: fetched tensors alive at once (>= 1); 2 lets both cores hash.

    Returns:
        Size, CRC-32 (``None`` when skipped), header digest and per-tensor digests.

    Raises:
        UnsupportedDtypeError, WeightsFormatError: invalid specs (see :func:`encode_header`), or
            a BOOL array holding bytes other than 0/1.
        WeightsMismatchError: a fetched array's dtype or shape differs from its spec.
        ValueError: ``digest`` is not in the digest table, or ``max_inflight`` is below 1.
    """
    check_algorithm(digest)
    if max_inflight < 1:
        raise ValueError(f"max_inflight={max_inflight} must be >= 1")
    header = encode_header(specs)
    header_view = memoryview(header)
    scheduler = Scheduler(workers, work_bytes=sum(_spec_nbytes(s) for s in specs))
    _write_all(stream, header_view)
    size = len(header)
    crc_parts: list[Future[int] | int] = []
    lengths: list[int] = []
    if crc32 is not None:
        crc_parts.append(crc32(header_view, 0))
        lengths.append(size)
    digests: dict[str, Future[str] | str] = {}
    inflight: deque[list[Future[Any]]] = deque()
    with scheduler:
        for spec in specs:
            while len(inflight) >= max_inflight:
                for future in inflight.popleft():
                    future.result()
            data = _checked_bytes(spec, fetch(spec.name))
            if data.nbytes < _SMALL:
                digests[spec.name] = digest_hex(digest, data)
                if crc32 is not None:
                    crc_parts.append(crc32(data, 0))
                    lengths.append(data.nbytes)
            else:
                # The digest first: it is the longest task and is not split.
                futures: list[Future[Any]] = [scheduler.submit(digest_hex, digest, data)]
                digests[spec.name] = futures[0]
                if crc32 is not None:
                    for start in range(0, data.nbytes, _CRC_CHUNK):
                        piece = data[start : start + _CRC_CHUNK]
                        futures.append(scheduler.submit(crc32, piece, 0))
                        crc_parts.append(futures[-1])
                        lengths.append(piece.nbytes)
                inflight.append(futures)
            _write_all(stream, data)
            size += data.nbytes
            del data
        for futures in inflight:
            for future in futures:
                future.result()
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
        digest=digest,
        tensor_digests={
            k: v if isinstance(v, str) else v.result() for k, v in digests.items()
        },
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


def _decode_json(header_bytes: bytes, member: str, limits: Limits) -> dict[str, Any]:
    """Parse the JSON after the 8-byte length prefix of ``header_bytes``, bounded first."""
    try:
        text = str(memoryview(header_bytes)[8:], "utf-8")
    except UnicodeDecodeError as exc:
        _fail(member, f"header is not valid UTF-8 ({exc.reason} at byte {8 + exc.start})")
    # bound the values before json builds one object (see count_values_bound): a header of
    # a few MB of "[]," would otherwise expand to GBs of lists (the 8 prefix bytes can only
    # loosen the bound)
    bound = count_values_bound(header_bytes)
    if bound > limits.max_json_values:
        raise LimitExceededError(
            f"{member}: the header may hold up to {bound} JSON values, more than the limit of "
            f"{limits.max_json_values} (Limits.max_json_values)"
        )
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
    if isinstance(buf, bytes) and len(buf) == 8 + n:
        header_bytes = buf  # the caller read exactly the header: no copy
    else:
        header_bytes = bytes(view[: 8 + n])
    obj = _decode_json(header_bytes, member, limits)
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
    digest: str | None
    bad_bool: str | None


def _bool_problem(entry: TensorEntry, raw: np.ndarray) -> str | None:
    if entry.dtype != "BOOL" or not raw.size or int(raw.max()) <= 1:
        return None
    index = int(np.argmax(raw > 1))
    return f"tensor {entry.name!r}: BOOL byte {int(raw[index])} at element {index}"


def _hand_over(
    name: str,
    got: _Loaded,
    expected: Mapping[str, str] | None,
    ready: Callable[[str, np.ndarray], object] | None,
) -> None:
    """Give a tensor to the ``ready`` hook once it is known good."""
    if ready is None or got.bad_bool is not None:
        return
    if expected is None or got.digest == expected[name]:
        ready(name, got.array)


_scratch = threading.local()


def _scratch_buffer(size: int = _READ_CHUNK) -> np.ndarray:
    """This thread's reusable read buffer for ``verify`` (touched once, so no page faults)."""
    buf: np.ndarray | None = getattr(_scratch, "buf", None)
    if buf is None or buf.size != size:
        buf = aligned_empty(size)
        buf.fill(0)
        _scratch.buf = buf
    return buf


class WeightsReader:
    """Reads tensors of one safetensors member from memory or from a file descriptor.

    The header is read and strictly parsed on construction (see :func:`parse_header`). Each
    tensor is then read on demand straight into a fresh 64-byte-aligned buffer (the only copy:
    jax's CPU ``device_put`` aliases such buffers), its digest computed chunk by chunk while
    the bytes are still in cache. Returned arrays are owned by the caller, writeable, and never
    views of the source. Digests use the algorithm the caller names (the manifest's), from
    the digest table (``_digests``); reads run on a :class:`~hkstore.store._workers.Scheduler`.

    Args:
        source: the archive as bytes, bytearray, memoryview or mmap, a ranged-read source
            (:class:`~hkstore.store._remote.RemoteSource`: an object in a remote store), or
            an open file descriptor (read with ``os.preadv``; nothing is memory-mapped).
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
        source: bytes | bytearray | memoryview | mmap.mmap | int | RemoteSource,
        offset: int = 0,
        size: int | None = None,
        limits: Limits = DEFAULT_LIMITS,
        *,
        member: str = MEMBER,
    ) -> None:
        self._member = member
        self._fd: int | None = None
        self._src: np.ndarray | None = None
        self._bytes: ByteSource | None = None
        self._chunk = _READ_CHUNK
        if isinstance(source, int):
            self._fd = source
            info = os.fstat(source)
            available = info.st_size - offset if stat.S_ISREG(info.st_mode) else None
        elif isinstance(source, RemoteSource):
            # a ranged-read source (an object in a remote store): fewer, bigger reads
            self._bytes = source
            self._chunk = max(_READ_CHUNK, source.read_chunk)
            available = source.size - offset
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
            self._read_bytes(0, 8 + n), limits, member_size=size, member=member
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
        if self._bytes is not None:
            self._bytes.readinto(start, dst.data)
            return
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
        """``n`` bytes from member position ``pos`` in one new ``bytes`` (no second copy)."""
        start = self.offset + pos
        if self._bytes is not None:
            return self._bytes.read(start, n)
        if self._fd is None:
            if self._src is None:
                raise ValueError(f"{self._member}: reader is closed")
            return self._src[start : start + n].tobytes()
        parts = []
        done = 0
        while done < n:
            part = os.pread(self._fd, n - done, start + done)
            if not part:
                _fail(
                    self._member,
                    f"truncated: the file ended at member byte {pos + done}, {n - done} "
                    "bytes short",
                )
            parts.append(part)
            done += len(part)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def _read_pieces(self, raw: np.ndarray, pos: int, scheduler: Scheduler) -> None:
        """Fill ``raw`` from ``pos`` in :data:`_SPLIT_CHUNK` pieces on every worker."""
        starts = range(0, raw.size, _SPLIT_CHUNK)
        scheduler.map(lambda at: self._read_into(raw[at : at + _SPLIT_CHUNK], pos + at), starts)

    def _load(self, entry: TensorEntry, algorithm: str | None) -> _Loaded:
        """Read one tensor on this thread, hashing each chunk right after it is read."""
        raw = aligned_empty(entry.nbytes)
        pos = self.header_size + entry.begin
        hasher = None if algorithm is None else new_hasher(algorithm)
        for start in range(0, entry.nbytes, self._chunk):
            piece = raw[start : start + self._chunk]
            self._read_into(piece, pos + start)
            if hasher is not None:
                hasher.update(piece.data)
        array = raw.view(DTYPES[entry.dtype].dtype).reshape(entry.shape)
        digest = None if hasher is None else hasher.hexdigest()
        return _Loaded(array, digest, _bool_problem(entry, raw))

    def _load_batch(self, batch: list[TensorEntry], algorithm: str | None) -> list[_Loaded]:
        return [self._load(entry, algorithm) for entry in batch]

    def _jobs(self, entries: Sequence[TensorEntry]) -> list[list[TensorEntry]]:
        """Largest tensors first (so the last job to finish is a short one); small ones batched."""
        jobs: list[list[TensorEntry]] = []
        batch: list[TensorEntry] = []
        batch_bytes = 0
        for entry in sorted(entries, key=lambda e: e.nbytes, reverse=True):
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

    @staticmethod
    def _split(
        entries: Sequence[TensorEntry], algorithm: str | None, workers: int
    ) -> tuple[list[TensorEntry], list[TensorEntry]]:
        """``(whole, split)``: the tensors read by one thread each, and those cut up."""
        if workers == 1 or algorithm == "sha256":
            return list(entries), []
        cut = max(_SPLIT_MIN, sum(e.nbytes for e in entries) // workers)
        return [e for e in entries if e.nbytes <= cut], [e for e in entries if e.nbytes > cut]

    def _entry(self, name: str) -> TensorEntry:
        try:
            return self.entries[name]
        except KeyError:
            raise WeightsMismatchError(f"{self._member}: no tensor named {name!r}") from None

    # -- public reads ---------------------------------------------------------------------

    def tensor(
        self,
        name: str,
        *,
        expected: str | None = None,
        algorithm: str = DEFAULT_DIGEST,
        workers: int | None = 1,
    ) -> np.ndarray:
        """Read one tensor (only its bytes), checking its digest when one is given.

        Args:
            name: the tensor.
            expected: its hex digest, or ``None`` to read without checking.
            algorithm: the digest's algorithm (from the manifest).
            workers: threads (``None``: every available core); a big tensor's copy is cut
                into pieces for every thread and, with BLAKE3, hashed on as many.

        Raises:
            WeightsMismatchError: no tensor ``name`` in the member.
            DigestMismatchError: its bytes do not hash to ``expected``.
            WeightsFormatError: the source ends early, or a BOOL byte is neither 0 nor 1.
            ValueError: ``algorithm`` is not in the digest table.
        """
        entry = self._entry(name)
        algo = None if expected is None else check_algorithm(algorithm)
        with Scheduler(workers, work_bytes=entry.nbytes) as scheduler:
            whole, _ = self._split([entry], algo, scheduler.workers)
            if whole:
                loaded = self._load(entry, algo)
            else:
                loaded = self._load_split(entry, algo, scheduler)
        if expected is not None and loaded.digest != expected:
            raise DigestMismatchError(
                _mismatch_message(self._member, algorithm, [(name, expected, loaded.digest)])
            )
        if loaded.bad_bool:
            _fail(self._member, loaded.bad_bool + " (only 0 and 1 are valid)")
        return loaded.array

    def _load_split(
        self, entry: TensorEntry, algorithm: str | None, scheduler: Scheduler
    ) -> _Loaded:
        raw = aligned_empty(entry.nbytes)
        self._read_pieces(raw, self.header_size + entry.begin, scheduler)
        digest = None
        if algorithm is not None:
            digest = digest_hex(algorithm, raw.data, threads=scheduler.workers)
        array = raw.view(DTYPES[entry.dtype].dtype).reshape(entry.shape)
        return _Loaded(array, digest, _bool_problem(entry, raw))

    def _check_expected(self, expected: Mapping[str, str] | None) -> None:
        if expected is not None and set(expected) != set(self.entries):
            missing = sorted(set(self.entries) - set(expected))
            extra = sorted(set(expected) - set(self.entries))
            _fail(
                self._member,
                f"expected digests do not match the tensors: no digest for "
                f"{missing}, digest for absent {extra}",
            )

    def read_all(
        self,
        expected: Mapping[str, str] | None,
        *,
        algorithm: str = DEFAULT_DIGEST,
        workers: int | None = None,
        ready: Callable[[str, np.ndarray], object] | None = None,
    ) -> dict[str, np.ndarray]:
        """Read every tensor, checking every digest in ``expected`` (skip checks with ``None``).

        Tensors are read and hashed on ``workers`` threads, largest first, each chunk hashed
        right after it is read; a tensor bigger than its share is copied by every thread and
        (BLAKE3) hashed by as many. Every digest mismatch is collected before raising.

        Args:
            expected: hex digest per tensor name, covering exactly the member's tensors; or
                ``None`` to read without checking (only for data already trusted).
            algorithm: the digests' algorithm (from the manifest).
            workers: reading/hashing threads; ``None`` for every available core.
            ready: called on the calling thread with each tensor whose digest matched (and
                whose BOOL bytes are valid) as soon as it is, before the others are done:
                a loader starts its host-to-device copy there. A failed read calls it for
                some tensors and then raises.

        Returns:
            Arrays by name, in data (offset) order.

        Raises:
            WeightsFormatError: ``expected`` names other tensors than the member holds, the
                source ends early, or a BOOL byte is neither 0 nor 1.
            DigestMismatchError: one or more tensors do not match (all are named).
            ValueError: ``algorithm`` is not in the digest table.
        """
        self._check_expected(expected)
        algo = None if expected is None else check_algorithm(algorithm)
        total = sum(e.nbytes for e in self.entries.values())
        done: dict[str, _Loaded] = {}
        with Scheduler(workers, work_bytes=total) as scheduler:
            whole, split = self._split(list(self.entries.values()), algo, scheduler.workers)
            pieces: list[tuple[TensorEntry, np.ndarray]] = []
            futures: list[Future[Any]] = []
            for entry in split:  # first: their pieces spread over every thread
                raw = aligned_empty(entry.nbytes)
                pieces.append((entry, raw))
                pos = self.header_size + entry.begin
                for at in range(0, entry.nbytes, _SPLIT_CHUNK):
                    part = raw[at : at + _SPLIT_CHUNK]
                    futures.append(scheduler.submit(self._read_into, part, pos + at))
            jobs = self._jobs(whole)
            batches = [scheduler.submit(self._load_batch, job, algo) for job in jobs]
            for job, batch in zip(jobs, batches, strict=True):
                for entry, got in zip(job, batch.result(), strict=True):
                    done[entry.name] = got
                    _hand_over(entry.name, got, expected, ready)
            for future in futures:
                future.result()
        for entry, raw in pieces:  # the pool is idle: BLAKE3's own threads hash
            digest = None
            if algo is not None:
                digest = digest_hex(algo, raw.data, threads=scheduler.workers)
            array = raw.view(DTYPES[entry.dtype].dtype).reshape(entry.shape)
            done[entry.name] = _Loaded(array, digest, _bool_problem(entry, raw))
            _hand_over(entry.name, done[entry.name], expected, ready)
        loaded = {name: done[name] for name in self.entries}
        if expected is not None:
            bad = [
                (name, expected[name], got.digest)
                for name, got in loaded.items()
                if got.digest != expected[name]
            ]
            if bad:
                raise DigestMismatchError(_mismatch_message(self._member, algorithm, bad))
        bad_bools = [got.bad_bool for got in loaded.values() if got.bad_bool]
        if bad_bools:
            _fail(self._member, "; ".join(bad_bools) + " (only 0 and 1 are valid)")
        return {name: got.array for name, got in loaded.items()}

    # -- checking without keeping the data ------------------------------------------------

    def _digest_through_scratch(self, entry: TensorEntry, algorithm: str) -> tuple[str, bool]:
        """Hash one tensor through this thread's scratch buffer; ``(digest, bad BOOL byte)``."""
        buf = _scratch_buffer(self._chunk)
        hasher = new_hasher(algorithm)
        pos = self.header_size + entry.begin
        bad = False
        for start in range(0, entry.nbytes, buf.size):
            piece = buf[: min(buf.size, entry.nbytes - start)]
            self._read_into(piece, pos + start)
            hasher.update(piece.data)
            if entry.dtype == "BOOL" and int(piece.max()) > 1:
                bad = True
        return hasher.hexdigest(), bad

    def _check_batch(self, batch: list[TensorEntry], algorithm: str) -> list[tuple[str, str, bool]]:
        out = []
        for entry in batch:
            digest, bad = self._digest_through_scratch(entry, algorithm)
            out.append((entry.name, digest, bad))
        return out

    def _digest_segments(
        self, entry: TensorEntry, algorithm: str, scheduler: Scheduler, segment: np.ndarray
    ) -> tuple[str, bool]:
        """Hash a big tensor :data:`_SEGMENT` bytes at a time: copied by every worker, then
        hashed by BLAKE3's threads while the pool is idle."""
        hasher = new_hasher(algorithm, threads=scheduler.workers)
        pos = self.header_size + entry.begin
        bad = False
        for start in range(0, entry.nbytes, segment.size):
            piece = segment[: min(segment.size, entry.nbytes - start)]
            self._read_pieces(piece, pos + start, scheduler)
            hasher.update(piece.data)
            if entry.dtype == "BOOL" and int(piece.max()) > 1:
                bad = True
        return hasher.hexdigest(), bad

    def check_digests(
        self,
        expected: Mapping[str, str],
        *,
        algorithm: str = DEFAULT_DIGEST,
        workers: int | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> int:
        """Check every tensor's digest and BOOL bytes without keeping the data; return bytes read.

        Memory stays bounded (a 1 MiB buffer per thread, plus one 64 MiB segment for tensors
        bigger than their share of the work), whatever the tensors' sizes. Every mismatch is
        collected before raising.

        Args:
            expected: hex digest per tensor name, covering exactly the member's tensors.
            algorithm: the digests' algorithm (from the manifest).
            workers: threads; ``None`` for every available core.
            progress: called with the byte count of each tensor or batch once it is checked.

        Raises:
            DigestMismatchError: naming every tensor whose bytes differ from ``expected``.
            WeightsFormatError: ``expected`` names other tensors, the source ends early, or a
                BOOL byte is neither 0 nor 1.
            ValueError: ``algorithm`` is not in the digest table.
        """
        self._check_expected(expected)
        check_algorithm(algorithm)
        entries = list(self.entries.values())
        got: dict[str, tuple[str, bool]] = {}
        total = sum(e.nbytes for e in entries)
        with Scheduler(workers, work_bytes=total) as scheduler:
            whole, split = self._split(entries, algorithm, scheduler.workers)
            jobs = self._jobs(whole)
            window = 2 * scheduler.workers
            checked = scheduler.window(lambda j: self._check_batch(j, algorithm), jobs, window)
            for job, results in zip(jobs, checked, strict=True):
                got.update((name, (digest, bad)) for name, digest, bad in results)
                if progress is not None:
                    progress(sum(e.nbytes for e in job))
            if split:
                segment = aligned_empty(min(_SEGMENT, max(e.nbytes for e in split)))
                for entry in split:
                    got[entry.name] = self._digest_segments(entry, algorithm, scheduler, segment)
                    if progress is not None:
                        progress(entry.nbytes)
        bad = [
            (name, expected[name], digest)
            for name, (digest, _) in ((n, got[n]) for n in self.entries)
            if digest != expected[name]
        ]
        if bad:
            raise DigestMismatchError(_mismatch_message(self._member, algorithm, bad))
        bools = [name for name in self.entries if got[name][1]]
        if bools:
            _fail(
                self._member,
                "; ".join(f"tensor {n!r}: a BOOL byte other than 0 or 1" for n in bools)
                + " (only 0 and 1 are valid)",
            )
        return total


_LABELS = {"sha256": "SHA-256", "blake3": "BLAKE3"}


def _mismatch_message(
    member: str, algorithm: str, bad: Sequence[tuple[str, str, str | None]]
) -> str:
    label = _LABELS.get(algorithm, algorithm)
    lines = [f"{member}: {len(bad)} tensor(s) do not match their {label} digest:"]
    for name, want, got in bad:
        lines.append(f"  {name!r}: expected {want}, got {got or ''}")
    return "\n".join(lines)


def stream_tensors(
    read_into: Callable[[memoryview], int],
    entries: Sequence[TensorEntry],
    expected: Mapping[str, str] | None,
    *,
    keep: bool,
    algorithm: str = DEFAULT_DIGEST,
    member: str = MEMBER,
    progress: Callable[[int], None] | None = None,
) -> dict[str, np.ndarray] | None:
    """Read tensor data that arrives in order (a decompressing stream), hashing as it comes.

    ``entries`` must be sorted by offset and tile the data (as :func:`parse_header` returns
    them), so the stream is read once, front to back. With ``keep`` each tensor is read into
    a fresh 64-byte-aligned buffer; without, through one scratch buffer of at most 1 MiB, so
    checking a compressed member needs no memory proportional to its size.

    Args:
        read_into: fills a writable byte view completely (e.g.
            :meth:`~hkstore.store._zstd.BoundedReader.readinto`).
        entries: the tensors, in data order.
        expected: hex digest per tensor name, or ``None`` to skip digest checks.
        keep: return the arrays (else return ``None``).
        algorithm: the digests' algorithm (from the manifest).
        member: names the member in error messages.
        progress: called with each tensor's byte count once it is read.

    Returns:
        Arrays by name in data order when ``keep``, else ``None``.

    Raises:
        DigestMismatchError: one or more tensors do not match (all are named).
        WeightsFormatError: a BOOL byte is neither 0 nor 1.
        ValueError: ``algorithm`` is not in the digest table.
    """
    check_algorithm(algorithm)
    out: dict[str, np.ndarray] = {}
    bad: list[tuple[str, str, str]] = []
    bad_bools: list[str] = []
    largest = max((e.nbytes for e in entries), default=0)
    scratch = None if keep else np.empty(min(largest, _READ_CHUNK), dtype=np.uint8)
    for entry in entries:
        hasher = new_hasher(algorithm) if expected is not None else None
        raw = aligned_empty(entry.nbytes) if keep else None
        high = 0
        for start in range(0, entry.nbytes, _READ_CHUNK):
            n = min(_READ_CHUNK, entry.nbytes - start)
            if raw is not None:
                piece = raw[start : start + n]
            else:
                assert scratch is not None
                piece = scratch[:n]
            read_into(piece.data)
            if hasher is not None:
                hasher.update(piece.data)
            if entry.dtype == "BOOL" and n:
                high = max(high, int(piece.max()))
        if high > 1:
            bad_bools.append(f"tensor {entry.name!r}: BOOL byte {high} (only 0 and 1 are valid)")
        if hasher is not None and expected is not None:
            got = hasher.hexdigest()
            if got != expected[entry.name]:
                bad.append((entry.name, expected[entry.name], got))
        if raw is not None:
            out[entry.name] = raw.view(DTYPES[entry.dtype].dtype).reshape(entry.shape)
        if progress is not None:
            progress(entry.nbytes)
    if bad:
        raise DigestMismatchError(_mismatch_message(member, algorithm, bad))
    if bad_bools:
        _fail(member, "; ".join(bad_bools))
    return out if keep else None
