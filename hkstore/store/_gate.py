"""The trust gate: the one path from stored function descriptions to callables.

Archives and configs both describe the model and loss functions as a reference, a pickled
member, or nothing. :func:`resolve_functions` turns those descriptions into callables only as
far as the caller's :class:`~hkstore.store._trust.Trust` allows, in a fixed order: policy
first, then signature, runtime and digest, and only then the import or the unpickling.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from hkstore.errors import ArchiveFormatError, RefusedCodeError
from hkstore.store._functions import (
    ROLES,
    check_reference,
    check_runtime,
    resolve_reference,
    unpickle_functions,
)
from hkstore.store._limits import DEFAULT_LIMITS
from hkstore.store._trust import Trust

__all__ = ["ROLES", "missing_function", "resolve_functions"]


def resolve_functions(
    specs: Mapping[str, Mapping[str, Any]],
    trust: Trust,
    *,
    roles: Sequence[str] = ROLES,
    verified_key_id: Callable[[], str | None],
    pickle_record: Mapping[str, Any] | None,
    read_pickle: Callable[[], bytes],
    max_pickle_bytes: int,
    max_window: int = DEFAULT_LIMITS.max_zstd_window_bytes,
    where: str,
    load: bool = True,
) -> dict[str, Callable[..., Any] | None]:
    """Return the callables for ``roles`` that ``specs`` describe, if ``trust`` allows them.

    Args:
        specs: ``{"model": spec, "loss": spec}``; a spec is ``{"kind": "reference", "ref":
            "pkg.mod:name", "kwargs": {...}}``, ``{"kind": "pickle"}`` or ``{"kind": "none"}``.
        trust: the caller's policy.
        roles: which functions the caller needs (others are not imported or unpickled,
            except that a pickle holds all pickled functions and is unpickled whole).
        verified_key_id: verifies the signature with ``trust``'s keys and returns the key
            id (``None`` when unsigned / not checked); called before any code is touched.
        pickle_record: the ``pickle`` record (writer Python version, sizes) or ``None``.
        read_pickle: returns the blob after checking its size and SHA-256 digest (and, for
            an archive, its frame and opcodes); these very bytes are what is unpickled.
        max_pickle_bytes: cap on the decompressed blob.
        max_window: cap on the blob's zstd window.
        where: names the source in error messages ("archive", "config").
        load: ``False`` runs every check but imports and unpickles nothing, and refuses a
            role of kind ``"none"`` as a load without that function would: what ``verify``
            uses to give a loader's verdict. Returns ``None`` for every role then.

    Returns:
        ``{role: callable or None}`` for each requested role (``None`` for kind ``"none"``).

    Raises:
        RefusedCodeError: the policy refuses a reference or the pickle.
        RuntimeMismatchError: the pickle was written by another Python.
        SignatureError, UntrustedKeyError, DigestMismatchError: checks before unpickling.
        ArchiveFormatError: the description is inconsistent; with ``load=False``, a role
            has kind ``"none"``.
    """
    wanted = {role: specs[role] for role in roles if role in specs}
    key_id = verified_key_id()  # a bad signature fails here, before anything else
    out: dict[str, Callable[..., Any] | None] = {}
    if any(spec["kind"] == "pickle" for spec in wanted.values()):
        if pickle_record is None:
            raise ArchiveFormatError(f"{where}: a function is pickled but no pickle is recorded")
        blob = None
        digest = None
        if trust.approved:  # the digest of the bytes themselves, never the source's claim
            blob = read_pickle()
            digest = hashlib.sha256(blob).hexdigest()
        if not trust.allow_pickle and not trust.approved:
            raise RefusedCodeError(
                f"{where}: the functions are pickled and the trust policy does not allow "
                "unpickling; pass model=/loss= yourself, or use "
                "Trust(allow_pickle=True, keys=[the signer's public key]), or review the "
                "blob and approve its digest with Trust(approved=[...])"
            )
        trust.check_pickle_allowed(key_id, digest)
        if not trust.allow_python_mismatch:
            check_runtime(pickle_record["python"], pickle_record["python_implementation"])
        blob = read_pickle() if blob is None else blob
        if load:
            pickled = unpickle_functions(
                blob,
                raw_size=pickle_record["raw_size"],
                cap=max_pickle_bytes,
                max_window=max_window,
            )
        else:
            pickled = {role: None for role, spec in wanted.items() if spec["kind"] == "pickle"}
    else:
        pickled = {}
    for role, spec in wanted.items():
        kind = spec["kind"]
        if kind == "none":
            if not load:
                raise missing_function(role, where)
            out[role] = None
        elif kind == "reference":
            if load:
                out[role] = resolve_reference(spec, trust)
            else:
                check_reference(spec, trust)
                out[role] = None
        elif role in pickled:
            out[role] = pickled[role]
        else:
            raise ArchiveFormatError(f"{where}: the pickle has no {role!r} function")
    return out


def missing_function(role: str, where: str) -> ArchiveFormatError:
    """The error for a function the source does not store (kind ``"none"``) and the caller
    did not pass."""
    return ArchiveFormatError(
        f"the {where} stores no {role} function (kind 'none'); pass {role}= yourself"
    )
