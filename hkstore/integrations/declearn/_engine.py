"""The declearn-engine part of the integration: hkstore models in declearn's federated runs.

Importing this module (which touching any of its names on
``hkstore.integrations.declearn`` does) needs the ``declearn`` extra; it registers
:class:`DeclearnHaikuModel` and :class:`DeclearnJaxVector` with declearn and runs
:func:`harden` (declearn's decoders then refuse peers' model payloads outside the
allow-list). See the package docstring for the map.
"""

from __future__ import annotations

from hkstore.errors import MissingDependencyError

try:
    import declearn as _declearn  # noqa: F401
    import declearn.model.api as _declearn_model_api  # noqa: F401
    import haiku as _haiku  # noqa: F401
    import jax as _jax  # noqa: F401
except ImportError as _exc:  # the conversion part of the package works without them
    raise MissingDependencyError(
        f"hkstore's declearn engine integration needs declearn, jax and dm-haiku ({_exc}); "
        "install them with pip install 'hkstore[declearn]'"
    ) from _exc

from hkstore.integrations.declearn._harden import (
    check_declearn_internals,
    harden,
    is_hardened,
    unharden,
)
from hkstore.integrations.declearn._model import TYPEKEY, DeclearnHaikuModel
from hkstore.integrations.declearn._policy import (
    ReceivePolicy,
    get_receive_policy,
    set_receive_policy,
)
from hkstore.integrations.declearn._vector import DeclearnJaxVector

__all__ = [
    "TYPEKEY",
    "DeclearnHaikuModel",
    "DeclearnJaxVector",
    "ReceivePolicy",
    "check_declearn_internals",
    "get_receive_policy",
    "harden",
    "is_hardened",
    "set_receive_policy",
    "unharden",
]

harden()  # documented: importing the engine part guards declearn's decoders
