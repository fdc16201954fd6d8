"""The fast clipped step: DP-SGD's clipped mean gradient without per-sample weight gradients.

What it computes is exactly what the per-sample path computes: each sample's gradient of
``w_i * loss_i`` (the model called on a batch of one, with the sample's own random key: the
same keys, drawn the same way), clipped to ``min(1, max_norm / ||g_i||)`` by its global L2 norm
over all trainable weights, then averaged. Only the way there differs:

1. One forward pass, vmapped over samples, each sample a batch of one (so a model that mixes
   samples, e.g. batch statistics, sees what the per-sample path shows it). The normed layers'
   inputs are kept, and a zero *tap* is added to their outputs; weights the plan does not norm
   enter as one copy per sample.
2. One backward pass (``vjp`` with unit cotangents, w.r.t. the taps and the per-sample
   weights only) gives each tap's gradient ``G`` (the gradient of the layer's output, per
   sample) and the per-sample weights' exact gradients; no normed weight's gradient is
   formed.
3. Per-sample squared norms (``_ghost_layers.WeightFactors``) from the kept inputs and ``G``
   for normed weights, plain sums of squares for per-sample ones; their total gives the
   clipping factors ``c_i``.
4. The clipped mean of a normed weight is ``sum_i c_i X_i.T @ G_i / n`` from the same two
   factors ("book-keeping": no second backward pass); per-sample weights' come from step 2,
   scaled.

No ``batch x weights`` array is built for normed weights; memory stays about that of a plain
step plus the kept layer outputs' gradients.

Example (through the wrapper):
    >>> import haiku as hk, jax.numpy as jnp, numpy as np
    >>> from hkstore import HaikuModel
    >>> def fwd(x): return hk.Linear(1, name="lin")(x)
    >>> def mse(p, y): return jnp.mean((p - y) ** 2, axis=-1)
    >>> m = HaikuModel(fwd, mse, seed=0)
    >>> m.initialize({"data_type": "float32", "features_shape": (3,)})
    >>> x, y = np.ones((8, 3), np.float32), np.zeros((8, 1), np.float32)
    >>> g = m.compute_batch_gradients((x, y, None), max_norm=0.1)
    >>> m.last_clipping.path, m.last_clipping.methods
    ('fast', {'lin:b': 'linear: bias', 'lin:w': 'linear: rank1'})
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import haiku as hk
import jax
import jax.numpy as jnp

from hkstore.errors import ClippingError
from hkstore.model._ghost_layers import WeightFactors, capture, layer_kind, weights_of
from hkstore.model._ghost_plan import Plan, trace_state

__all__ = ["fast_clipped_grads"]

Params = dict[str, dict[str, Any]]


class _Tapper:
    """Interceptor of one sample's forward: keeps the normed layers' inputs, taps outputs."""

    def __init__(self, plan: Plan, taps: tuple[jax.Array, ...]) -> None:
        self.plan = plan
        self.normed = set(plan.normed)
        self.taps = taps
        self.entry = trace_state()
        self.acts: list[jax.Array] = []

    def intercept(self, next_f: Callable[..., Any], args: Any, kwargs: Any, ctx: Any) -> Any:
        kind = layer_kind(ctx.module) if ctx.method_name == "__call__" else None
        if kind is None or trace_state() != self.entry:
            return next_f(*args, **kwargs)
        if self.normed.isdisjoint(weights_of(kind, ctx.module)):
            return next_f(*args, **kwargs)
        index = len(self.acts)
        if index >= len(self.plan.calls) or self.plan.calls[index].module != ctx.module.module_name:
            raise ClippingError(
                f"compute_batch_gradients: the model called layer {ctx.module.module_name!r} "
                "where its traced plan expected "
                + (repr(self.plan.calls[index].module) if index < len(self.plan.calls) else "none")
                + "; a model whose layer calls change from trace to trace needs "
                "clipping='per-sample'"
            )
        act, _ = capture(kind, ctx.module, args, kwargs)
        self.acts.append(act)
        return next_f(*args, **kwargs) + self.taps[index]

    def check_complete(self) -> None:
        if len(self.acts) != len(self.plan.calls):
            raise ClippingError(
                f"compute_batch_gradients: the model made {len(self.acts)} normed layer "
                f"call(s) where its traced plan has {len(self.plan.calls)}; a model whose "
                "layer calls change from trace to trace needs clipping='per-sample'"
            )


def _split(plan: Plan, trainable: Params) -> tuple[dict[str, jax.Array], dict[str, jax.Array]]:
    flat = {f"{m}:{p}": v for m, inner in trainable.items() for p, v in inner.items()}
    return {n: flat[n] for n in plan.normed}, {n: flat[n] for n in plan.per_sample}


def _nest(flat: dict[str, jax.Array], like: Params) -> Params:
    where = {f"{m}:{p}": (m, p) for m, inner in like.items() for p in inner}
    out: Params = {}
    for name, value in flat.items():
        module, param = where[name]
        out.setdefault(module, {})[param] = value
    return out


def fast_clipped_grads(
    loss: Callable[..., jax.Array],
    plan: Plan,
    trainable: Params,
    frozen: Params,
    rng: jax.Array,
    inputs: tuple[jax.Array, ...],
    y: jax.Array | None,
    w: jax.Array | None,
    max_norm: jax.Array | float,
) -> tuple[jax.Array, jax.Array, Params]:
    """The clipped mean gradient, the fast way (traced inside the step's ``jit``).

    Args:
        loss: ``loss(params, key, inputs, y, w) -> mean(w * per-sample loss)``.
        plan: from ``_ghost_plan.plan_clipping`` on this batch's signature.
        trainable, frozen: the weights as haiku trees.
        rng: the model's key; split exactly as the per-sample path splits it.
        inputs, y, w: the batch (``y``/``w`` may be None).
        max_norm: the clipping bound.

    Returns:
        ``(new rng, mean loss, clipped mean gradient as a haiku tree like trainable)``.

    Raises:
        ClippingError: the model's layer calls differ from those the plan traced.
    """
    rng, key = jax.random.split(rng)
    n = inputs[0].shape[0]
    keys = jax.random.split(key, n)  # one key per sample, as on the per-sample path
    normed, shared_per_sample = _split(plan, trainable)
    per_sample = {k: jnp.broadcast_to(v, (n, *v.shape)) for k, v in shared_per_sample.items()}
    taps = tuple(jnp.zeros((n, *c.out_shape), c.out_dtype) for c in plan.calls)

    def one_sample(
        normed: dict[str, jax.Array],
        mine: dict[str, jax.Array],
        taps_i: tuple[jax.Array, ...],
        x_i: Any,
        y_i: Any,
        w_i: Any,
        key_i: jax.Array,
    ) -> tuple[jax.Array, tuple[jax.Array, ...]]:
        tapper = _Tapper(plan, taps_i)
        params = _nest({**normed, **mine}, trainable)
        merged = {m: {**frozen.get(m, {}), **params.get(m, {})} for m in {*params, *frozen}}
        x1, y1, w1 = jax.tree_util.tree_map(lambda a: a[None], (x_i, y_i, w_i))
        with hk.intercept_methods(tapper.intercept):
            value = loss(merged, key_i, x1, y1, w1)
        tapper.check_complete()
        return value, tuple(tapper.acts)

    def forward(
        mine: dict[str, jax.Array], taps: tuple[jax.Array, ...]
    ) -> tuple[jax.Array, tuple[jax.Array, ...]]:
        batched = jax.vmap(one_sample, in_axes=(None, 0, 0, 0, 0, 0, 0))
        return batched(normed, mine, taps, inputs, y, w, keys)

    values, backward, acts = jax.vjp(forward, per_sample, taps, has_aux=True)
    sample_grads, tap_grads = backward(jnp.ones_like(values))

    factors: dict[str, WeightFactors] = {}
    for name in plan.normed:
        idx = [i for i, c in enumerate(plan.calls) if name in c.weights]
        calls = [plan.calls[i] for i in idx]
        kept = [acts[i] for i in idx]
        factors[name] = WeightFactors(name, calls, kept, [tap_grads[i] for i in idx])
    sq = jnp.zeros((n,), jnp.float32)
    for weight in factors.values():
        sq = sq + weight.sq_norms().astype(sq.dtype)
    for g in sample_grads.values():
        wide = g.astype(jnp.promote_types(g.dtype, jnp.float32))
        sq = sq + jnp.sum(jnp.square(wide), axis=tuple(range(1, g.ndim))).astype(sq.dtype)
    # DP-SGD: g_i * min(1, C / ||g_i||), ||.|| the global L2 norm of sample i's gradient
    scale = jnp.minimum(1.0, max_norm / jnp.sqrt(sq))

    clipped = {name: f.weighted_sum(scale / n, normed[name]) for name, f in factors.items()}
    for name, g in sample_grads.items():
        factor = scale.reshape((n,) + (1,) * (g.ndim - 1)).astype(g.dtype)
        clipped[name] = jnp.mean(g * factor, axis=0)
    return rng, jnp.mean(values), _nest(clipped, trainable)
