"""Exit codes of the ``hkstore`` command and the one place where exceptions map to them."""

from __future__ import annotations

import enum
import sys
import traceback
from collections.abc import Callable

from hkstore._cli._escape import printable
from hkstore.errors import (
    ContainerError,
    DeclearnFormatError,
    DigestMismatchError,
    HkstoreError,
    InvalidKeyError,
    LimitExceededError,
    ManifestError,
    MissingDependencyError,
    RefusedCodeError,
    SignatureError,
    TrustPolicyError,
    UnsupportedVersionError,
    WeightsFormatError,
)

__all__ = ["ExitCode", "UsageError", "check_name", "exit_code_for", "run_verb"]


class ExitCode(enum.IntEnum):
    """What ``hkstore`` exits with (the contract is 0, 1 and 2; 3 and 130 are never a verdict)."""

    OK = 0
    #: The input was read and a check failed: bad structure, schema, limit, digest or
    #: signature, or code that the converter refuses.
    CHECK_FAILED = 1
    #: Bad command line, or input that cannot be judged: missing, unreadable, not a file,
    #: a key file that does not load, a newer format version, a malformed declearn input.
    USAGE = 2
    #: A bug in hkstore (an exception that is not part of the error family).
    INTERNAL = 3
    #: Interrupted by Ctrl-C.
    INTERRUPTED = 130


class UsageError(Exception):
    """A usage problem or an input that cannot be judged (exit 2); the message says which."""


_USAGE_ERRORS = (
    UsageError,
    DeclearnFormatError,
    UnsupportedVersionError,
    InvalidKeyError,
    MissingDependencyError,
    TrustPolicyError,
)


def exit_code_for(exc: BaseException) -> ExitCode:
    """Map an exception to the exit status (the only mapping in the command).

    Order matters: bad options, key files that do not load, a missing optional dependency
    and a newer format version are input this command cannot judge (2); any other
    :class:`~hkstore.errors.HkstoreError` is a failed check (1); a file the system cannot
    read or write is a usage problem (2); anything else is a bug (3).
    """
    if isinstance(exc, _USAGE_ERRORS):
        return ExitCode.USAGE
    if isinstance(exc, HkstoreError):
        return ExitCode.CHECK_FAILED
    if isinstance(exc, OSError):
        return ExitCode.USAGE
    if isinstance(exc, KeyboardInterrupt):
        return ExitCode.INTERRUPTED
    return ExitCode.INTERNAL


# Most specific first: the first matching class names the check.
_CHECK_NAMES: tuple[tuple[type[BaseException], str], ...] = (
    (UnsupportedVersionError, "format version"),
    (LimitExceededError, "limits"),
    (ContainerError, "container"),
    (ManifestError, "manifest"),
    (WeightsFormatError, "weights"),
    (DigestMismatchError, "digests"),
    (SignatureError, "signature"),
    (RefusedCodeError, "code"),
)


def check_name(exc: BaseException) -> str:
    """Name the check an exception reports as failed (``"digests"``, ``"signature"``...)."""
    for cls, name in _CHECK_NAMES:
        if isinstance(exc, cls):
            return name
    return "archive"


def run_verb(verb: str, call: Callable[[], int], *, debug: bool = False) -> int:
    """Run one verb and turn whatever it raises into a diagnostic on stderr and an exit status.

    This is the one place exceptions become exit codes (through :func:`exit_code_for`).
    A bug (exit 3) always prints its traceback; ``debug`` prints it for every error.
    """
    try:
        return int(call())
    except (Exception, KeyboardInterrupt) as exc:
        code = exit_code_for(exc)
        if debug or code is ExitCode.INTERNAL:
            sys.stderr.write(printable(traceback.format_exc()))
        sys.stderr.write(printable(f"hkstore: {verb}: {_describe(exc, code)}") + "\n")
        return code


def _describe(exc: BaseException, code: ExitCode) -> str:
    if code is ExitCode.INTERNAL:
        return (f"internal error ({type(exc).__name__}: {exc}); this is a bug in hkstore, "
                "please report it with the traceback above")
    if code is ExitCode.INTERRUPTED:
        return "interrupted"
    if isinstance(exc, OSError) and not isinstance(exc, HkstoreError):
        where = f"{exc.filename}: " if exc.filename else ""
        return f"{where}{exc.strerror or exc}"
    if code is ExitCode.CHECK_FAILED:
        return f"{check_name(exc)} check failed: {exc}"
    return str(exc)
