"""Tests for hkstore.store._signing: Ed25519 / HMAC signatures over the canonical manifest."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hkstore.errors import (
    HkstoreError,
    InvalidKeyError,
    LimitExceededError,
    MissingDependencyError,
    SignatureError,
    UnsupportedVersionError,
    UntrustedKeyError,
)
from hkstore.store._canonical import canonical_json
from hkstore.store._limits import Limits
from hkstore.store._signing import (
    SIGNATURE_CONTEXT,
    Ed25519Signer,
    Ed25519Verifier,
    HmacKey,
    read_signature_document,
    sign_manifest,
    signing_payload,
    verify_manifest_signature,
)

SCHEMA = json.loads((Path(__file__).parent.parent / "schemas" / "signature.v1.json").read_text())
MANIFEST = canonical_json({"format": "hkstore", "format_version": 1, "tensors": [], "x": "é"})
OTHER_MANIFEST = canonical_json({"format": "hkstore", "format_version": 1, "tensors": []})
SECRET = bytes(range(100, 132))


def _ed25519() -> tuple[Ed25519Signer, Ed25519Verifier]:
    signer = Ed25519Signer.generate()
    return signer, signer.verifier()


def _pairs() -> list[tuple[Any, Any]]:
    signer, verifier = _ed25519()
    key = HmacKey(SECRET)
    return [(signer, verifier), (key, key)]


def _doc(data: bytes) -> dict[str, Any]:
    obj: dict[str, Any] = json.loads(data)
    return obj


def _bytes(obj: dict[str, Any]) -> bytes:
    return canonical_json(obj)


def _raises(exc_type: type[Exception], data: bytes, verifiers: list[Any]) -> str:
    with pytest.raises(exc_type) as info:
        verify_manifest_signature(data, MANIFEST, verifiers)
    assert type(info.value) is exc_type
    return str(info.value)


# --- round trips --------------------------------------------------------------------------


@pytest.mark.parametrize("index", [0, 1], ids=["ed25519", "hmac-sha256"])
def test_sign_verify_round_trip(index: int) -> None:
    signer, verifier = _pairs()[index]
    data = sign_manifest(MANIFEST, signer)
    assert verify_manifest_signature(data, MANIFEST, [verifier]) == signer.key_id
    doc = _doc(data)
    jsonschema.validate(doc, SCHEMA)
    assert data == canonical_json(doc)
    assert doc["format"] == "hkstore-signature" and doc["version"] == 1
    assert doc["algorithm"] == signer.algorithm and doc["key_id"] == signer.key_id
    assert doc["manifest_sha256"] == hashlib.sha256(MANIFEST).hexdigest()
    assert read_signature_document(data).signature == base64.b64decode(doc["signature"])


def test_verifier_is_chosen_by_key_id_among_many() -> None:
    signer, verifier = _ed25519()
    others = [Ed25519Signer.generate().verifier() for _ in range(3)] + [HmacKey.generate()]
    data = sign_manifest(MANIFEST, signer)
    assert verify_manifest_signature(data, MANIFEST, [*others, verifier]) == signer.key_id
    assert verify_manifest_signature(data, MANIFEST, [verifier, verifier]) == signer.key_id


def test_hmac_signature_is_plain_hmac_sha256_of_context_and_manifest() -> None:
    data = sign_manifest(MANIFEST, HmacKey(SECRET))
    expected = hmac.new(SECRET, SIGNATURE_CONTEXT + MANIFEST, hashlib.sha256).digest()
    assert read_signature_document(data).signature == expected
    assert signing_payload(MANIFEST) == b"hkstore-manifest-signature-v1\n" + MANIFEST


# --- tampering and replay ----------------------------------------------------------------


@pytest.mark.parametrize("index", [0, 1], ids=["ed25519", "hmac-sha256"])
def test_verify_rejects_tampered_manifest_byte(index: int) -> None:
    signer, verifier = _pairs()[index]
    data = sign_manifest(MANIFEST, signer)
    tampered = bytearray(MANIFEST)
    tampered[-3] ^= 0x01
    with pytest.raises(SignatureError) as info:
        verify_manifest_signature(data, bytes(tampered), [verifier])
    actual = hashlib.sha256(bytes(tampered)).hexdigest()
    assert str(info.value) == (
        "signature.json: the signature is for a manifest with sha256 "
        f"{hashlib.sha256(MANIFEST).hexdigest()}, but manifest.json has sha256 {actual} "
        "(signature replayed from another archive, or manifest changed)"
    )


@pytest.mark.parametrize("index", [0, 1], ids=["ed25519", "hmac-sha256"])
def test_verify_rejects_tampered_manifest_with_updated_digest(index: int) -> None:
    signer, verifier = _pairs()[index]
    doc = _doc(sign_manifest(OTHER_MANIFEST, signer))
    doc["manifest_sha256"] = hashlib.sha256(MANIFEST).hexdigest()  # attacker fixes the digest
    message = _raises(SignatureError, _bytes(doc), [verifier])
    assert message == (
        f"signature.json: the {signer.algorithm} signature by {signer.key_id} does not verify "
        "over manifest.json (tampered signature or manifest)"
    )


@pytest.mark.parametrize("index", [0, 1], ids=["ed25519", "hmac-sha256"])
def test_verify_rejects_signature_replayed_onto_another_manifest(index: int) -> None:
    signer, verifier = _pairs()[index]
    replayed = sign_manifest(OTHER_MANIFEST, signer)
    message = _raises(SignatureError, replayed, [verifier])
    assert "signature replayed from another archive" in message


@pytest.mark.parametrize("index", [0, 1], ids=["ed25519", "hmac-sha256"])
def test_verify_rejects_flipped_signature_bit(index: int) -> None:
    signer, verifier = _pairs()[index]
    doc = _doc(sign_manifest(MANIFEST, signer))
    raw = bytearray(base64.b64decode(doc["signature"]))
    raw[5] ^= 0x80
    doc["signature"] = base64.b64encode(bytes(raw)).decode()
    assert "does not verify over manifest.json" in _raises(SignatureError, _bytes(doc), [verifier])


def test_domain_separation_bare_manifest_signatures_do_not_verify() -> None:
    signer, verifier = _ed25519()
    key = HmacKey(SECRET)
    cases: list[tuple[Any, Any, bytes]] = [
        (signer, verifier, signer.private_key.sign(MANIFEST)),
        (key, key, hmac.new(SECRET, MANIFEST, hashlib.sha256).digest()),
    ]
    for who, check, raw in cases:
        doc = _doc(sign_manifest(MANIFEST, who))
        doc["signature"] = base64.b64encode(raw).decode()
        assert "does not verify" in _raises(SignatureError, _bytes(doc), [check])
        # and the reverse: an hkstore signature is not a signature of the bare bytes
        good = read_signature_document(sign_manifest(MANIFEST, who)).signature
        assert not check.verify(MANIFEST, good)
        assert check.verify(SIGNATURE_CONTEXT + MANIFEST, good)


# --- trust: which key ---------------------------------------------------------------------


def test_verify_rejects_untrusted_key_and_names_ids() -> None:
    signer, _ = _ed25519()
    trusted_a, trusted_b = Ed25519Signer.generate().verifier(), HmacKey.generate()
    data = sign_manifest(MANIFEST, signer)
    message = _raises(UntrustedKeyError, data, [trusted_b, trusted_a])
    trusted = ", ".join(sorted([trusted_a.key_id, trusted_b.key_id]))
    assert message == (
        f"signature.json: signed by {signer.key_id} (ed25519), which is not a trusted key "
        f"(trusted: {trusted})"
    )
    assert _raises(UntrustedKeyError, data, []).endswith("(trusted: none given)")


def test_verify_never_uses_another_algorithm_with_the_same_key_id() -> None:
    key = HmacKey(SECRET)

    class Impostor:  # claims the HMAC key's id under another algorithm, accepts anything
        algorithm = "ed25519"
        key_id = key.key_id

        def verify(self, payload: bytes, signature: bytes) -> bool:
            return True

    data = sign_manifest(MANIFEST, key)
    assert "not a trusted key" in _raises(UntrustedKeyError, data, [Impostor()])


def test_verify_rejects_algorithm_and_key_id_mismatch() -> None:
    signer, verifier = _ed25519()
    doc = _doc(sign_manifest(MANIFEST, signer))
    doc["algorithm"] = "hmac-sha256"
    doc["signature"] = base64.b64encode(bytes(32)).decode()
    message = _raises(SignatureError, _bytes(doc), [verifier])
    assert message == (
        "signature.json is malformed (1 problem): "
        f"key_id {signer.key_id!r} is not an hmac-sha256 key id"
    )


# --- malformed signature.json ---------------------------------------------------------------

_NOT_HEX = "is not 64 lowercase hex digits"


def _good() -> tuple[dict[str, Any], HmacKey]:
    key = HmacKey(SECRET)
    return _doc(sign_manifest(MANIFEST, key)), key


def test_malformed_duplicate_key() -> None:
    doc, key = _good()
    text = _bytes(doc).decode()
    data = text.replace('"format":', f'"key_id":"{doc["key_id"]}","format":').encode()
    message = _raises(SignatureError, data, [key])
    assert message == "signature.json: duplicate key 'key_id' in the object at $"


def test_malformed_missing_and_extra_fields_listed_together() -> None:
    doc, key = _good()
    del doc["key_id"], doc["signature"]
    doc["public_key"] = "AAAA"
    message = _raises(SignatureError, _bytes(doc), [key])
    assert message == (
        "signature.json is malformed (2 problems): missing field(s) 'key_id', 'signature'; "
        "unexpected field(s) 'public_key'"
    )


@pytest.mark.parametrize(
    ("field", "value", "problem"),
    [
        ("format", "hkstore", "format is 'hkstore', expected 'hkstore-signature'"),
        ("version", "1", "version is '1', expected 1"),
        ("algorithm", "rsa", "algorithm is 'rsa', expected 'ed25519' or 'hmac-sha256'"),
        (
            "key_id",
            "hmac-sha256:ABC",
            "key_id 'hmac-sha256:ABC' is not a key fingerprint ('ed25519:' or 'hmac-sha256:' "
            "followed by 32 lowercase hex digits)",
        ),
        ("manifest_sha256", "A" * 64, f"manifest_sha256 {'A' * 64!r} {_NOT_HEX}"),
        ("manifest_sha256", "0" * 63, f"manifest_sha256 {'0' * 63!r} {_NOT_HEX}"),
        ("signature", 12, "signature is int, expected a base64 string"),
        ("signature", "not base64!", "signature is not valid base64"),
        ("signature", "QUJD\nREVG", "signature is not valid base64"),
        ("signature", "QUJDRA", "signature is not valid base64"),
        ("signature", "QUJDRB==", "signature is not canonical base64 (padded, no line breaks)"),
        (
            "signature",
            base64.b64encode(bytes(31)).decode(),
            "signature is 31 bytes; an hmac-sha256 signature is 32 bytes",
        ),
        (
            "signature",
            base64.b64encode(bytes(64)).decode(),
            "signature is 64 bytes; an hmac-sha256 signature is 32 bytes",
        ),
    ],
)  # fmt: skip
def test_malformed_field_exact_messages(field: str, value: Any, problem: str) -> None:
    doc, key = _good()
    doc[field] = value
    message = _raises(SignatureError, _bytes(doc), [key])
    assert message == f"signature.json is malformed (1 problem): {problem}"
    with pytest.raises(jsonschema.ValidationError):  # the schema refuses it as well
        jsonschema.validate(doc, SCHEMA)


def test_malformed_other_version_is_unsupported() -> None:
    doc, key = _good()
    doc["version"] = 2
    message = _raises(UnsupportedVersionError, _bytes(doc), [key])
    assert message == (
        "signature.json: version 2 is not supported by this reader (it reads version 1)"
    )


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"[]", "signature.json: the top-level JSON value is an array; expected an object"),
        (b"{", "signature.json: invalid JSON: Expecting property name enclosed in double quotes "
               "(line 1, column 2)"),
        (b"\xff", "signature.json: not valid UTF-8 (byte 0xff at offset 0)"),
    ],
)  # fmt: skip
def test_malformed_not_a_json_object(data: bytes, message: str) -> None:
    assert _raises(SignatureError, data, []) == message


def test_malformed_non_canonical_bytes() -> None:
    doc, key = _good()
    for data in (_bytes(doc) + b"\n", json.dumps(doc, indent=1).encode()):
        assert _raises(SignatureError, data, [key]) == (
            "signature.json is not canonical JSON (sorted keys, no whitespace, no trailing "
            "newline)"
        )


def test_signature_document_size_limit() -> None:
    doc, key = _good()
    data = _bytes(doc)
    with pytest.raises(LimitExceededError) as info:
        verify_manifest_signature(data, MANIFEST, [key], limits=Limits(max_signature_bytes=100))
    assert str(info.value) == (
        f"signature.json: {len(data)} bytes, more than the limit of 100 bytes"
    )


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300), st.integers(0, 400), st.integers(0, 255))
def test_fuzz_signature_document_raises_only_our_errors(
    junk: bytes, position: int, value: int
) -> None:
    """Junk and every changed byte of a good document fail to verify, with one of our errors."""
    key = HmacKey(SECRET)
    original = sign_manifest(MANIFEST, key)
    mutated = bytearray(original)
    mutated[position % len(mutated)] = value
    with pytest.raises(HkstoreError):  # anything else (KeyError, UnicodeError...) fails the test
        verify_manifest_signature(junk, MANIFEST, [key])
    if bytes(mutated) == original:  # the byte already had that value: still a good document
        assert verify_manifest_signature(bytes(mutated), MANIFEST, [key]) == key.key_id
    else:
        with pytest.raises(HkstoreError):
            verify_manifest_signature(bytes(mutated), MANIFEST, [key])


def test_schema_accepts_what_the_code_writes_and_pins_lengths() -> None:
    for signer, _ in _pairs():
        doc = _doc(sign_manifest(MANIFEST, signer))
        jsonschema.validate(doc, SCHEMA)
        doc["key_id"] = ("hmac-sha256:" if signer.algorithm == "ed25519" else "ed25519:") + "0" * 32
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(doc, SCHEMA)


# --- keys ---------------------------------------------------------------------------------


def test_key_ids_are_fingerprints() -> None:
    signer, verifier = _ed25519()
    raw = verifier.public_bytes
    assert len(raw) == 32
    assert signer.key_id == verifier.key_id == "ed25519:" + hashlib.sha256(raw).hexdigest()[:32]
    assert Ed25519Verifier.from_public_bytes(raw) == verifier
    key = HmacKey(SECRET)
    digest = hashlib.sha256(b"hkstore-hmac-key-id\n" + SECRET).hexdigest()
    assert key.key_id == "hmac-sha256:" + digest[:32]
    assert SECRET.hex() not in key.key_id and SECRET.hex() not in repr(key)
    assert repr(key) == f"HmacKey(key_id={key.key_id!r})"
    assert HmacKey(SECRET) == key and HmacKey(SECRET[::-1]).key_id != key.key_id
    seed = bytes(range(32))
    assert Ed25519Signer.from_private_bytes(seed).key_id == (
        Ed25519Signer.from_private_bytes(seed).key_id
    )


def test_hmac_secret_too_short_or_not_bytes() -> None:
    with pytest.raises(InvalidKeyError) as info:
        HmacKey(b"x" * 31)
    assert str(info.value) == (
        "HMAC-SHA256 secret is 31 bytes; at least 32 random bytes are required "
        "(e.g. secrets.token_bytes(32))"
    )
    assert isinstance(info.value, ValueError)
    with pytest.raises(InvalidKeyError, match="an HMAC secret must be bytes, got str"):
        HmacKey("s" * 40)  # type: ignore[arg-type]


def test_ed25519_constructors_refuse_wrong_keys() -> None:
    with pytest.raises(InvalidKeyError, match="a raw Ed25519 private key is 32 bytes, got 31"):
        Ed25519Signer.from_private_bytes(bytes(31))
    with pytest.raises(InvalidKeyError, match="a raw Ed25519 public key is 32 bytes, got 33"):
        Ed25519Verifier.from_public_bytes(bytes(33))
    with pytest.raises(InvalidKeyError, match="needs an Ed25519 private key, got bytes"):
        Ed25519Signer(bytes(32))  # type: ignore[arg-type]
    signer = Ed25519Signer.generate()
    with pytest.raises(InvalidKeyError, match="needs an Ed25519 public key, got Ed25519Private"):
        Ed25519Verifier(signer.private_key)  # type: ignore[arg-type]
    assert not signer.verifier().verify(b"x", b"short")


def test_sign_manifest_refuses_broken_signers() -> None:
    class Wrong:
        algorithm = "hmac-sha256"
        key_id = "hmac-sha256:" + "0" * 32

        def sign(self, payload: bytes) -> bytes:
            return b"\x00" * 31

    with pytest.raises(InvalidKeyError) as info:
        sign_manifest(MANIFEST, Wrong())
    assert str(info.value) == (
        f"signer {Wrong.key_id} returned a signature of 31 bytes; hmac-sha256 signatures are "
        "32 bytes"
    )
    Wrong.algorithm = "rsa"
    with pytest.raises(InvalidKeyError, match="signer algorithm 'rsa' is not supported"):
        sign_manifest(MANIFEST, Wrong())
    Wrong.algorithm, Wrong.key_id = "ed25519", "alice"
    with pytest.raises(InvalidKeyError, match="signer key id 'alice' is not an ed25519 key"):
        sign_manifest(MANIFEST, Wrong())


# --- the [sign] extra -------------------------------------------------------------------------


def test_missing_cryptography_gives_install_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "cryptography.hazmat.primitives.asymmetric.ed25519", None)
    with pytest.raises(MissingDependencyError) as info:
        Ed25519Signer.generate()
    assert str(info.value) == (
        "Ed25519 keys need the 'cryptography' package: pip install hkstore[sign]"
    )
    assert isinstance(info.value, ImportError)
    key = HmacKey(SECRET)  # HMAC needs only the standard library
    assert verify_manifest_signature(sign_manifest(MANIFEST, key), MANIFEST, [key])


def test_signing_modules_import_without_jax_or_cryptography() -> None:
    code = (
        "import sys\n"
        "for name in ('jax', 'haiku', 'cryptography'):\n"
        "    sys.modules[name] = None\n"
        "from hkstore.store import _signing, _keys, _trust, _pickle_scan\n"
        "key = _signing.HmacKey(bytes(32))\n"
        "doc = _signing.sign_manifest(b'{}', key)\n"
        "assert _signing.verify_manifest_signature(doc, b'{}', [key]) == key.key_id\n"
        "print(_trust.Trust(keys=[key], allow_pickle=True))\n"
        "try:\n"
        "    _signing.Ed25519Signer.generate()\n"
        "except ImportError as exc:\n"
        "    print(exc)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert "pip install hkstore[sign]" in result.stdout
