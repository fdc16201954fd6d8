"""Signatures over the canonical manifest: the Signer/Verifier protocol, its keys, signature.json.

One small protocol, two implementations: :class:`Ed25519Signer` / :class:`Ed25519Verifier`
(``cryptography``, the ``[sign]`` extra, imported only when an Ed25519 key is used) for parties
that exchange public keys, and :class:`HmacKey` (stdlib HMAC-SHA256) for a federation that
shares a secret. Anything with the same attributes and methods (an HSM, a KMS) plugs in.

What is signed is :data:`SIGNATURE_CONTEXT` followed by the canonical ``manifest.json`` bytes;
the manifest digests every other member, so the signature covers the whole archive. The
context string (domain separation) means a signature made by the same key for anything else
never verifies as an hkstore manifest signature, and the reverse.

Key ids are fingerprints, never names a signer chooses: ``"ed25519:"`` + the first 32 hex
digits (128 bits) of SHA-256 of the raw 32-byte public key, and ``"hmac-sha256:"`` + the first
32 hex digits of SHA-256 of ``b"hkstore-hmac-key-id\\n" + secret`` (which reveals nothing
usable about a random secret). A key id only *selects* among the keys the caller trusts; the
signature is then checked with that key, so a colliding id gains an attacker nothing.

``signature.json`` is canonical JSON (schema ``schemas/signature.v1.json``)::

    {"algorithm":"ed25519","format":"hkstore-signature","key_id":"ed25519:<32 hex>",
     "manifest_sha256":"<64 hex>","signature":"<base64 of 64 bytes>","version":1}

(The file stays whole past 400 lines: the protocol, its two key kinds and the document they
produce are one concept, and half of it is docstrings.)
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import importlib
import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from hkstore.errors import (
    InvalidKeyError,
    MissingDependencyError,
    SignatureError,
    UnsupportedVersionError,
    UntrustedKeyError,
)
from hkstore.store._canonical import canonical_json, parse_json_strict
from hkstore.store._limits import DEFAULT_LIMITS, Limits
from hkstore.store._members import SIGNATURE

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import (
        Ed25519PrivateKey,
        Ed25519PublicKey,
    )

__all__ = [
    "ALGORITHMS",
    "ED25519",
    "HMAC_SHA256",
    "MIN_HMAC_SECRET_BYTES",
    "SIGNATURE_CONTEXT",
    "SIGNATURE_FORMAT",
    "SIGNATURE_MEMBER",
    "SIGNATURE_VERSION",
    "DocumentSignature",
    "Ed25519Signer",
    "Ed25519Verifier",
    "HmacKey",
    "SignatureDocument",
    "Signer",
    "Verifier",
    "ed25519_key_id",
    "hmac_key_id",
    "read_signature_document",
    "require_cryptography",
    "sign_manifest",
    "signing_payload",
    "verify_manifest_signature",
]

#: Prefix of every signed payload (domain separation): payload = context + manifest bytes.
SIGNATURE_CONTEXT = b"hkstore-manifest-signature-v1\n"
SIGNATURE_FORMAT = "hkstore-signature"
SIGNATURE_VERSION = 1
SIGNATURE_MEMBER = SIGNATURE
ED25519 = "ed25519"
HMAC_SHA256 = "hmac-sha256"
#: Supported algorithms and the length of their signatures in bytes.
ALGORITHMS: dict[str, int] = {ED25519: 64, HMAC_SHA256: 32}
#: Shortest HMAC secret accepted: 32 bytes, the SHA-256 block-size-independent security level.
MIN_HMAC_SECRET_BYTES = 32
_KEY_ID_HEX = 32  # hex digits of the fingerprint (128 bits)
_HMAC_KEY_ID_CONTEXT = b"hkstore-hmac-key-id\n"
_FIELDS = ("algorithm", "format", "key_id", "manifest_sha256", "signature", "version")
_KEY_ID_RE = re.compile(rf"(ed25519|hmac-sha256):[0-9a-f]{{{_KEY_ID_HEX}}}")
_SHA256_RE = re.compile(r"[0-9a-f]{64}")
_INSTALL_HINT = "Ed25519 keys need the 'cryptography' package: pip install hkstore[sign]"


# --- the protocol -----------------------------------------------------------------------------


class Signer(Protocol):
    """Makes signatures: what :func:`sign_manifest` needs.

    Attributes:
        algorithm: ``"ed25519"`` or ``"hmac-sha256"``.
        key_id: the key's fingerprint (see the module docstring).
    """

    @property
    def algorithm(self) -> str: ...

    @property
    def key_id(self) -> str: ...

    def sign(self, payload: bytes) -> bytes:
        """Return the signature of ``payload``."""
        ...


class Verifier(Protocol):
    """Checks signatures: what :func:`verify_manifest_signature` and ``Trust(keys=...)`` take.

    Attributes:
        algorithm: ``"ed25519"`` or ``"hmac-sha256"``.
        key_id: the key's fingerprint (see the module docstring).
    """

    @property
    def algorithm(self) -> str: ...

    @property
    def key_id(self) -> str: ...

    def verify(self, payload: bytes, signature: bytes) -> bool:
        """Return whether ``signature`` is this key's signature of ``payload`` (never raises)."""
        ...


def signing_payload(manifest_bytes: bytes | bytearray | memoryview) -> bytes:
    """Return the bytes a manifest signature covers: :data:`SIGNATURE_CONTEXT` + manifest."""
    return SIGNATURE_CONTEXT + bytes(manifest_bytes)


def ed25519_key_id(public_key_raw: bytes) -> str:
    """Fingerprint of a raw 32-byte Ed25519 public key: ``"ed25519:"`` + 32 hex digits."""
    return f"{ED25519}:{hashlib.sha256(public_key_raw).hexdigest()[:_KEY_ID_HEX]}"


def hmac_key_id(secret: bytes) -> str:
    """Fingerprint of an HMAC secret: ``"hmac-sha256:"`` + 32 hex digits (secret not revealed)."""
    digest = hashlib.sha256(_HMAC_KEY_ID_CONTEXT + secret).hexdigest()
    return f"{HMAC_SHA256}:{digest[:_KEY_ID_HEX]}"


# --- Ed25519 ----------------------------------------------------------------------------------


def require_cryptography() -> None:
    """Check that ``cryptography`` (the ``[sign]`` extra) can be imported.

    Raises:
        MissingDependencyError: it cannot; the message says ``pip install hkstore[sign]``.
    """
    _ed25519()


def _ed25519() -> Any:
    """Import cryptography's Ed25519 module, or say how to install it."""
    try:
        return importlib.import_module("cryptography.hazmat.primitives.asymmetric.ed25519")
    except ImportError:
        raise MissingDependencyError(_INSTALL_HINT) from None


def _raw_public(public_key: Ed25519PublicKey) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


class Ed25519Signer:
    """An Ed25519 private key that signs (needs ``pip install hkstore[sign]``).

    Args:
        private_key: a ``cryptography`` ``Ed25519PrivateKey``.

    Raises:
        InvalidKeyError: ``private_key`` is not an Ed25519 private key.
        MissingDependencyError: ``cryptography`` is not installed.

    Example:
        >>> signer = Ed25519Signer.generate()
        >>> signer.verifier().verify(b"x", signer.sign(b"x"))
        True
    """

    algorithm = ED25519

    def __init__(self, private_key: Ed25519PrivateKey) -> None:
        if not isinstance(private_key, _ed25519().Ed25519PrivateKey):
            raise InvalidKeyError(
                f"Ed25519Signer needs an Ed25519 private key, got {type(private_key).__name__}"
            )
        self._private_key = private_key
        self._key_id = ed25519_key_id(_raw_public(private_key.public_key()))

    @classmethod
    def generate(cls) -> Ed25519Signer:
        """Return a signer with a fresh random key."""
        return cls(_ed25519().Ed25519PrivateKey.generate())

    @classmethod
    def from_private_bytes(cls, raw: bytes) -> Ed25519Signer:
        """Return the signer of a raw 32-byte Ed25519 private key (seed).

        Raises:
            InvalidKeyError: ``raw`` is not 32 bytes.
        """
        if len(raw) != 32:
            raise InvalidKeyError(f"a raw Ed25519 private key is 32 bytes, got {len(raw)}")
        return cls(_ed25519().Ed25519PrivateKey.from_private_bytes(bytes(raw)))

    @property
    def key_id(self) -> str:
        """The public key's fingerprint, ``"ed25519:"`` + 32 hex digits."""
        return self._key_id

    @property
    def private_key(self) -> Ed25519PrivateKey:
        """The ``cryptography`` private key object (for writing key files)."""
        return self._private_key

    def verifier(self) -> Ed25519Verifier:
        """Return the matching public-key verifier."""
        return Ed25519Verifier(self._private_key.public_key())

    def sign(self, payload: bytes) -> bytes:
        """Return the 64-byte Ed25519 signature of ``payload``."""
        return self._private_key.sign(bytes(payload))

    def __repr__(self) -> str:
        return f"Ed25519Signer(key_id={self._key_id!r})"


class Ed25519Verifier:
    """An Ed25519 public key that checks signatures (needs ``pip install hkstore[sign]``).

    Args:
        public_key: a ``cryptography`` ``Ed25519PublicKey``.

    Raises:
        InvalidKeyError: ``public_key`` is not an Ed25519 public key.
        MissingDependencyError: ``cryptography`` is not installed.
    """

    algorithm = ED25519

    def __init__(self, public_key: Ed25519PublicKey) -> None:
        if not isinstance(public_key, _ed25519().Ed25519PublicKey):
            raise InvalidKeyError(
                f"Ed25519Verifier needs an Ed25519 public key, got {type(public_key).__name__}"
            )
        self._public_key = public_key
        self._raw = _raw_public(public_key)
        self._key_id = ed25519_key_id(self._raw)

    @classmethod
    def from_public_bytes(cls, raw: bytes) -> Ed25519Verifier:
        """Return the verifier of a raw 32-byte Ed25519 public key.

        Raises:
            InvalidKeyError: ``raw`` is not 32 bytes.
        """
        if len(raw) != 32:
            raise InvalidKeyError(f"a raw Ed25519 public key is 32 bytes, got {len(raw)}")
        return cls(_ed25519().Ed25519PublicKey.from_public_bytes(bytes(raw)))

    @property
    def key_id(self) -> str:
        """The key's fingerprint, ``"ed25519:"`` + 32 hex digits."""
        return self._key_id

    @property
    def public_key(self) -> Ed25519PublicKey:
        """The ``cryptography`` public key object (for writing key files)."""
        return self._public_key

    @property
    def public_bytes(self) -> bytes:
        """The raw 32-byte public key."""
        return self._raw

    def verify(self, payload: bytes, signature: bytes) -> bool:
        """Return whether ``signature`` is a valid Ed25519 signature of ``payload``."""
        from cryptography.exceptions import InvalidSignature

        if len(signature) != ALGORITHMS[ED25519]:
            return False
        try:
            self._public_key.verify(bytes(signature), bytes(payload))
        except InvalidSignature:
            return False
        return True

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Ed25519Verifier):
            return NotImplemented
        return self._raw == other._raw

    def __hash__(self) -> int:
        return hash((ED25519, self._raw))

    def __repr__(self) -> str:
        return f"Ed25519Verifier(key_id={self._key_id!r})"


# --- HMAC-SHA256 ------------------------------------------------------------------------------


class HmacKey:
    """A shared HMAC-SHA256 secret: signs and verifies (stdlib only).

    Anyone holding the secret can sign, so this suits a federation whose members all trust
    each other with it. The secret must be random (e.g. ``secrets.token_bytes(32)``): a
    guessable secret can be found offline from any signature or from the key id.

    Args:
        secret: at least :data:`MIN_HMAC_SECRET_BYTES` (32) bytes.

    Raises:
        InvalidKeyError: ``secret`` is not bytes or is shorter than 32 bytes.

    Example:
        >>> key = HmacKey(bytes(range(32)))
        >>> key.verify(b"x", key.sign(b"x")), key.key_id.startswith("hmac-sha256:")
        (True, True)
    """

    algorithm = HMAC_SHA256

    def __init__(self, secret: bytes) -> None:
        if not isinstance(secret, bytes | bytearray | memoryview):
            raise InvalidKeyError(
                f"an HMAC secret must be bytes, got {type(secret).__name__} "
                "(to read a secret file, use load_hmac_key(path))"
            )
        secret = bytes(secret)
        confusion = _key_file_kind(secret)
        if confusion is not None:
            raise InvalidKeyError(
                f"this HMAC secret is {confusion}, not a shared secret: an HMAC secret is "
                "random bytes only the signing parties hold, and key files (public keys above "
                "all) are not secret, so anyone could forge signatures with it. Use the "
                "Ed25519 key as a key (--key / load_verifier), or generate a secret "
                "(e.g. secrets.token_bytes(32))"
            )
        if len(secret) < MIN_HMAC_SECRET_BYTES:
            raise InvalidKeyError(
                f"HMAC-SHA256 secret is {len(secret)} bytes; at least {MIN_HMAC_SECRET_BYTES} "
                "random bytes are required (e.g. secrets.token_bytes(32))"
            )
        self._secret = secret
        self._key_id = hmac_key_id(secret)

    @classmethod
    def generate(cls) -> HmacKey:
        """Return a key with a fresh random 32-byte secret."""
        return cls(secrets.token_bytes(MIN_HMAC_SECRET_BYTES))

    @property
    def key_id(self) -> str:
        """The secret's fingerprint, ``"hmac-sha256:"`` + 32 hex digits."""
        return self._key_id

    @property
    def secret(self) -> bytes:
        """The raw secret (for writing it to a file; handle with care)."""
        return self._secret

    def sign(self, payload: bytes) -> bytes:
        """Return the 32-byte HMAC-SHA256 of ``payload``."""
        return hmac.new(self._secret, bytes(payload), hashlib.sha256).digest()

    def verify(self, payload: bytes, signature: bytes) -> bool:
        """Return whether ``signature`` is this secret's HMAC of ``payload`` (constant time)."""
        return hmac.compare_digest(self.sign(payload), bytes(signature))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, HmacKey):
            return NotImplemented
        return hmac.compare_digest(self._secret, other._secret)

    def __hash__(self) -> int:
        return hash((HMAC_SHA256, self._key_id))

    def __repr__(self) -> str:  # never shows the secret
        return f"HmacKey(key_id={self._key_id!r})"


#: An OpenSSH public key line: a key type, a space, base64 of the key blob (it starts "AAAA").
_SSH_KEY_LINE = re.compile(rb"(?:\A|\s)(?:ssh|ecdsa-sha2|sk-ssh|sk-ecdsa)-[A-Za-z0-9@.-]+ AAAA")


def _key_file_kind(data: bytes) -> str | None:
    """Say which key-file encoding ``data`` is in (PEM, OpenSSH), or None for other bytes.

    Such content is never an HMAC secret: it is a public key (known to everyone), or a
    private key meant for another algorithm, and taking its bytes as a secret would let
    whoever has the file sign.
    """
    if b"-----BEGIN " in data:
        return "a PEM key file (-----BEGIN ...-----)"
    if _SSH_KEY_LINE.search(data):
        return "an OpenSSH public key line"
    return None


# --- signature.json ---------------------------------------------------------------------------


@dataclass(frozen=True)
class SignatureDocument:
    """A parsed, well-formed ``signature.json`` (not yet verified).

    Attributes:
        algorithm: ``"ed25519"`` or ``"hmac-sha256"``.
        key_id: the fingerprint of the key that claims to have signed.
        manifest_sha256: hex SHA-256 of the manifest bytes the signature is for.
        signature: the raw signature bytes.
    """

    algorithm: str
    key_id: str
    manifest_sha256: str
    signature: bytes

    def to_dict(self) -> dict[str, Any]:
        """The JSON object, as written."""
        return {
            "algorithm": self.algorithm,
            "format": SIGNATURE_FORMAT,
            "key_id": self.key_id,
            "manifest_sha256": self.manifest_sha256,
            "signature": base64.b64encode(self.signature).decode("ascii"),
            "version": SIGNATURE_VERSION,
        }

    def to_json(self) -> bytes:
        """The canonical ``signature.json`` bytes."""
        return canonical_json(self.to_dict(), what=SIGNATURE_MEMBER)


def _problems(obj: dict[str, Any]) -> list[str]:
    """Every way ``obj`` is not a v1 signature document (empty list when it is one)."""
    problems: list[str] = []
    missing = [name for name in _FIELDS if name not in obj]
    extra = sorted(name for name in obj if name not in _FIELDS)
    if missing:
        problems.append("missing field(s) " + ", ".join(repr(n) for n in missing))
    if extra:
        problems.append("unexpected field(s) " + ", ".join(repr(n) for n in extra))
    if "format" in obj and obj["format"] != SIGNATURE_FORMAT:
        problems.append(f"format is {obj['format']!r}, expected {SIGNATURE_FORMAT!r}")
    algorithm = obj.get("algorithm")
    if "algorithm" in obj and (type(algorithm) is not str or algorithm not in ALGORITHMS):
        expected = " or ".join(repr(a) for a in ALGORITHMS)
        problems.append(f"algorithm is {algorithm!r}, expected {expected}")
        algorithm = None
    if "key_id" in obj:
        key_id = obj["key_id"]
        if not (isinstance(key_id, str) and _KEY_ID_RE.fullmatch(key_id)):
            problems.append(
                f"key_id {key_id!r} is not a key fingerprint ('ed25519:' or 'hmac-sha256:' "
                f"followed by {_KEY_ID_HEX} lowercase hex digits)"
            )
        elif algorithm is not None and not key_id.startswith(algorithm + ":"):
            problems.append(f"key_id {key_id!r} is not an {algorithm} key id")
    if "manifest_sha256" in obj:
        digest = obj["manifest_sha256"]
        if not (isinstance(digest, str) and _SHA256_RE.fullmatch(digest)):
            problems.append(f"manifest_sha256 {digest!r} is not 64 lowercase hex digits")
    if "signature" in obj:
        problems.extend(_signature_problems(obj["signature"], algorithm))
    return problems


def _signature_problems(value: Any, algorithm: str | None) -> list[str]:
    if not isinstance(value, str):
        return [f"signature is {type(value).__name__}, expected a base64 string"]
    try:
        raw = base64.b64decode(value.encode("ascii"), validate=True)
    except (UnicodeEncodeError, binascii.Error):
        return ["signature is not valid base64"]
    if base64.b64encode(raw).decode("ascii") != value:
        return ["signature is not canonical base64 (padded, no line breaks)"]
    if algorithm is not None and len(raw) != ALGORITHMS[algorithm]:
        return [
            f"signature is {len(raw)} bytes; an {algorithm} signature is "
            f"{ALGORITHMS[algorithm]} bytes"
        ]
    return []


def read_signature_document(
    signature_bytes: bytes | bytearray | memoryview, limits: Limits = DEFAULT_LIMITS
) -> SignatureDocument:
    """Parse and check ``signature.json`` (structure only: nothing is verified here).

    Args:
        signature_bytes: the member's bytes.
        limits: ``limits.max_signature_bytes`` caps its size.

    Returns:
        The :class:`SignatureDocument`.

    Raises:
        LimitExceededError: the document is larger than ``limits.max_signature_bytes``.
        UnsupportedVersionError: ``version`` is an integer other than 1.
        SignatureError: anything else: not strict canonical JSON (duplicate keys, whitespace),
            a missing or unexpected field, an unknown algorithm, a malformed key id, digest or
            base64 signature, or a signature of the wrong length. Every problem is listed.
    """
    obj = parse_json_strict(
        signature_bytes,
        what=SIGNATURE_MEMBER,
        max_bytes=limits.max_signature_bytes,
        error=SignatureError,
    )
    version = obj.get("version")
    if type(version) is int and version != SIGNATURE_VERSION:
        raise UnsupportedVersionError(
            f"{SIGNATURE_MEMBER}: version {version} is not supported by this reader "
            f"(it reads version {SIGNATURE_VERSION})"
        )
    problems = _problems(obj)
    if "version" in obj and type(version) is not int:
        problems.insert(0, f"version is {version!r}, expected {SIGNATURE_VERSION}")
    if problems:
        count = f"{len(problems)} problems" if len(problems) > 1 else "1 problem"
        raise SignatureError(f"{SIGNATURE_MEMBER} is malformed ({count}): " + "; ".join(problems))
    document = SignatureDocument(
        algorithm=obj["algorithm"],
        key_id=obj["key_id"],
        manifest_sha256=obj["manifest_sha256"],
        signature=base64.b64decode(obj["signature"]),
    )
    if document.to_json() != bytes(signature_bytes):
        raise SignatureError(
            f"{SIGNATURE_MEMBER} is not canonical JSON (sorted keys, no whitespace, "
            "no trailing newline)"
        )
    return document


def sign_manifest(manifest_bytes: bytes | bytearray | memoryview, signer: Signer) -> bytes:
    """Sign canonical manifest bytes; return the ``signature.json`` bytes.

    Args:
        manifest_bytes: the exact ``manifest.json`` bytes that will be stored.
        signer: an :class:`Ed25519Signer`, an :class:`HmacKey`, or any :class:`Signer`.

    Returns:
        Canonical ``signature.json`` bytes.

    Raises:
        InvalidKeyError: the signer's algorithm or key id is not one this format knows, or
            it returned a signature of the wrong type or length.
        MissingDependencyError: an Ed25519 signer without ``cryptography``.

    Example:
        >>> key = HmacKey(bytes(32))
        >>> doc = sign_manifest(b'{"format":"hkstore"}', key)
        >>> verify_manifest_signature(doc, b'{"format":"hkstore"}', [key]) == key.key_id
        True
    """
    algorithm, key_id = signer.algorithm, signer.key_id
    if not isinstance(algorithm, str) or algorithm not in ALGORITHMS:
        expected = " or ".join(repr(a) for a in ALGORITHMS)
        raise InvalidKeyError(f"signer algorithm {algorithm!r} is not supported ({expected})")
    if not (
        isinstance(key_id, str)
        and _KEY_ID_RE.fullmatch(key_id)
        and key_id.startswith(algorithm + ":")
    ):
        raise InvalidKeyError(f"signer key id {key_id!r} is not an {algorithm} key fingerprint")
    manifest = bytes(manifest_bytes)
    signature = signer.sign(signing_payload(manifest))
    if not isinstance(signature, bytes) or len(signature) != ALGORITHMS[algorithm]:
        size = len(signature) if isinstance(signature, bytes) else type(signature).__name__
        raise InvalidKeyError(
            f"signer {key_id} returned a signature of {size} bytes; "
            f"{algorithm} signatures are {ALGORITHMS[algorithm]} bytes"
        )
    document = SignatureDocument(
        algorithm=algorithm,
        key_id=key_id,
        manifest_sha256=hashlib.sha256(manifest).hexdigest(),
        signature=signature,
    )
    return document.to_json()


def verify_manifest_signature(
    signature_bytes: bytes | bytearray | memoryview,
    manifest_bytes: bytes | bytearray | memoryview,
    verifiers: Sequence[Verifier],
    *,
    limits: Limits = DEFAULT_LIMITS,
) -> str:
    """Check that ``signature.json`` is a valid signature of the manifest by a trusted key.

    The key is chosen from ``verifiers`` (the caller's trusted keys) by the document's key id
    *and* algorithm; nothing shipped in the archive is ever used as a key.

    Args:
        signature_bytes: the ``signature.json`` bytes.
        manifest_bytes: the exact ``manifest.json`` bytes of the same archive.
        verifiers: the trusted keys.
        limits: ``limits.max_signature_bytes`` caps the document's size.

    Returns:
        The key id of the trusted key that verified the signature.

    Raises:
        LimitExceededError: the document is too large.
        UnsupportedVersionError: the document has another version.
        SignatureError: the document is malformed, was made for another manifest (its
            ``manifest_sha256`` differs: replayed signature), or does not verify.
        UntrustedKeyError: no trusted key has the document's key id and algorithm; the
            message names the key id found and the trusted ones.
    """
    document = read_signature_document(signature_bytes, limits)
    manifest = bytes(manifest_bytes)
    actual = hashlib.sha256(manifest).hexdigest()
    if actual != document.manifest_sha256:
        raise SignatureError(
            f"{SIGNATURE_MEMBER}: the signature is for a manifest with sha256 "
            f"{document.manifest_sha256}, but manifest.json has sha256 {actual} "
            "(signature replayed from another archive, or manifest changed)"
        )
    return verify_with(
        verifiers,
        key_id=document.key_id,
        algorithm=document.algorithm,
        payload=signing_payload(manifest),
        signature=document.signature,
        where=SIGNATURE_MEMBER,
        signed="manifest.json",
        content="manifest",
    )


@dataclass(frozen=True)
class DocumentSignature:
    """A signature carried inside a JSON document (a config, a round record), as parsed.

    Attributes:
        algorithm: the algorithm it claims (``"ed25519"`` or ``"hmac-sha256"``).
        key_id: the key id it claims (unverified).
        signature: the raw signature bytes.
    """

    algorithm: str
    key_id: str
    signature: bytes


def verify_with(
    verifiers: Sequence[Verifier],
    *,
    key_id: str,
    algorithm: str,
    payload: bytes,
    signature: bytes,
    where: str,
    signed: str,
    content: str,
) -> str:
    """Verify ``signature`` over ``payload`` with the caller's verifier for ``key_id``.

    The verifier is chosen by key id *and* algorithm among the caller's ``verifiers`` (never
    from the signed data).

    Args:
        verifiers: the trusted keys.
        key_id, algorithm: what the signature claims.
        payload: the exact signed bytes (context prefix included).
        signature: the raw signature.
        where: names the signature in messages (``"signature.json"``, ``"config"``).
        signed: names what was signed, for messages (``"manifest.json"``).
        content: what may have been tampered with besides the signature (``"manifest"``).

    Returns:
        ``key_id``, once verified.

    Raises:
        UntrustedKeyError: no trusted verifier has that key id and algorithm.
        SignatureError: the signature does not verify.
    """
    candidates = [v for v in verifiers if v.key_id == key_id and v.algorithm == algorithm]
    if not candidates:
        trusted = ", ".join(sorted({v.key_id for v in verifiers})) or "none given"
        raise UntrustedKeyError(
            f"{where}: signed by {key_id} ({algorithm}), which is not a trusted key "
            f"(trusted: {trusted})"
        )
    for verifier in candidates:
        if verifier.verify(payload, signature):
            return key_id
    raise SignatureError(
        f"{where}: the {algorithm} signature by {key_id} does not verify over {signed} "
        f"(tampered signature or {content})"
    )
