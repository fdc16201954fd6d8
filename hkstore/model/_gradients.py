"""The compiled steps of a model: init, loss gradients (plain or per-sample clipped), predictions.

Clipped gradients take one of two paths (:func:`clipped_step`): the per-sample path below
(``vmap`` of ``grad``: every sample's full gradient is built) or the fast path of ``_ghost``
(norms from the layers' inputs and output gradients, planned by ``_ghost_plan``). Both give
the same numbers; the switch (``"auto"``, ``"fast"``, ``"per-sample"``) picks one.

The functions are jitted once per ``(model, loss)`` pair and are device-agnostic: they run
where their (committed) arguments live (unused arguments are kept so that this holds). Moving
a model to another device only moves its arrays, and jax compiles one executable per device on
first use. Nothing here depends on the device: nothing to invalidate when the policy changes.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable, Hashable
from typing import Any, NamedTuple

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np

from hkstore.errors import ClippingError
from hkstore.model._ghost import fast_clipped_grads
from hkstore.model._ghost_plan import ClippingReport, Plan, plan_clipping

__all__ = [
    "CLIPPING_MODES",
    "ClippingReport",
    "Params",
    "StepFunctions",
    "check_clipping",
    "check_max_norm",
    "clipped_step",
    "named_leaves",
    "step_functions",
]

log = logging.getLogger("hkstore.model")

#: The clipping switch: ``"auto"`` (the fast path when it norms at least one weight, else the
#: per-sample path), ``"fast"`` (always the fast path), ``"per-sample"`` (always ``vmap(grad)``).
CLIPPING_MODES = ("auto", "fast", "per-sample")
_MAX_PLANS = 64  # plans kept per (model, loss) pair: one per batch signature and trainable set

#: haiku's parameter tree: ``{module path: {param name: array}}``.
Params = dict[str, dict[str, jax.Array]]


class StepFunctions(NamedTuple):
    """The jitted functions of one ``(model, loss)`` pair (see :func:`step_functions`)."""

    transformed: hk.Transformed
    init: Callable[..., Params]
    grads: Callable[..., tuple[jax.Array, jax.Array, Params]]
    clipped_grads: Callable[..., tuple[jax.Array, jax.Array, Params]]
    predict: Callable[..., tuple[jax.Array, jax.Array]]
    loss: Callable[..., jax.Array]
    fast_clipped_grads: Callable[..., tuple[jax.Array, jax.Array, Params]]
    plan: Callable[[Params, Params, tuple[Any, ...], Any, Any], Plan]


def named_leaves(tree: Params) -> dict[str, jax.Array]:
    """Flatten a haiku tree into ``{"module:param": leaf}``, in the tree's own (sorted) order.

    Names come from the tree's keys, never from a separate list, so a gradient tree is always
    labelled with the weights it is the gradient of.
    """
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {f"{path[0].key}:{path[1].key}": leaf for path, leaf in flat}


def _merge(trainable: Params, frozen: Params) -> Params:
    modules = sorted(set(trainable) | set(frozen))
    return {m: {**frozen.get(m, {}), **trainable.get(m, {})} for m in modules}


def _mean_loss(
    apply: Callable[..., Any],
    loss_fn: Callable[[Any, Any], jax.Array],
    params: Params,
    key: jax.Array,
    inputs: tuple[jax.Array, ...],
    y_true: jax.Array | None,
    s_wght: jax.Array | None,
) -> jax.Array:
    """``mean(s_wght * loss(model(inputs), y_true))`` (declearn's weighting convention)."""
    losses = jnp.asarray(loss_fn(apply(params, key, *inputs), y_true))
    if s_wght is not None:
        losses = losses * s_wght.reshape(s_wght.shape + (1,) * (losses.ndim - 1))
    return jnp.mean(losses)


def _global_norms(per_sample: Params) -> jax.Array:
    """L2 norm of each sample's gradient over *all* tensors (leading axis = sample)."""
    total = None
    for leaf in jax.tree_util.tree_leaves(per_sample):
        wide = leaf.astype(jnp.promote_types(leaf.dtype, jnp.float32))
        part = jnp.sum(jnp.square(wide), axis=tuple(range(1, leaf.ndim)))
        total = part if total is None else total + part
    if total is None:  # nothing trainable
        return jnp.zeros((0,), jnp.float32)
    return jnp.sqrt(total)


def _build(model_fn: Callable[..., Any], loss_fn: Callable[[Any, Any], jax.Array]) -> StepFunctions:
    transformed = hk.transform(model_fn)
    apply = transformed.apply
    loss = functools.partial(_mean_loss, apply, loss_fn)

    def grads(
        trainable: Params, frozen: Params, rng: jax.Array, inputs: Any, y: Any, w: Any
    ) -> Any:
        rng, key = jax.random.split(rng)
        value, grad = jax.value_and_grad(lambda tr: loss(_merge(tr, frozen), key, inputs, y, w))(
            trainable
        )
        return rng, value, grad

    def clipped_grads(
        trainable: Params,
        frozen: Params,
        rng: jax.Array,
        inputs: Any,
        y: Any,
        w: Any,
        max_norm: Any,
    ) -> Any:
        rng, key = jax.random.split(rng)
        n_samples = inputs[0].shape[0]
        keys = jax.random.split(key, n_samples)  # one key per sample

        def one_sample(x_i: Any, y_i: Any, w_i: Any, key_i: jax.Array) -> Any:
            # the model sees a batch of ONE (leading dim 1), exactly as in ordinary training
            x1, y1, w1 = jax.tree_util.tree_map(lambda a: a[None], (x_i, y_i, w_i))
            return jax.value_and_grad(lambda tr: loss(_merge(tr, frozen), key_i, x1, y1, w1))(
                trainable
            )

        values, per_sample = jax.vmap(one_sample)(inputs, y, w, keys)
        # DP-SGD: g_i * min(1, C / ||g_i||), ||.|| the global L2 norm of sample i's gradient
        scale = jnp.minimum(1.0, max_norm / _global_norms(per_sample))

        def clip_mean(g: jax.Array) -> jax.Array:
            factor = scale.reshape((n_samples,) + (1,) * (g.ndim - 1)).astype(g.dtype)
            return jnp.mean(g * factor, axis=0)

        return rng, jnp.mean(values), jax.tree_util.tree_map(clip_mean, per_sample)

    def fast(plan: Plan, *args: Any) -> Any:
        return fast_clipped_grads(loss, plan, *args)

    def loss_of(apply: Callable[..., Any]) -> Callable[..., jax.Array]:
        return functools.partial(_mean_loss, apply, loss_fn)

    plans: dict[Hashable, Plan] = {}

    def plan(trainable: Params, frozen: Params, inputs: Any, y: Any, w: Any) -> Plan:
        """The fast path's plan for this batch signature (traced once, then cached)."""
        key = _signature(trainable, frozen, inputs, y, w)
        found = plans.get(key)
        if found is None:
            if len(plans) >= _MAX_PLANS:
                plans.clear()
            one = jax.tree_util.tree_map(_one_sample_spec, (inputs, y, w))
            found = plan_clipping(model_fn, loss_of, _specs(trainable), _specs(frozen), one)
            plans[key] = found
            if found.fallbacks:
                log.warning(
                    "clipped gradients: %d weight(s) get per-sample gradients, as the fast "
                    "path cannot norm them from their layer%s: %s",
                    len(found.fallbacks),
                    "" if found.fast_helps else " (no weight is normed: with clipping='auto' "
                    "the per-sample path runs)",
                    "; ".join(f"{name}: {why}" for name, why in found.fallbacks),
                )
        return found

    def predict(params: Params, rng: jax.Array, inputs: Any) -> Any:
        rng, key = jax.random.split(rng)
        return rng, apply(params, key, *inputs)

    def per_sample_loss(y_pred: Any, y_true: Any) -> jax.Array:
        return jnp.asarray(loss_fn(y_pred, y_true))

    # keep_unused: an argument the computation ignores (the key of a model drawing no random
    # numbers, the input of constant initializers) must not be pruned, or a computation left
    # with no committed argument would run on the default device instead of the model's.
    jit = functools.partial(jax.jit, keep_unused=True)
    return StepFunctions(
        transformed=transformed,
        init=jit(transformed.init),
        grads=jit(grads),
        clipped_grads=jit(clipped_grads),
        predict=jit(predict),
        loss=jit(per_sample_loss),
        fast_clipped_grads=jax.jit(fast, static_argnums=0, keep_unused=True),
        plan=plan,
    )


def _spec(a: Any) -> tuple[tuple[int, ...], str]:
    return tuple(a.shape), str(a.dtype)


def _signature(trainable: Params, frozen: Params, inputs: Any, y: Any, w: Any) -> Hashable:
    """What a plan depends on: the weights' names, shapes, dtypes and one sample's shapes."""

    def tree(params: Params) -> tuple[Any, ...]:
        return tuple((m, p, _spec(v)) for m, inner in params.items() for p, v in inner.items())

    sample = tuple(None if a is None else (a.shape[1:], str(a.dtype)) for a in (*inputs, y, w))
    return tree(trainable), tree(frozen), len(inputs), sample


def _specs(params: Params) -> dict[str, dict[str, Any]]:
    """The weights as abstract values (shapes and dtypes), for tracing a plan."""
    return {m: {p: jax.ShapeDtypeStruct(v.shape, v.dtype) for p, v in inner.items()}
            for m, inner in params.items()}


def _one_sample_spec(a: jax.Array) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct((1, *a.shape[1:]), a.dtype)


# Bounded, so that a long-lived process creating many models with throwaway functions keeps
# at most this many (model, loss) pairs (and their compiled executables) alive.
_cached_build = functools.lru_cache(maxsize=16)(_build)


def step_functions(
    model_fn: Callable[..., Any], loss_fn: Callable[[Any, Any], jax.Array]
) -> StepFunctions:
    """Return the jitted step functions of ``(model_fn, loss_fn)``, shared by every model.

    Models built from the same two functions share compiled executables (a federated client
    creating a fresh model per round does not recompile). Unhashable callables get their own.
    """
    try:
        hash((model_fn, loss_fn))
    except TypeError:  # an unhashable callable object: its own, uncached functions
        return _build(model_fn, loss_fn)
    return _cached_build(model_fn, loss_fn)


def check_max_norm(max_norm: object) -> float:
    """Return ``max_norm`` as a float > 0.

    Raises:
        TypeError: not a number.
        ValueError: ``<= 0`` or NaN (declearn read 0 as "no clipping"; here ``None`` means that).
    """
    if isinstance(max_norm, bool) or not isinstance(max_norm, int | float | np.number):
        raise TypeError(f"max_norm must be a number or None, got {type(max_norm).__name__}")
    bound = float(max_norm)
    if math.isnan(bound) or bound <= 0:
        raise ValueError(f"max_norm must be > 0 (or None for no clipping), got {max_norm!r}")
    return bound


def check_clipping(mode: object) -> str:
    """Return ``mode`` if it is one of :data:`CLIPPING_MODES`.

    Raises:
        ClippingError: anything else (a ``ValueError``), naming the accepted values.
    """
    if not isinstance(mode, str) or mode not in CLIPPING_MODES:
        raise ClippingError(
            f"clipping must be one of {', '.join(map(repr, CLIPPING_MODES))}, got {mode!r}"
        )
    return mode


def clipped_step(
    fns: StepFunctions,
    mode: str,
    trainable: Params,
    frozen: Params,
    rng: jax.Array,
    inputs: tuple[jax.Array, ...],
    y: jax.Array | None,
    w: jax.Array | None,
    max_norm: float,
) -> tuple[jax.Array, jax.Array, Params, ClippingReport]:
    """Run a clipped step on the path ``mode`` selects; return what it did as a report.

    Args:
        fns: the model's step functions.
        mode: one of :data:`CLIPPING_MODES` (checked by the caller).
        trainable, frozen, rng, inputs, y, w: as for ``StepFunctions.clipped_grads``.
        max_norm: the clipping bound (> 0).

    Returns:
        ``(new rng, mean loss, clipped mean gradient tree, ClippingReport)``. A fallback (a
        weight the fast path could not norm from its layer) is logged as a warning on
        ``hkstore.model`` when the plan is made (once per batch signature), naming the
        weights and why; every step logs its path at debug level.
    """
    if mode == "per-sample":
        rng, loss, grads = fns.clipped_grads(trainable, frozen, rng, inputs, y, w, max_norm)
        names = [f"{m}:{p}" for m, inner in trainable.items() for p in inner]
        report = ClippingReport("per-sample", mode, dict.fromkeys(names, "per-sample"), {})
        log.debug("clipped step: per-sample path (clipping='per-sample')")
        return rng, loss, grads, report
    plan = fns.plan(trainable, frozen, inputs, y, w)
    fast = mode == "fast" or plan.fast_helps
    report = ClippingReport(
        "fast" if fast else "per-sample",
        mode,
        dict(plan.notes) if fast else {n: "per-sample" for n, _ in plan.notes},
        dict(plan.fallbacks),
    )
    log.debug("clipped step: %s path (clipping=%r): %s", report.path, mode, report.methods)
    if fast:
        rng, loss, grads = fns.fast_clipped_grads(
            plan, trainable, frozen, rng, inputs, y, w, max_norm
        )
    else:
        rng, loss, grads = fns.clipped_grads(trainable, frozen, rng, inputs, y, w, max_norm)
    return rng, loss, grads, report
