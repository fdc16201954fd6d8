"""hkstore.store: the archive format, with no jax or haiku import anywhere below it.

Map: ``_container`` (the ZIP container and its one strict parser), ``_members`` (the member
names), ``_manifest``, ``_records`` and ``_canonical`` (the canonical JSON manifest),
``_config`` (the model config document), ``_weights`` (the safetensors codec), ``_dtypes``
(the one dtype table), ``_digests`` (the tensor-digest table: SHA-256, BLAKE3), ``_workers``
(the one thread-pool policy), ``_functions`` / ``_zstd`` / ``_pickle_scan`` (function references,
the opt-in pickle blob, static pickle listing), ``_signing`` / ``_keys`` (Ed25519 and
HMAC-SHA256), ``_trust`` and ``_gate`` (what a loader agrees to run), ``_limits``,
``_atomic`` (durable writes), ``_remote`` (archives in object storage through fsspec: ranged
reads, uploads once complete), ``_archive`` (writing and lazily reading whole archives);
checkpoint directories without jax: ``_round_dir`` (the directory's files: naming, staging,
publishing, removal, history files, the writer lock), ``_round_objects`` (the same on an
object-store prefix: the record uploaded last, a lease for the one writer), ``_round_record``
(the round record and history documents), ``_rounds`` (writing, opening and verifying
rounds), ``_retention``.

Two tiers of names, both resolved on first access (importing one submodule, as the CLI's
``inspect`` does, does not pay for the others):

- **public** (``__all__``; all but :func:`write_archive` and :class:`ArchiveContent` are
  re-exported by ``hkstore``): :class:`Archive`, :func:`open_archive`, :class:`Trust`,
  :class:`Limits`, the key classes and helpers...
- **internal**: what hkstore's own upper layers (saving, ``hkstore.model``, the checkpoint
  manager, the integrations and the CLI) need from the format: :func:`atomic_write`, the
  config document, the function descriptions, the dtype table, member names, checkpoint
  rounds. Nothing outside
  ``hkstore/store/`` imports a private ``hkstore.store._*`` module; these names may change
  between minor releases.

Example:
    >>> from hkstore.store import Trust
    >>> Trust()
    Trust(keys=(), modules=()) [weights only]
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
    from hkstore.store._atomic import atomic_write as atomic_write
    from hkstore.store._atomic import fsync_folder as fsync_folder
    from hkstore.store._canonical import canonical_json as canonical_json
    from hkstore.store._canonical import json_safe as json_safe
    from hkstore.store._canonical import parse_json_strict as parse_json_strict
    from hkstore.store._config import CONFIG_FORMAT as CONFIG_FORMAT
    from hkstore.store._config import CONFIG_VERSION as CONFIG_VERSION
    from hkstore.store._config import ConfigDocument as ConfigDocument
    from hkstore.store._config import build_config as build_config
    from hkstore.store._config import config_schema as config_schema
    from hkstore.store._config import config_with_binary_blob as config_with_binary_blob
    from hkstore.store._config import config_with_text_blob as config_with_text_blob
    from hkstore.store._config import parse_config as parse_config
    from hkstore.store._dtypes import code_for_dtype as code_for_dtype
    from hkstore.store._dtypes import dtype_for_code as dtype_for_code
    from hkstore.store._fileio import open_regular as open_regular
    from hkstore.store._functions import FUNCTION_KINDS as FUNCTION_KINDS
    from hkstore.store._functions import ROLES as ROLES
    from hkstore.store._functions import FunctionKind as FunctionKind
    from hkstore.store._functions import describe_functions as describe_functions
    from hkstore.store._functions import pickle_runtime as pickle_runtime
    from hkstore.store._keys import generate_ed25519_keypair as generate_ed25519_keypair
    from hkstore.store._keys import load_hmac_key as load_hmac_key
    from hkstore.store._keys import load_signer as load_signer
    from hkstore.store._keys import load_verifier as load_verifier
    from hkstore.store._limits import DEFAULT_LIMITS as DEFAULT_LIMITS
    from hkstore.store._limits import Limits as Limits
    from hkstore.store._manifest import FunctionSpec as FunctionSpec
    from hkstore.store._manifest import Manifest as Manifest
    from hkstore.store._manifest import TensorRecord as TensorRecord
    from hkstore.store._manifest import writer_versions as writer_versions
    from hkstore.store._members import FUNCTIONS as FUNCTIONS
    from hkstore.store._members import MANIFEST as MANIFEST
    from hkstore.store._members import MEMBER_NAMES as MEMBER_NAMES
    from hkstore.store._members import SIGNATURE as SIGNATURE
    from hkstore.store._members import WEIGHTS as WEIGHTS
    from hkstore.store._members import WEIGHTS_ZSTD as WEIGHTS_ZSTD
    from hkstore.store._pickle_scan import is_plain_global_reference as is_plain_global_reference
    from hkstore.store._pickle_scan import pickle_globals as pickle_globals
    from hkstore.store._records import RNG_IMPLEMENTATIONS as RNG_IMPLEMENTATIONS
    from hkstore.store._records import RngRecord as RngRecord
    from hkstore.store._remote import destination as destination
    from hkstore.store._remote import is_url as is_url
    from hkstore.store._remote import local_path as local_path
    from hkstore.store._remote import remote_filesystem as remote_filesystem
    from hkstore.store._retention import KeepBest as KeepBest
    from hkstore.store._retention import Retention as Retention
    from hkstore.store._round_dir import MODEL_MEMBER as MODEL_MEMBER
    from hkstore.store._round_dir import RECORD_MEMBER as RECORD_MEMBER
    from hkstore.store._round_dir import STATE_MEMBER as STATE_MEMBER
    from hkstore.store._round_dir import RoundDirectory as RoundDirectory
    from hkstore.store._round_dir import WriterLock as WriterLock
    from hkstore.store._round_dir import parse_round_folder as parse_round_folder
    from hkstore.store._round_dir import round_folder_name as round_folder_name
    from hkstore.store._round_objects import Lease as Lease
    from hkstore.store._round_objects import ObjectRoundDirectory as ObjectRoundDirectory
    from hkstore.store._round_objects import round_directory as round_directory
    from hkstore.store._round_record import HistoryEntry as HistoryEntry
    from hkstore.store._round_record import RoundRecord as RoundRecord
    from hkstore.store._rounds import Round as Round
    from hkstore.store._rounds import StateContent as StateContent
    from hkstore.store._rounds import open_round as open_round
    from hkstore.store._rounds import reconcile_history as reconcile_history
    from hkstore.store._rounds import round_history as round_history
    from hkstore.store._rounds import rounds_metrics as rounds_metrics
    from hkstore.store._rounds import write_round as write_round
    from hkstore.store._signing import Ed25519Signer as Ed25519Signer
    from hkstore.store._signing import Ed25519Verifier as Ed25519Verifier
    from hkstore.store._signing import HmacKey as HmacKey
    from hkstore.store._signing import Signer as Signer
    from hkstore.store._signing import Verifier as Verifier
    from hkstore.store._trust import Trust as Trust
    from hkstore.store._weights import TensorSpec as TensorSpec
    from hkstore.store._workers import resolve_workers as resolve_workers

#: Public names (re-exported by ``hkstore``) -> the private module that defines them.
_PUBLIC: dict[str, str] = {
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
#: The internal tier: for hkstore's own layers above the store (see the module docstring).
_INTERNAL: dict[str, str] = {
    "atomic_write": "_atomic",
    "fsync_folder": "_atomic",
    "canonical_json": "_canonical",
    "json_safe": "_canonical",
    "parse_json_strict": "_canonical",
    "CONFIG_FORMAT": "_config",
    "CONFIG_VERSION": "_config",
    "ConfigDocument": "_config",
    "build_config": "_config",
    "config_schema": "_config",
    "config_with_binary_blob": "_config",
    "config_with_text_blob": "_config",
    "parse_config": "_config",
    "code_for_dtype": "_dtypes",
    "open_regular": "_fileio",
    "dtype_for_code": "_dtypes",
    "FUNCTION_KINDS": "_functions",
    "ROLES": "_functions",
    "FunctionKind": "_functions",
    "describe_functions": "_functions",
    "pickle_runtime": "_functions",
    "FunctionSpec": "_manifest",
    "TensorRecord": "_manifest",
    "writer_versions": "_manifest",
    "FUNCTIONS": "_members",
    "MANIFEST": "_members",
    "MEMBER_NAMES": "_members",
    "SIGNATURE": "_members",
    "WEIGHTS": "_members",
    "WEIGHTS_ZSTD": "_members",
    "is_plain_global_reference": "_pickle_scan",
    "pickle_globals": "_pickle_scan",
    "RNG_IMPLEMENTATIONS": "_records",
    "RngRecord": "_records",
    "destination": "_remote",
    "is_url": "_remote",
    "local_path": "_remote",
    "remote_filesystem": "_remote",
    "KeepBest": "_retention",
    "Retention": "_retention",
    "MODEL_MEMBER": "_round_dir",
    "Lease": "_round_objects",
    "ObjectRoundDirectory": "_round_objects",
    "round_directory": "_round_objects",
    "RECORD_MEMBER": "_round_dir",
    "STATE_MEMBER": "_round_dir",
    "RoundDirectory": "_round_dir",
    "WriterLock": "_round_dir",
    "parse_round_folder": "_round_dir",
    "round_folder_name": "_round_dir",
    "HistoryEntry": "_round_record",
    "RoundRecord": "_round_record",
    "Round": "_rounds",
    "StateContent": "_rounds",
    "open_round": "_rounds",
    "reconcile_history": "_rounds",
    "round_history": "_rounds",
    "rounds_metrics": "_rounds",
    "write_round": "_rounds",
    "Signer": "_signing",
    "Verifier": "_signing",
    "TensorSpec": "_weights",
    "resolve_workers": "_workers",
}
_LAZY = {**_PUBLIC, **_INTERNAL}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'hkstore.store' has no attribute {name!r}")
    value = getattr(import_module(f"hkstore.store.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
