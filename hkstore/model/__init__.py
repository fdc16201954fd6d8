"""hkstore.model: the HaikuModel wrapper (imports jax), its vectors, device policy and data info.

Map: ``_model`` (:class:`HaikuModel`), ``_gradients`` (its jitted steps: init, gradients with
optional per-sample clipping, predictions), ``_batch`` (batch checks and placement), ``_fit``
(name/shape/dtype checks of weights), ``_vector`` (:class:`JaxNumpyVector`), ``_device``
(:class:`DevicePolicy` and device selection), ``_data_info`` (``data_info`` validation),
``_dtype_names`` (dtypes by name). Importing this package changes no global jax setting.
"""

from hkstore.model._data_info import aggregate_data_info as aggregate_data_info
from hkstore.model._data_info import validate_data_info as validate_data_info
from hkstore.model._device import DevicePolicy as DevicePolicy
from hkstore.model._device import get_device_policy as get_device_policy
from hkstore.model._device import set_device_policy as set_device_policy
from hkstore.model._model import HaikuModel as HaikuModel
from hkstore.model._vector import JaxNumpyVector as JaxNumpyVector
from hkstore.model._vector import VectorSpec as VectorSpec

__all__ = [
    "DevicePolicy",
    "HaikuModel",
    "JaxNumpyVector",
    "VectorSpec",
    "aggregate_data_info",
    "get_device_policy",
    "set_device_policy",
    "validate_data_info",
]
