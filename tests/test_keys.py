"""Tests for hkstore.store._keys: Ed25519 key files (PEM, OpenSSH) and HMAC secret files."""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from hkstore.errors import InvalidKeyError
from hkstore.store._keys import (
    MAX_KEY_FILE_BYTES,
    generate_ed25519_keypair,
    load_hmac_key,
    load_signer,
    load_verifier,
)
from hkstore.store._signing import Ed25519Signer, HmacKey

FORMATS_HELP = (
    "expected an Ed25519 key as PEM (PKCS#8 'PRIVATE KEY' or SubjectPublicKeyInfo "
    "'PUBLIC KEY', as written by `hkstore keygen`) or OpenSSH"
)


@pytest.fixture
def umask_022() -> Iterator[None]:
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def _invalid(loader: object, path: Path) -> str:
    assert callable(loader)
    with pytest.raises(InvalidKeyError) as info:
        loader(path)
    message = str(info.value)
    assert message.startswith(f"{path}: ")
    return message[len(f"{path}: ") :]


# --- keygen -------------------------------------------------------------------------------


def test_generate_keypair_writes_pem_files_and_returns_key_id(
    tmp_path: Path, umask_022: None
) -> None:
    key_id = generate_ed25519_keypair(tmp_path / "alice")
    private, public = tmp_path / "alice.key", tmp_path / "alice.pub"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["alice.key", "alice.pub"]  # no litter
    assert private.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----\n")
    assert public.read_bytes().startswith(b"-----BEGIN PUBLIC KEY-----\n")
    assert _mode(private) == 0o600
    assert _mode(public) == 0o644
    assert key_id.startswith("ed25519:") and len(key_id) == len("ed25519:") + 32
    # stable across loads, and the same from either file
    assert load_signer(private).key_id == key_id == load_signer(private).key_id
    assert load_verifier(public).key_id == key_id
    assert load_verifier(private).key_id == key_id
    assert load_verifier(public) == load_verifier(private)


def test_generate_keypair_private_key_is_0600_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        generate_ed25519_keypair(tmp_path / "open")
    finally:
        os.umask(old)
    assert _mode(tmp_path / "open.key") == 0o600
    assert _mode(tmp_path / "open.pub") == 0o644


def test_generate_keypair_appends_suffixes(tmp_path: Path) -> None:
    generate_ed25519_keypair(str(tmp_path / "team.v2"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["team.v2.key", "team.v2.pub"]


@pytest.mark.parametrize("existing", ["alice.key", "alice.pub"])
def test_generate_keypair_never_overwrites(tmp_path: Path, existing: str) -> None:
    (tmp_path / existing).write_bytes(b"keep me")
    with pytest.raises(FileExistsError) as info:
        generate_ed25519_keypair(tmp_path / "alice")
    assert info.value.errno == errno.EEXIST
    assert info.value.filename == str(tmp_path / existing)
    assert str(info.value) == (
        f"[Errno 17] refusing to overwrite an existing key file: {str(tmp_path / existing)!r}"
    )
    assert [p.name for p in tmp_path.iterdir()] == [existing]
    assert (tmp_path / existing).read_bytes() == b"keep me"


def test_generate_keypair_loses_a_race_without_overwriting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another process creates NAME.pub between the check and the link: nothing is replaced,
    and the private key written moments before is removed again."""
    real_link = os.link

    def racing_link(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        if str(dst).endswith(".pub"):
            Path(dst).write_bytes(b"theirs")
        real_link(src, dst)

    monkeypatch.setattr(os, "link", racing_link)
    with pytest.raises(FileExistsError):
        generate_ed25519_keypair(tmp_path / "alice")
    assert [p.name for p in tmp_path.iterdir()] == ["alice.pub"]
    assert (tmp_path / "alice.pub").read_bytes() == b"theirs"


def test_generate_keypair_without_hard_links(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_links(src: object, dst: object) -> None:
        raise PermissionError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    key_id = generate_ed25519_keypair(tmp_path / "bob")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bob.key", "bob.pub"]
    assert _mode(tmp_path / "bob.key") == 0o600
    assert load_signer(tmp_path / "bob.key").key_id == key_id


def test_generate_keypair_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        generate_ed25519_keypair(tmp_path / "nope" / "alice")
    assert list(tmp_path.iterdir()) == []


# --- passphrases --------------------------------------------------------------------------


def test_encrypted_private_key(tmp_path: Path) -> None:
    key_id = generate_ed25519_keypair(tmp_path / "carol", passphrase=b"correct horse")
    private = tmp_path / "carol.key"
    assert private.read_bytes().startswith(b"-----BEGIN ENCRYPTED PRIVATE KEY-----\n")
    assert load_signer(private, passphrase=b"correct horse").key_id == key_id
    assert load_verifier(tmp_path / "carol.pub").key_id == key_id
    assert _invalid(load_signer, private) == "the private key is encrypted; pass its passphrase"
    with pytest.raises(InvalidKeyError) as info:
        load_signer(private, passphrase=b"wrong")
    assert str(info.value) == f"{private}: cannot decrypt the private key (wrong passphrase?)"


def test_passphrase_for_a_clear_key_is_refused(tmp_path: Path) -> None:
    generate_ed25519_keypair(tmp_path / "dave")
    with pytest.raises(InvalidKeyError, match=r"dave\.key: Password was given but private key"):
        load_signer(tmp_path / "dave.key", passphrase=b"x")


# --- other encodings and wrong files ------------------------------------------------------------


def test_openssh_keys_are_read(tmp_path: Path) -> None:
    signer = Ed25519Signer.generate()
    private = tmp_path / "id_ed25519"
    public = tmp_path / "id_ed25519.pub"
    private.write_bytes(
        signer.private_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        )
    )
    public.write_bytes(
        signer.private_key.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        )
        + b" alice@example\n"
    )
    assert load_signer(private).key_id == signer.key_id
    assert load_verifier(private).key_id == signer.key_id
    assert load_verifier(public).key_id == signer.key_id


def test_wrong_format_errors_name_the_file(tmp_path: Path) -> None:
    text = tmp_path / "notes.txt"
    text.write_bytes(b"hello world")
    found = "found 11 bytes that are not a PEM or OpenSSH key"
    assert _invalid(load_signer, text) == f"not an Ed25519 private key: {FORMATS_HELP}; {found}"
    assert _invalid(load_verifier, text) == f"not an Ed25519 key: {FORMATS_HELP}; {found}"
    raw = tmp_path / "raw.key"
    raw.write_bytes(bytes(range(32)))
    assert _invalid(load_signer, raw).endswith(
        "; found 32 raw bytes (raw keys are not read: they cannot say what they are)"
    )
    cert = tmp_path / "cert.pem"
    cert.write_bytes(b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
    assert _invalid(load_verifier, cert).endswith("; found a PEM 'CERTIFICATE' block")


def test_public_key_given_to_load_signer(tmp_path: Path) -> None:
    generate_ed25519_keypair(tmp_path / "erin")
    pub = tmp_path / "erin.pub"
    assert _invalid(load_signer, pub) == (
        "this is a public key; signing needs the private key (the .key file)"
    )


def test_two_pem_blocks_are_refused(tmp_path: Path) -> None:
    generate_ed25519_keypair(tmp_path / "a")
    both = tmp_path / "both.pem"
    both.write_bytes((tmp_path / "a.key").read_bytes() + (tmp_path / "a.pub").read_bytes())
    assert _invalid(load_signer, both) == "2 PEM blocks; expected one key"
    assert _invalid(load_verifier, both) == "2 PEM blocks; expected one key"


def test_rsa_keys_are_refused(tmp_path: Path) -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private = tmp_path / "rsa.key"
    private.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    public = tmp_path / "rsa.pub"
    public.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    assert _invalid(load_signer, private) == (
        "an RSAPrivateKey; hkstore signs with Ed25519 keys only"
    )
    assert _invalid(load_verifier, public) == (
        "an RSAPublicKey; hkstore verifies Ed25519 keys only"
    )


def test_malformed_pem_body(tmp_path: Path) -> None:
    bad = tmp_path / "bad.pub"
    bad.write_bytes(b"-----BEGIN PUBLIC KEY-----\nnot base64\n-----END PUBLIC KEY-----\n")
    assert _invalid(load_verifier, bad).startswith("malformed public key: ")
    bad_private = tmp_path / "bad.key"
    bad_private.write_bytes(b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n")
    assert _invalid(load_signer, bad_private).startswith("malformed private key: ")


def test_huge_key_file_is_refused_unread(tmp_path: Path) -> None:
    big = tmp_path / "big.key"
    big.write_bytes(b"-" * (MAX_KEY_FILE_BYTES + 1))
    assert _invalid(load_signer, big) == (
        f"{MAX_KEY_FILE_BYTES + 1} bytes is too large for a key file (at most 65536 bytes)"
    )


def test_missing_key_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        load_verifier(tmp_path / "absent.pub")


# --- HMAC secrets -------------------------------------------------------------------------


def test_hmac_secret_file_is_read_byte_for_byte(tmp_path: Path) -> None:
    secret = os.urandom(32).hex().encode() + b"\n"  # e.g. `openssl rand -hex 32 > fed.secret`
    path = tmp_path / "fed.secret"
    path.write_bytes(secret)
    key = load_hmac_key(path)
    assert key == HmacKey(secret)
    assert key.key_id == load_hmac_key(str(path)).key_id == load_hmac_key(secret).key_id
    assert key.key_id != HmacKey(secret.rstrip(b"\n")).key_id


def test_hmac_short_secret_file_is_refused_without_showing_it(tmp_path: Path) -> None:
    path = tmp_path / "short.secret"
    path.write_bytes(b"hunter2")
    with pytest.raises(InvalidKeyError) as info:
        load_hmac_key(path)
    assert str(info.value) == (
        f"{path}: HMAC-SHA256 secret is 7 bytes; at least 32 random bytes are required "
        "(e.g. secrets.token_bytes(32))"
    )
    assert "hunter2" not in str(info.value)
    with pytest.raises(InvalidKeyError):
        load_hmac_key(b"")
