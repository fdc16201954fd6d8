"""HaikuModel: declearn's Haiku model wrapper (same API, same meaning), on today's JAX.

This file stays whole past ~400 lines because it is one class, declearn's API surface (its
public members plus the serialization hooks), mostly docstrings; the work it delegates lives in
``_gradients`` (compiled steps), ``_batch``, ``_fit``, ``_trainable``, ``_device``, ``_vector``.
"""

from __future__ import annotations

import functools
import math
import secrets
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np

from hkstore.errors import (
    ArchiveFormatError,
    DataInfoError,
    InvalidSeedError,
    LimitExceededError,
    ModelFunctionError,
    NotInitializedError,
    WeightsMismatchError,
)
from hkstore.model._batch import Batch, place_batch
from hkstore.model._data_info import REQUIRED_FIELDS, validate_data_info
from hkstore.model._device import (
    DevicePolicy,
    get_device_policy,
    policy_of,
    put_on,
    select_device,
)
from hkstore.model._fit import Spec, check_fit, spec_of
from hkstore.model._gradients import (
    ClippingReport,
    Params,
    StepFunctions,
    check_clipping,
    check_max_norm,
    clipped_step,
    named_leaves,
    step_functions,
)
from hkstore.model._state import ModelState, RngState
from hkstore.model._trainable import Criterion, select_trainable
from hkstore.model._vector import JaxNumpyVector
from hkstore.store import (
    DEFAULT_LIMITS,
    ROLES,
    FunctionKind,
    Limits,
    Signer,
    Trust,
    build_config,
    config_with_binary_blob,
    config_with_text_blob,
    describe_functions,
    json_safe,
    parse_config,
    pickle_runtime,
)

__all__ = ["HaikuModel", "require_functions"]


def _check_init_size(
    batch: jax.ShapeDtypeStruct, init: Callable[..., Any], key: jax.Array, limits: Limits
) -> None:
    """Refuse an init whose zero batch or weights would pass ``limits.max_member_bytes``."""
    cap = limits.max_member_bytes
    batch_bytes = math.prod(batch.shape) * batch.dtype.itemsize
    if batch_bytes > cap:
        raise LimitExceededError(
            f"initialize: a zero batch of shape {list(batch.shape)} ({batch.dtype}) is "
            f"{batch_bytes} bytes, more than max_member_bytes={cap}"
        )
    try:
        shapes = jax.eval_shape(init, key, batch)
    except Exception as exc:  # the caller's model function raised: say so, keep the cause
        raise ModelFunctionError(
            f"initialize: the model function fails on a batch of shape {list(batch.shape)} "
            f"({batch.dtype}): {type(exc).__name__}: {exc}"
        ) from exc
    weight_bytes = sum(
        math.prod(leaf.shape) * np.dtype(leaf.dtype).itemsize
        for leaf in jax.tree_util.tree_leaves(shapes)
    )
    if weight_bytes > cap:
        raise LimitExceededError(
            f"initialize: on a batch of shape {list(batch.shape)} the model has "
            f"{weight_bytes} bytes of weights, more than max_member_bytes={cap}"
        )


@functools.partial(jax.jit, keep_unused=True)
def _tree_add(params: Params, updates: Params) -> Params:
    return jax.tree_util.tree_map(lambda p, u: p + u, params, updates)


def _check_seed(seed: object) -> int:
    if seed is None:
        return secrets.randbelow(2**32)
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer):
        raise InvalidSeedError(f"seed must be an int or None, got {type(seed).__name__}")
    if not 0 <= int(seed) < 2**32:  # jax keys hold 32 bits (x64 off): larger seeds would collide
        raise InvalidSeedError(f"seed must be in [0, 2**32), got {seed}")
    return int(seed)


class HaikuModel:
    """A Haiku model with named weights, a trainable mask, gradients, updates and predictions.

    Same constructor, methods and meaning as declearn's ``HaikuModel``; the differences (all
    fixes) are listed in the project's docs.

    Args:
        model: the forward function ``model(*inputs) -> y_pred``, building haiku modules
            (the wrapper applies ``hk.transform``).
        loss: ``loss(y_pred, y_true) -> per-sample losses`` (prediction first).
        seed: seed of the model's random key; ``None`` draws one (kept in ``_seed``).

    Raises:
        TypeError: ``model`` or ``loss`` is not callable.
        InvalidSeedError: ``seed`` is not an int, or is outside ``[0, 2**32)`` (also a
            ``TypeError`` and a ``ValueError``).

    Example:
        >>> import haiku as hk, jax.numpy as jnp, numpy as np
        >>> def fwd(x): return hk.Linear(1, name="lin")(x)
        >>> def mse(y_pred, y_true): return jnp.mean((y_pred - y_true) ** 2, axis=-1)
        >>> model = HaikuModel(fwd, mse, seed=0)
        >>> model.initialize({"data_type": "float32", "features_shape": (3,)})
        >>> model.get_weight_names()
        ['lin:b', 'lin:w']
    """

    def __init__(
        self,
        model: Callable[..., Any],
        loss: Callable[[Any, Any], Any],
        seed: int | None = None,
    ) -> None:
        if not callable(model) or not callable(loss):
            raise TypeError("HaikuModel needs a callable model function and a callable loss")
        self._model_fn = model
        self._loss_fn = loss
        self._seed = _check_seed(seed)
        self._device = select_device(get_device_policy())
        self._rng: jax.Array = jax.device_put(jax.random.key(self._seed), self._device)
        self._params: Params | None = None
        self._names: list[str] = []  # model order: haiku's sorted order
        self._where: dict[str, tuple[str, str]] = {}  # name -> (module path, param name)
        self._trainable: list[str] = []  # a subset of _names, in model order
        self._losses: list[jax.Array] = []
        self.data_info: dict[str, Any] = {}
        #: The clipping switch: "auto", "fast" or "per-sample" (see compute_batch_gradients).
        self.clipping: str = "auto"
        #: How the last clipped step ran (path, per-weight method, fallbacks), or None.
        self.last_clipping: ClippingReport | None = None

    # --- properties and data info -----------------------------------------------------

    @property
    def device_policy(self) -> DevicePolicy:
        """The device this model uses, as a policy (declearn's meaning).

        ``gpu`` says whether it is a GPU, ``idx`` its index among the devices of its kind, so
        ``DevicePolicy(gpu=False, idx=0)`` on ``cpu:0`` even when a GPU was asked for and
        none was found; passing it to :meth:`update_device_policy` keeps the model where it is.

        Example:
            >>> model.device_policy
            DevicePolicy(gpu=False, idx=0)
        """
        return policy_of(self._device)

    @property
    def required_data_info(self) -> set[str]:
        """Fields :meth:`initialize` still needs (empty once initialized)."""
        return set() if self._params is not None else set(REQUIRED_FIELDS)

    def _functions(self) -> StepFunctions:
        return step_functions(self._model_fn, self._loss_fn)

    def _require_init(self, where: str) -> Params:
        if self._params is None:
            raise NotInitializedError(
                f"{where}: the model has no weights yet; call initialize(data_info) first"
            )
        return self._params

    def initialize(
        self, data_info: Mapping[str, Any], *, limits: Limits = DEFAULT_LIMITS
    ) -> None:
        """Build the weights by running the model once on a zero batch; all become trainable.

        The zero batch has shape ``(1, *features_shape)`` and dtype ``data_type`` and lives on
        the model's device. A second call with the same data info does nothing. Before
        anything is allocated, the batch's size and the weights' (from ``jax.eval_shape`` of
        the init: no compute) are checked against ``limits.max_member_bytes``: a data info
        chosen by a peer (a config) cannot make this process allocate more.

        Args:
            data_info: needs ``data_type`` and ``features_shape`` (other fields are ignored).
            limits: ``max_member_bytes`` bounds the zero batch and the weights, each.

        Raises:
            DataInfoError: a field is missing or bad (``None`` dimensions included), or the
                model was already initialized with a different data info.
            LimitExceededError: the batch or the weights would be larger than the limit, or
                cannot be allocated.
            ModelFunctionError: the model function fails on this data info.
        """
        info = validate_data_info(data_info, REQUIRED_FIELDS)
        info = {key: info[key] for key in sorted(REQUIRED_FIELDS)}
        if self._params is not None:
            if info == self.data_info:
                return
            diff = {k: (self.data_info[k], info[k]) for k in info if info[k] != self.data_info[k]}
            raise DataInfoError(
                "initialize: the model is already initialized with a different data info; "
                + "; ".join(f"{k!r}: {old!r} before, {new!r} now" for k, (old, new) in diff.items())
            )
        rng, key = jax.random.split(self._rng)
        batch = jax.ShapeDtypeStruct((1, *info["features_shape"]), np.dtype(info["data_type"]))
        _check_init_size(batch, self._functions().transformed.init, key, limits)
        try:
            zeros = np.zeros(batch.shape, dtype=batch.dtype)
            params = self._functions().init(key, put_on(zeros, self._device))
        except MemoryError:
            raise LimitExceededError(
                f"initialize: the weights for data info {info} cannot be allocated"
            ) from None
        self._set_params(params)
        self._rng = rng
        self._trainable = list(self._names)
        self.data_info = info

    def _set_params(self, params: Params) -> None:
        names = named_leaves(params)
        self._params = {module: dict(inner) for module, inner in params.items()}
        self._names = list(names)
        self._where = {
            f"{module}:{param}": (module, param)
            for module, inner in params.items()
            for param in inner
        }

    # --- weights ----------------------------------------------------------------------

    def get_weight_names(self, trainable: bool = False) -> list[str]:
        """Return the weight names in model order (a new list): all, or the trainable ones."""
        return list(self._trainable if trainable else self._names)

    def _named(self, names: Sequence[str], where: str = "get_weights") -> dict[str, jax.Array]:
        params = self._require_init(where)
        return {name: params[self._where[name][0]][self._where[name][1]] for name in names}

    def get_weights(self, trainable: bool = False) -> JaxNumpyVector:
        """Return the weights (all, or the trainable ones) as a vector, in model order.

        Raises:
            NotInitializedError: before :meth:`initialize`.
        """
        return JaxNumpyVector(self._named(self._trainable if trainable else self._names))

    def _checked_arrays(
        self, vector: object, names: Sequence[str], where: str, given_as: str
    ) -> dict[str, jax.Array]:
        """Check ``vector`` against the weights ``names``; return its arrays on our device."""
        self._require_init(where)
        if not isinstance(vector, JaxNumpyVector):
            raise TypeError(f"{where}: expected a JaxNumpyVector, got {type(vector).__name__}")
        current = self._named(names, where)
        expected: dict[str, Spec] = {name: spec_of(value) for name, value in current.items()}
        given = {name: spec_of(value) for name, value in vector.coefs.items()}
        check_fit(expected, given, where=where, given_as=given_as)
        given_arrays: dict[str, Any] = {name: vector.coefs[name] for name in names}
        return put_on(given_arrays, self._device)  # now all jax arrays, on our device

    def _replaced(self, arrays: Mapping[str, jax.Array]) -> Params:
        params = {module: dict(inner) for module, inner in self._require_init("weights").items()}
        for name, value in arrays.items():
            module, param = self._where[name]
            params[module][param] = value
        return params

    def set_weights(self, weights: JaxNumpyVector, trainable: bool = False) -> None:
        """Replace all the weights (or all the trainable ones).

        numpy arrays are copied to jax arrays on the model's device; nothing changes unless
        every name, shape and dtype fits.

        Raises:
            TypeError: ``weights`` is not a JaxNumpyVector.
            WeightsMismatchError: names missing or unexpected, shapes or dtypes that differ
                (a ``KeyError``; every mismatch is listed).
            NotInitializedError: before :meth:`initialize`.
        """
        self._require_init("set_weights")
        names = self._trainable if trainable else self._names
        arrays = self._checked_arrays(weights, names, "set_weights", "weights")
        self._params = self._replaced(arrays)

    def apply_updates(self, updates: JaxNumpyVector) -> None:
        """Add ``updates`` (one array per trainable weight) to the trainable weights.

        Raises:
            TypeError: ``updates`` is not a JaxNumpyVector.
            WeightsMismatchError: names other than the trainable ones, or shapes or dtypes
                that differ from the weights' (all listed; nothing is changed).
            NotInitializedError: before :meth:`initialize`.
        """
        arrays = self._checked_arrays(updates, self._trainable, "apply_updates", "updates")
        current = self._nest(self._named(self._trainable))
        updated = named_leaves(_tree_add(current, self._nest(arrays)))
        self._params = self._replaced(updated)

    def _split(self) -> tuple[Params, Params]:
        """Return the weights as two haiku trees: (trainable, frozen)."""
        params = self._require_init("weights")
        chosen = set(self._trainable)
        trainable: Params = {}
        frozen: Params = {}
        for module, inner in params.items():
            for param, value in inner.items():
                side = trainable if f"{module}:{param}" in chosen else frozen
                side.setdefault(module, {})[param] = value
        return trainable, frozen

    def _nest(self, flat: Mapping[str, jax.Array]) -> Params:
        nested: Params = {}
        for name, value in flat.items():
            module, param = self._where[name]
            nested.setdefault(module, {})[param] = value
        return nested

    def set_trainable_weights(self, criterion: Criterion) -> None:
        """Choose which weights are trainable (the others are frozen).

        Args:
            criterion: a list of weight names; a dict ``{module: {param: ...}}`` (or
                ``{module: [param, ...]}``); or any callable ``(module, param, value) -> bool``
                (functions, ``functools.partial`` objects, callable instances).

        Raises:
            NotInitializedError: before :meth:`initialize` (a ``ValueError``).
            WeightsMismatchError: names that are not weights of the model (a ``KeyError``
                naming them all).
            TypeError: ``criterion`` is none of the above.
        """
        self._require_init("set_trainable_weights")
        self._trainable = select_trainable(
            criterion, self._names, self._where, lambda name: self._named([name])[name]
        )

    # --- gradients, updates, predictions ----------------------------------------------

    def compute_batch_gradients(
        self, batch: Batch, max_norm: float | None = None, *, clipping: str | None = None
    ) -> JaxNumpyVector:
        """Return the gradients of the batch's mean loss w.r.t. the trainable weights.

        The loss is ``mean(s_wght * loss(model(inputs), y_true))``. With ``max_norm``, each
        sample's gradient (the model called on a batch of one, with the sample's own random
        key) is scaled by ``min(1, max_norm / ||g||)`` where ``||g||`` is its global L2 norm
        over all trainable tensors (DP-SGD's rule), and the clipped gradients are averaged.
        The batch loss is recorded (see :meth:`collect_training_losses`); the weights do not
        change.

        Clipping runs on one of two paths with the same result (float32 round-off apart):
        the *fast* path norms the weights and biases of ``hk.Linear``, ``hk.ConvND`` and
        ``hk.Embed`` layers from their inputs and output gradients (no per-sample gradient is
        built for them) and gives every other weight (norm scales, other layers) exact
        per-sample gradients; the *per-sample* path builds every sample's full gradient.
        ``clipping`` (or the ``clipping`` attribute, default ``"auto"``) chooses: ``"auto"``
        takes the fast path when it norms at least one weight, ``"fast"`` and
        ``"per-sample"`` force one. :attr:`last_clipping` tells which ran, how each weight
        was handled, and the fallbacks (also logged on ``hkstore.model``).

        Args:
            batch: ``(inputs, y_true, s_wght)``.
            max_norm: clipping bound (> 0), or ``None`` for no clipping.
            clipping: ``"auto"``, ``"fast"`` or ``"per-sample"`` for this call; ``None``
                uses the ``clipping`` attribute.

        Returns:
            ``{name: gradient}`` for the trainable weights, in model order.

        Raises:
            NotInitializedError: before :meth:`initialize`.
            TypeError: a malformed batch, or a non-number ``max_norm``.
            ValueError: ``max_norm <= 0`` (or NaN), or batch arrays of different lengths.
            ClippingError: ``clipping`` is not one of the three (a ``ValueError``).
        """
        self._require_init("compute_batch_gradients")
        bound = None if max_norm is None else check_max_norm(max_norm)
        mode = check_clipping(self.clipping if clipping is None else clipping)
        inputs, y_true, s_wght = place_batch(batch, self._device, where="compute_batch_gradients")
        trainable, frozen = self._split()
        fns = self._functions()
        if bound is None:
            rng, loss, grads = fns.grads(trainable, frozen, self._rng, inputs, y_true, s_wght)
        else:
            rng, loss, grads, self.last_clipping = clipped_step(
                fns, mode, trainable, frozen, self._rng, inputs, y_true, s_wght, bound
            )
        self._rng = rng
        self._losses.append(loss)
        labelled = named_leaves(grads)  # labels from the gradient tree itself
        return JaxNumpyVector({name: labelled[name] for name in self._trainable})

    def collect_training_losses(self) -> list[float]:
        """Return the batch losses recorded since the last call, and forget them."""
        losses, self._losses = self._losses, []
        return [float(loss) for loss in losses]

    def compute_batch_predictions(
        self, batch: Batch
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """Run the model on a batch.

        Returns:
            ``(y_true, y_pred, s_wght)`` as numpy arrays (``s_wght`` may be ``None``).

        Raises:
            NotInitializedError: before :meth:`initialize`.
            TypeError: a malformed batch, or ``y_true`` is None.
        """
        params = self._require_init("compute_batch_predictions")
        if isinstance(batch, tuple | list) and len(batch) == 3 and batch[1] is None:
            raise TypeError("compute_batch_predictions: the batch has no y_true (None)")
        inputs, _, _ = place_batch(batch, self._device, where="compute_batch_predictions")
        self._rng, y_pred = self._functions().predict(params, self._rng, inputs)
        s_wght = None if batch[2] is None else np.asarray(batch[2])
        return np.asarray(batch[1]), np.asarray(y_pred), s_wght

    def loss_function(self, y_true: np.ndarray, y_pred: np.ndarray) -> np.ndarray:
        """Return the per-sample losses as a 1-d numpy array (length 1 for a batch of one).

        A loss that returns more than one value per sample is averaged over the extra axes,
        as in training.
        """
        y_true_d, y_pred_d = put_on((np.asarray(y_true), np.asarray(y_pred)), self._device)
        out = np.asarray(self._functions().loss(y_pred_d, y_true_d))
        if out.ndim == 0:
            return out.reshape(1)
        if out.ndim > 1:
            return out.reshape(out.shape[0], -1).mean(axis=1)
        return out

    # --- device -----------------------------------------------------------------------

    def update_device_policy(self, policy: DevicePolicy | None = None) -> None:
        """Move the model (weights and random state) to the device of ``policy``.

        Works at any time, before or after anything was computed: the compiled functions
        follow their arguments' device, so there is no cache to invalidate.

        Args:
            policy: the policy to enforce; ``None`` takes the current global policy.

        Raises:
            TypeError: ``policy`` is not a DevicePolicy.
        """
        policy = get_device_policy() if policy is None else policy
        device = select_device(policy)
        if self._params is not None:
            self._params = jax.device_put(self._params, device)
        self._rng = jax.device_put(self._rng, device)
        self._device = device

    # --- random state ------------------------------------------------------------------

    @property
    def rng_state(self) -> RngState:
        """The model's current random state: the PRNG key its next step will split.

        Not the seed: a model that trained for a while has moved on from it. Reading gives an
        :class:`RngState` (plain data); setting accepts one, a typed jax key
        (``jax.random.key``) or a raw ``uint32[2]`` key, placed on the model's device. Archives
        and configs carry it, so a reloaded model draws the same random numbers (dropout
        masks, clipping keys) as the original would have.

        Raises:
            RngStateError: (on setting) not one PRNG key of a known implementation.

        Example:
            >>> before = model.rng_state
            >>> grads = model.compute_batch_gradients(batch)
            >>> model.rng_state == before  # the step drew from it
            False
            >>> model.rng_state = before  # replays the same keys
        """
        return RngState.from_key(self._rng)

    @rng_state.setter
    def rng_state(self, value: RngState | jax.Array) -> None:
        self._rng = RngState.from_key(value).to_key(self._device)

    # --- the model-state hook -----------------------------------------------------------

    def export_state(self) -> ModelState:
        """Return everything needed to write this model out and rebuild it, as a snapshot.

        The snapshot holds the current (immutable) weight arrays, trainable names, data info,
        seed, random state and functions; nothing is copied to the host until
        :meth:`ModelState.host_weights` is iterated, and changing the model afterwards does not
        change the snapshot. Saving, checkpoints and the framework integrations all use it.

        Returns:
            A :class:`ModelState`; ``data_info`` is ``None`` before :meth:`initialize`.

        Example:
            >>> state = model.export_state()
            >>> [spec.name for spec in state.weight_specs()][:1]
            ['mlp/~/linear_0:b']
        """
        initialized = self._params is not None
        return ModelState(
            model=self._model_fn,
            loss=self._loss_fn,
            seed=self._seed,
            data_info=dict(self.data_info) if initialized else None,
            weights=self._named(self._names) if initialized else {},
            trainable=tuple(self._trainable),
            rng=self.rng_state,
        )

    @classmethod
    def from_state(cls, state: ModelState) -> HaikuModel:
        """Build a model from a :class:`ModelState`, in one all-or-nothing step.

        The expected names, shapes and dtypes come from ``jax.eval_shape`` of the model's init
        on the state's data info (no compute, no random init): weights that do not fit are
        refused, every mismatch named, before any model exists. The arrays are placed on the
        current device policy's device as they are (on the CPU, jax may alias a suitably
        aligned numpy buffer: hand over fresh, owned buffers; device arrays a loader already
        sent there, ``early_placement``, stay where they are). The random state is the
        state's, or, when it has none, the one :meth:`initialize` leaves for that seed.

        Args:
            state: the state; for a model that was not initialized (``data_info=None``) the
                new model is not initialized either.

        Returns:
            A new :class:`HaikuModel`.

        Raises:
            DataInfoError: bad data info.
            WeightsMismatchError: weights missing, unexpected, or of another shape or dtype, or
                trainable names that are not weights (all listed at once).
            ModelFunctionError: the model function itself fails when traced on the data info.
            RngStateError: a bad random state.
        """
        model = cls(state.model, state.loss, seed=state.seed)
        if state.data_info is None:
            if state.weights or state.trainable:
                raise WeightsMismatchError(
                    "from_state: a state without data info cannot have weights or trainable "
                    "names (the model was not initialized)"
                )
            if state.rng is not None:
                model.rng_state = state.rng
            return model
        info = validate_data_info(state.data_info, REQUIRED_FIELDS)
        info = {key: info[key] for key in sorted(REQUIRED_FIELDS)}
        rng, key = jax.random.split(model._rng)
        zeros = jax.ShapeDtypeStruct((1, *info["features_shape"]), np.dtype(info["data_type"]))
        try:
            shapes = jax.eval_shape(model._functions().transformed.init, key, zeros)
        except Exception as exc:  # the caller's model function raised: say so, keep the cause
            raise ModelFunctionError(
                f"from_state: the model function fails on the stored data info (data_type "
                f"{info['data_type']!r}, features_shape {list(info['features_shape'])}): "
                f"{type(exc).__name__}: {exc}"
            ) from exc
        expected = {name: spec_of(value) for name, value in named_leaves(shapes).items()}
        given = {name: spec_of(value) for name, value in state.weights.items()}
        check_fit(expected, given, where="from_state", given_as="stored weights")
        unknown = [name for name in state.trainable if name not in expected]
        if unknown:
            raise WeightsMismatchError(
                f"from_state: {len(unknown)} trainable name(s) are not weights of the model: "
                f"{', '.join(map(repr, unknown))}"
            )
        if state.rng is not None:
            rng = RngState.from_key(state.rng).to_key(model._device)
        where = [(module, param) for module, inner in shapes.items() for param in inner]
        arrays = [state.weights[f"{module}:{param}"] for module, param in where]
        placed = jax.device_put(arrays, model._device)  # one batched transfer, no host copy
        params: Params = {}
        for (module, param), value in zip(where, placed, strict=True):
            params.setdefault(module, {})[param] = value
        model._set_params(params)
        model._rng = rng
        chosen = set(state.trainable)
        model._trainable = [name for name in model._names if name in chosen]
        model.data_info = info
        return model

    # --- configs --------------------------------------------------------------------------

    def get_config(
        self,
        allow_bin: bool = False,
        *,
        functions: FunctionKind = "reference",
        signer: Signer | None = None,
    ) -> dict[str, Any]:
        """Return the model's config: a JSON-safe dict with no weights (as in declearn).

        It records the functions, seed, data info, trainable names and random state. Pickled
        functions travel only with ``functions="pickle"``, base64-encoded with their digest
        and the writer's Python; sign the config (``signer``) so a receiver can accept them.
        Format: ``schemas/config.v1.json``.

        Args:
            allow_bin: declearn's meaning: binary content may be given as ``bytes`` rather
                than text. Here that is the pickled-functions blob (present only with
                ``functions="pickle"``), given as raw bytes instead of base64 -- the form a
                binary transport (msgpack) carries without the 4/3 overhead. It changes
                nothing else: what the config carries is chosen by ``functions``, and what a
                receiver runs by its ``trust``.
            functions: ``"reference"`` (default), ``"pickle"`` (opt-in) or ``"none"``.
            signer: an :class:`~hkstore.Ed25519Signer` or :class:`~hkstore.HmacKey`.

        Raises:
            NotImportableError: ``functions="reference"`` and a function is not importable.
            TypeError: ``allow_bin`` is not a bool.

        Example:
            >>> config = model.get_config()
            >>> config["functions"]["model"]["kind"]
            'reference'
        """
        _check_allow_bin(allow_bin, "get_config")
        state = self.export_state()
        specs, blob, raw_size = describe_functions(
            {"model": state.model, "loss": state.loss}, functions
        )
        config = build_config(
            seed=self._seed,
            data_info=None if state.data_info is None
            else json_safe(state.data_info, where="data_info"),
            trainable=None if state.data_info is None else list(state.trainable),
            functions=specs,
            pickle_blob=blob,
            pickle_raw_size=raw_size,
            pickle_runtime=None if blob is None else pickle_runtime(),
            rng=None if state.rng is None else state.rng.to_dict(),
            signer=signer,
        )
        return config_with_binary_blob(config) if allow_bin else config

    @classmethod
    def from_config(
        cls,
        config: Mapping[str, Any],
        allow_bin: bool = False,
        *,
        trust: Trust | None = None,
        model: Callable[..., Any] | None = None,
        loss: Callable[..., Any] | None = None,
        limits: Limits = DEFAULT_LIMITS,
    ) -> HaikuModel:
        """Rebuild a model from :meth:`get_config`'s output, through the trust gate.

        Functions the caller passes are used as given; the others come from the config only
        as ``trust`` allows (see :class:`~hkstore.Trust`). A signature, when present, is
        checked with ``trust``'s keys even when both functions are passed. When the config
        has data info the model is initialized (same seed, so the same initial weights),
        its trainable mask set and its random state restored.

        Args:
            config: the config document.
            allow_bin: accept the binary form (:meth:`get_config` with ``allow_bin=True``:
                the pickle blob as bytes) as well as the text form. Trust is unaffected.
            trust: what the config may make this process import or unpickle.
            model: the model function (overrides the config's).
            loss: the loss function (overrides the config's).
            limits: caps on the config's pickle blob, and on the zero batch and weights its
                data info makes :meth:`initialize` allocate (``max_member_bytes``).

        Raises:
            TypeError: ``allow_bin`` is not a bool (``trust`` and the functions are keywords).
            ConfigError: the config is malformed (naming the field); a blob given as bytes
                without ``allow_bin=True``.
            LimitExceededError: the pickle, or the model the data info describes, is too
                large for ``limits``.
            UnsupportedVersionError: a newer config version.
            RefusedCodeError, SignatureError, UntrustedKeyError, DigestMismatchError,
            RuntimeMismatchError: as for :func:`hkstore.load`.
        """
        _check_allow_bin(allow_bin, "from_config")
        trust = Trust() if trust is None else trust
        document = parse_config(
            config_with_text_blob(config) if allow_bin else config, limits=limits
        )
        document.check_signature(trust)  # always: a bad or untrusted signature fails
        given = {"model": model, "loss": loss}
        missing = [role for role in ROLES if given[role] is None]
        if missing:
            given.update(document.resolve_functions(trust, roles=missing, limits=limits))
        model_fn, loss_fn = require_functions(given, where="config")
        new = cls(model_fn, loss_fn, seed=document.seed)
        if document.data_info is not None:
            new.initialize(document.data_info, limits=limits)
            if document.trainable is not None:
                new.set_trainable_weights(list(document.trainable))
        if document.rng is not None:
            new.rng_state = RngState(document.rng.impl, document.rng.key_data)
        return new


def _check_allow_bin(allow_bin: object, where: str) -> None:
    if not isinstance(allow_bin, bool):
        raise TypeError(
            f"{where}: allow_bin must be a bool, got {type(allow_bin).__name__} (trust, "
            "model, loss, functions and signer are keyword arguments)"
        )


def require_functions(
    given: Mapping[str, Callable[..., Any] | None], *, where: str
) -> tuple[Callable[..., Any], Callable[..., Any]]:
    """Return ``(model_fn, loss_fn)``, refusing a role the source stores as ``none``.

    Raises:
        ArchiveFormatError: ``where`` (``"archive"``, ``"config"``) stores no such function
            and the caller passed none.
    """
    model_fn, loss_fn = given.get("model"), given.get("loss")
    for role, fn in (("model", model_fn), ("loss", loss_fn)):
        if fn is None:
            raise ArchiveFormatError(
                f"the {where} stores no {role} function (kind 'none'); pass {role}= yourself"
            )
    assert model_fn is not None and loss_fn is not None
    return model_fn, loss_fn
