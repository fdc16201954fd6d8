"""DeclearnHaikuModel: an hkstore.HaikuModel as a declearn ``Model``.

declearn's engine moves a model three ways, and each is hkstore's format here:

- **messages and ``.mpk`` files** (msgpack, ``get_config(allow_bin=True)``): an hkstore
  archive (``hkstore.dumps``): weights, trainable mask, data info, seed and random state. The
  server's ``InitRequest`` therefore gives every client the very same weights, frozen ones
  included (after it, declearn sends trainable weights only);
- **JSON** (``get_config()``, ``model_config.json``, ``FederatedServer(model=dict|path)``):
  the hkstore config document, no weights;
- **receiving** (``from_config``): through the process's receive policy
  (:func:`~hkstore.integrations.declearn.set_receive_policy`), since declearn passes no trust
  argument; by default nothing from the wire is imported or unpickled.

The trainable criterion given to the constructor is applied inside :meth:`initialize`:
declearn's server initializes the model itself, after collecting the clients' data info,
and sends it at once, so there is no other moment to freeze layers.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from declearn.model.api import Model
from declearn.utils import DevicePolicy as DeclearnDevicePolicy
from declearn.utils import get_device_policy as declearn_device_policy

import hkstore
from hkstore.errors import HkstoreError, NotImportableError, RefusedPayloadError
from hkstore.integrations.declearn._policy import get_receive_policy
from hkstore.integrations.declearn._vector import DeclearnJaxVector

if TYPE_CHECKING:
    import numpy as np

    from hkstore.store import Signer

__all__ = ["TYPEKEY", "DeclearnHaikuModel"]

#: declearn's type-registry key of :class:`DeclearnHaikuModel` (declearn's own is "haiku").
TYPEKEY = "hkstore-haiku"
FunctionsForm = Literal["auto", "reference", "pickle", "none"]
_FORMS = ("auto", "reference", "pickle", "none")
_LOG = logging.getLogger("hkstore.integrations.declearn")


def hkstore_policy(policy: object = None) -> hkstore.DevicePolicy:
    """Return ``policy`` (declearn's or hkstore's; ``None``: declearn's global) as hkstore's.

    Raises:
        TypeError: ``policy`` is neither kind of ``DevicePolicy``.
    """
    if policy is None:
        policy = declearn_device_policy()
    if isinstance(policy, hkstore.DevicePolicy):
        return policy
    if isinstance(policy, DeclearnDevicePolicy):
        return hkstore.DevicePolicy(gpu=policy.gpu, idx=policy.idx)
    raise TypeError(f"expected a DevicePolicy, got {type(policy).__name__}")


@contextlib.contextmanager
def _on_declearn_device() -> Iterator[None]:
    """Build hkstore models on the device of declearn's policy (a declearn Model follows it).

    ``hkstore.HaikuModel`` takes the process-wide hkstore policy when it is built; building
    under declearn's one (restored afterwards) places it once, at the right device, instead
    of placing it on hkstore's device (warning if that is a missing GPU) and moving it.
    """
    previous = hkstore.get_device_policy()
    wanted = hkstore_policy()
    hkstore.set_device_policy(wanted.gpu, wanted.idx)
    try:
        yield
    finally:
        hkstore.set_device_policy(previous.gpu, previous.idx)


class DeclearnHaikuModel(Model):
    """A declearn ``Model`` wrapping an :class:`hkstore.HaikuModel`.

    Args:
        model: an :class:`hkstore.HaikuModel` to wrap (used as it is, device included); or,
            as with declearn's ``HaikuModel(model, loss, seed=None)``, the forward function,
            in which case ``loss`` is required and a new ``hkstore.HaikuModel`` is built on
            the device of declearn's device policy.
        loss: the per-sample loss function (only with a forward function).
        seed: the seed (only with a forward function; ``None`` draws one).
        trainable: what stays trainable, as any criterion
            :meth:`hkstore.HaikuModel.set_trainable_weights` takes (names, a
            ``{module: {param: ...}}`` dict, a predicate); applied when :meth:`initialize`
            builds the weights (at once if the model already has weights). ``None``: all.
        functions: how the functions travel in what this model sends: ``"reference"``,
            ``"pickle"`` (sign it: ``signer``), ``"none"`` (receivers set their own), or
            ``"auto"`` (default: references when both functions are importable, else none).
        signer: an :class:`hkstore.Ed25519Signer` or :class:`hkstore.HmacKey` signing every
            archive and config this model sends.

    Raises:
        TypeError: a model that is neither, ``loss``/``seed`` given with an hkstore model, or
            a ``functions`` form not listed above.

    Example:
        >>> from hkstore.integrations.declearn import DeclearnHaikuModel
        >>> net = hkstore.HaikuModel(forward, loss, seed=0)
        >>> frozen_encoder = lambda module, name, value: module != "encoder"
        >>> server_model = DeclearnHaikuModel(net, trainable=frozen_encoder)
    """

    typekey: ClassVar[str] = TYPEKEY

    def __init__(
        self,
        model: hkstore.HaikuModel | Callable[..., Any],
        loss: Callable[..., Any] | None = None,
        seed: int | None = None,
        *,
        trainable: Any = None,
        functions: FunctionsForm = "auto",
        signer: Signer | None = None,
    ) -> None:
        if functions not in _FORMS:
            raise TypeError(f"functions must be one of {_FORMS}, got {functions!r}")
        if isinstance(model, hkstore.HaikuModel):
            if loss is not None or seed is not None:
                raise TypeError(
                    "DeclearnHaikuModel wraps an hkstore.HaikuModel as it is: give loss and "
                    "seed to the hkstore.HaikuModel, not here"
                )
            inner = model
        elif callable(model):
            if loss is None:
                raise TypeError("DeclearnHaikuModel(model_fn, loss, seed=None) needs a loss")
            with _on_declearn_device():
                inner = hkstore.HaikuModel(model, loss, seed)
        else:
            raise TypeError(
                "DeclearnHaikuModel needs an hkstore.HaikuModel or a forward function, got "
                f"{type(model).__name__}"
            )
        super().__init__(inner)
        self._model: hkstore.HaikuModel = inner
        self._trainable_criterion = trainable
        self._functions_form: FunctionsForm = functions
        self._signer = signer
        if trainable is not None and not inner.required_data_info:
            inner.set_trainable_weights(trainable)

    # --- the wrapped model ---------------------------------------------------------------

    def set_wrapped_model(self, model: hkstore.HaikuModel) -> None:
        """Replace the wrapped model (a restored checkpoint, say), used as it is.

        The trainable criterion is not applied again: the model keeps its own mask.

        Raises:
            TypeError: ``model`` is not an :class:`hkstore.HaikuModel`.
        """
        if not isinstance(model, hkstore.HaikuModel):
            raise TypeError(f"expected an hkstore.HaikuModel, got {type(model).__name__}")
        self._model = model

    @property
    def data_info(self) -> dict[str, Any]:
        """The data info the model was initialized with (empty before)."""
        return self._model.data_info

    @property
    def _params(self) -> dict[str, dict[str, Any]]:
        """haiku's nested parameters ``{module: {param: array}}`` (a new dict; read-only).

        declearn's ``HaikuModel`` exposes this attribute and code written for it reads it.
        """
        if self._model.required_data_info:
            return {}
        nested: dict[str, dict[str, Any]] = {}
        for name, value in self._model.get_weights().coefs.items():
            module, _, param = name.rpartition(":")
            nested.setdefault(module, {})[param] = value
        return nested

    def get_weight_names(self, trainable: bool = False) -> list[str]:
        """Return the weight names in model order: all, or the trainable ones."""
        return self._model.get_weight_names(trainable=trainable)

    def set_trainable_weights(self, criterion: Any) -> None:
        """Choose the trainable weights (see :meth:`hkstore.HaikuModel.set_trainable_weights`)."""
        self._model.set_trainable_weights(criterion)

    # --- declearn's Model API --------------------------------------------------------------

    @property
    def device_policy(self) -> DeclearnDevicePolicy:
        """The device in use, as declearn's ``DevicePolicy`` (``gpu=False, idx=0`` on cpu:0)."""
        policy = self._model.device_policy
        return DeclearnDevicePolicy(gpu=policy.gpu, idx=policy.idx)

    @property
    def required_data_info(self) -> set[str]:
        """``{"data_type", "features_shape"}`` until initialized, then empty."""
        return self._model.required_data_info

    def initialize(self, data_info: dict[str, Any]) -> None:
        """Build the weights from ``data_info``, then apply the trainable criterion.

        All or nothing: when the criterion fails, the model is left uninitialized.

        Raises:
            DataInfoError: bad data info, or other data info than a previous call's.
            WeightsMismatchError, TypeError: the trainable criterion does not fit the model.
        """
        first = bool(self._model.required_data_info)
        before = self._model.export_state() if first else None
        self._model.initialize(data_info)
        if before is None or self._trainable_criterion is None:
            return
        try:
            self._model.set_trainable_weights(self._trainable_criterion)
        except Exception:  # keep all or nothing, then report the criterion's own error
            device = self._model.device_policy
            self._model = hkstore.HaikuModel.from_state(before)
            self._model.update_device_policy(device)
            raise

    def get_config(self, allow_bin: bool = False) -> dict[str, Any]:
        """Return ``{"typekey", "archive": bytes}`` (``allow_bin=True``, initialized model)
        or ``{"typekey", "config": hkstore config}``.

        Raises:
            NotImportableError: ``functions="reference"`` and a function is not importable.
        """
        if allow_bin and not self._model.required_data_info:
            archive = self._with_functions(
                lambda kind: hkstore.dumps(self._model, functions=kind, signer=self._signer)
            )
            return {"typekey": self.typekey, "archive": archive}
        config = self._with_functions(
            lambda kind: self._model.get_config(allow_bin, functions=kind, signer=self._signer)
        )
        return {"typekey": self.typekey, "config": config}

    def _with_functions(self, write: Callable[[Any], Any]) -> Any:
        if self._functions_form != "auto":
            return write(self._functions_form)
        try:
            return write("reference")
        except NotImportableError:  # lambdas, closures, __main__: receivers pass their own
            return write("none")

    @classmethod
    def from_config(cls, config: dict[str, Any], allow_bin: bool = False) -> DeclearnHaikuModel:
        """Rebuild a model from :meth:`get_config`'s output, as the receive policy allows.

        The functions are the policy's, or the payload's as its ``trust`` allows; archives
        are read within its ``limits``. The model is placed on declearn's device policy.

        Raises:
            RefusedPayloadError: the payload is malformed, or the policy refuses it (the
                hkstore error is chained); a ``TypeError`` and ``ValueError``, which
                declearn's message decoding treats as a bad message. It is also logged.
        """
        try:
            with _on_declearn_device():
                inner = _rebuild(config, allow_bin, expected=cls.typekey)
        except HkstoreError as exc:
            message = f"refused a {cls.__name__} payload: {type(exc).__name__}: {exc}"
            _LOG.warning("%s", message)
            raise RefusedPayloadError(message) from exc
        return cls(inner)

    def get_weights(self, trainable: bool = False) -> DeclearnJaxVector:
        """Return the weights (all, or the trainable ones) as a :class:`DeclearnJaxVector`."""
        return DeclearnJaxVector(self._model.get_weights(trainable=trainable).coefs)

    def set_weights(self, weights: hkstore.JaxNumpyVector, trainable: bool = False) -> None:
        """Replace all (or the trainable) weights; nothing changes unless everything fits.

        Raises:
            TypeError: ``weights`` is not a JaxNumpyVector (``DeclearnJaxVector`` is one).
            WeightsMismatchError: names, shapes or dtypes that do not fit, all named.
        """
        self._model.set_weights(weights, trainable=trainable)

    def compute_batch_gradients(
        self, batch: Any, max_norm: float | None = None
    ) -> DeclearnJaxVector:
        """Return the batch's gradients (see :meth:`hkstore.HaikuModel.compute_batch_gradients`)."""
        grads = self._model.compute_batch_gradients(batch, max_norm=max_norm)
        return DeclearnJaxVector(grads.coefs)

    def apply_updates(self, updates: hkstore.JaxNumpyVector) -> None:
        """Add ``updates`` to the trainable weights; nothing changes unless everything fits.

        Raises:
            TypeError: ``updates`` is not a JaxNumpyVector.
            WeightsMismatchError: names, shapes or dtypes that do not fit, all named.
        """
        self._model.apply_updates(updates)

    def collect_training_losses(self) -> list[float]:
        """Return the batch losses recorded since the last call, and forget them."""
        return self._model.collect_training_losses()

    def compute_batch_predictions(
        self, batch: Any
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """Return ``(y_true, y_pred, s_wght)`` as numpy arrays."""
        return self._model.compute_batch_predictions(batch)

    def loss_function(self, y_true: np.ndarray, y_pred: np.ndarray) -> np.ndarray:
        """Return the per-sample losses as a 1-d numpy array."""
        return self._model.loss_function(y_true, y_pred)

    def update_device_policy(self, policy: Any = None) -> None:
        """Move the model to the device of ``policy`` (declearn's or hkstore's ``DevicePolicy``;
        ``None``: declearn's global policy)."""
        self._model.update_device_policy(hkstore_policy(policy))


def _rebuild(config: object, allow_bin: bool, *, expected: str) -> hkstore.HaikuModel:
    """Read a payload of :meth:`DeclearnHaikuModel.get_config` under the receive policy."""
    if not isinstance(config, Mapping):
        raise hkstore.errors.ConfigError(
            f"a {expected!r} payload must be a dict, got {type(config).__name__}"
        )
    if config.get("typekey") != expected:
        raise hkstore.errors.ConfigError(
            f"payload typekey {config.get('typekey')!r}, expected {expected!r}"
        )
    body = set(config) - {"typekey"}
    if body not in ({"archive"}, {"config"}):
        raise hkstore.errors.ConfigError(
            f"a {expected!r} payload holds 'archive' or 'config', got {sorted(map(str, body))}"
        )
    policy = get_receive_policy()
    if "config" in config:
        return hkstore.HaikuModel.from_config(
            config["config"], allow_bin, trust=policy.trust, model=policy.model, loss=policy.loss
        )
    archive = config["archive"]
    if not allow_bin or not isinstance(archive, bytes | bytearray | memoryview):
        raise hkstore.errors.ConfigError(
            f"a {expected!r} archive travels as bytes in binary forms only (allow_bin=True), "
            f"got {type(archive).__name__} with allow_bin={allow_bin}"
        )
    return hkstore.loads(
        archive, model=policy.model, loss=policy.loss, trust=policy.trust, limits=policy.limits
    )
