"""hkstore.model: the HaikuModel wrapper (imports jax), its vectors, device policy and state.

Map: ``_model`` (:class:`HaikuModel`), ``_state`` (:class:`ModelState` and :class:`RngState`,
the model-state hook's values), ``_persist`` (a ModelState as archive content and back),
``_gradients`` (its jitted steps: init, gradients with optional per-sample clipping,
predictions), the fast clipping path (``_ghost`` its step, ``_ghost_plan`` which weights it
norms and why, ``_ghost_layers`` the layers it knows, ``_ghost_norms`` the norm arithmetic),
``_batch`` (batch checks and placement), ``_fit`` (name/shape/dtype checks of
weights), ``_vector`` (:class:`JaxNumpyVector`), ``_device`` (:class:`DevicePolicy` and
device selection), ``_data_info`` (``data_info`` validation), ``_dtype_names`` (dtypes by
name). Importing this package changes no global jax setting.

It needs the ``haiku`` extra (jax, jaxlib, dm-haiku): without it, importing this package
raises :class:`~hkstore.errors.MissingDependencyError` naming the extra.
"""

from hkstore.errors import MissingDependencyError

try:
    import haiku as _haiku  # noqa: F401
    import jax as _jax  # noqa: F401
except ImportError as _exc:  # the store and the CLI work without; the wrapper cannot
    raise MissingDependencyError(
        f"hkstore's model wrapper needs jax and dm-haiku ({_exc}); install them with "
        "pip install 'hkstore[haiku]'"
    ) from _exc

from hkstore.model._data_info import aggregate_data_info as aggregate_data_info
from hkstore.model._data_info import validate_data_info as validate_data_info
from hkstore.model._device import DevicePolicy as DevicePolicy
from hkstore.model._device import early_placement as early_placement
from hkstore.model._device import get_device_policy as get_device_policy
from hkstore.model._device import set_device_policy as set_device_policy
from hkstore.model._fit import check_fit as check_fit
from hkstore.model._fit import spec_of as spec_of
from hkstore.model._ghost_plan import ClippingReport as ClippingReport
from hkstore.model._model import HaikuModel as HaikuModel
from hkstore.model._persist import archive_content as archive_content
from hkstore.model._persist import read_state as read_state
from hkstore.model._state import ModelState as ModelState
from hkstore.model._state import RngState as RngState
from hkstore.model._state import WeightSpec as WeightSpec
from hkstore.model._vector import JaxNumpyVector as JaxNumpyVector
from hkstore.model._vector import VectorSpec as VectorSpec

__all__ = [
    "ClippingReport",
    "DevicePolicy",
    "HaikuModel",
    "JaxNumpyVector",
    "ModelState",
    "RngState",
    "VectorSpec",
    "WeightSpec",
    "aggregate_data_info",
    "archive_content",
    "check_fit",
    "early_placement",
    "get_device_policy",
    "read_state",
    "set_device_policy",
    "spec_of",
    "validate_data_info",
]
