"""What every verb shares: opening input archives, trusted keys, output streams, sizes, progress."""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TextIO

from hkstore._cli._escape import printable
from hkstore._cli._status import UsageError

if TYPE_CHECKING:
    from hkstore.store import Archive, Signer, Trust

__all__ = [
    "Progress",
    "emit",
    "emit_json",
    "emit_report",
    "human_bytes",
    "load_signer",
    "load_trust",
    "note",
    "open_input",
    "parse_storage_options",
    "printable",
    "write_stderr",
]

#: Verifying at least this many tensor bytes shows a progress line (on a terminal only).
PROGRESS_MIN_BYTES = 1 << 30


def parse_storage_options(items: Sequence[str]) -> dict[str, Any]:
    """Turn ``--storage-option KEY=VALUE`` items into fsspec storage options.

    A value that is a JSON literal (``true``, ``false``, ``null``, a number) becomes that
    value; any other value stays a string.

    Raises:
        UsageError: an item without ``=`` or with an empty key.

    Example:
        >>> parse_storage_options(["endpoint_url=http://127.0.0.1:9000", "anon=true"])
        {'endpoint_url': 'http://127.0.0.1:9000', 'anon': True}
    """
    options: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError(f"--storage-option: expected KEY=VALUE, got {item!r}")
        try:
            parsed = json.loads(value)
        except ValueError:
            parsed = value
        options[key] = parsed if parsed is None or isinstance(parsed, (bool, int, float)) else value
    return options


def open_input(
    path: str, *, workers: int | None = None, storage_options: Mapping[str, Any] | None = None
) -> Archive:
    """Open an archive named on the command line (container and manifest checked).

    A path that does not exist, cannot be read or is not a regular file (a folder, a FIFO,
    a device: refused at once, without blocking) is a :class:`UsageError` (exit 2): there is
    no file to judge. Any regular file is then judged like every other entry point judges
    it: one that is not an archive at all fails the container check (exit 1), with the
    library's error, so that the command and the library give the same verdict.

    Raises:
        UsageError: as above.
        ContainerError, ManifestError, LimitExceededError, UnsupportedVersionError: from
            :func:`hkstore.store.open_archive`.
    """
    from hkstore.errors import ContainerError
    from hkstore.store import is_url, local_path, open_archive, open_regular

    if is_url(path):
        local = local_path(path)
        if local is None:
            return _open_remote(path, workers, storage_options)
        path = local
    try:
        fd = open_regular(path)
    except FileNotFoundError:
        raise UsageError(f"{path}: no such file") from None
    except ContainerError as exc:  # a folder, FIFO, device or socket
        raise UsageError(str(exc)) from None
    except OSError as exc:
        raise UsageError(f"{path}: cannot read: {exc.strerror}") from None
    os.close(fd)
    return open_archive(path, workers=workers)


def _open_remote(
    url: str, workers: int | None, storage_options: Mapping[str, Any] | None
) -> Archive:
    """Open an archive in object storage; a missing object or extra is a usage error."""
    from hkstore.errors import MissingDependencyError
    from hkstore.store import open_archive, remote_filesystem

    try:
        fs, key = remote_filesystem(url, storage_options)
        kind = fs.info(key).get("type")
    except MissingDependencyError as exc:
        raise UsageError(str(exc)) from None
    except FileNotFoundError:
        raise UsageError(f"{url}: no such object") from None
    except OSError as exc:
        raise UsageError(f"{url}: cannot read: {exc}") from None
    if kind != "file":
        raise UsageError(f"{url}: is a {kind}, not an object")
    return open_archive(url, workers=workers, storage_options=storage_options)


def load_trust(
    keys: Sequence[str] = (),
    hmac_secret_files: Sequence[str] = (),
    *,
    require_signature: bool = False,
    approved: Sequence[str] = (),
    modules: Sequence[str] = (),
    allow_stdlib: bool = False,
    allow_pickle: bool = False,
    allow_python_mismatch: bool = False,
) -> Trust:
    """Build the :class:`~hkstore.store.Trust` described by the command line's options.

    ``--key``/``--hmac-secret-file`` give the keys, ``--require-signature`` requires one of
    them; ``--approve``, ``--allow-module``, ``--allow-stdlib`` and ``--allow-pickle`` describe
    the code policy whose verdict ``--functions`` reports (the command itself never imports
    or unpickles anything).

    Raises:
        UsageError: a key file is missing, unreadable or not a key (the message names it),
            ``require_signature`` without any key, or options that ``Trust`` refuses.
    """
    from hkstore.errors import TrustPolicyError
    from hkstore.store import Trust, load_hmac_key, load_verifier

    verifiers: list[Any] = [_key_file("--key", path, load_verifier) for path in keys]
    verifiers += [_key_file("--hmac-secret-file", p, load_hmac_key) for p in hmac_secret_files]
    if require_signature and not verifiers:
        raise UsageError("--require-signature needs the keys to check with: --key FILE or "
                         "--hmac-secret-file FILE")
    try:
        return Trust(keys=verifiers, require_signature=require_signature, approved=approved,
                     modules=modules, allow_stdlib=allow_stdlib, allow_pickle=allow_pickle,
                     allow_python_mismatch=allow_python_mismatch)
    except TrustPolicyError as exc:
        raise UsageError(str(exc)) from None


def load_signer(*, key: str | None, hmac_secret_file: str | None) -> Signer:
    """Load the signing key named by ``--key`` (Ed25519 private key) or ``--hmac-secret-file``.

    Raises:
        UsageError: the file is missing, unreadable or not such a key.
    """
    from hkstore.store import load_hmac_key
    from hkstore.store import load_signer as load_ed25519_signer

    if key is not None:
        return _key_file("--key", key, load_ed25519_signer)
    assert hmac_secret_file is not None  # argparse makes one of the two required
    return _key_file("--hmac-secret-file", hmac_secret_file, load_hmac_key)


def _key_file(option: str, path: str, loader: Callable[[str], Any]) -> Any:
    """Load one key file; every way it can fail is a usage error naming the option and file."""
    from hkstore.errors import HkstoreError

    try:
        return loader(path)
    except FileNotFoundError:
        raise UsageError(f"{option} {path}: no such file") from None
    except OSError as exc:
        raise UsageError(f"{option} {path}: cannot read: {exc.strerror}") from None
    except HkstoreError as exc:
        message = str(exc)
        if not message.startswith(path):  # key errors usually name the file already
            message = f"{path}: {message}"
        raise UsageError(f"{option} {message}") from None


# --- output -----------------------------------------------------------------------------------


def emit(text: str) -> None:
    """Write data (the command's result) to stdout, one trailing newline added."""
    _write(sys.stdout, text + "\n")


def emit_json(document: Any) -> None:
    """Write a JSON document to stdout (indented, keys in the order built, ASCII only: every
    character outside ASCII, control characters included, is a ``\\u`` escape)."""
    _write(sys.stdout, json.dumps(document, indent=2, ensure_ascii=True, allow_nan=False) + "\n")


def emit_report(report: Any, render: Callable[[Any], str], *, as_json: bool) -> None:
    """Write a report to stdout: its JSON document with ``--json``, else ``render(report)``."""
    if as_json:
        emit_json(report)
    else:
        emit(render(report))


def note(text: str) -> None:
    """Write a diagnostic (never data) to stderr."""
    _write(sys.stderr, f"hkstore: {text}\n")


def write_stderr(text: str) -> None:
    """Write ``text`` to stderr as is, but escaped (:func:`printable`)."""
    _write(sys.stderr, text)


def _write(stream: TextIO, text: str) -> None:
    """Write ``text`` (escaped by :func:`printable`: this is the only way the command writes
    to its output streams)."""
    text = printable(text)
    try:
        stream.write(text)
        stream.flush()
    except BrokenPipeError:
        # The reader went away (`hkstore inspect x | head`): stop writing, keep the status.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, stream.fileno())
        os.close(devnull)


def human_bytes(n: int) -> str:
    """``1536`` -> ``"1.5 KiB"`` (binary units; bytes below 1 KiB exactly)."""
    if n < 1024:
        return f"{n} B"
    value = float(n)
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        value /= 1024
        if value < 1024 or unit == "TiB":
            break
    return f"{value:.1f} {unit}"


class Progress:
    """A one-line progress meter on stderr, shown only on a terminal and for big inputs."""

    def __init__(self, label: str, total: int, *, stream: TextIO | None = None) -> None:
        self._stream = stream if stream is not None else sys.stderr
        self._label = label
        self._total = max(total, 1)
        self._done = 0
        self._last = 0.0
        self.enabled = total >= PROGRESS_MIN_BYTES and _isatty(self._stream)

    def advance(self, nbytes: int) -> None:
        """Count ``nbytes`` more as done; redraw at most ten times a second."""
        self._done += nbytes
        if not self.enabled:
            return
        now = time.monotonic()
        if now - self._last >= 0.1 or self._done >= self._total:
            self._last = now
            percent = 100 * self._done // self._total
            self._stream.write(
                f"\r{self._label}: {percent:3d}% ({human_bytes(self._done)} of "
                f"{human_bytes(self._total)})"
            )
            self._stream.flush()

    def close(self) -> None:
        """End the progress line (erase it) so later messages start clean."""
        if self.enabled:
            self._stream.write("\r\x1b[K")
            self._stream.flush()


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
