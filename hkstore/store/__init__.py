"""hkstore.store: the archive format, with no jax or haiku import anywhere below it.

Map: ``_container`` (the ZIP container and its one strict parser), ``_manifest`` and
``_canonical`` (the canonical JSON manifest), ``_weights`` (the safetensors codec), ``_dtypes``
(the one dtype table), ``_functions`` / ``_zstd`` / ``_pickle_scan`` (function references,
the opt-in pickle blob, static pickle listing), ``_signing`` / ``_keys`` (Ed25519 and
HMAC-SHA256), ``_trust`` and ``_gate`` (what a loader agrees to run), ``_limits``,
``_atomic`` (durable writes), ``_archive`` (writing and lazily reading whole archives).

Public names are resolved on first access, so importing one submodule (the CLI's ``inspect``)
does not pay for the others.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from hkstore.store._archive import Archive as Archive
    from hkstore.store._archive import ArchiveContent as ArchiveContent
    from hkstore.store._archive import VerifyReport as VerifyReport
    from hkstore.store._archive import open_archive as open_archive
    from hkstore.store._archive import write_archive as write_archive
    from hkstore.store._keys import generate_ed25519_keypair as generate_ed25519_keypair
    from hkstore.store._keys import load_hmac_key as load_hmac_key
    from hkstore.store._keys import load_signer as load_signer
    from hkstore.store._keys import load_verifier as load_verifier
    from hkstore.store._limits import DEFAULT_LIMITS as DEFAULT_LIMITS
    from hkstore.store._limits import Limits as Limits
    from hkstore.store._manifest import Manifest as Manifest
    from hkstore.store._signing import Ed25519Signer as Ed25519Signer
    from hkstore.store._signing import Ed25519Verifier as Ed25519Verifier
    from hkstore.store._signing import HmacKey as HmacKey
    from hkstore.store._trust import Trust as Trust

_LAZY: dict[str, str] = {
    "Archive": "_archive",
    "ArchiveContent": "_archive",
    "VerifyReport": "_archive",
    "open_archive": "_archive",
    "write_archive": "_archive",
    "generate_ed25519_keypair": "_keys",
    "load_hmac_key": "_keys",
    "load_signer": "_keys",
    "load_verifier": "_keys",
    "DEFAULT_LIMITS": "_limits",
    "Limits": "_limits",
    "Manifest": "_manifest",
    "Ed25519Signer": "_signing",
    "Ed25519Verifier": "_signing",
    "HmacKey": "_signing",
    "Trust": "_trust",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'hkstore.store' has no attribute {name!r}")
    value = getattr(import_module(f"hkstore.store.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
