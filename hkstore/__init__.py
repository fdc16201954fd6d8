"""hkstore: save, send and reload JAX/Haiku models without trusting pickle.

Map of the package:

- ``hkstore.HaikuModel``, ``JaxNumpyVector``, ``DevicePolicy`` and the device-policy helpers,
  ``ModelState`` / ``RngState`` (a model's full state, the hook saving and checkpoints use):
  the model wrapper (``hkstore.model``; imports jax, lazily on first use; needs the ``haiku``
  extra: without it, touching these names raises an ``ImportError`` naming the extra).
- ``hkstore.save`` / ``load`` / ``dumps`` / ``loads`` / ``open_archive``: the archive format
  (``hkstore.store``, which never imports jax).
- ``hkstore.Checkpointer`` (and ``Restored``, what its ``restore()`` returns): federated
  rounds in a directory, crash-safe, verified, resumable bit for bit (``hkstore.checkpoint``;
  imports jax).
- ``hkstore.Trust`` and the key helpers: what a loader agrees to import or unpickle.
- ``hkstore.errors``: the error family (every error is an ``HkstoreError``).

Importing ``hkstore`` does not import jax; touching a model name does.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

from hkstore import errors as errors
from hkstore._version import __version__ as __version__
from hkstore.errors import HkstoreError as HkstoreError

if TYPE_CHECKING:
    from hkstore.checkpoint import Checkpointer as Checkpointer
    from hkstore.checkpoint import Restored as Restored
    from hkstore.model import DevicePolicy as DevicePolicy
    from hkstore.model import HaikuModel as HaikuModel
    from hkstore.model import JaxNumpyVector as JaxNumpyVector
    from hkstore.model import ModelState as ModelState
    from hkstore.model import RngState as RngState
    from hkstore.model import get_device_policy as get_device_policy
    from hkstore.model import set_device_policy as set_device_policy
    from hkstore.saving import dumps as dumps
    from hkstore.saving import load as load
    from hkstore.saving import loads as loads
    from hkstore.saving import save as save
    from hkstore.store import Archive as Archive
    from hkstore.store import Ed25519Signer as Ed25519Signer
    from hkstore.store import Ed25519Verifier as Ed25519Verifier
    from hkstore.store import HmacKey as HmacKey
    from hkstore.store import Limits as Limits
    from hkstore.store import Manifest as Manifest
    from hkstore.store import Trust as Trust
    from hkstore.store import VerifyReport as VerifyReport
    from hkstore.store import generate_ed25519_keypair as generate_ed25519_keypair
    from hkstore.store import load_hmac_key as load_hmac_key
    from hkstore.store import load_signer as load_signer
    from hkstore.store import load_verifier as load_verifier
    from hkstore.store import open_archive as open_archive

# name -> module that defines it; resolved on first access so that `import hkstore` stays
# free of jax (the storage layer and the CLI must run where jax is not installed).
_LAZY: dict[str, str] = {
    "save": "hkstore.saving",
    "load": "hkstore.saving",
    "dumps": "hkstore.saving",
    "loads": "hkstore.saving",
    "open_archive": "hkstore.store",
    "Archive": "hkstore.store",
    "VerifyReport": "hkstore.store",
    "Manifest": "hkstore.store",
    "Trust": "hkstore.store",
    "Limits": "hkstore.store",
    "Ed25519Signer": "hkstore.store",
    "Ed25519Verifier": "hkstore.store",
    "HmacKey": "hkstore.store",
    "generate_ed25519_keypair": "hkstore.store",
    "load_signer": "hkstore.store",
    "load_verifier": "hkstore.store",
    "load_hmac_key": "hkstore.store",
    "HaikuModel": "hkstore.model",
    "JaxNumpyVector": "hkstore.model",
    "ModelState": "hkstore.model",
    "RngState": "hkstore.model",
    "DevicePolicy": "hkstore.model",
    "get_device_policy": "hkstore.model",
    "set_device_policy": "hkstore.model",
    "Checkpointer": "hkstore.checkpoint",
    "Restored": "hkstore.checkpoint",
}

__all__ = ["HkstoreError", "__version__", "errors", *_LAZY]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'hkstore' has no attribute {name!r}")
    value = getattr(import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
