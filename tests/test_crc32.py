"""Tests of hkstore.store._crc32: the CRC-32 in use and crc32_combine."""

from __future__ import annotations

import subprocess
import sys
import zlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hkstore.store._crc32 import CRC32_IMPLEMENTATION, crc32, crc32_combine


def test_crc32_is_zlibs_crc32_whatever_implementation_is_used() -> None:
    assert CRC32_IMPLEMENTATION in {"isal.isal_zlib", "zlib_ng.zlib_ng", "zlib"}
    data = bytes(range(256)) * 1000
    assert crc32(data) == zlib.crc32(data)
    assert crc32(data[1000:], crc32(data[:1000])) == zlib.crc32(data)
    assert crc32(memoryview(data)[7:]) == zlib.crc32(data[7:])
    array = np.arange(1000, dtype=np.float32)
    assert crc32(array) == zlib.crc32(array.tobytes())
    assert crc32(b"") == 0


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=2000), st.binary(max_size=2000))
def test_combine_matches_crc_of_concatenation(first: bytes, second: bytes) -> None:
    combined = crc32_combine(zlib.crc32(first), zlib.crc32(second), len(second))
    assert combined == zlib.crc32(first + second)


def test_combine_over_long_runs_of_zeros() -> None:
    head = zlib.crc32(b"head")
    for length in (1, 255, 256, 65_537, 3_000_001):
        zeros = bytes(length)
        assert crc32_combine(head, zlib.crc32(zeros), length) == zlib.crc32(zeros, head)


@given(
    st.integers(0, 2**32 - 1),
    st.integers(0, 2**32 - 1),
    st.integers(0, 2**32 - 1),
    st.integers(0, 2**48),
    st.integers(0, 2**48),
)
def test_combine_is_associative_for_huge_lengths(a: int, b: int, c: int, lb: int, lc: int) -> None:
    # Lengths far beyond what a test can CRC directly (the tables for high length bytes).
    left = crc32_combine(crc32_combine(a, b, lb), c, lc)
    right = crc32_combine(a, crc32_combine(b, c, lc), lb + lc)
    assert left == right


def test_combine_with_empty_second_part_keeps_the_first() -> None:
    assert crc32_combine(0xDEADBEEF, 0, 0) == 0xDEADBEEF


@pytest.mark.parametrize(("crc1", "crc2", "len2"), [(-1, 0, 0), (0, 2**32, 0), (0, 0, -1)])
def test_combine_refuses_bad_arguments(crc1: int, crc2: int, len2: int) -> None:
    with pytest.raises(ValueError, match="bad arguments"):
        crc32_combine(crc1, crc2, len2)


def test_falls_back_to_zlib_without_accelerators() -> None:
    code = (
        "import sys\n"
        "sys.modules['isal'] = sys.modules['zlib_ng'] = None  # as if not installed\n"
        "from hkstore.store import _crc32\n"
        "print(_crc32.CRC32_IMPLEMENTATION, _crc32.crc32(b'123456789'))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["zlib", str(0xCBF43926)]
