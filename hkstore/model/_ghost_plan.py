"""The fast clipping path's plan: which weights are normed from their layers, which are not, why.

:func:`plan_clipping` traces the model once on one sample (abstract values, nothing runs) and
decides, per trainable weight:

- *normed*: the weight of a layer ``_ghost_layers`` knows, fetched only inside that layer's
  calls, every call made at the model's own level (not inside ``hk.scan``, ``hk.remat`` and
  other jax transformations, where the layer's input cannot be kept), and not changed by a
  custom getter. Its per-sample norm then comes from the calls' inputs and output gradients.
- *per-sample*: everything else. Its exact per-sample gradient is computed directly (one copy
  of the weight per sample, ``batch x size`` floats). For vector weights (norm scales and
  offsets, the bias of a layer that is not normed) this is the plan; for anything else it is a
  *fallback*, and the plan says why.

How "fetched only inside its calls" is proven rather than assumed: while tracing, a weight is
handed out as one value inside its layer's calls and as a second, separate value anywhere
else (``embed.embeddings`` read for tied output weights, a name-scope trick, a layer called
inside ``hk.scan``); the weight is normed only if the traced computation never uses the
second value.

Example:
    >>> plan = Plan(calls=(), normed=(), per_sample=("lin:b",),
    ...             notes=(("lin:b", "per-sample (bias)"),), fallbacks=())
    >>> plan.fast_helps
    False
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import haiku as hk
import jax
import numpy as np
from jax.extend import core as jex

from hkstore.model._ghost_layers import (
    LayerCall,
    capture,
    layer_kind,
    layer_method,
    unsupported_reason,
    vector_role,
    weights_of,
)

__all__ = ["ClippingReport", "Plan", "live_inputs", "plan_clipping", "trace_state"]

log = logging.getLogger("hkstore.model")

#: haiku's parameter tree: ``{module path: {param name: array}}``.
Params = dict[str, dict[str, Any]]
#: ``(inputs, y_true, s_wght)`` of one sample with its leading axis of one, as abstract values.
OneSample = tuple[tuple[Any, ...], Any, Any]


def trace_state() -> object:
    """An opaque, comparable token of the current jax trace (same token: same level)."""
    return jex.get_opaque_trace_state(convention="haiku")


@dataclass(frozen=True)
class Plan:
    """How the fast path clips one model on one batch signature (hashable: a jit static).

    Attributes:
        calls: the normed layers' calls, in the order the model makes them.
        normed: weights normed from their calls (model order).
        per_sample: trainable weights given exact per-sample gradients (model order).
        notes: ``(weight, how)`` for every trainable weight, model order.
        fallbacks: ``(weight, why)`` for per-sample weights that are not vector weights.
    """

    calls: tuple[LayerCall, ...]
    normed: tuple[str, ...]
    per_sample: tuple[str, ...]
    notes: tuple[tuple[str, str], ...]
    fallbacks: tuple[tuple[str, str], ...]

    @property
    def fast_helps(self) -> bool:
        """Whether any weight is normed (else the fast path has nothing to save)."""
        return bool(self.normed)


@dataclass(frozen=True)
class ClippingReport:
    """Which clipping path the last clipped step took, and how each weight was handled.

    Attributes:
        path: ``"fast"`` or ``"per-sample"``.
        requested: the switch in force: ``"auto"``, ``"fast"`` or ``"per-sample"``.
        methods: ``{weight: how its per-sample norm was found}``, model order; e.g.
            ``"linear: rank1"``, ``"conv: direct"``, ``"linear: bias"``, ``"embed: ids"``,
            ``"per-sample (layer-norm)"``, ``"per-sample: <why>"``.
        fallbacks: ``{weight: why}`` for the weights the fast path could not norm from their
            layer (empty when every weight is a normed layer's or a vector weight).
    """

    path: str
    requested: str
    methods: dict[str, str] = field(default_factory=dict)
    fallbacks: dict[str, str] = field(default_factory=dict)


def live_inputs(jaxpr: jex.Jaxpr) -> list[bool]:
    """For each input of ``jaxpr``: whether any output (or side effect) depends on it.

    A backward sweep: an equation is live when one of its results is, or when it has effects;
    the inputs of live equations are live. Nested jaxprs count as a whole (conservative).
    """
    live: set[Any] = {v for v in jaxpr.outvars if isinstance(v, jex.Var)}
    for eqn in reversed(jaxpr.eqns):
        if eqn.effects or any(v in live for v in eqn.outvars if isinstance(v, jex.Var)):
            live.update(v for v in eqn.invars if isinstance(v, jex.Var))
    return [v in live for v in jaxpr.invars]


class _Recorder:
    """Interceptor and getter of the planning trace (one trace, then thrown away)."""

    def __init__(self, trainable: Sequence[str]) -> None:
        self.trainable = set(trainable)
        self.inside_values: dict[str, Any] = {}
        self.entry: object = None
        self.stack: list[tuple[Any, tuple[str, ...], int]] = []  # (module, weights, call index)
        self.calls: list[LayerCall] = []
        self.fetched: set[tuple[int, str]] = set()  # (call index, weight) fetched inside it
        self.changed: set[str] = set()  # weights a custom getter changed
        self.reasons: dict[str, str] = {}
        self.owner: dict[str, str] = {}  # weight -> its module's type, or role

    def intercept(self, next_f: Callable[..., Any], args: Any, kwargs: Any, ctx: Any) -> Any:
        kind = layer_kind(ctx.module) if ctx.method_name == "__call__" else None
        if kind is None:
            return next_f(*args, **kwargs)
        weights = tuple(w for w in weights_of(kind, ctx.module) if w in self.trainable)
        if not weights:  # a frozen layer: nothing to norm
            return next_f(*args, **kwargs)
        layer = type(ctx.module).__name__
        why: str | None = None
        if trace_state() != self.entry:
            why = (
                f"hk.{layer} called inside a jax transformation (hk.scan/dynamic_unroll, "
                "hk.remat, hk.vmap, ...) where its input cannot be kept; "
                "hk.static_unroll keeps it normed"
            )
        elif (unsupported := unsupported_reason(kind, ctx.module)) is not None:
            why = f"hk.{unsupported} is not normed"
        if why is not None:
            for weight in weights:
                self.reasons[weight] = why
            return next_f(*args, **kwargs)
        act, config = capture(kind, ctx.module, args, kwargs)
        index = len(self.calls) + len(self.stack)
        self.stack.append((ctx.module, weights, index))
        try:
            out = next_f(*args, **kwargs)
        finally:
            self.stack.pop()
        self.calls.append(
            LayerCall(
                module=ctx.module.module_name,
                kind=kind,
                weights=weights,
                config=config,
                in_shape=tuple(act.shape),
                out_shape=tuple(out.shape),
                out_dtype=np.dtype(out.dtype),
            )
        )
        return out

    def getter(self, next_getter: Callable[[Any], Any], value: Any, ctx: Any) -> Any:
        name = f"{ctx.module_name}:{ctx.name}"
        if name not in self.inside_values:
            return next_getter(value)
        top = self.stack[-1] if self.stack else None
        inside = top is not None and top[0] is ctx.module and name in top[1]
        handed = self.inside_values[name] if inside else value
        out = next_getter(handed)
        if out is not handed:
            self.changed.add(name)
        if inside and top is not None:
            self.fetched.add((top[2], name))
        else:
            role = vector_role(ctx.module, ctx.name)
            owner = None if ctx.module is None else type(ctx.module).__name__
            self.owner.setdefault(name, f"vector:{role}" if role else (owner or ""))
        return out


def plan_clipping(
    model_fn: Callable[..., Any],
    loss_of: Callable[[Callable[..., Any]], Callable[..., Any]],
    trainable: Params,
    frozen: Params,
    one: OneSample,
) -> Plan:
    """Trace the model on one sample and decide how each trainable weight is clipped.

    Args:
        model_fn: the user's forward function (un-transformed).
        loss_of: ``apply -> loss(params, key, inputs, y, w)``, the step's mean loss around a
            given ``apply``.
        trainable, frozen: the weights as haiku trees of ``jax.ShapeDtypeStruct``.
        one: one sample's ``(inputs, y_true, s_wght)``, leading axis of one, as
            ``jax.ShapeDtypeStruct`` (or None).

    Returns:
        The :class:`Plan`; nothing is computed, only traced.
    """
    where = [(m, p) for m, inner in trainable.items() for p in inner]
    names = [f"{m}:{p}" for m, p in where]
    specs = tuple(trainable[m][p] for m, p in where)
    rec = _Recorder(names)

    def instrumented(*inputs: Any) -> Any:
        with hk.custom_getter(rec.getter):
            return model_fn(*inputs)

    loss = loss_of(hk.transform(instrumented).apply)
    key = jax.random.key(0)

    def traced(inside: tuple[Any, ...], other: tuple[Any, ...], frozen: Params, one: Any) -> Any:
        rec.entry = trace_state()
        rec.inside_values = dict(zip(names, inside, strict=True))
        params: Params = {m: dict(inner) for m, inner in frozen.items()}
        for (m, p), value in zip(where, other, strict=True):
            params.setdefault(m, {})[p] = value
        with hk.intercept_methods(rec.intercept):
            return loss(params, key, *one)

    closed = jax.make_jaxpr(traced)(specs, specs, frozen, one)
    live = live_inputs(closed.jaxpr)
    outside_used = dict(zip(names, live[len(names) : 2 * len(names)], strict=True))
    return _decide(rec, names, outside_used)


def _decide(rec: _Recorder, names: Sequence[str], outside_used: dict[str, bool]) -> Plan:
    by_weight: dict[str, list[int]] = {}
    for i, call in enumerate(rec.calls):
        for weight in call.weights:
            by_weight.setdefault(weight, []).append(i)
    normed: list[str] = []
    notes: list[tuple[str, str]] = []
    fallbacks: list[tuple[str, str]] = []
    for name in names:
        indices = by_weight.get(name, [])
        why: str | None = None
        if name in rec.changed:
            why = "a custom getter changes its value before the layer uses it"
        elif outside_used[name]:
            owner = rec.owner.get(name, "")
            if owner.startswith("vector:"):  # small and exact per sample: not a fallback
                notes.append((name, f"per-sample ({owner.removeprefix('vector:')})"))
                continue
            if name in rec.reasons:
                why = rec.reasons[name]
            elif indices:
                why = "also used outside its layer's calls"
            else:
                why = (
                    f"a weight of {owner}, a layer the fast path does not norm"
                    if owner
                    else "created outside any module"
                )
        elif not indices:
            why = rec.reasons.get(name, "not used by the model")
        elif any((i, name) not in rec.fetched for i in indices):
            why = "its layer did not fetch it inside its call"
        if why is None:
            normed.append(name)
            notes.append((name, layer_method(name, [rec.calls[i] for i in indices])))
        else:
            notes.append((name, f"per-sample: {why}"))
            fallbacks.append((name, why))
    chosen = set(normed)
    return Plan(
        calls=tuple(c for c in rec.calls if chosen.intersection(c.weights)),
        normed=tuple(normed),
        per_sample=tuple(n for n in names if n not in chosen),
        notes=tuple(notes),
        fallbacks=tuple(fallbacks),
    )
