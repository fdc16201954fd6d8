"""hkstore.integrations.declearn: hkstore models in declearn, and declearn's files in hkstore.

Two parts:

- **conversion** (needs neither declearn nor jax: ``hkstore convert-declearn`` runs it):
  reading declearn 2.x ``HaikuModel`` checkpoints without unpickling them and writing hkstore
  archives -- :func:`convert`, :func:`read_declearn`, :func:`locate_inputs`.
- **the federated engine** (``pip install 'hkstore[declearn]'``; module ``_engine``, imported
  on first use of one of its names): :class:`DeclearnHaikuModel` (a declearn ``Model``
  wrapping an :class:`hkstore.HaikuModel`; its messages are hkstore archives),
  :class:`DeclearnJaxVector` (a declearn ``Vector``), the receive policy
  (:func:`set_receive_policy`, :func:`get_receive_policy`, :class:`ReceivePolicy`) and the
  hardening of declearn's decoders (:func:`harden`, :func:`is_hardened`, :func:`unharden`,
  :func:`check_declearn_internals`). **Importing the engine part runs** :func:`harden`.
  Without declearn, touching these names raises
  :class:`~hkstore.errors.MissingDependencyError` naming the ``[declearn]`` extra.

Example:
    >>> from pathlib import Path
    >>> from hkstore.integrations.declearn import convert, locate_inputs
    >>> config, state = locate_inputs(Path("ckpt"), None)
    >>> convert(config, state, "converted.hkz").text  # doctest: +ELLIPSIS
    'converted.hkz: 4 tensors from model_state_26-11-29_12-00-00.mpk (all trainable), ...'
    >>> from hkstore.integrations import declearn as hk_declearn
    >>> hk_declearn.set_receive_policy(model=forward, loss=loss)  # doctest: +SKIP
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

from hkstore.integrations.declearn._convert import CONFIG_NAME as CONFIG_NAME
from hkstore.integrations.declearn._convert import ConvertSummary as ConvertSummary
from hkstore.integrations.declearn._convert import DeclearnModel as DeclearnModel
from hkstore.integrations.declearn._convert import convert as convert
from hkstore.integrations.declearn._convert import decode_array as decode_array
from hkstore.integrations.declearn._convert import function_reference as function_reference
from hkstore.integrations.declearn._convert import locate_inputs as locate_inputs
from hkstore.integrations.declearn._convert import read_declearn as read_declearn

if TYPE_CHECKING:
    from hkstore.integrations.declearn._engine import TYPEKEY as TYPEKEY
    from hkstore.integrations.declearn._engine import DeclearnHaikuModel as DeclearnHaikuModel
    from hkstore.integrations.declearn._engine import DeclearnJaxVector as DeclearnJaxVector
    from hkstore.integrations.declearn._engine import HkstoreCheckpointer as HkstoreCheckpointer
    from hkstore.integrations.declearn._engine import ReceivePolicy as ReceivePolicy
    from hkstore.integrations.declearn._engine import (
        ResumableFederatedClient as ResumableFederatedClient,
    )
    from hkstore.integrations.declearn._engine import (
        ResumableFederatedServer as ResumableFederatedServer,
    )
    from hkstore.integrations.declearn._engine import ResumeReply as ResumeReply
    from hkstore.integrations.declearn._engine import ResumeRequest as ResumeRequest
    from hkstore.integrations.declearn._engine import RoundState as RoundState
    from hkstore.integrations.declearn._engine import (
        check_declearn_internals as check_declearn_internals,
    )
    from hkstore.integrations.declearn._engine import get_receive_policy as get_receive_policy
    from hkstore.integrations.declearn._engine import harden as harden
    from hkstore.integrations.declearn._engine import is_hardened as is_hardened
    from hkstore.integrations.declearn._engine import set_receive_policy as set_receive_policy
    from hkstore.integrations.declearn._engine import unharden as unharden

#: The engine part's names: resolved on first access (importing declearn and jax then).
_ENGINE = frozenset(
    {
        "TYPEKEY",
        "DeclearnHaikuModel",
        "DeclearnJaxVector",
        "HkstoreCheckpointer",
        "ReceivePolicy",
        "ResumableFederatedClient",
        "ResumableFederatedServer",
        "ResumeReply",
        "ResumeRequest",
        "RoundState",
        "check_declearn_internals",
        "get_receive_policy",
        "harden",
        "is_hardened",
        "set_receive_policy",
        "unharden",
    }
)

__all__ = [
    "CONFIG_NAME",
    "ConvertSummary",
    "DeclearnModel",
    "convert",
    "decode_array",
    "function_reference",
    "locate_inputs",
    "read_declearn",
    *sorted(_ENGINE),
]


def __getattr__(name: str) -> Any:
    if name not in _ENGINE:
        raise AttributeError(f"module 'hkstore.integrations.declearn' has no attribute {name!r}")
    value = getattr(import_module("hkstore.integrations.declearn._engine"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | _ENGINE)
