"""The trust policy: which keys, modules and pickles a loader agrees to; weights-only by default.

``Trust()`` imports nothing and unpickles nothing: a load takes weights, trainable mask and data
info from the archive and the caller passes the model and loss functions. Each option widens
that, and only that:

============================  ==================================================================
``keys=[...]``                public keys / HMAC keys whose signatures are trusted (paths to key
                              files are loaded at construction). Signed archives are verified
                              with them; the archive's own claims about keys are never used.
``modules=["mypkg"]``         references ``mypkg[.sub]:name`` may be imported (exact module or a
                              dotted sub-module; never ``mypkgx``, never private ``_`` segments).
``allow_pickle=True``         the pickled functions may be unpickled, *if* a signature made by
                              one of ``keys`` verifies (digests and Python version checked first).
``allow_unsigned=True``       with ``allow_pickle``: an unsigned pickle is unpickled as well.
                              Unsafe (it runs whatever code the blob holds): an
                              :class:`~hkstore.errors.UnsafeTrustWarning` is emitted on every use.
``require_signature=True``    every load/verify fails unless a signature by one of ``keys``
                              verifies, even weights-only.
``allow_python_mismatch``     with ``allow_pickle`` or ``approved``: unpickle a blob written by
                              another Python ``major.minor`` or implementation (it can crash
                              the interpreter).
``approved=[sha256, ...]``    the pickled functions whose ``functions.pkl.zst`` bytes have one of
                              these SHA-256 digests may be unpickled, signed or not: a receiver
                              that reviewed a blob accepts exactly that blob (``hkstore inspect``
                              prints the digest to pin). Any other blob is refused as before.
``allow_stdlib=True``         ``modules`` may name standard-library modules (refused by default:
                              several of their public functions start processes, e.g.
                              ``pydoc.pipepager``); the modules of :data:`REFUSED_MODULE_ROOTS`
                              stay refused even then.
============================  ==================================================================

Combinations that cannot mean what the caller intends are refused at construction with a
:class:`~hkstore.errors.TrustPolicyError` rather than silently ignored: ``allow_unsigned`` or
``allow_python_mismatch`` without ``allow_pickle`` (they only widen pickle loading),
``require_signature`` with ``allow_unsigned``, and ``require_signature`` without keys.
Allowing a module allows every public function in it and its sub-modules to be called with
JSON keyword arguments chosen by the archive, so list your own model packages only. Standard
library modules are refused unless ``allow_stdlib=True`` (a list of "safe" standard modules
could never be complete), and the standard and third-party modules that are code-execution
primitives by design (``os``, ``subprocess``, ``builtins``, ``pickle``, ``pydoc``...) are
refused outright.
"""

from __future__ import annotations

import os
import re
import sys
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from hkstore.errors import (
    RefusedCodeError,
    SignatureError,
    TrustPolicyError,
    UnsafeTrustWarning,
)
from hkstore.store._keys import load_verifier
from hkstore.store._signing import ALGORITHMS, Ed25519Signer, Verifier

__all__ = ["REFUSED_MODULE_ROOTS", "STDLIB_MODULES", "Trust"]

#: Top-level modules that ``Trust(modules=...)`` refuses: their public functions run commands,
#: evaluate code, load pickles or touch memory by design, so an allowlist entry for them (or
#: below them) would turn a reference into arbitrary code execution.
REFUSED_MODULE_ROOTS = frozenset(
    {
        "asyncio",  # create_subprocess_shell
        "bdb",
        "builtins",
        "cProfile",  # run(statement) executes code
        "code",
        "codeop",
        "ctypes",
        "cloudpickle",
        "dill",
        "distutils",
        "doctest",
        "ensurepip",
        "idlelib",
        "imp",
        "importlib",
        "joblib",
        "marshal",
        "multiprocessing",
        "nt",
        "os",
        "pdb",
        "pickle",
        "pkgutil",
        "posix",
        "profile",
        "pty",
        "pydoc",  # pipepager / tempfilepager run a shell command
        "runpy",
        "shelve",
        "shutil",
        "subprocess",
        "sys",
        "timeit",  # timeit(stmt) executes code
        "trace",
        "venv",
        "webbrowser",  # open() runs the browser command
        "zipimport",
    }
)

#: Names of the standard library's top-level modules (refused in ``modules`` unless
#: ``allow_stdlib=True``).
STDLIB_MODULES: frozenset[str] = frozenset(sys.stdlib_module_names)
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")

_FLAGS = (
    "allow_pickle",
    "allow_unsigned",
    "require_signature",
    "allow_python_mismatch",
    "allow_stdlib",
)


@dataclass(frozen=True, init=False, repr=False)
class Trust:
    """What a loader agrees to import or unpickle. Keyword-only; ``Trust()`` is weights-only.

    Args:
        keys: trusted keys: :class:`~hkstore.store._signing.Ed25519Verifier`,
            :class:`~hkstore.store._signing.HmacKey`, any ``Verifier``, an ``Ed25519Signer``
            (its public half is used), or the path of an Ed25519 public (or private) key file,
            loaded now with :func:`~hkstore.store._keys.load_verifier`. HMAC secrets are not
            accepted as paths (a path cannot say which kind it is): pass
            ``load_hmac_key(path)``. Duplicates are dropped.
        modules: module prefixes whose functions references may import.
        allow_pickle: allow unpickling the functions, when signed by one of ``keys``.
        allow_unsigned: with ``allow_pickle``, also unpickle unsigned functions (unsafe).
        require_signature: refuse any archive not signed by one of ``keys``.
        allow_python_mismatch: with ``allow_pickle`` or ``approved``, skip the Python version
            check (unsafe).
        approved: SHA-256 digests (64 hex digits) of reviewed ``functions.pkl.zst`` blobs that
            may be unpickled, signed or not; default none.
        allow_stdlib: let ``modules`` name standard-library modules (except the hard-refused
            :data:`REFUSED_MODULE_ROOTS`).

    Raises:
        TrustPolicyError: a key or module is invalid, or the options contradict each other
            (see the module docstring).
        InvalidKeyError: a key file is not an Ed25519 key (the message names the file).

    Example:
        >>> Trust()
        Trust(keys=(), modules=()) [weights only]
        >>> Trust(modules=["mypkg"]).allows_module("mypkg.nets")
        True
    """

    keys: tuple[Verifier, ...]
    modules: tuple[str, ...]
    allow_pickle: bool
    allow_unsigned: bool
    require_signature: bool
    allow_python_mismatch: bool
    approved: tuple[str, ...]
    allow_stdlib: bool

    def __init__(
        self,
        *,
        keys: Iterable[Verifier | Ed25519Signer | str | os.PathLike[str]] = (),
        modules: Iterable[str] = (),
        allow_pickle: bool = False,
        allow_unsigned: bool = False,
        require_signature: bool = False,
        allow_python_mismatch: bool = False,
        approved: Iterable[str] = (),
        allow_stdlib: bool = False,
    ) -> None:
        flags = {
            "allow_pickle": allow_pickle,
            "allow_unsigned": allow_unsigned,
            "require_signature": require_signature,
            "allow_python_mismatch": allow_python_mismatch,
            "allow_stdlib": allow_stdlib,
        }
        for name, value in flags.items():
            if type(value) is not bool:  # "no" or 0 must not pass for a decision
                raise TrustPolicyError(f"Trust({name}=...) must be True or False, got {value!r}")
        verifiers = _verifiers(keys)
        module_names = _modules(modules, allow_stdlib=allow_stdlib)
        digests = _approved(approved)
        problems = []
        if allow_unsigned and not allow_pickle:
            problems.append(
                "allow_unsigned=True has no effect without allow_pickle=True (it only widens "
                "which pickles may be unpickled); pass both, or neither"
            )
        if allow_python_mismatch and not (allow_pickle or digests):
            problems.append(
                "allow_python_mismatch=True has no effect without allow_pickle=True or "
                "approved=[...] (it only widens which pickles may be unpickled)"
            )
        if require_signature and allow_unsigned:
            problems.append("require_signature=True contradicts allow_unsigned=True")
        if require_signature and not verifiers:
            problems.append(
                "require_signature=True needs keys=[...] to verify signatures with; "
                "with no keys every archive would be refused"
            )
        if problems:
            raise TrustPolicyError("invalid Trust: " + "; ".join(problems))
        object.__setattr__(self, "keys", verifiers)
        object.__setattr__(self, "modules", module_names)
        object.__setattr__(self, "approved", digests)
        for name, value in flags.items():
            object.__setattr__(self, name, value)

    # -- what the archive layer asks ---------------------------------------------------------

    @property
    def verifiers(self) -> tuple[Verifier, ...]:
        """The trusted keys, as verifiers (``keys`` after loading paths)."""
        return self.keys

    @property
    def key_ids(self) -> tuple[str, ...]:
        """The trusted keys' ids, in order."""
        return tuple(key.key_id for key in self.keys)

    def wants_signature_checked(self, signed: bool, *, what: str) -> bool:
        """Apply the policy to a signature's presence: whether it must now be verified.

        The one rule for archives, configs and round records: an unsigned ``what`` passes
        unless a signature is required; a signature is verified only when the policy has keys
        (``require_signature`` always comes with keys: the constructor refuses it without).

        Args:
            signed: whether ``what`` carries a signature.
            what: names the document in the error (``"archive"``, ``"config"``...).

        Returns:
            ``True`` when the caller must verify the signature with :attr:`verifiers`.

        Raises:
            SignatureError: ``what`` is unsigned and the policy requires a signature.

        Example:
            >>> Trust().wants_signature_checked(True, what="archive")
            False
        """
        if not signed:
            if self.require_signature:
                raise SignatureError(
                    f"{what} is unsigned, but the trust policy requires a signature"
                )
            return False
        return bool(self.verifiers)

    @property
    def unsafe_options(self) -> tuple[str, ...]:
        """The options set that let unverified code run (empty for a safe policy)."""
        return tuple(
            name for name in ("allow_unsigned", "allow_python_mismatch") if getattr(self, name)
        )

    def allows_module(self, name: str) -> bool:
        """Tell whether references may import module ``name``.

        True when ``name`` is one of ``modules`` or a dotted sub-module of one ("mypkg" allows
        "mypkg" and "mypkg.nets", not "mypkgx"), and ``name`` itself is a dotted identifier
        of ASCII identifiers with no private (``_``-prefixed) segment. Never raises.
        """
        if not isinstance(name, str) or _module_problem(name) is not None:
            return False
        return self.allows_definition_in(name)

    def allows_definition_in(self, name: str) -> bool:
        """Tell whether an object a reference leads to may be *defined* in module ``name``.

        A reference is resolved attribute by attribute, and every object on the way must be
        defined (its ``__module__``) in one of ``modules`` or below it, private sub-modules
        included: ``mypkg:forward`` may lead to a function defined in ``mypkg._impl`` and
        re-exported by ``mypkg``, but not to ``subprocess.run`` merely imported into ``mypkg``.
        Never raises.

        Example:
            >>> Trust(modules=["mypkg"]).allows_definition_in("mypkg._impl")
            True
            >>> Trust(modules=["mypkg"]).allows_definition_in("subprocess")
            False
        """
        if not isinstance(name, str):
            return False
        return any(name == allowed or name.startswith(allowed + ".") for allowed in self.modules)

    def check_pickle_allowed(
        self, signature_key_id: str | None, blob_sha256: str | None = None
    ) -> None:
        """Refuse unpickling unless this policy allows it for this blob and signature state.

        Call it after the signature was verified with :attr:`verifiers` and the blob's digest
        was computed from its bytes (never taken from the archive's word). A blob whose
        digest is one of :attr:`approved` is allowed, signed or not. Emits
        :class:`~hkstore.errors.UnsafeTrustWarning` when an unsigned pickle is allowed through
        ``allow_unsigned``.

        Args:
            signature_key_id: the key id that verified the signature, or ``None`` when the
                source is unsigned or its signature was not checked.
            blob_sha256: hex SHA-256 of the pickle blob's bytes, for :attr:`approved`.

        Raises:
            RefusedCodeError: the blob is not approved and ``allow_pickle`` is off; or it is
                not signed by a trusted key and ``allow_unsigned`` is off. The message says
                which options would allow it.
        """
        if blob_sha256 is not None and blob_sha256 in self.approved:
            return
        if self.approved and not self.allow_pickle:
            raise RefusedCodeError(
                f"refusing to unpickle the pickled functions: their sha256 {blob_sha256} is not "
                f"one of the {len(self.approved)} approved digest(s) of Trust(approved=[...]); "
                "review this blob (`hkstore inspect` prints its digest) and approve it, or "
                "pass the functions yourself (model=..., loss=...)"
            )
        if not self.allow_pickle:
            raise RefusedCodeError(
                "refusing to unpickle the pickled functions: the trust policy does not allow "
                "pickled code (allow_pickle=False). Options: pass the functions yourself "
                "(model=..., loss=...) and load the weights only; or "
                "Trust(allow_pickle=True, keys=[<the signer's public key>]) for a pickle signed "
                "by a key you trust; or Trust(allow_pickle=True, allow_unsigned=True) to run an "
                "unsigned pickle (unsafe: it can run any code)"
            )
        if signature_key_id is not None and signature_key_id in self.key_ids:
            return
        if signature_key_id is not None:
            reason = f"it is signed by {signature_key_id}, which is not one of the trusted keys"
        elif self.keys:
            reason = "it is not signed by any of the trusted keys"
        else:
            reason = (
                "the trust policy lists no keys to verify a signature with (an unsigned pickle, "
                "or a signature nobody checked)"
            )
        if self.allow_unsigned:
            warnings.warn(
                f"unpickling functions that are not signed by a trusted key ({reason}) because "
                "Trust(allow_unsigned=True): they can run any code",
                UnsafeTrustWarning,
                stacklevel=2,
            )
            return
        raise RefusedCodeError(
            f"refusing to unpickle the pickled functions: {reason}. Options: "
            "Trust(allow_pickle=True, keys=[<the signer's public key>]) if you trust the "
            "signer; or add allow_unsigned=True (unsafe: it can run any code); or pass the "
            "functions yourself (model=..., loss=...) and load the weights only"
        )

    def __repr__(self) -> str:
        parts = [f"keys={self.key_ids!r}", f"modules={self.modules!r}"]
        if self.approved:
            parts.append(f"approved={self.approved!r}")
        parts.extend(f"{name}=True" for name in _FLAGS if getattr(self, name))
        text = f"Trust({', '.join(parts)})"
        notes = {
            "allow_unsigned": "allow_unsigned runs unsigned pickled code",
            "allow_python_mismatch": "allow_python_mismatch unpickles code from another Python",
        }
        unsafe = [notes[name] for name in self.unsafe_options]
        if unsafe:
            return f"{text} [UNSAFE: {'; '.join(unsafe)}]"
        if not (self.modules or self.allow_pickle or self.approved):
            return f"{text} [weights only]"
        return text


def _verifiers(keys: Any) -> tuple[Verifier, ...]:
    """Validate and load ``Trust(keys=...)``; drop duplicates (same algorithm and key id)."""
    if isinstance(keys, str | bytes | os.PathLike) or not isinstance(keys, Iterable):
        raise TrustPolicyError(
            f"Trust(keys=...) takes a list of keys or key file paths, got {type(keys).__name__}"
            " (for one key write keys=[key])"
        )
    out: dict[tuple[str, str], Verifier] = {}
    for index, key in enumerate(keys):
        if isinstance(key, str | os.PathLike):
            verifier: Any = load_verifier(key)
        elif isinstance(key, Ed25519Signer):
            verifier = key.verifier()
        else:
            verifier = key
        algorithm = getattr(verifier, "algorithm", None)
        key_id = getattr(verifier, "key_id", None)
        if not callable(getattr(verifier, "verify", None)) or not isinstance(key_id, str):
            raise TrustPolicyError(
                f"Trust(keys=...)[{index}]: expected a key (Ed25519Verifier, HmacKey) or a key "
                f"file path, got {type(key).__name__}"
            )
        if not isinstance(algorithm, str) or algorithm not in ALGORITHMS:
            raise TrustPolicyError(
                f"Trust(keys=...)[{index}]: algorithm {algorithm!r} is not supported "
                f"({' or '.join(repr(a) for a in ALGORITHMS)})"
            )
        out.setdefault((algorithm, key_id), verifier)
    return tuple(out.values())


def _module_problem(name: str) -> str | None:
    """Say why ``name`` is not an acceptable module name (None when it is)."""
    parts = name.split(".")
    if not all(part.isascii() and part.isidentifier() for part in parts):
        return "is not a dotted module name (ASCII identifiers)"
    if any(part.startswith("_") for part in parts):
        return "has a private ('_') segment; private modules are never allowed"
    return None


def _checked_list(
    values: Any, option: str, usage: str, check: Callable[[Any], tuple[str, str | None]]
) -> tuple[str, ...]:
    """Validate a ``Trust`` list option: ``check(value)`` gives ``(kept form, problem)``;
    ``usage`` says what the list holds, for the message when it is no list at all.

    Every problem is listed at once; duplicates are dropped, order is kept.
    """
    if isinstance(values, str | bytes) or not isinstance(values, Iterable):
        raise TrustPolicyError(
            f"Trust({option}=...) takes a list of {usage.format(type(values).__name__)}"
        )
    out: dict[str, None] = {}
    problems = []
    for value in values:
        kept, problem = check(value)
        if problem is not None:
            problems.append(f"{value!r} {problem}")
        else:
            out.setdefault(kept, None)
    if problems:
        raise TrustPolicyError(f"Trust({option}=...): " + "; ".join(problems))
    return tuple(out)


def _approved(approved: Any) -> tuple[str, ...]:
    """Validate ``Trust(approved=...)``: SHA-256 hex digests (any case, kept lower-case)."""

    def check(digest: Any) -> tuple[str, str | None]:
        text = digest.strip().lower() if isinstance(digest, str) else ""
        if not _SHA256_HEX.fullmatch(text):
            return text, "is not a SHA-256 digest (64 hex digits)"
        return text, None

    return _checked_list(approved, "approved", "SHA-256 hex digests, got {} (for one digest "
                         "write approved=[digest])", check)  # fmt: skip


def _modules(modules: Any, *, allow_stdlib: bool = False) -> tuple[str, ...]:
    """Validate ``Trust(modules=...)``; drop duplicates, keep order."""

    def check(name: Any) -> tuple[str, str | None]:
        if not isinstance(name, str):
            return "", f"is not a module name ({type(name).__name__})"
        problem = _module_problem(name)
        root = name.split(".")[0]
        if problem is None and root in REFUSED_MODULE_ROOTS:
            problem = (
                "is refused: its functions run commands or code by design, so allowing it "
                "would let an archive run anything"
            )
        elif problem is None and root in STDLIB_MODULES and not allow_stdlib:
            problem = (
                "is a standard-library module: refused unless allow_stdlib=True (several "
                "standard functions start processes or run code; an archive would choose "
                "which to call, with which arguments)"
            )
        return name, problem

    return _checked_list(modules, "modules", "module names, got {} (for one module write "
                         "modules=['mypkg'])", check)  # fmt: skip
