"""Tests for hkstore.store._weights: the hand-written safetensors codec."""

from __future__ import annotations

import hashlib
import io
import json
import mmap
import os
import re
import struct
import zlib
from pathlib import Path
from typing import Any

import ml_dtypes  # noqa: F401  (lets safetensors' numpy loader return bfloat16)
import numpy as np
import pytest
import safetensors.numpy as stn
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open

from hkstore.errors import (
    DigestMismatchError,
    LimitExceededError,
    UnsupportedDtypeError,
    WeightsFormatError,
    WeightsMismatchError,
)
from hkstore.store._digests import digest_hex
from hkstore.store._dtypes import DTYPES, code_for_dtype
from hkstore.store._limits import Limits
from hkstore.store._weights import (
    TensorEntry,
    TensorSpec,
    WeightsReader,
    aligned_empty,
    encode_header,
    parse_header,
    write_weights,
)

OUR_ERRORS = (WeightsFormatError, LimitExceededError, UnsupportedDtypeError)
# safetensors' numpy loader has no float8 types (AttributeError on numpy.float8_*).
NUMPY_LOADABLE = [code for code in DTYPES if not code.startswith("F8_")]
M = "weights.safetensors"


# --- helpers ------------------------------------------------------------------------------


def random_array(code: str, shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """Random bytes viewed as ``code`` (BOOL gets 0/1); NaN payloads included on purpose."""
    info = DTYPES[code]
    count = int(np.prod(shape, dtype=np.int64))
    rng = np.random.default_rng(seed)
    high = 2 if code == "BOOL" else 256
    raw = rng.integers(0, high, count * info.itemsize, dtype=np.uint8)
    return raw.view(info.dtype).reshape(shape)


def same(a: np.ndarray, b: np.ndarray) -> bool:
    """Bit-exact equality with dtype and shape."""
    return (
        a.dtype == b.dtype
        and a.shape == b.shape
        and a.reshape(-1).view(np.uint8).tobytes() == b.reshape(-1).view(np.uint8).tobytes()
    )


def write_member(arrays: dict[str, np.ndarray], **kwargs: Any) -> tuple[bytes, Any]:
    specs = [TensorSpec(k, code_for_dtype(v.dtype), v.shape) for k, v in arrays.items()]
    out = io.BytesIO()
    written = write_weights(out, specs, arrays.__getitem__, **kwargs)
    return out.getvalue(), written


def craft(header: object, data: bytes = b"", *, length: int | None = None) -> bytes:
    """A member with a hand-written header (dict/list -> JSON, str -> UTF-8, bytes as is)."""
    if isinstance(header, bytes):
        body = header
    elif isinstance(header, str):
        body = header.encode()
    else:
        body = json.dumps(header).encode()
    n = len(body) if length is None else length
    return n.to_bytes(8, "little") + body + data


def t(dtype: str, shape: list[Any], begin: int, end: int) -> dict[str, Any]:
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


def refusal(member: bytes, limits: Limits | None = None) -> str:
    with pytest.raises(WeightsFormatError) as info:
        parse_header(member, *([limits] if limits else []))
    return str(info.value)


SAMPLE = {
    "dense:w": random_array("F32", (3, 5), 1),
    "dense:b": random_array("BF16", (5,), 2),
    "flag": np.array(True),
    "empty": np.zeros((0, 4), dtype=np.int16),
}


# --- round trips --------------------------------------------------------------------------


@pytest.mark.parametrize("code", list(DTYPES))
def test_round_trip_every_dtype(code: str) -> None:
    arrays = {
        "matrix": random_array(code, (3, 4), 1),
        "scalar": random_array(code, (), 2),
        "empty": random_array(code, (2, 0, 3), 3),
    }
    member, written = write_member(arrays)
    reader = WeightsReader(member, 0, len(member))
    loaded = reader.read_all(written.tensor_digests)
    assert list(loaded) == list(arrays)
    for name, array in arrays.items():
        assert same(loaded[name], array), name
        assert written.tensor_digests[name] == digest_hex("blake3", array.tobytes())
        assert same(reader.tensor(name, expected=written.tensor_digests[name]), array)


names = st.text(st.characters(exclude_categories=["Cs"]), max_size=12).filter(
    lambda s: s != "__metadata__"
)
tensors = st.tuples(
    st.sampled_from(list(DTYPES)),
    st.lists(st.integers(0, 5), max_size=3).map(tuple),
    st.integers(0, 2**32 - 1),
)


@settings(max_examples=60, deadline=None)
@given(st.dictionaries(names, tensors, max_size=6))
def test_round_trip_random(layout: dict[str, tuple[str, tuple[int, ...], int]]) -> None:
    arrays = {name: random_array(code, shape, seed) for name, (code, shape, seed) in layout.items()}
    member, written = write_member(arrays)
    assert written.size == len(member)
    assert written.crc32 == zlib.crc32(member)
    _, header_size, header = parse_header(member)
    assert header_size % 64 == 0 and header == member[:header_size]
    assert written.header_sha256 == hashlib.sha256(header).hexdigest()
    loaded = WeightsReader(member).read_all(written.tensor_digests, workers=3)
    nonempty = [name for name, array in arrays.items() if array.size]
    assert [name for name in loaded if loaded[name].size] == nonempty  # data order = spec order
    assert sorted(loaded) == sorted(arrays)
    assert all(same(loaded[k], v) for k, v in arrays.items())


def test_write_makes_input_contiguous_and_checks_it() -> None:
    base = random_array("F64", (6, 8), 4)
    arrays = {"fortran": np.asfortranarray(base), "strided": base[::2, ::3]}
    member, written = write_member(arrays)
    loaded = WeightsReader(member).read_all(written.tensor_digests)
    assert np.array_equal(loaded["fortran"], base) and np.array_equal(
        loaded["strided"], base[::2, ::3]
    )


def test_crc_is_the_member_crc_across_chunks_and_can_be_skipped() -> None:
    arrays = {"big": random_array("U8", (9 << 20,), 5), "small": random_array("I32", (7,), 6)}
    member, written = write_member(arrays, workers=1)
    assert written.crc32 == zlib.crc32(member)
    assert write_member(arrays, crc32=None)[1].crc32 is None
    assert write_member(arrays, crc32=zlib.crc32, max_inflight=1)[1] == written


def test_encode_header_is_deterministic_sorted_and_64_aligned() -> None:
    specs = [TensorSpec("b", "F32", (2,)), TensorSpec("a", "BOOL", ()), TensorSpec("é", "U8", (0,))]
    header = encode_header(specs)
    assert header == encode_header(list(specs)) and len(header) % 64 == 0
    assert header[8:] == (
        '{"a":{"data_offsets":[8,9],"dtype":"BOOL","shape":[]},'
        '"b":{"data_offsets":[0,8],"dtype":"F32","shape":[2]},'
        '"é":{"data_offsets":[9,9],"dtype":"U8","shape":[0]}}'
    ).encode().ljust(len(header) - 8)
    assert int.from_bytes(header[:8], "little") == len(header) - 8


# --- compatibility with the safetensors library -------------------------------------------


def all_dtype_arrays() -> dict[str, np.ndarray]:
    arrays = {}
    for i, code in enumerate(DTYPES):
        arrays[f"{code}:m"] = random_array(code, (2, 3), i)
        arrays[f"{code}:s"] = random_array(code, (), i)
        arrays[f"{code}:e"] = random_array(code, (0, 3), i)
    return arrays


def test_safetensors_library_reads_what_we_write(tmp_path: Path) -> None:
    arrays = all_dtype_arrays()
    member, _ = write_member(arrays)
    path = tmp_path / "ours.safetensors"
    path.write_bytes(member)
    with safe_open(str(path), framework="numpy") as f:  # validates the header in Rust
        assert sorted(f.keys()) == sorted(arrays)
        for name, array in arrays.items():
            tensor_slice = f.get_slice(name)
            assert tensor_slice.get_dtype() == code_for_dtype(array.dtype)
            assert tuple(tensor_slice.get_shape()) == array.shape
        for name in arrays:
            if name.split(":")[0] in NUMPY_LOADABLE:
                assert same(f.get_tensor(name), arrays[name]), name
    loadable = {k: v for k, v in arrays.items() if k.split(":")[0] in NUMPY_LOADABLE}
    member, _ = write_member(loadable)
    path.write_bytes(member)
    theirs = stn.load_file(str(path))
    assert sorted(theirs) == sorted(loadable)
    assert all(same(theirs[k], v) for k, v in loadable.items())
    member, _ = write_member(arrays)
    # float8: numpy-side safetensors can't build the arrays; compare the raw byte ranges.
    entries = {e.name: e for e in parse_header(member)[0]}
    start = parse_header(member)[1]
    for name in set(arrays) - set(loadable):
        entry = entries[name]
        assert member[start + entry.begin : start + entry.end] == arrays[name].tobytes()


def test_we_read_what_the_safetensors_library_writes(tmp_path: Path) -> None:
    arrays = all_dtype_arrays()
    path = tmp_path / "theirs.safetensors"
    stn.save_file(arrays, str(path), metadata={"format": "np", "round": "3"})
    member = path.read_bytes()
    entries, _, _ = parse_header(member)
    assert sorted(e.name for e in entries) == sorted(arrays)
    fd = os.open(path, os.O_RDONLY)
    try:
        reader = WeightsReader(fd)
        digests = {k: hashlib.sha256(v.tobytes()).hexdigest() for k, v in arrays.items()}
        loaded = reader.read_all(digests, algorithm="sha256")
    finally:
        os.close(fd)
    for name, array in arrays.items():
        assert same(loaded[name], array), name
        entry = reader.entries[name]
        assert (entry.dtype, entry.shape) == (code_for_dtype(array.dtype), array.shape)


# --- reader behaviour ---------------------------------------------------------------------


def test_fd_bytes_and_mmap_sources_give_identical_aligned_owned_arrays(tmp_path: Path) -> None:
    member, written = write_member(SAMPLE)
    prefix = b"\x00" * 37  # the member sits at an odd offset inside a larger file
    path = tmp_path / "archive.bin"
    path.write_bytes(prefix + member + b"tail")
    with open(path, "rb") as f:
        by_fd = WeightsReader(f.fileno(), len(prefix), len(member)).read_all(written.tensor_digests)
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            with WeightsReader(mm, len(prefix), len(member)) as reader:
                by_mmap = reader.read_all(written.tensor_digests, workers=1)
            del reader
    source = bytearray(prefix + member)
    by_bytes = WeightsReader(source, len(prefix), len(member)).read_all(written.tensor_digests)
    for name, array in SAMPLE.items():
        for loaded in (by_fd, by_mmap, by_bytes):
            got = loaded[name]
            assert same(got, array)
            assert got.flags.writeable and got.flags.c_contiguous
            assert got.ctypes.data % 64 == 0 or got.size == 0
        assert not np.shares_memory(by_bytes[name], np.frombuffer(source, np.uint8))
    by_bytes["dense:w"][...] = 0
    assert bytes(source) == prefix + member  # writing to a result never touches the source


def test_tensor_reads_only_its_own_bytes() -> None:
    member, written = write_member(SAMPLE)
    entries, start, _ = parse_header(member)
    corrupt = bytearray(member)
    other = next(e for e in entries if e.name == "dense:b")
    corrupt[start + other.begin] ^= 0xFF
    reader = WeightsReader(bytes(corrupt))
    got = reader.tensor("dense:w", expected=written.tensor_digests["dense:w"])
    assert same(got, SAMPLE["dense:w"])
    with pytest.raises(WeightsMismatchError, match="no tensor named 'nope'"):
        reader.tensor("nope")


def test_read_all_names_every_tensor_whose_digest_mismatches() -> None:
    member, written = write_member(SAMPLE)
    entries, start, _ = parse_header(member)
    flipped = bytearray(member)
    for name in ("dense:w", "flag"):
        entry = next(e for e in entries if e.name == name)
        flipped[start + entry.end - 1] ^= 0x01  # BOOL True (1) becomes 0: still a valid bool
    reader = WeightsReader(bytes(flipped))
    with pytest.raises(DigestMismatchError) as info:
        reader.read_all(written.tensor_digests)
    loaded = WeightsReader(bytes(flipped)).read_all(None)
    actual = {k: digest_hex("blake3", v.tobytes()) for k, v in loaded.items()}
    assert str(info.value) == (
        f"{M}: 2 tensor(s) do not match their BLAKE3 digest:\n"
        f"  'dense:w': expected {written.tensor_digests['dense:w']}, got {actual['dense:w']}\n"
        f"  'flag': expected {written.tensor_digests['flag']}, got {actual['flag']}"
    )
    with pytest.raises(DigestMismatchError, match="'flag': expected"):
        reader.tensor("flag", expected=written.tensor_digests["flag"])


def test_read_all_refuses_digests_for_other_tensors() -> None:
    member, written = write_member(SAMPLE)
    expected = dict(written.tensor_digests)
    del expected["flag"]
    expected["ghost"] = "0" * 64
    with pytest.raises(WeightsFormatError) as info:
        WeightsReader(member).read_all(expected)
    assert str(info.value) == (
        f"{M}: expected digests do not match the tensors: no digest for ['flag'], "
        "digest for absent ['ghost']"
    )


def test_bool_bytes_other_than_0_and_1_are_refused() -> None:
    member = craft(
        {"ok": t("BOOL", [2], 0, 2), "bad": t("BOOL", [3], 2, 5)}, b"\x01\x00\x00\x07\x01"
    )
    reader = WeightsReader(member)
    assert reader.tensor("ok").tolist() == [True, False]
    with pytest.raises(WeightsFormatError) as info:
        reader.tensor("bad")
    assert str(info.value) == (
        f"{M}: tensor 'bad': BOOL byte 7 at element 1 (only 0 and 1 are valid)"
    )
    with pytest.raises(WeightsFormatError, match="tensor 'bad': BOOL byte 7 at element 1"):
        reader.read_all(None)
    sneaky = np.array([0, 2], dtype=np.uint8).view(np.bool_)
    with pytest.raises(WeightsFormatError, match="BOOL array holds bytes other than 0/1"):
        write_member({"sneaky": sneaky})


def test_source_shorter_than_declared_and_file_shrinking_under_the_reader(tmp_path: Path) -> None:
    member, written = write_member(SAMPLE)
    with pytest.raises(WeightsFormatError) as info:
        WeightsReader(member, 10, len(member))
    assert str(info.value) == (
        f"{M}: truncated: {len(member)} bytes declared at offset 10, only {len(member) - 10} "
        "available"
    )
    path = tmp_path / "w.safetensors"
    path.write_bytes(member)
    fd = os.open(path, os.O_RDONLY)
    try:
        reader = WeightsReader(fd, 0, len(member))
        os.truncate(path, len(member) - 3)
        with pytest.raises(WeightsFormatError, match=r"truncated: the file ended at member byte"):
            reader.read_all(written.tensor_digests)
    finally:
        os.close(fd)


def test_many_small_tensors_and_a_few_large_ones() -> None:
    arrays = {f"small/{i}": random_array("U8", (i % 50,), i) for i in range(2500)}
    arrays.update({f"large/{i}": random_array("F16", (50_000 * (i + 1),), i) for i in range(3)})
    member, written = write_member(arrays)
    reader = WeightsReader(member)
    loaded = reader.read_all(written.tensor_digests)
    assert list(loaded) == list(reader.entries) and sorted(loaded) == sorted(arrays)
    assert all(same(loaded[k], v) for k, v in arrays.items())


def test_aligned_empty() -> None:
    assert aligned_empty(0).size == 0  # numpy gives empty arrays no pointer of their own
    for n in (1, 63, 64, 1000):
        buf = aligned_empty(n)
        assert buf.dtype == np.uint8 and buf.size == n and buf.ctypes.data % 64 == 0
    assert aligned_empty(10, 4096).ctypes.data % 4096 == 0


# --- writer behaviour ---------------------------------------------------------------------


class RecordingStream:
    """A real in-memory sink that logs each write next to the fetch log it shares."""

    def __init__(self, log: list[tuple[str, object]]) -> None:
        self.log = log
        self.data = bytearray()

    def write(self, buf: Any) -> int:
        view = memoryview(buf).cast("B")
        self.log.append(("write", view.nbytes))
        self.data += view
        return view.nbytes


def test_fetch_is_lazy_one_tensor_just_before_its_write() -> None:
    log: list[tuple[str, object]] = []
    # "a" and "b" go through the worker threads, "c" is small enough to be hashed inline.
    arrays = {"a": random_array("F32", (40_000,)), "b": random_array("U8", (70_000,)),
              "c": np.array(1.5)}  # fmt: skip

    def fetch(name: str) -> np.ndarray:
        log.append(("fetch", name))
        return arrays[name]

    stream = RecordingStream(log)
    specs = [TensorSpec(k, code_for_dtype(v.dtype), v.shape) for k, v in arrays.items()]
    write_weights(stream, specs, fetch, max_inflight=1)
    header = len(encode_header(specs))
    assert log == [
        ("write", header),
        ("fetch", "a"), ("write", 160_000),
        ("fetch", "b"), ("write", 70_000),
        ("fetch", "c"), ("write", 8),
    ]  # fmt: skip
    assert same(WeightsReader(bytes(stream.data)).read_all(None)["c"], arrays["c"])


class ShortWriter:
    """A raw-file-like sink that accepts at most 5 bytes per call."""

    def __init__(self) -> None:
        self.data = bytearray()

    def write(self, buf: Any) -> int:
        chunk = bytes(memoryview(buf).cast("B")[:5])
        self.data += chunk
        return len(chunk)


def test_short_writes_are_completed() -> None:
    sink = ShortWriter()
    specs = [TensorSpec("x", "I64", (3,))]
    write_weights(sink, specs, lambda name: np.arange(3, dtype=np.int64))
    assert WeightsReader(bytes(sink.data)).tensor("x").tolist() == [0, 1, 2]


def test_fetched_array_must_match_its_spec() -> None:
    specs = [TensorSpec("w", "F32", (2, 3))]
    cases: dict[str, np.ndarray] = {
        "f64": np.zeros((2, 3)),
        "shape": np.zeros((3, 2), np.float32),
        "big-endian": np.zeros((2, 3), ">f4"),
    }
    messages = {}
    for label, value in cases.items():

        def fetch(name: str, value: np.ndarray = value) -> np.ndarray:
            return value

        with pytest.raises(WeightsMismatchError) as info:
            write_weights(io.BytesIO(), specs, fetch)
        messages[label] = str(info.value)
    assert messages == {
        "f64": "tensor 'w': fetched array has dtype <f8 (float64), expected <f4 (float32)",
        "shape": "tensor 'w': fetched array has shape [3, 2], expected [2, 3]",
        "big-endian": "tensor 'w': fetched array has dtype >f4 (>f4), expected <f4 (float32)",
    }


@pytest.mark.parametrize(
    ("specs", "error", "message"),
    [
        ([TensorSpec("a", "F32", ()), TensorSpec("a", "F32", ())], WeightsFormatError,
         "tensor 'a' is listed twice"),
        ([TensorSpec("__metadata__", "F32", ())], WeightsFormatError,
         "tensor name '__metadata__' cannot be stored"),
        ([TensorSpec("a", "F32", (-1,))], WeightsFormatError,
         "tensor 'a': shape (-1,) must be a tuple of ints >= 0"),
        ([TensorSpec("a", "F32", [2])], WeightsFormatError,  # type: ignore[arg-type]
         "tensor 'a': shape [2] must be a tuple of ints >= 0"),
        ([TensorSpec("a", "F4", (2,))], UnsupportedDtypeError,
         "tensor 'a': dtype 'F4' is not a supported safetensors dtype"),
        ([TensorSpec("\ud800", "F32", ())], WeightsFormatError,
         "a tensor name is not valid UTF-8: surrogates not allowed"),
    ],
)  # fmt: skip
def test_invalid_specs_are_refused(specs: list[TensorSpec], error: type, message: str) -> None:
    with pytest.raises(error) as info:
        encode_header(specs)
    assert str(info.value).startswith(message)
    with pytest.raises(error):
        write_weights(io.BytesIO(), specs, lambda name: np.zeros(()))


# --- strict parsing: each refusal with its exact message ----------------------------------

F4x2 = b"\x00" * 8


@pytest.mark.parametrize(
    ("member", "message"),
    [
        (b"\x05\x00\x00", "truncated: 3 bytes, shorter than the 8-byte header length"),
        (craft({}, length=100), "truncated: the header needs 108 bytes, the member has 10"),
        (craft({"a": t("F32", [2], 0, 8)}, b"\x00" * 12),
         "4 trailing bytes after the tensor data (header 69 + data 8 = 77, member has 81)"),
        (craft({"a": t("F32", [2], 0, 8)}, b"\x00" * 5),
         "truncated: header 69 + data 8 = 77 bytes, member has 74"),
        (craft({"a": t("F32", [1], 0, 4), "b": t("F32", [1], 8, 12)}, b"\x00" * 12),
         "bytes [4, 8) of the data belong to no tensor (gap before tensor 'b')"),
        (craft({"a": t("F32", [1], 4, 8)}, b"\x00" * 8),
         "bytes [0, 4) of the data belong to no tensor (gap before tensor 'a')"),
        (craft({"a": t("F32", [2], 0, 8), "b": t("F32", [2], 4, 12)}, b"\x00" * 12),
         "tensor 'b' at data_offsets [4, 12] overlaps tensor 'a' at [0, 8]"),
        (craft({"a": t("F32", [2], 0, 8), "b": t("F32", [2], 0, 8)}, F4x2),
         "tensor 'b' aliases tensor 'a': both at data_offsets [0, 8]"),
        (craft({"a": t("F32", [2], 0, 8), "z": t("F32", [0], 4, 4)}, F4x2),
         "tensor 'z' at data_offsets [4, 4] overlaps tensor 'a' at [0, 8]"),
        (craft('{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, "a": {}}', F4x2),
         "duplicate key 'a' in the header JSON"),
        (craft('{"a": {"dtype": "F32", "dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}'),
         "duplicate key 'dtype' in the header JSON"),
        (craft({"a": t("F32", [3], 0, 8)}, F4x2),
         "tensor 'a': shape [3] of F32 needs more than 8 bytes, data_offsets [0, 8] hold 8"),
        (craft({"a": t("F32", [1], 0, 8)}, F4x2),
         "tensor 'a': shape [1] of F32 needs 4 bytes, data_offsets [0, 8] hold 8"),
        (craft({"a": t("F32", [2**62, 2**62], 0, 8)}, F4x2),
         f"tensor 'a': shape [{2**62}, {2**62}] of F32 needs more than 8 bytes, "
         "data_offsets [0, 8] hold 8"),
        (craft([1, 2]), "header must be a JSON object, got array"),
        (craft('"text"'), "header must be a JSON object, got string"),
        (craft("null"), "header must be a JSON object, got null"),
        (craft(b'{"\xff": 1}'), "header is not valid UTF-8 (invalid start byte at byte 10)"),
        (craft("{"), "header is not valid JSON: Expecting property name enclosed in double "
         "quotes (line 1 column 2)"),
        (craft('{"a": NaN}'), "header JSON has the non-standard constant NaN"),
        (craft("[" * 100_000), "header JSON nests too deeply"),
        (craft({"a": t("F32", [-2], 0, 8)}, F4x2),
         "tensor 'a': shape must be a list of integers >= 0, got [-2]"),
        (craft({"a": t("F32", [2.0], 0, 8)}, F4x2),
         "tensor 'a': shape must be a list of integers >= 0, got [2.0]"),
        (craft({"a": t("F32", [True, 2], 0, 8)}, F4x2),
         "tensor 'a': shape must be a list of integers >= 0, got [true, 2]"),
        (craft({"a": {"dtype": "F32", "shape": "2", "data_offsets": [0, 8]}}, F4x2),
         "tensor 'a': shape must be a list of integers >= 0, got \"2\""),
        (craft({"a": t("F32", [2], -8, 0)}),
         "tensor 'a': data_offsets must be [begin, end] with 0 <= begin <= end, got [-8, 0]"),
        (craft({"a": t("F32", [2], 8, 0)}),
         "tensor 'a': data_offsets must be [begin, end] with 0 <= begin <= end, got [8, 0]"),
        (craft({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8, 8]}}, F4x2),
         "tensor 'a': data_offsets must be [begin, end] with 0 <= begin <= end, got [0, 8, 8]"),
        (craft({"a": {"dtype": 7, "shape": [2], "data_offsets": [0, 8]}}, F4x2),
         "tensor 'a': dtype must be a string, got number"),
        (craft({"a": [0, 8]}, F4x2),
         "tensor 'a': expected an object with dtype, shape and data_offsets, got array"),
        (craft({"a": {"dtype": "F32", "shape": [2]}}, F4x2),
         "tensor 'a': keys must be exactly data_offsets, dtype, shape (missing "
         "['data_offsets'], unexpected [])"),
        (craft({"a": {**t("F32", [2], 0, 8), "offset": 0}}, F4x2),
         "tensor 'a': keys must be exactly data_offsets, dtype, shape (missing [], "
         "unexpected ['offset'])"),
        (craft({"__metadata__": ["x"]}), "__metadata__ must be an object of strings, got array"),
        (craft({"__metadata__": {"round": 3}}),
         "__metadata__['round'] must be a string, got number"),
    ],
)  # fmt: skip
def test_parse_header_refuses(member: bytes, message: str) -> None:
    assert refusal(member) == f"{M}: {message}"
    with pytest.raises(WeightsFormatError):
        WeightsReader(member)


def test_parse_header_refuses_integers_too_long_to_convert() -> None:
    message = refusal(craft('{"a": ' + "9" * 5000 + "}"))
    assert message.startswith(f"{M}: header is not valid JSON: Exceeds the limit (4300 digits)")


def test_parse_header_refuses_unknown_dtype() -> None:
    with pytest.raises(UnsupportedDtypeError) as info:
        parse_header(craft({"a": t("F4", [2], 0, 1)}, b"\x00"))
    assert str(info.value).startswith(
        f"{M}: tensor 'a': dtype 'F4' is not a supported safetensors dtype (expected one of BOOL"
    )


def test_limits_apply_before_allocating(tmp_path: Path) -> None:
    huge = (2**63).to_bytes(8, "little") + b"{}"
    with pytest.raises(LimitExceededError) as info:
        parse_header(huge)
    assert str(info.value) == (
        f"{M}: header length {2**63} bytes exceeds the limit of {32 * 2**20} "
        "(Limits.max_header_bytes)"
    )
    path = tmp_path / "huge.safetensors"
    path.write_bytes(huge)
    fd = os.open(path, os.O_RDONLY)
    try:
        with pytest.raises(LimitExceededError, match=f"header length {2**63} bytes exceeds"):
            WeightsReader(fd, 0, len(huge))  # refused after reading 8 bytes
    finally:
        os.close(fd)
    member, _ = write_member({"a": np.zeros(1), "b": np.zeros(2), "c": np.zeros(3)})
    with pytest.raises(LimitExceededError) as info:
        parse_header(member, Limits(max_tensors=2))
    assert str(info.value) == f"{M}: 3 tensors exceed the limit of 2 (Limits.max_tensors)"
    with pytest.raises(LimitExceededError, match="exceeds the limit of 64"):
        WeightsReader(member, limits=Limits(max_header_bytes=64))
    assert len(parse_header(member, Limits(max_tensors=3))[0]) == 3


def test_metadata_and_shared_empty_offsets_are_accepted() -> None:
    member = craft(
        {"__metadata__": {"k": "v"}, "e": t("F32", [0], 0, 0), "f": t("U8", [0, 2], 0, 0),
         "a": t("U8", [2], 0, 2), "z": t("I8", [0], 2, 2)},
        b"\x01\x02",
    )  # fmt: skip
    entries, _, _ = parse_header(member)
    assert [e.name for e in entries] == ["e", "f", "a", "z"]
    assert entries[2] == TensorEntry("a", "U8", (2,), 0, 2)
    assert WeightsReader(member).read_all(None)["a"].tolist() == [1, 2]


def test_truncation_at_every_byte_is_a_format_error(tmp_path: Path) -> None:
    member, _ = write_member(SAMPLE)
    path = tmp_path / "cut.safetensors"
    for cut in range(len(member)):
        with pytest.raises(WeightsFormatError, match="truncated"):
            parse_header(member[:cut])
        with pytest.raises(WeightsFormatError, match="truncated"):
            WeightsReader(member[:cut], 0, cut)
        path.write_bytes(member[:cut])
        fd = os.open(path, os.O_RDONLY)
        try:
            with pytest.raises(WeightsFormatError, match="truncated"):
                WeightsReader(fd, 0, len(member))  # container claims the full size
        finally:
            os.close(fd)


# --- fuzzing ------------------------------------------------------------------------------

VALID, _ = write_member(SAMPLE)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=200), st.binary(max_size=40))
def test_fuzz_header_bytes_raise_only_our_errors(body: bytes, data: bytes) -> None:
    member = craft(body, data)
    try:
        parse_header(member)
        WeightsReader(member).read_all(None)
    except OUR_ERRORS:
        pass


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=5),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=4)
    ),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(["a", "b", "__metadata__"]), json_values, max_size=3),
       st.binary(max_size=24))  # fmt: skip
def test_fuzz_json_headers_raise_only_our_errors(header: dict[str, Any], data: bytes) -> None:
    member = craft(json.dumps(header), data)
    try:
        WeightsReader(member).read_all(None)
    except OUR_ERRORS:
        pass


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(0, len(VALID) - 1), st.integers(0, 255)), min_size=1,
                max_size=4))  # fmt: skip
def test_fuzz_mutated_member_raises_only_our_errors(edits: list[tuple[int, int]]) -> None:
    member = bytearray(VALID)
    for index, value in edits:
        member[index] = value
    try:
        reader = WeightsReader(bytes(member))
        reader.read_all(None)
    except OUR_ERRORS:
        pass


tensor_infos = st.fixed_dictionaries(
    {
        "dtype": st.sampled_from([*DTYPES, "F4", "bf16", ""]),
        "shape": st.lists(st.integers(0, 4), max_size=3),
        "data_offsets": st.lists(st.integers(0, 40), min_size=2, max_size=2),
    }
)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from("abcd"), tensor_infos, max_size=4), st.binary(max_size=40))
def test_fuzz_tensor_layouts_raise_only_our_errors(header: dict[str, Any], data: bytes) -> None:
    member = craft(header, data)
    try:
        entries, start, _ = parse_header(member)
    except OUR_ERRORS:
        return
    loaded = WeightsReader(member).read_all(None)  # a layout that parses must read back
    for entry in entries:
        assert loaded[entry.name].tobytes() == member[start + entry.begin : start + entry.end]


@pytest.mark.parametrize(
    ("shape", "message"),
    [([0, 2**70], "larger than 2**63 - 1"), ([0] * 65, "65 dimensions, more than numpy's 64")],
)
def test_parse_header_refuses_shapes_numpy_cannot_hold(shape: list[int], message: str) -> None:
    header = json.dumps({"a": {"dtype": "F32", "shape": shape, "data_offsets": [0, 0]}}).encode()
    member = struct.pack("<Q", len(header)) + header
    with pytest.raises(WeightsFormatError, match=re.escape(message)):
        WeightsReader(member, 0, len(member)).read_all(None)


@pytest.mark.parametrize("workers", [1, 2])
def test_read_all_of_a_multi_mib_member_checks_every_digest_on_any_thread_count(
    workers: int,
) -> None:
    # big enough for the threaded path (> 1 MiB in all), with a small tensor batched too
    arrays = {
        "big:w": np.arange(600_000, dtype=np.float32).reshape(600, 1000),
        "big:b": np.arange(1000, dtype=np.float32),
        "other:w": -np.arange(300_000, dtype=np.float32),
    }
    member, written = write_member(arrays)
    loaded = WeightsReader(member).read_all(written.tensor_digests, workers=workers)
    assert all(same(loaded[name], value) for name, value in arrays.items())
    entries, start, _ = parse_header(member)
    flipped = bytearray(member)
    for name in ("big:w", "other:w"):
        entry = next(e for e in entries if e.name == name)
        flipped[start + entry.begin + 12345] ^= 0x10
    with pytest.raises(DigestMismatchError, match=r"2 tensor\(s\) do not match"):
        WeightsReader(bytes(flipped)).read_all(written.tensor_digests, workers=workers)
