"""Key files: Ed25519 key pairs in standard encodings, and HMAC secret files.

Formats read and written:

- Ed25519 private key (``NAME.key``): PEM PKCS#8 (``-----BEGIN PRIVATE KEY-----``), optionally
  encrypted with a passphrase (``-----BEGIN ENCRYPTED PRIVATE KEY-----``); OpenSSH private
  keys (``-----BEGIN OPENSSH PRIVATE KEY-----``) are read too. Written mode ``0600`` from the
  moment the file exists.
- Ed25519 public key (``NAME.pub``): PEM SubjectPublicKeyInfo (``-----BEGIN PUBLIC KEY-----``);
  OpenSSH public key lines (``ssh-ed25519 AAAA... comment``) are read too.
- HMAC-SHA256 secret: the file's bytes, exactly (no newline stripping, no decoding), at least
  32 of them.

Raw 32-byte Ed25519 key files are *not* read: 32 raw bytes cannot say whether they are a
private seed, a public key or an HMAC secret, and guessing wrong silently trusts or uses the
wrong key. Programs holding raw keys use ``Ed25519Signer.from_private_bytes`` /
``Ed25519Verifier.from_public_bytes``.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
from pathlib import Path
from typing import Any

from hkstore.errors import ContainerError, InvalidKeyError
from hkstore.store._atomic import fsync_folder
from hkstore.store._fileio import open_regular
from hkstore.store._signing import Ed25519Signer, Ed25519Verifier, HmacKey, require_cryptography

__all__ = [
    "MAX_KEY_FILE_BYTES",
    "PRIVATE_KEY_SUFFIX",
    "PUBLIC_KEY_SUFFIX",
    "generate_ed25519_keypair",
    "load_hmac_key",
    "load_signer",
    "load_verifier",
    "private_key_pem",
    "public_key_pem",
]

#: Key and secret files larger than this are refused unread.
MAX_KEY_FILE_BYTES = 64 * 1024
PRIVATE_KEY_SUFFIX = ".key"
PUBLIC_KEY_SUFFIX = ".pub"

_PEM_LABEL = re.compile(rb"-----BEGIN ([A-Z0-9 ]+)-----")
_PRIVATE_LABELS = (b"PRIVATE KEY", b"ENCRYPTED PRIVATE KEY", b"OPENSSH PRIVATE KEY")
_FORMATS_HELP = (
    "expected an Ed25519 key as PEM (PKCS#8 'PRIVATE KEY' or SubjectPublicKeyInfo "
    "'PUBLIC KEY', as written by `hkstore keygen`) or OpenSSH"
)


# --- writing ----------------------------------------------------------------------------------


def private_key_pem(signer: Ed25519Signer, *, passphrase: bytes | None = None) -> bytes:
    """Encode a signer's private key as PEM PKCS#8, encrypted when ``passphrase`` is given."""
    from cryptography.hazmat.primitives import serialization

    encryption: Any = (
        serialization.BestAvailableEncryption(passphrase)
        if passphrase
        else serialization.NoEncryption()
    )
    return signer.private_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption
    )


def public_key_pem(verifier: Ed25519Verifier) -> bytes:
    """Encode a public key as PEM SubjectPublicKeyInfo."""
    from cryptography.hazmat.primitives import serialization

    return verifier.public_key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def generate_ed25519_keypair(
    stem: str | os.PathLike[str], *, passphrase: bytes | None = None
) -> str:
    """Create a new Ed25519 key pair as ``STEM.key`` (private, ``0600``) and ``STEM.pub``.

    The suffixes are appended (``team.v2`` gives ``team.v2.key``). Each file is written to a
    temp file in the same folder (the private one created ``0600``, so the key is never
    readable by others), fsynced, then hard-linked to its final name, which fails instead of
    replacing an existing file; the folder is fsynced. On file systems without hard links the
    temp file is renamed with ``os.replace`` after checking the name is free. If the public
    key cannot be written, the private key just written is removed again.

    Args:
        stem: path without suffix; the folder must exist.
        passphrase: encrypt the private key with it (PKCS#8 best available encryption).

    Returns:
        The key id (``"ed25519:"`` + 32 hex digits).

    Raises:
        FileExistsError: ``STEM.key`` or ``STEM.pub`` exists (nothing is written or changed).
        OSError: the folder is missing or not writable.
        MissingDependencyError: ``cryptography`` is not installed.

    Example:
        >>> key_id = generate_ed25519_keypair(tmp / "alice")
        >>> load_verifier(tmp / "alice.pub").key_id == key_id
        True
    """
    require_cryptography()
    base = os.fspath(stem)
    private_path = Path(base + PRIVATE_KEY_SUFFIX)
    public_path = Path(base + PUBLIC_KEY_SUFFIX)
    for path in (private_path, public_path):
        if os.path.lexists(path):
            raise FileExistsError(
                errno.EEXIST, "refusing to overwrite an existing key file", str(path)
            )
    signer = Ed25519Signer.generate()
    private_pem = private_key_pem(signer, passphrase=passphrase)
    public_pem = public_key_pem(signer.verifier())
    _write_new_file(private_path, private_pem, mode=0o600)
    try:
        _write_new_file(public_path, public_pem, mode=0o644)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(private_path)
        raise
    return signer.key_id


def _write_new_file(path: Path, data: bytes, *, mode: int) -> None:
    """Write ``data`` to a new file ``path`` atomically, never replacing an existing file."""
    folder = path.parent
    tmp = folder / f".{path.name}.{secrets.token_hex(8)}.tmp"
    flags = (
        os.O_WRONLY
        | os.O_CREAT
        | os.O_EXCL
        | getattr(os, "O_NOFOLLOW", 0)
        | getattr(os, "O_CLOEXEC", 0)
        | getattr(os, "O_BINARY", 0)
    )
    fd = os.open(tmp, flags, mode)  # created with the final permissions (minus umask)
    try:
        try:
            if mode == 0o600 and hasattr(os, "fchmod"):
                os.fchmod(fd, 0o600)  # exactly owner read/write, whatever the umask
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(tmp, path)  # atomic and refuses to replace an existing name
        except FileExistsError:
            raise FileExistsError(
                errno.EEXIST, "refusing to overwrite an existing key file", str(path)
            ) from None
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
                raise
            # no hard links here: rename, after checking that the name is still free
            if os.path.lexists(path):
                raise FileExistsError(
                    errno.EEXIST, "refusing to overwrite an existing key file", str(path)
                ) from None
            os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    fsync_folder(folder)


# --- reading ----------------------------------------------------------------------------------


def _read_key_file(path: str | os.PathLike[str], what: str) -> bytes:
    """Read a small key file, refusing anything larger than MAX_KEY_FILE_BYTES.

    Only a regular file is read (a FIFO or a device is refused at once, without blocking).
    """
    try:
        fd = open_regular(path)
    except ContainerError as exc:
        raise InvalidKeyError(f"{exc} (expected {what})") from None
    with os.fdopen(fd, "rb") as handle:
        size = os.fstat(handle.fileno()).st_size
        if size > MAX_KEY_FILE_BYTES:
            raise InvalidKeyError(
                f"{os.fspath(path)}: {size} bytes is too large for {what} "
                f"(at most {MAX_KEY_FILE_BYTES} bytes)"
            )
        data = handle.read(MAX_KEY_FILE_BYTES + 1)
    if len(data) > MAX_KEY_FILE_BYTES:
        raise InvalidKeyError(f"{os.fspath(path)}: too large for {what}")
    return data


def _pem_labels(data: bytes) -> list[bytes]:
    return _PEM_LABEL.findall(data)


def _describe(data: bytes) -> str:
    """Say what a file that is not an Ed25519 key looks like, for the error message."""
    labels = _pem_labels(data)
    if labels:
        return f"found a PEM {labels[0].decode('ascii')!r} block"
    if len(data) == 32:
        return "found 32 raw bytes (raw keys are not read: they cannot say what they are)"
    return f"found {len(data)} bytes that are not a PEM or OpenSSH key"


def _load_private(data: bytes, where: str, passphrase: bytes | None) -> Any:
    """Parse a private key file's bytes into a cryptography Ed25519PrivateKey."""
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization

    labels = _pem_labels(data)
    if len(labels) != 1 or labels[0] not in _PRIVATE_LABELS:
        if (len(labels) == 1 and labels[0] == b"PUBLIC KEY") or data.startswith(b"ssh-"):
            raise InvalidKeyError(
                f"{where}: this is a public key; signing needs the private key "
                f"(the {PRIVATE_KEY_SUFFIX} file)"
            )
        if len(labels) > 1:
            raise InvalidKeyError(f"{where}: {len(labels)} PEM blocks; expected one key")
        raise InvalidKeyError(
            f"{where}: not an Ed25519 private key: {_FORMATS_HELP}; {_describe(data)}"
        )
    password = passphrase or None
    key: Any
    try:
        if labels[0] == b"OPENSSH PRIVATE KEY":
            key = serialization.load_ssh_private_key(data, password)
        else:
            key = serialization.load_pem_private_key(data, password)
    except TypeError as exc:  # cryptography: password missing / given for a clear key
        if password is None:
            raise InvalidKeyError(
                f"{where}: the private key is encrypted; pass its passphrase"
            ) from None
        raise InvalidKeyError(f"{where}: {exc}") from None
    except UnsupportedAlgorithm as exc:
        raise InvalidKeyError(f"{where}: unsupported key type: {exc}") from None
    except ValueError as exc:
        if password is not None and labels[0] != b"PRIVATE KEY":
            raise InvalidKeyError(
                f"{where}: cannot decrypt the private key (wrong passphrase?)"
            ) from None
        raise InvalidKeyError(f"{where}: malformed private key: {exc}") from None
    return key


def _key_type(key: object) -> str:
    """Name a cryptography key type for messages ("RSAPrivateKey", "EllipticCurvePublicKey")."""
    for base in type(key).__mro__:
        if base.__module__.startswith("cryptography.") and not base.__name__.startswith("_"):
            return base.__name__
    return type(key).__name__


def load_signer(path: str | os.PathLike[str], *, passphrase: bytes | None = None) -> Ed25519Signer:
    """Load an Ed25519 private key file (PEM PKCS#8 or OpenSSH) as a signer.

    Args:
        path: the private key file (``NAME.key`` from :func:`generate_ed25519_keypair`).
        passphrase: the passphrase of an encrypted key.

    Returns:
        An :class:`~hkstore.store._signing.Ed25519Signer`.

    Raises:
        InvalidKeyError: the file is not an Ed25519 private key (a public key, another key
            type, another format, encrypted without passphrase or wrong passphrase); the
            message names the file.
        OSError: the file cannot be read.
        MissingDependencyError: ``cryptography`` is not installed.
    """
    require_cryptography()
    where = os.fspath(path)
    key = _load_private(_read_key_file(path, "a key file"), where, passphrase)
    try:
        return Ed25519Signer(key)
    except InvalidKeyError:
        raise InvalidKeyError(
            f"{where}: an {_key_type(key)}; hkstore signs with Ed25519 keys only"
        ) from None


def load_verifier(
    path: str | os.PathLike[str], *, passphrase: bytes | None = None
) -> Ed25519Verifier:
    """Load an Ed25519 public key file (or a private key file, whose public half is used).

    Args:
        path: PEM SubjectPublicKeyInfo (``NAME.pub``), an OpenSSH ``ssh-ed25519`` line, or a
            private key file as :func:`load_signer` reads.
        passphrase: the passphrase, when ``path`` is an encrypted private key.

    Returns:
        An :class:`~hkstore.store._signing.Ed25519Verifier`.

    Raises:
        InvalidKeyError: the file is not an Ed25519 key; the message names the file.
        OSError: the file cannot be read.
        MissingDependencyError: ``cryptography`` is not installed.
    """
    require_cryptography()
    where = os.fspath(path)
    data = _read_key_file(path, "a key file")
    labels = _pem_labels(data)
    if len(labels) == 1 and labels[0] in _PRIVATE_LABELS:
        key = _load_private(data, where, passphrase).public_key()
    else:
        key = _load_public(data, where, labels)
    try:
        return Ed25519Verifier(key)
    except InvalidKeyError:
        raise InvalidKeyError(
            f"{where}: an {_key_type(key)}; hkstore verifies Ed25519 keys only"
        ) from None


def _load_public(data: bytes, where: str, labels: list[bytes]) -> Any:
    """Parse a public key file's bytes (PEM SubjectPublicKeyInfo or an OpenSSH line)."""
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization

    if len(labels) > 1:
        raise InvalidKeyError(f"{where}: {len(labels)} PEM blocks; expected one key")
    is_pem = labels == [b"PUBLIC KEY"]
    if not is_pem and (labels or not data.startswith(b"ssh-")):
        raise InvalidKeyError(f"{where}: not an Ed25519 key: {_FORMATS_HELP}; {_describe(data)}")
    try:
        if is_pem:
            return serialization.load_pem_public_key(data)
        return serialization.load_ssh_public_key(data)
    except UnsupportedAlgorithm as exc:
        raise InvalidKeyError(f"{where}: unsupported key type: {exc}") from None
    except ValueError as exc:
        raise InvalidKeyError(f"{where}: malformed public key: {exc}") from None


def load_hmac_key(source: str | os.PathLike[str] | bytes | bytearray) -> HmacKey:
    """Load an HMAC-SHA256 shared secret from a file (its exact bytes) or from bytes.

    A ``str`` is always a path: pass a secret held in memory as ``bytes``.

    Args:
        source: the secret file's path, or the secret itself as bytes.

    Returns:
        An :class:`~hkstore.store._signing.HmacKey`.

    Raises:
        InvalidKeyError: the secret is shorter than 32 bytes or the file is larger than
            :data:`MAX_KEY_FILE_BYTES` (the message names the file, never the secret).
        OSError: the file cannot be read.
    """
    if isinstance(source, bytes | bytearray):
        return HmacKey(bytes(source))
    where = os.fspath(source)
    data = _read_key_file(source, "an HMAC secret file")
    try:
        return HmacKey(data)
    except InvalidKeyError as exc:
        raise InvalidKeyError(f"{where}: {exc}") from None
