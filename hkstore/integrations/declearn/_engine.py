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

# the names the package exports lazily (its _ENGINE set), re-exported here
from hkstore.integrations.declearn._checkpointer import (
    HkstoreCheckpointer as HkstoreCheckpointer,
)
from hkstore.integrations.declearn._checkpointer import RoundState as RoundState
from hkstore.integrations.declearn._client import (
    ResumableFederatedClient as ResumableFederatedClient,
)
from hkstore.integrations.declearn._harden import (
    check_declearn_internals as check_declearn_internals,
)
from hkstore.integrations.declearn._harden import harden as harden
from hkstore.integrations.declearn._harden import is_hardened as is_hardened
from hkstore.integrations.declearn._harden import unharden as unharden
from hkstore.integrations.declearn._messages import ResumeReply as ResumeReply
from hkstore.integrations.declearn._messages import ResumeRequest as ResumeRequest
from hkstore.integrations.declearn._model import TYPEKEY as TYPEKEY
from hkstore.integrations.declearn._model import DeclearnHaikuModel as DeclearnHaikuModel
from hkstore.integrations.declearn._policy import ReceivePolicy as ReceivePolicy
from hkstore.integrations.declearn._policy import get_receive_policy as get_receive_policy
from hkstore.integrations.declearn._policy import set_receive_policy as set_receive_policy
from hkstore.integrations.declearn._server import (
    ResumableFederatedServer as ResumableFederatedServer,
)
from hkstore.integrations.declearn._vector import DeclearnJaxVector as DeclearnJaxVector

harden()  # documented: importing the engine part guards declearn's decoders
