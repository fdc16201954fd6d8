"""Tests for hkstore.store._archive through its public entry points (no jax in this module).

``open_archive`` (from bytes and from a path), ``Archive.verify``, ``Archive.tensor``,
``Archive.functions`` (the trust gate) and ``Archive.copy_with_signature``, over archives built
with ``write_archive`` from numpy arrays. Each attack of issue 3's "Bad input" list is refused
here with the specific ``HkstoreError`` subclass and a message naming the fault; attacks on
code (pickles, references) use canaries that would prove execution. The same attacks through
``hkstore.load``/``loads`` are in ``test_serialization.py``; the store modules' own unit tests
(container, weights, manifest, zstd, signing, trust, functions) are not repeated here.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import itertools
import pickle
import re
import struct
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import fnrefs
import numpy as np
import pytest
import safetensors.numpy
from helpers_archives import (
    FUNCTIONS,
    NO_FUNCTIONS,
    WEIGHTS,
    WEIGHTS_ZST,
    archive_bytes,
    archive_members,
    default_tensors,
    hand_weights,
    make_content,
    malicious_pickle,
    manifest_document,
    pickle_archive,
    repack,
    with_manifest,
    with_weights_member,
    with_zstd_weights,
    zstd_frame,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from hkstore.errors import (
    ArchiveFormatError,
    ContainerError,
    DigestMismatchError,
    HkstoreError,
    LimitExceededError,
    ManifestError,
    RefusedCodeError,
    RuntimeMismatchError,
    SignatureError,
    UnsafeTrustWarning,
    UnsupportedDtypeError,
    UnsupportedVersionError,
    UntrustedKeyError,
    WeightsFormatError,
)
from hkstore.store import Archive, Ed25519Signer, HmacKey, Trust, open_archive
from hkstore.store._container import read_container
from hkstore.store._dtypes import DTYPES
from hkstore.store._functions import pickle_functions

# --- helpers ----------------------------------------------------------------------------------


def raw(array: np.ndarray) -> np.ndarray:
    """The array's bytes as a flat uint8 array (works for 0-d and zero-size arrays)."""
    return np.ascontiguousarray(array).reshape(-1).view(np.uint8)


def same_bytes(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and np.array_equal(raw(a), raw(b))


def exactly(message: str) -> str:
    """A ``match`` pattern for exactly ``message`` (the whole error text is pinned)."""
    return f"^{re.escape(message)}$"


@contextlib.contextmanager
def refused(cls: type[HkstoreError], match: str) -> Iterator[pytest.ExceptionInfo[Any]]:
    """``pytest.raises`` that also requires exactly ``cls`` (not a subclass or a parent)."""
    with pytest.raises(cls, match=match) as info:
        yield info
    assert type(info.value) is cls, f"{type(info.value).__name__}: {info.value}"


Opener = Callable[[bytes], Archive]


@pytest.fixture(params=["bytes", "path"])
def open_from(request: pytest.FixtureRequest, tmp_path: Path) -> Opener:
    """``open_archive`` over the bytes themselves, or over a file holding them (mmap + fd)."""
    counter = itertools.count()

    def opener(data: bytes) -> Archive:
        if request.param == "bytes":
            return open_archive(data)
        path = tmp_path / f"input-{next(counter)}.hkz"
        path.write_bytes(data)
        return open_archive(path)

    return opener


def verify(open_from: Opener, data: bytes, trust: Trust | None = None) -> None:
    with open_from(data) as archive:
        archive.verify(trust)


def functions(open_from: Opener, data: bytes, trust: Trust) -> dict[str, Any]:
    with open_from(data) as archive:
        return archive.functions(trust)


@pytest.fixture()
def key() -> HmacKey:
    return HmacKey.generate()


@pytest.fixture()
def canary(tmp_path: Path) -> Path:
    """A path that a hostile payload would create (each test asserts it stays absent)."""
    return tmp_path / "canary"


def two_tensors() -> dict[str, np.ndarray]:
    return {"a": np.arange(2, dtype=np.float32), "b": np.arange(3, dtype=np.int64)}


# --- round trips ------------------------------------------------------------------------------

_NAMES = st.text(st.characters(codec="utf-8"), min_size=1, max_size=12).filter(
    lambda name: name != "__metadata__"
)
_SHAPES = st.lists(st.integers(0, 3), max_size=3).map(tuple)


@st.composite
def _tensors(draw: st.DrawFn) -> dict[str, np.ndarray]:
    names = draw(st.lists(_NAMES, min_size=1, max_size=6, unique=True))
    out = {}
    for name in names:
        code = draw(st.sampled_from(sorted(DTYPES)))
        shape = draw(_SHAPES)
        dtype = DTYPES[code].dtype
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        data = np.frombuffer(draw(st.binary(min_size=nbytes, max_size=nbytes)), np.uint8)
        if code == "BOOL":
            data = np.bitwise_and(data, np.uint8(1))
        out[name] = data.copy().view(dtype).reshape(shape)
    return out


@settings(max_examples=60, deadline=None)
@given(
    tensors=_tensors(),
    picks=st.lists(st.booleans(), min_size=6, max_size=6),
    compression=st.sampled_from([None, "zstd"]),
    seed=st.none() | st.integers(-(2**63), 2**63 - 1),
)
def test_write_open_round_trip_is_bit_exact(
    tensors: dict[str, np.ndarray], picks: list[bool], compression: str | None, seed: int | None
) -> None:
    trainable = [name for name, pick in zip(tensors, picks, strict=False) if pick]
    content = make_content(tensors, trainable=trainable, seed=seed, functions=NO_FUNCTIONS,
                           metadata={"round": 3, "names": list(tensors)})
    data = archive_bytes(content, compression=compression)
    with open_archive(data) as archive:
        assert archive.names() == list(tensors)
        assert archive.trainable_names() == trainable
        assert archive.manifest.seed == seed
        assert archive.manifest.metadata == {"round": 3, "names": list(tensors)}
        loaded = archive.read_weights()
        assert set(loaded) == set(tensors)  # (data order: zero-size tensors share offsets)
        for name, array in tensors.items():
            assert same_bytes(loaded[name], array), name
            assert same_bytes(archive.tensor(name), array), name
        report = archive.verify()
        assert report.tensors == len(tensors)
    # writing the same content again gives the same bytes (canonical manifest, fixed layout)
    assert archive_bytes(content, compression=compression) == data


def test_special_dtypes_and_shapes_round_trip(open_from: Opener) -> None:
    import ml_dtypes

    tensors = {
        "bf16": np.array([1.5, -2.0, np.inf], dtype=ml_dtypes.bfloat16),
        "e4m3": np.array([[0.5, -448.0]], dtype=ml_dtypes.float8_e4m3fn),
        "e5m2": np.array([np.nan], dtype=ml_dtypes.float8_e5m2),
        "scalar": np.array(7, dtype=np.int16),
        "empty": np.zeros((0, 3), dtype=np.float32),
        "bool": np.array([True, False, True]),
    }
    with open_from(archive_bytes(make_content(tensors, functions=NO_FUNCTIONS))) as archive:
        loaded = archive.read_weights()
        for name, array in tensors.items():
            assert same_bytes(loaded[name], array), name
        assert archive.manifest.tensors[3].shape == ()
        assert archive.tensor("empty").shape == (0, 3)


def test_tensor_reads_one_tensor_and_checks_only_its_digest(open_from: Opener) -> None:
    tensors = two_tensors()
    data = bytearray(archive_bytes(make_content(tensors, functions=NO_FUNCTIONS)))
    at = bytes(data).find(tensors["b"].tobytes())
    data[at] ^= 0x10  # corrupt "b" only
    with open_from(bytes(data)) as archive:
        assert same_bytes(archive.tensor("a"), tensors["a"])
        with refused(DigestMismatchError, "'b': expected"):
            archive.tensor("b")
        flipped = archive.tensor("b", verify=False)
        assert flipped[0] == tensors["b"][0] ^ 0x10
        with pytest.raises(KeyError, match="'c' is not in the archive"):
            archive.tensor("c")


def test_zstd_weights_round_trip(open_from: Opener) -> None:
    tensors = {"w": np.zeros((64, 64), np.float32), "b": np.arange(64, dtype=np.float32)}
    data = archive_bytes(make_content(tensors, functions=NO_FUNCTIONS), compression="zstd")
    assert set(archive_members(data)) == {WEIGHTS_ZST, "manifest.json"}
    assert len(data) < tensors["w"].nbytes  # zeros compress
    with open_from(data) as archive:
        assert archive.manifest.weights.compression == "zstd"
        loaded = archive.read_weights()
        assert all(same_bytes(loaded[n], a) for n, a in tensors.items())
        assert same_bytes(archive.tensor("b"), tensors["b"])


def test_weights_member_is_plain_safetensors(tmp_path: Path) -> None:
    tensors = {"mlp/~/linear_0:w": np.arange(12, dtype=np.float32).reshape(3, 4),
               "mlp/~/linear_0:b": np.arange(4, dtype=np.int32), "scalar": np.array(2.5)}
    member = archive_members(archive_bytes(make_content(tensors)))[WEIGHTS]
    (tmp_path / "w.safetensors").write_bytes(member)
    loaded = safetensors.numpy.load_file(tmp_path / "w.safetensors")
    assert set(loaded) == set(tensors)
    assert all(same_bytes(loaded[n], a) for n, a in tensors.items())


# --- signing ----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["ed25519", "hmac"])
def test_signed_archive_verifies_with_the_signers_key(open_from: Opener, kind: str) -> None:
    signer: Any = Ed25519Signer.generate() if kind == "ed25519" else HmacKey.generate()
    public = signer.verifier() if kind == "ed25519" else signer
    data = archive_bytes(signer=signer)
    with open_from(data) as archive:
        assert archive.signature_key_id == signer.key_id
        report = archive.verify(Trust(keys=[public], require_signature=True))
        assert report.signed_by == signer.key_id
        assert report.members == ("manifest.json", WEIGHTS, "signature.json")
        # without keys the signature is not checked (and not claimed as verified)
        assert archive.verify().signed_by is None
    wrong: Any = Ed25519Signer.generate().verifier() if kind == "ed25519" else HmacKey.generate()
    with refused(UntrustedKeyError, "not a trusted key"):
        verify(open_from, data, Trust(keys=[wrong]))


def test_verify_requires_a_signature_when_asked(open_from: Opener, key: HmacKey) -> None:
    with refused(
        SignatureError, "archive is unsigned, but the trust policy requires a signature"
    ):
        verify(open_from, archive_bytes(), Trust(keys=[key], require_signature=True))


def test_copy_with_signature_resigns_and_copies_members_exactly(key: HmacKey) -> None:
    old = Ed25519Signer.generate()
    data = archive_bytes(signer=old, compression="zstd")
    out = io.BytesIO()
    with open_archive(data) as archive:
        archive.copy_with_signature(out, key)
    copied = out.getvalue()
    before, after = archive_members(data), archive_members(copied)
    assert list(after) == list(before)
    assert {n: b for n, b in after.items() if n != "signature.json"} == {
        n: b for n, b in before.items() if n != "signature.json"
    }
    with open_archive(copied) as archive:
        assert archive.verify(Trust(keys=[key], require_signature=True)).signed_by == key.key_id
        with refused(UntrustedKeyError, f"signed by {key.key_id}"):
            archive.verify(Trust(keys=[old]))
        name = "mlp/~/linear_1:b"
        assert same_bytes(archive.tensor(name), default_tensors()[name])


# --- bad input: truncation and bit flips ------------------------------------------------------


def small_signed_archive(key: HmacKey, *, compression: str | None = None) -> bytes:
    """Every member kind: weights, a (benign) pickle, manifest, signature; a few KiB."""
    raw_pickle = pickle.dumps({"model": None, "loss": None})
    return archive_bytes(
        make_content(two_tensors(), pickle_blob=zstd_frame(raw_pickle),
                     pickle_raw_size=len(raw_pickle)),
        signer=key,
        compression=compression,
    )


@pytest.mark.parametrize("compression", [None, "zstd"])
def test_open_archive_rejects_truncation_at_every_byte(
    open_from: Opener, key: HmacKey, compression: str | None
) -> None:
    data = small_signed_archive(key, compression=compression)
    verify(open_from, data, Trust(keys=[key], require_signature=True))  # whole: fine
    for length in range(len(data)):
        # (length 0 from a path is an empty file: refused as such)
        with refused(ContainerError, "truncated|empty file"):
            verify(open_from, data[:length], Trust(keys=[key]))


@pytest.mark.parametrize("member", [WEIGHTS, FUNCTIONS, "manifest.json"])
def test_verify_rejects_member_truncated_at_every_byte(key: HmacKey, member: str) -> None:
    """A shorter member inside a valid container (CRC, sizes and, for the weights, the
    manifest's size updated): still refused, whatever the cut."""
    data = small_signed_archive(key)
    members = archive_members(data)
    allowed: tuple[type[HkstoreError], ...] = {
        WEIGHTS: (WeightsFormatError,),
        FUNCTIONS: (ContainerError,),  # its size is in the manifest, which the signature covers
        "manifest.json": (ManifestError,),
    }[member]
    for length in range(len(members[member])):
        cut = {**members, member: members[member][:length]}
        if member == WEIGHTS:
            document = manifest_document(data)
            document["weights"]["size"] = length
            candidate = with_manifest(data, document, members={WEIGHTS: cut[WEIGHTS]})
        else:
            candidate = repack(cut)
        with pytest.raises(allowed) as info:
            with open_archive(candidate) as archive:
                archive.verify()
        assert "truncated" in str(info.value) or member in str(info.value), str(info.value)


def _member_regions(data: bytes) -> dict[str, tuple[int, int]]:
    return {n: (m.data_offset, m.data_offset + m.size) for n, m in read_container(data).items()}


@pytest.mark.parametrize("compression", [None, "zstd"])
def test_verify_rejects_a_bit_flip_in_every_member(
    open_from: Opener, key: HmacKey, compression: str | None
) -> None:
    data = small_signed_archive(key, compression=compression)
    trust = Trust(keys=[key], require_signature=True)
    tensors = two_tensors()
    with open_archive(data) as archive:
        header_end = archive._weights_reader().header_size if compression is None else 0
    for name, (start, end) in _member_regions(data).items():
        for at in range(start, end):
            corrupt = bytearray(data)
            corrupt[at] ^= 1 << (at % 8)
            with pytest.raises(HkstoreError) as info:
                verify(open_from, bytes(corrupt), trust)
            error, message = info.value, str(info.value)
            if name in ("manifest.json", "signature.json"):
                # the container checks these two members' CRC-32 before reading them
                assert type(error) is ContainerError and f"member {name!r}" in message
            elif name == WEIGHTS and at - start >= header_end:
                tensor = "a" if at - start - header_end < tensors["a"].nbytes else "b"
                assert type(error) is DigestMismatchError, message
                assert f"{name}: 1 tensor(s) do not match" in message
                assert f"{tensor!r}: expected" in message
            elif name == WEIGHTS:  # the safetensors header: malformed, or its digest differs
                assert type(error) in (WeightsFormatError, DigestMismatchError,
                                       UnsupportedDtypeError, LimitExceededError), message
                assert name in message
            else:  # weights.safetensors.zst, functions.pkl.zst: the member digest
                assert type(error) is DigestMismatchError, message
                assert message.startswith(f"member {name!r}: sha256 ")


@pytest.mark.parametrize("member", ["manifest.json", "signature.json"])
def test_verify_rejects_a_bit_flip_behind_a_recomputed_crc(key: HmacKey, member: str) -> None:
    """A tamperer who also fixes the ZIP CRC: the manifest's strict parse and canonical form,
    then the signature, catch every flip. (An unsigned archive has only the CRC: a flip
    inside its data_info or metadata behind a recomputed CRC is a different, valid manifest;
    that is what signatures are for.)"""
    data = small_signed_archive(key)
    members = archive_members(data)
    # ContainerError: the flip changed a member size the manifest records
    allowed = (ManifestError, UnsupportedVersionError, ContainerError, SignatureError)
    for at in range(len(members[member])):
        flipped = bytearray(members[member])
        flipped[at] ^= 1 << (at % 8)
        with pytest.raises(allowed) as info:
            verify(open_archive, repack({**members, member: bytes(flipped)}), Trust(keys=[key]))
        assert member in str(info.value) or "manifest" in str(info.value), str(info.value)


def _zip_header_bytes(data: bytes) -> Iterator[tuple[str, int]]:
    """(record, offset) of every ZIP header byte that carries meaning: local headers, central
    directory entries and the end record. Left out are ZIP bookkeeping fields the reader
    accepts within bounds -- version made by / needed (<= 4.5), internal and DOS/Unix
    permission attributes, the padding field's alignment value -- which change no byte of what
    is read (see the report of issue 3's tests)."""
    members = read_container(data)
    for name, m in members.items():
        name_len, extra_len = struct.unpack_from("<HH", data, m.header_offset + 26)
        skip = {m.header_offset + 4}  # version needed, low byte
        pos = m.header_offset + 30 + name_len
        while pos < m.header_offset + 30 + name_len + extra_len:
            field, size = struct.unpack_from("<HH", data, pos)
            if field == 0xD935:  # padding: u16 alignment, then zeros (the zeros are checked)
                skip |= {pos + 4, pos + 5}
            pos += 4 + size
        for at in range(m.header_offset, m.data_offset):
            if at not in skip:
                yield f"local header of {name}", at
    at = max(m.data_offset + m.size for m in members.values())
    while data[at : at + 4] == b"PK\x01\x02":
        size = 46 + sum(struct.unpack_from("<HHH", data, at + 28))
        skip = {at + i for i in (4, 5, 6, 36, 37, 38, 39, 40, 41)}
        for offset in range(at, at + size):
            if offset not in skip:
                yield "central directory", offset
        at += size
    for offset in range(at, len(data)):
        yield "end record", offset


def test_verify_rejects_a_bit_flip_in_zip_headers(key: HmacKey) -> None:
    data = small_signed_archive(key)
    checked = 0
    for what, at in _zip_header_bytes(data):
        for bit in range(8):
            corrupt = bytearray(data)
            corrupt[at] ^= 1 << bit
            # ContainerError, or its subclass for another container version (the magic)
            with pytest.raises(ContainerError, match=r"^container[: ]") as info:
                verify(open_archive, bytes(corrupt), Trust(keys=[key]))
            if what == "end record" and isinstance(info.value, UnsupportedVersionError):
                assert "this reader implements 'hkstore/1' only" in str(info.value)
            else:
                assert type(info.value) is ContainerError, (what, at, bit, str(info.value))
            checked += 1
    assert checked > 8 * 300


# --- bad input: the weights member against the manifest ---------------------------------------


def test_verify_rejects_manifest_header_mismatch(open_from: Opener) -> None:
    data = archive_bytes(make_content({"w": np.arange(6, dtype=np.float32).reshape(2, 3)},
                                      functions=NO_FUNCTIONS))
    document = manifest_document(data)
    document["tensors"][0]["shape"] = [3, 2]  # the header (and its digest) still say [2, 3]
    with open_from(with_manifest(data, document)) as archive:
        assert archive.manifest.tensors[0].shape == (3, 2)  # opening reads no tensor
        with refused(WeightsFormatError, exactly(
            "weights member disagrees with the manifest (1 problem(s)): tensor 'w': weights "
            "member has F32[2, 3], manifest has F32[3, 2]"
        )):
            archive.verify()
        with refused(WeightsFormatError, "tensor 'w'"):
            archive.tensor("w")


def test_verify_names_every_manifest_header_mismatch(open_from: Opener) -> None:
    data = archive_bytes(make_content(two_tensors(), functions=NO_FUNCTIONS, trainable=["a"]))
    document = manifest_document(data)
    document["tensors"][0].update(dtype="F64", shape=[1])  # 'a': F32[2] in the header
    document["tensors"][1]["name"] = "c"  # 'b' in the header
    with refused(
        WeightsFormatError,
        exactly(
            "weights member disagrees with the manifest (3 problem(s)): tensor 'c' is in the "
            "manifest but not in the weights member; tensor 'b' is in the weights member but "
            "not in the manifest; tensor 'a': weights member has F32[2], manifest has F64[1]"
        ),
    ):
        verify(open_from, with_manifest(data, document))


_F32x2 = {"dtype": "F32", "shape": [2]}


@pytest.mark.parametrize(
    ("offsets", "data_len", "message"),
    [
        ({"a": [0, 8], "b": [4, 12]}, 12,
         "tensor 'b' at data_offsets [4, 12] overlaps tensor 'a' at [0, 8]"),
        ({"a": [0, 8], "b": [12, 20]}, 20,
         "bytes [8, 12) of the data belong to no tensor (gap before tensor 'b')"),
        ({"a": [4, 12], "b": [12, 20]}, 20,
         "bytes [0, 4) of the data belong to no tensor (gap before tensor 'a')"),
        ({"a": [0, 8], "b": [0, 8]}, 8,
         "tensor 'b' aliases tensor 'a': both at data_offsets [0, 8]"),
    ],
    ids=["overlap", "gap", "leading-gap", "alias"],
)
def test_verify_rejects_overlapping_or_gapped_tensor_ranges(
    open_from: Opener, offsets: dict[str, list[int]], data_len: int, message: str
) -> None:
    data = archive_bytes(make_content({"a": np.zeros(2, np.float32), "b": np.ones(2, np.float32)},
                                      functions=NO_FUNCTIONS))
    header = {name: {**_F32x2, "data_offsets": span} for name, span in offsets.items()}
    hostile = with_weights_member(data, hand_weights(header, bytes(data_len)))
    with refused(
        WeightsFormatError, exactly(f"{WEIGHTS}: {message}")
    ):
        verify(open_from, hostile)


def test_hand_written_weights_member_is_accepted(open_from: Opener) -> None:
    """The control for the hostile members above: the same construction, tiled exactly."""
    tensors = {"a": np.zeros(2, np.float32), "b": np.ones(2, np.float32)}
    data = archive_bytes(make_content(tensors, functions=NO_FUNCTIONS))
    header = {"a": {**_F32x2, "data_offsets": [0, 8]}, "b": {**_F32x2, "data_offsets": [8, 16]}}
    member = hand_weights(header, tensors["a"].tobytes() + tensors["b"].tobytes())
    with open_from(with_weights_member(data, member)) as archive:
        assert archive.verify().tensors == 2


# --- bad input: duplicate keys, huge sizes, zstd frames ------------------------------------------


def test_verify_rejects_duplicate_keys_in_manifest(open_from: Opener) -> None:
    data = archive_bytes()
    manifest = archive_members(data)["manifest.json"]
    assert manifest.startswith(b'{"data_info":')
    hostile = with_manifest(data, b'{"seed":1,' + manifest[1:])  # "seed":0 comes later
    with refused(ManifestError, exactly("manifest.json: duplicate key 'seed' in the object at $")):
        open_from(hostile)


def test_verify_rejects_duplicate_keys_in_weights_header(open_from: Opener) -> None:
    data = archive_bytes(make_content({"a": np.zeros(2, np.float32)}, functions=NO_FUNCTIONS))
    body = b'{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},' \
           b'"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}'
    member = len(body).to_bytes(8, "little") + body + bytes(8)
    with refused(
        WeightsFormatError, exactly(f"{WEIGHTS}: duplicate key 'a' in the header JSON")
    ):
        verify(open_from, with_weights_member(data, member))


def test_verify_rejects_duplicate_keys_in_signature(open_from: Opener, key: HmacKey) -> None:
    data = archive_bytes(signer=key)
    members = archive_members(data)
    signature = members["signature.json"]
    members["signature.json"] = b'{"version":1,' + signature[1:]
    with refused(SignatureError, "duplicate key 'version'"):
        verify(open_from, repack(members), Trust(keys=[key]))


def test_verify_rejects_huge_header_length_prefix(open_from: Opener) -> None:
    data = archive_bytes(make_content({"a": np.zeros(2, np.float32)}, functions=NO_FUNCTIONS))
    header = {"a": {**_F32x2, "data_offsets": [0, 8]}}
    hostile = with_weights_member(data, hand_weights(header, bytes(8), length=2**62))
    with refused(LimitExceededError, exactly(
        f"{WEIGHTS}: header length {2**62} bytes exceeds the limit of {32 << 20} "
        "(Limits.max_header_bytes)"
    )):
        verify(open_from, hostile)


def test_verify_rejects_huge_shape_in_weights_header(open_from: Opener) -> None:
    data = archive_bytes(make_content({"a": np.zeros(2, np.float32)}, functions=NO_FUNCTIONS))
    header = {"a": {"dtype": "F32", "shape": [2**40, 2**40], "data_offsets": [0, 8]}}
    with refused(
        WeightsFormatError,
        exactly(f"{WEIGHTS}: tensor 'a': shape [{2**40}, {2**40}] of F32 needs more than 8 "
                "bytes, data_offsets [0, 8] hold 8"),
    ):
        verify(open_from, with_weights_member(data, hand_weights(header, bytes(8))))


def test_open_archive_rejects_huge_declared_member_size(open_from: Opener) -> None:
    data = archive_bytes()
    document = manifest_document(data)
    size = document["weights"]["size"]
    document["weights"]["size"] = 2**62
    with refused(ContainerError, exactly(
        f"member {WEIGHTS!r}: size {size} in the container, {2**62} in the manifest"
    )):
        open_from(with_manifest(data, document))


def test_verify_rejects_huge_raw_size_of_zstd_weights(open_from: Opener) -> None:
    data = archive_bytes(compression="zstd")
    document = manifest_document(data)
    document["weights"]["raw_size"] = 2**62
    with refused(
        LimitExceededError,
        exactly(f"member {WEIGHTS_ZST!r}: declared size {2**62} bytes is more than the limit "
                f"of {256 << 30} bytes"),
    ):
        verify(open_from, with_manifest(data, document))


def _weights_raw(data: bytes) -> bytes:
    import zstandard

    return zstandard.ZstdDecompressor().decompress(archive_members(data)[WEIGHTS_ZST])


# (frame's recorded content size, size the manifest declares) -> error; n is the real size.
_FRAMES: list[tuple[str, Callable[[int], tuple[int | str, int]], type[HkstoreError], str]] = [
    ("unknown", lambda n: ("unknown", n), ArchiveFormatError,
     "zstd frame does not record its content size; refused"),
    ("lying-small", lambda n: (n - 8, n - 8), ArchiveFormatError,
     "corrupt zstd frame ("),
    ("lying-large", lambda n: (n + 64, n + 64), ArchiveFormatError,
     "corrupt zstd frame ("),
    ("over-declared", lambda n: (n + 64, n), LimitExceededError,
     "more than the {declared} bytes declared for it"),
    ("under-declared", lambda n: (n, n + 64), ArchiveFormatError,
     "but {declared} bytes are declared for it"),
]


@pytest.mark.parametrize(("case", "sizes", "error", "message"), _FRAMES,
                         ids=[case[0] for case in _FRAMES])
def test_verify_rejects_zstd_weights_frame_with_unknown_or_lying_size(
    open_from: Opener, case: str, sizes: Callable[[int], tuple[int | str, int]],
    error: type[HkstoreError], message: str,
) -> None:
    data = archive_bytes(make_content(two_tensors(), functions=NO_FUNCTIONS), compression="zstd")
    raw_weights = _weights_raw(data)
    recorded, declared = sizes(len(raw_weights))
    frame = zstd_frame(raw_weights, content_size=recorded)  # type: ignore[arg-type]
    with refused(
        error, f"^member {WEIGHTS_ZST!r}: .*" + re.escape(message.format(declared=declared))
    ):
        verify(open_from, with_zstd_weights(data, frame, raw_size=declared))


# --- bad input: pickled functions (canaries) ---------------------------------------------------

def signed_pickle_trust(key: HmacKey) -> Trust:
    return Trust(allow_pickle=True, keys=[key])


@pytest.mark.parametrize(("case", "sizes", "error", "message"), _FRAMES,
                         ids=[case[0] for case in _FRAMES])
def test_functions_rejects_pickle_frame_with_unknown_or_lying_size(
    open_from: Opener, key: HmacKey, canary: Path, case: str,
    sizes: Callable[[int], tuple[int | str, int]], error: type[HkstoreError], message: str,
) -> None:
    """Signed by the trusted key, so every trust check passes: the frame checks alone stop it."""
    payload = malicious_pickle(canary)
    recorded, declared = sizes(len(payload))
    frame = zstd_frame(payload, content_size=recorded)  # type: ignore[arg-type]
    data = pickle_archive(payload, signer=key, frame=frame, raw_size=declared)
    pattern = f"^{FUNCTIONS}: .*" + re.escape(message.format(declared=declared))
    with refused(error, pattern):
        functions(open_from, data, signed_pickle_trust(key))
    with refused(error, pattern):
        verify(open_from, data, Trust(keys=[key]))
    assert not canary.exists()


def test_functions_rejects_huge_raw_size_of_pickle(
    open_from: Opener, key: HmacKey, canary: Path
) -> None:
    data = pickle_archive(malicious_pickle(canary), signer=key, raw_size=2**40)
    message = exactly(f"{FUNCTIONS}: declared size {2**40} bytes is more than the limit of "
                      f"{256 << 20} bytes")
    with refused(LimitExceededError, message):
        functions(open_from, data, signed_pickle_trust(key))
    with refused(LimitExceededError, message):
        verify(open_from, data, Trust(keys=[key]))
    assert not canary.exists()


def test_canary_pickle_runs_when_the_policy_allows_it(open_from: Opener, canary: Path) -> None:
    """The control for every pickle test here: this payload does create the canary if it is
    ever unpickled, so its absence elsewhere means it was never unpickled."""
    data = pickle_archive(malicious_pickle(canary))
    with pytest.warns(UnsafeTrustWarning), refused(ArchiveFormatError, "expected a dict"):
        functions(open_from, data, Trust(allow_pickle=True, allow_unsigned=True))
    assert canary.exists()


@pytest.mark.parametrize(
    ("trust", "message"),
    [
        (lambda key: Trust(),
         "archive: the functions are pickled and the trust policy does not allow unpickling"),
        (lambda key: Trust(allow_pickle=True),
         "refusing to unpickle the pickled functions: the trust policy lists no keys to verify "
         "a signature with"),
        (lambda key: Trust(allow_pickle=True, keys=[key]),
         "refusing to unpickle the pickled functions: it is not signed by any of the trusted "
         "keys"),
        (lambda key: Trust(modules=["fnrefs"]),
         "archive: the functions are pickled and the trust policy does not allow unpickling"),
    ],
    ids=["weights-only", "allow_pickle", "allow_pickle+keys", "modules"],
)
def test_functions_rejects_unsigned_pickle(
    open_from: Opener, key: HmacKey, canary: Path, trust: Callable[[HmacKey], Trust],
    message: str,
) -> None:
    data = pickle_archive(malicious_pickle(canary))
    with refused(RefusedCodeError, "^" + re.escape(message)):
        functions(open_from, data, trust(key))
    verify(open_from, data)  # the archive itself is intact: only the policy refuses
    assert not canary.exists()


def test_functions_accepts_unsigned_pickle_only_with_allow_unsigned(open_from: Opener) -> None:
    blob, raw_size = pickle_functions({"model": fnrefs.make_closure(1.5), "loss": fnrefs.forward})
    data = archive_bytes(make_content(pickle_blob=blob, pickle_raw_size=raw_size))
    with pytest.warns(UnsafeTrustWarning, match="the trust policy lists no keys to verify"):
        loaded = functions(open_from, data, Trust(allow_pickle=True, allow_unsigned=True))
    assert loaded["model"] is not None and loaded["model"](1.0) == 2.5
    assert loaded["loss"] is fnrefs.forward  # importable functions travel by reference


def test_functions_accepts_pickle_signed_by_a_trusted_key(open_from: Opener) -> None:
    signer = Ed25519Signer.generate()
    blob, raw_size = pickle_functions({"model": fnrefs.make_closure(1.5), "loss": None})
    data = archive_bytes(make_content(pickle_blob=blob, pickle_raw_size=raw_size,
                                      functions={"model": {"kind": "pickle"},
                                                 "loss": {"kind": "none"}}), signer=signer)
    loaded = functions(open_from, data, Trust(allow_pickle=True, keys=[signer.verifier()]))
    assert loaded["model"] is not None and loaded["model"](0.5) == 2.0
    assert loaded["loss"] is None


def test_functions_rejects_pickle_signed_by_untrusted_key(
    open_from: Opener, key: HmacKey, canary: Path
) -> None:
    stranger = Ed25519Signer.generate()
    data = pickle_archive(malicious_pickle(canary), signer=stranger)
    message = exactly(f"signature.json: signed by {stranger.key_id} (ed25519), which is not a "
                      f"trusted key (trusted: {key.key_id})")
    with refused(UntrustedKeyError, message):
        functions(open_from, data, signed_pickle_trust(key))
    with refused(UntrustedKeyError, message):
        verify(open_from, data, Trust(keys=[key]))
    with refused(RefusedCodeError, "refusing to unpickle"):  # no keys: never "trusted"
        functions(open_from, data, Trust(allow_pickle=True))
    assert not canary.exists()


def test_functions_rejects_replayed_signature(
    open_from: Opener, key: HmacKey, canary: Path
) -> None:
    """signature.json of a benign archive A, signed by the trusted key, put into archive B."""
    benign = pickle_archive(pickle.dumps({"model": None, "loss": None}), signer=key)
    hostile = pickle_archive(malicious_pickle(canary))
    members = archive_members(hostile)
    members["signature.json"] = archive_members(benign)["signature.json"]
    replayed = repack(members)
    manifest_sha = hashlib.sha256(members["manifest.json"]).hexdigest()
    pattern = (r"^signature\.json: the signature is for a manifest with sha256 [0-9a-f]{64}, "
               f"but manifest.json has sha256 {manifest_sha} " + re.escape(
                   "(signature replayed from another archive, or manifest changed)") + "$")
    with refused(SignatureError, pattern):
        functions(open_from, replayed, signed_pickle_trust(key))
    with refused(SignatureError, pattern):
        verify(open_from, replayed, Trust(keys=[key]))
    assert not canary.exists()


@pytest.mark.parametrize(
    ("python", "implementation"),
    [(f"3.{sys.version_info.minor - 1}", "cpython"), (f"3.{sys.version_info.minor + 1}",
                                                       "cpython"),
     (f"3.{sys.version_info.minor}", "pypy")],
    ids=["older-minor", "newer-minor", "pypy"],
)
def test_functions_rejects_pickle_from_another_python(
    open_from: Opener, key: HmacKey, canary: Path, python: str, implementation: str
) -> None:
    data = pickle_archive(malicious_pickle(canary), signer=key)
    document = manifest_document(data)
    document["pickle"].update(python=python, python_implementation=implementation)
    hostile = with_manifest(data, document, signer=key)  # signed by the trusted key
    this = f"cpython 3.{sys.version_info.minor}"
    with refused(RuntimeMismatchError, "^" + re.escape(
        f"{FUNCTIONS}: pickled under {implementation} {python}, but this is {this}; "
    )):
        functions(open_from, hostile, signed_pickle_trust(key))
    assert not canary.exists()


# --- bad input: references (canary module) -----------------------------------------------------

CANARY_MODULE = "hkstore_canary_module"


def test_functions_rejects_reference_outside_the_allowlist(
    open_from: Opener, tmp_path: Path, canary: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "modules"
    folder.mkdir()
    (folder / f"{CANARY_MODULE}.py").write_text(
        f"import pathlib\n\npathlib.Path({str(canary)!r}).write_text('imported')\n\n\n"
        "def forward(x):\n    return x\n"
    )
    monkeypatch.syspath_prepend(str(folder))
    monkeypatch.delitem(sys.modules, CANARY_MODULE, raising=False)
    specs = {"model": {"kind": "reference", "ref": f"{CANARY_MODULE}:forward", "kwargs": {}},
             "loss": {"kind": "reference", "ref": "fnrefs:forward", "kwargs": {}}}
    data = archive_bytes(make_content(functions=specs))
    with refused(RefusedCodeError, exactly(
        f"reference '{CANARY_MODULE}:forward': module '{CANARY_MODULE}' is not in the allowed "
        "modules ('fnrefs'); add it to Trust(modules=[...]) if you trust its code"
    )):
        functions(open_from, data, Trust(modules=["fnrefs"]))
    assert CANARY_MODULE not in sys.modules
    assert not canary.exists()
    # only the loss asked for: the model's module is not even looked at
    with open_from(data) as archive:
        assert archive.functions(Trust(modules=["fnrefs"]), roles=["loss"]) == {
            "loss": fnrefs.forward
        }
    assert CANARY_MODULE not in sys.modules
    assert not canary.exists()
    # control: allowing the module does import it (so the canary above would have fired)
    try:
        loaded = functions(open_from, data, Trust(modules=["fnrefs", CANARY_MODULE]))
        assert loaded["model"] is not None and loaded["model"](3) == 3
        assert canary.exists()
    finally:
        sys.modules.pop(CANARY_MODULE, None)
