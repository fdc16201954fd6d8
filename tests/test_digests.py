"""Tensor digests: the algorithm table, how a manifest names the algorithm, and what is refused.

BLAKE3 vectors are the official ones (BLAKE3 team's test vectors / ``b3sum``); SHA-256 ones
are FIPS 180-2's. Archives are real ones written by ``write_archive`` and tampered byte-wise.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from helpers_archives import (
    archive_bytes,
    archive_members,
    default_tensors,
    make_content,
    manifest_document,
    repack,
    with_manifest,
    write_test_archive,
)

from hkstore.errors import DigestMismatchError, ManifestError, SignatureError
from hkstore.store._archive import open_archive, write_archive
from hkstore.store._canonical import canonical_json
from hkstore.store._digests import ALGORITHMS, DEFAULT, check_algorithm, digest_hex, new_hasher
from hkstore.store._manifest import decode_manifest
from hkstore.store._signing import Ed25519Signer
from hkstore.store._trust import Trust

EMPTY = {
    "sha256": "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
    "blake3": "af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262",
}
ABC = {
    "sha256": "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad",
    "blake3": "6437b3ac38465133ffb63b75273a8db548c558465d79db03fd359c6cd5bd9d85",
}


# --- the table --------------------------------------------------------------------------------


def test_the_table_holds_exactly_the_two_256_bit_hashes() -> None:
    assert ALGORITHMS == ("sha256", "blake3")
    assert DEFAULT == "blake3"


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_known_vectors(algorithm: str) -> None:
    assert digest_hex(algorithm, b"") == EMPTY[algorithm]
    assert digest_hex(algorithm, b"abc") == ABC[algorithm]


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_pieces_and_threads_do_not_change_the_digest(algorithm: str) -> None:
    data = np.random.default_rng(1).integers(0, 256, 3 << 20, dtype=np.uint8).tobytes()
    whole = digest_hex(algorithm, data)
    hasher = new_hasher(algorithm, threads=4)
    for start in range(0, len(data), 1 << 20):
        hasher.update(data[start : start + (1 << 20)])
    assert hasher.hexdigest() == whole == digest_hex(algorithm, data, threads=3)
    if algorithm == "sha256":
        assert whole == hashlib.sha256(data).hexdigest()


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_typed_buffers_are_hashed_as_their_bytes(algorithm: str) -> None:
    array = np.arange(12, dtype=np.float32).reshape(3, 4)
    assert digest_hex(algorithm, array.data) == digest_hex(algorithm, array.tobytes())


@pytest.mark.parametrize("name", ["md5", "sha1", "crc32", "SHA256", "blake2b", ""])
def test_anything_else_is_refused(name: str) -> None:
    with pytest.raises(ValueError, match="is not one of sha256, blake3"):
        check_algorithm(name)
    with pytest.raises(ValueError, match="is not one of sha256, blake3"):
        new_hasher(name)


# --- the manifest names the algorithm -----------------------------------------------------------


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_writer_records_the_algorithm_as_the_digest_key(algorithm: str) -> None:
    tensors = default_tensors()
    data = archive_bytes(make_content(tensors), digest=algorithm)
    doc = manifest_document(data)
    for record in doc["tensors"]:
        assert set(record) == {"name", "dtype", "shape", algorithm}
        raw = np.ascontiguousarray(tensors[record["name"]]).tobytes()
        assert record[algorithm] == digest_hex(algorithm, raw)
    with open_archive(data) as archive:
        assert archive.manifest.digest_algorithm == algorithm
        archive.verify()
        loaded = archive.read_weights()
    for name, array in tensors.items():
        assert np.array_equal(loaded[name], array)


def test_default_is_blake3() -> None:
    doc = manifest_document(archive_bytes())
    assert all("blake3" in t and "sha256" not in t for t in doc["tensors"])


def _decode(doc: dict[str, object]) -> None:
    decode_manifest(canonical_json(doc))


def test_a_tensor_with_no_digest_or_two_is_refused() -> None:
    doc = manifest_document(archive_bytes())
    digest = doc["tensors"][0].pop("blake3")
    with pytest.raises(ManifestError, match=r"\$\.tensors\[0\]: no alternative matches"):
        _decode(doc)
    doc["tensors"][0].update(blake3=digest, sha256=digest)
    with pytest.raises(ManifestError, match=r"\$\.tensors\[0\]: .* is valid under each of"):
        _decode(doc)


def test_an_algorithm_outside_the_table_is_refused_by_name() -> None:
    doc = manifest_document(archive_bytes())
    doc["tensors"][1]["md5"] = doc["tensors"][1].pop("blake3")[:32]
    with pytest.raises(ManifestError) as info:
        _decode(doc)
    assert "'md5' was unexpected" in str(info.value)


def test_tensors_of_one_manifest_use_one_algorithm() -> None:
    doc = manifest_document(archive_bytes())
    doc["tensors"][2]["sha256"] = doc["tensors"][2].pop("blake3")
    with pytest.raises(ManifestError) as info:
        _decode(doc)
    assert str(info.value) == (
        "manifest.json: $.tensors: every tensor must use the same digest algorithm, found "
        "'blake3' (first at $.tensors[0]) and 'sha256' (first at $.tensors[2])"
    )


def test_claiming_the_other_algorithm_fails_the_digest_check() -> None:
    """Renaming the key (same hex) makes the reader hash with the named algorithm: mismatch."""
    data = archive_bytes()
    doc = manifest_document(data)
    for record in doc["tensors"]:
        record["sha256"] = record.pop("blake3")
    tampered = with_manifest(data, doc)
    with open_archive(tampered) as archive:
        assert archive.manifest.digest_algorithm == "sha256"
        with pytest.raises(DigestMismatchError, match="do not match their SHA-256 digest"):
            archive.read_weights()
        with pytest.raises(DigestMismatchError, match="SHA-256"):
            archive.check_digests()
        with pytest.raises(DigestMismatchError):
            archive.tensor(doc["tensors"][0]["name"])


def test_the_signature_covers_the_algorithm(tmp_path: Path) -> None:
    """A signed archive re-labelled to SHA-256 (with correct SHA-256 digests) fails to verify."""
    signer = Ed25519Signer.generate()
    tensors = default_tensors()
    data = archive_bytes(make_content(tensors), signer=signer)
    doc = manifest_document(data)
    for record in doc["tensors"]:
        del record["blake3"]
        raw = np.ascontiguousarray(tensors[record["name"]]).tobytes()
        record["sha256"] = hashlib.sha256(raw).hexdigest()
    members = archive_members(data)
    members["manifest.json"] = canonical_json(doc)
    relabelled = repack(members)  # the old signature.json kept
    trust = Trust(keys=[signer.verifier()])
    with open_archive(data) as archive:
        assert archive.verify(trust).signed_by == signer.key_id
    with open_archive(relabelled) as archive:
        archive.check_digests()  # the SHA-256 digests themselves are right...
        with pytest.raises(SignatureError):
            archive.verify(trust)  # ...but the signed bytes named BLAKE3


def test_sha256_archives_still_written_and_read_through_every_path(tmp_path: Path) -> None:
    path = tmp_path / "legacy.hkz"
    tensors = default_tensors()
    with open(path, "wb") as handle:
        write_archive(handle, make_content(tensors), digest="sha256", workers=2)
    with open_archive(path, workers=2) as archive:
        assert archive.manifest.digest_algorithm == "sha256"
        archive.verify()
        assert archive.check_digests(workers=1) == sum(a.nbytes for a in tensors.values())
        for name, array in tensors.items():
            assert np.array_equal(archive.tensor(name), array)
        loaded = archive.read_weights(workers=1)
    assert all(np.array_equal(loaded[n], a) for n, a in tensors.items())


def test_diff_reads_tensors_whose_digests_use_different_algorithms(tmp_path: Path) -> None:
    from hkstore._cli._diff import diff_report

    tensors = default_tensors()
    a = tmp_path / "a.hkz"
    with open(a, "wb") as handle:
        write_archive(handle, make_content(tensors), digest="sha256")
    changed = dict(tensors)
    changed["mlp/~/linear_1:b"] = changed["mlp/~/linear_1:b"] + 1
    b = write_test_archive(tmp_path / "b.hkz", make_content(changed))
    with open_archive(a) as ra, open_archive(b) as rb:
        report = diff_report(ra, rb, str(a), str(b))
    status = {t["name"]: (t["status"], t["read"]) for t in report["tensors"]}
    assert status["mlp/~/linear_0:w"] == ("equal", True)
    assert status["mlp/~/linear_1:b"] == ("changed", True)
    json.dumps(report)
