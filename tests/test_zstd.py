"""Tests for hkstore.store._zstd: frames written with content size, read with bounded output."""

from __future__ import annotations

import hashlib
import io
import os
import tracemalloc
from typing import Any

import numpy as np
import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from hkstore.errors import ArchiveFormatError, LimitExceededError
from hkstore.store._zstd import (
    BoundedReader,
    CompressWriter,
    compress,
    decompress_bounded,
    stream_writer,
)

MiB = 1 << 20
GiB = 1 << 30
MAGIC = zstandard.MAGIC_NUMBER.to_bytes(4, "little")
BLOCK = 128 * 1024  # the largest block zstd allows


# --- hand-built frames: raw and RLE blocks need no entropy coder ------------------------------


def _block(kind: int, size: int, payload: bytes, *, last: bool) -> bytes:
    return (int(last) | kind << 1 | size << 3).to_bytes(3, "little") + payload


def _raw(data: bytes, *, last: bool = True) -> bytes:
    return _block(0, len(data), data, last=last)


def _rle(byte: int, size: int, *, last: bool = True) -> bytes:
    return _block(1, size, bytes([byte]), last=last)


def _frame(
    blocks: list[bytes],
    *,
    content_size: int | None,
    window_log: int = 17,
    dict_id: int = 0,
    checksum: bool = False,
) -> bytes:
    """A zstd frame: 8-byte content size field unless None, window descriptor; with
    ``checksum`` the checksum flag and 4 checksum bytes (zeros: wrong unless the content
    happens to hash to them, so only a decoder finds the mismatch)."""
    descriptor = (0xC0 if content_size is not None else 0) | (1 if dict_id else 0)
    descriptor |= 0x04 if checksum else 0
    out = MAGIC + bytes([descriptor, (window_log - 10) << 3])
    if dict_id:
        out += bytes([dict_id])
    if content_size is not None:
        out += content_size.to_bytes(8, "little")
    return out + b"".join(blocks) + (bytes(4) if checksum else b"")


def _rle_blocks(total: int) -> list[bytes]:
    count = total // BLOCK
    return [_rle(0, BLOCK, last=i == count - 1) for i in range(count)]


def test_hand_built_frames_are_real_zstd() -> None:
    frame = _frame([_raw(b"hello ", last=False), _rle(ord("!"), 3)], content_size=9)
    assert zstandard.ZstdDecompressor().decompress(frame) == b"hello !!!"
    # hand-built frames carry no checksum, which v1 requires: decoded, then refused
    with pytest.raises(ArchiveFormatError, match="no content checksum"):
        decompress_bounded(frame, declared_size=9, cap=100, what="m")


# --- round trips ----------------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, 1000, 3 * MiB + 5])
def test_round_trip(size: int) -> None:
    data = os.urandom(size // 2) + bytes(size - size // 2)
    frame = compress(data)
    params = zstandard.get_frame_parameters(frame)
    assert zstandard.frame_content_size(frame) == size
    assert params.has_checksum
    assert decompress_bounded(frame, declared_size=size, cap=size, what="m") == data
    assert decompress_bounded(memoryview(frame), declared_size=size, cap=size, what="m") == data


# --- refusals before decompression ----------------------------------------------------------


def test_decompress_bounded_rejects_frame_without_content_size() -> None:
    frame = zstandard.ZstdCompressor(write_content_size=False).compress(b"x" * 100)
    assert zstandard.frame_content_size(frame) == -1
    with pytest.raises(ArchiveFormatError) as info:
        decompress_bounded(frame, declared_size=100, cap=1000, what="member 'w.zst'")
    assert str(info.value) == (
        "member 'w.zst': zstd frame does not record its content size; refused (frames must "
        "declare it so that output can be bounded before decompressing)"
    )


def test_decompress_bounded_rejects_content_size_larger_than_declared() -> None:
    frame = compress(b"y" * 2000)
    with pytest.raises(LimitExceededError) as info:
        decompress_bounded(frame, declared_size=1000, cap=10_000, what="m")
    assert str(info.value) == (
        "m: zstd frame declares 2000 bytes of content, more than the 1000 bytes declared for it"
    )


def test_decompress_bounded_rejects_content_size_smaller_than_declared() -> None:
    frame = compress(b"y" * 1000)
    with pytest.raises(ArchiveFormatError) as info:
        decompress_bounded(frame, declared_size=2000, cap=10_000, what="m")
    assert not isinstance(info.value, LimitExceededError)
    assert str(info.value) == (
        "m: zstd frame declares 1000 bytes of content, but 2000 bytes are declared for it"
    )


def test_decompress_bounded_rejects_declared_size_over_cap() -> None:
    frame = compress(b"z" * 5000)
    with pytest.raises(LimitExceededError) as info:
        decompress_bounded(frame, declared_size=5000, cap=4096, what="functions.pkl.zst")
    assert str(info.value) == (
        "functions.pkl.zst: declared size 5000 bytes is more than the limit of 4096 bytes"
    )


def test_decompress_bounded_rejects_bombs_without_allocating() -> None:
    bomb = _frame(_rle_blocks(GiB), content_size=GiB, checksum=True)  # 1 GiB of 0 in ~32 KiB
    liar = _frame(_rle_blocks(GiB), content_size=100, checksum=True)  # header says 100 bytes
    assert len(bomb) < 64 * 1024
    tracemalloc.start()  # zstd's output buffers are allocated through Python: traced
    try:
        with pytest.raises(LimitExceededError) as info:
            decompress_bounded(bomb, declared_size=1000, cap=256 * MiB, what="m")
        assert str(info.value) == (
            "m: zstd frame declares 1073741824 bytes of content, more than the 1000 bytes "
            "declared for it"
        )
        with pytest.raises(LimitExceededError) as info:
            decompress_bounded(bomb, declared_size=GiB, cap=256 * MiB, what="m")
        assert str(info.value) == (
            "m: declared size 1073741824 bytes is more than the limit of 268435456 bytes"
        )
        with pytest.raises(ArchiveFormatError, match=r"^m: corrupt zstd frame \("):
            decompress_bounded(liar, declared_size=100, cap=256 * MiB, what="m")
        with pytest.raises(ArchiveFormatError, match=r"^m: corrupt zstd frame \("):
            BoundedReader(liar, declared_size=100, cap=256 * MiB, what="m").read(1000)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 * MiB


def test_decompress_bounded_rejects_header_that_overstates_content() -> None:
    # the blocks hold 1000 bytes: found by walking the block headers, nothing decompressed
    liar = _frame([_raw(b"a" * 1000)], content_size=2000, checksum=True)
    with pytest.raises(ArchiveFormatError) as info:
        decompress_bounded(liar, declared_size=2000, cap=10_000, what="m")
    assert str(info.value) == (
        "m: zstd frame declares 2000 bytes of content, but its blocks can hold at most 1000"
    )


def test_content_size_is_bounded_by_what_the_blocks_can_hold() -> None:
    # a tiny frame whose header claims a huge content size cannot make anything allocate:
    # 8 RLE blocks hold 1 MiB, so a claim of 1 GiB is refused before decompressing
    claim = _frame(_rle_blocks(MiB), content_size=GiB, checksum=True)
    with pytest.raises(ArchiveFormatError, match="its blocks can hold at most 1048576"):
        decompress_bounded(claim, declared_size=GiB, cap=2 * GiB, what="m")
    with pytest.raises(ArchiveFormatError, match="its blocks can hold at most 1048576"):
        BoundedReader(claim, declared_size=GiB, cap=2 * GiB, what="m")
    # a block may not claim more than the 128 KiB block maximum (a size field has 21 bits)
    huge_block = _frame([_rle(0, (1 << 21) - 1)], content_size=(1 << 21) - 1, checksum=True)
    with pytest.raises(ArchiveFormatError, match="more than the block maximum of 131072"):
        decompress_bounded(huge_block, declared_size=(1 << 21) - 1, cap=GiB, what="m")


@pytest.mark.parametrize(
    ("suffix", "extra"),
    [(b"junk", 4), (compress(b"second frame"), len(compress(b"second frame")))],
)
def test_decompress_bounded_rejects_trailing_data(suffix: bytes, extra: int) -> None:
    frame = compress(b"abc") + suffix
    with pytest.raises(ArchiveFormatError) as info:
        decompress_bounded(frame, declared_size=3, cap=100, what="m")
    assert str(info.value) == f"m: {extra} bytes of trailing data after the zstd frame"


def test_decompress_bounded_rejects_skippable_frame() -> None:
    skippable = (0x184D2A50).to_bytes(4, "little") + (4).to_bytes(4, "little") + b"abcd"
    with pytest.raises(ArchiveFormatError) as info:
        decompress_bounded(skippable + compress(b"abc"), declared_size=3, cap=100, what="m")
    assert str(info.value) == "m: not a zstd frame (magic bytes b'P*M\\x18')"


def test_decompress_bounded_rejects_truncated_frame() -> None:
    frame = compress(os.urandom(5000))
    with pytest.raises(ArchiveFormatError) as info:
        decompress_bounded(frame[:-1], declared_size=5000, cap=10_000, what="m")
    assert str(info.value) == (
        f"m: zstd frame is truncated ({len(frame) - 1} bytes, the frame needs {len(frame)})"
    )
    with pytest.raises(ArchiveFormatError, match=r"^m: malformed zstd frame header"):
        decompress_bounded(frame[:5], declared_size=5000, cap=10_000, what="m")
    with pytest.raises(ArchiveFormatError, match=r"^m: not a zstd frame"):
        decompress_bounded(b"", declared_size=0, cap=10, what="m")


def test_decompress_bounded_rejects_large_window() -> None:
    frame = _frame([_raw(b"abc")], content_size=3, window_log=30)
    with pytest.raises(LimitExceededError) as info:
        decompress_bounded(frame, declared_size=3, cap=100, what="m", max_window=8 * MiB)
    assert str(info.value) == (
        "m: zstd window of 1073741824 bytes is more than the limit of 8388608 bytes"
    )


def test_decompress_bounded_rejects_dictionary_frame() -> None:
    frame = _frame([_raw(b"abc")], content_size=3, dict_id=7)
    with pytest.raises(ArchiveFormatError) as info:
        decompress_bounded(frame, declared_size=3, cap=100, what="m")
    assert str(info.value) == "m: zstd frame needs dictionary 7"


def test_decompress_bounded_rejects_bad_checksum() -> None:
    frame = bytearray(compress(os.urandom(300)))
    frame[-1] ^= 0x01
    with pytest.raises(ArchiveFormatError, match=r"^m: corrupt zstd frame \(.*checksum"):
        decompress_bounded(bytes(frame), declared_size=300, cap=1000, what="m")


@pytest.mark.parametrize("declared", [-1, 1.5, True, "3"])
def test_decompress_bounded_rejects_nonsense_declared_size(declared: Any) -> None:
    with pytest.raises(ArchiveFormatError, match=r"is not a size$"):
        decompress_bounded(compress(b"abc"), declared_size=declared, cap=10, what="m")


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=300), st.integers(0, 2000))
def test_decompress_bounded_fuzz_random_bytes_raise_only_our_errors(data: bytes, size: int) -> None:
    for frame in (data, MAGIC + data):
        try:
            out = decompress_bounded(frame, declared_size=size, cap=1000, what="m")
        except ArchiveFormatError:
            continue
        assert len(out) == size


@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=1, max_size=2000), st.data())
def test_decompress_bounded_fuzz_mutated_frames(data: bytes, draw: st.DataObject) -> None:
    frame = bytearray(compress(data))
    for _ in range(draw.draw(st.integers(1, 3))):
        frame[draw.draw(st.integers(0, len(frame) - 1))] = draw.draw(st.integers(0, 255))
    try:
        out = decompress_bounded(bytes(frame), declared_size=len(data), cap=4096, what="m")
    except ArchiveFormatError:
        return
    assert out == data


# --- streaming ------------------------------------------------------------------------------


def test_compress_writer_streams_one_checked_frame() -> None:
    chunks: list[Any] = [os.urandom(1000), bytes(5 * MiB), np.arange(1000, dtype=np.float32)]
    total = sum(memoryview(c).nbytes for c in chunks)
    sink = io.BytesIO()
    writer = stream_writer(sink, raw_size=total, threads=2)
    for chunk in chunks:
        writer.write(chunk)
    written = writer.finish()
    writer.close()  # idempotent
    frame = sink.getvalue()
    assert written.size == len(frame)
    assert written.sha256 == hashlib.sha256(frame).hexdigest()
    assert zstandard.get_frame_parameters(frame).has_checksum
    expected = b"".join(memoryview(c).cast("B").tobytes() for c in chunks)
    assert decompress_bounded(frame, declared_size=total, cap=total, what="m") == expected


def test_compress_writer_refuses_wrong_amounts() -> None:
    writer = CompressWriter(io.BytesIO(), content_size=4)
    writer.write(b"abc")
    with pytest.raises(ValueError, match=r"5 bytes written, more than the content size 4"):
        writer.write(b"de")
    with pytest.raises(ValueError, match=r"3 bytes written, but the frame declares 4"):
        writer.finish()


def test_bounded_reader_reads_in_pieces_and_checks_the_end() -> None:
    data = os.urandom(300_000)
    frame = compress(data)
    with BoundedReader(frame, declared_size=len(data), cap=len(data), what="m") as reader:
        first = reader.read(1000)
        buf = bytearray(len(data) - 1000)
        assert reader.readinto(buf) == len(buf)
        assert reader.read(10) == b""
        assert reader.remaining == 0
    assert first + bytes(buf) == data


def test_bounded_reader_refuses_early_close_and_bad_checksum() -> None:
    data = os.urandom(1000)
    frame = compress(data)
    reader = BoundedReader(frame, declared_size=1000, cap=1000, what="m")
    reader.read(10)
    with pytest.raises(ArchiveFormatError, match=r"^m: 990 declared bytes left unread$"):
        reader.close()
    broken = bytearray(frame)
    broken[-1] ^= 0xFF
    with pytest.raises(ArchiveFormatError, match=r"checksum"):
        with BoundedReader(bytes(broken), declared_size=1000, cap=1000, what="m") as reader:
            reader.read(1000)


def test_bounded_reader_checks_the_frame_first() -> None:
    with pytest.raises(LimitExceededError):
        BoundedReader(
            _frame(_rle_blocks(GiB), content_size=GiB), declared_size=GiB, cap=MiB, what="m"
        )
    with pytest.raises(ArchiveFormatError, match="trailing data"):
        BoundedReader(compress(b"abc") + b"x", declared_size=3, cap=10, what="m")


def test_decompress_bounded_rejects_a_frame_without_checksum() -> None:
    data = b"hkstore" * 100
    frame = zstandard.ZstdCompressor(write_checksum=False, write_content_size=True).compress(data)
    with pytest.raises(ArchiveFormatError, match="no content checksum"):
        decompress_bounded(frame, declared_size=len(data), cap=1 << 20, what="member 'x'")
