"""The haiku layers whose weight gradients the fast clipping path norms from two factors.

A *normed* layer is one whose weight ``W`` enters its output linearly through one known
operation, so that a sample's gradient of ``W`` is fixed by the layer's input and the gradient
of its output (see ``_ghost_norms``):

- ``hk.Linear`` (``w``; inputs of any rank: the leading axes are the sample's rows),
- ``hk.ConvND`` and its subclasses ``hk.Conv1D/2D/3D`` (``w``; the input's patches are the
  rows), unless masked or grouped (``mask``, ``feature_group_count > 1``),
- ``hk.Embed`` (``embeddings``; both lookup styles, out-of-range ids handled as haiku does).

The bias ``b`` of a dense or convolution layer is normed too: a sample's bias gradient is its
output gradient summed over rows. A layer counts only if it runs haiku's own ``__call__`` (a
subclass that overrides it, or ``hk.Embed.embeddings``, is not recognised). Other vector
weights (``hk.LayerNorm``/``hk.RMSNorm`` scales and offsets, a bias whose layer is not normed)
get exact per-sample gradients directly, at ``batch x size`` floats (:func:`vector_role` names
them for the report).

Example:
    >>> import haiku as hk, jax.numpy as jnp
    >>> def f(x): return [layer_kind(m) for m in (hk.Linear(2), hk.LayerNorm(-1, True, True))]
    >>> hk.transform(f).apply({}, None, jnp.ones((1, 3)))
    ['linear', None]
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np

from hkstore.model._ghost_norms import (
    embedding_sq_norms,
    embedding_weighted_sum,
    outer_method,
    outer_sq_norms,
)

__all__ = [
    "LayerCall",
    "WeightFactors",
    "capture",
    "is_bias",
    "layer_kind",
    "layer_method",
    "unsupported_reason",
    "vector_role",
    "weight_of",
    "weights_of",
]

_KINDS: tuple[tuple[type[hk.Module], str, str], ...] = (
    (hk.Linear, "linear", "w"),
    (hk.ConvND, "conv", "w"),
    (hk.Embed, "embed", "embeddings"),
)
_VECTORS: tuple[tuple[type[hk.Module], tuple[str, ...], str], ...] = (
    (hk.Linear, ("b",), "bias"),
    (hk.ConvND, ("b",), "bias"),
    (hk.LayerNorm, ("scale", "offset"), "layer-norm"),
    (hk.RMSNorm, ("scale", "offset"), "rms-norm"),
)


@dataclass(frozen=True)
class LayerCall:
    """One call of a normed layer (static, hashable: part of a compiled step's plan).

    Attributes:
        module: the haiku module path (``"mlp/~/linear_0"``).
        kind: ``"linear"``, ``"conv"`` or ``"embed"``.
        weights: the trainable weights of the layer, ``"module:param"`` (kernel, bias).
        config: kind-specific static settings (the convolution's geometry).
        in_shape: one sample's captured input shape (the batch of one included).
        out_shape, out_dtype: one sample's output shape and dtype (the tap's).
    """

    module: str
    kind: str
    weights: tuple[str, ...]
    config: tuple[Any, ...]
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    out_dtype: np.dtype


def layer_kind(module: object) -> str | None:
    """Return the normed kind of a module instance, or None when it is not one."""
    for cls, kind, _ in _KINDS:
        if isinstance(module, cls) and type(module).__call__ is cls.__call__:
            if kind == "embed" and type(module).embeddings is not hk.Embed.embeddings:
                return None
            return kind
    return None


def weight_of(kind: str) -> str:
    """The kernel param name of a kind (``"w"`` or ``"embeddings"``)."""
    return {kind_: param for _, kind_, param in _KINDS}[kind]


def weights_of(kind: str, module: Any) -> tuple[str, ...]:
    """The full names (``"module:param"``) of the weights a call of ``module`` can norm: its
    kernel, and its bias for a dense or convolution layer that has one."""
    params = [weight_of(kind)]
    if kind != "embed" and module.with_bias:
        params.append("b")
    return tuple(f"{module.module_name}:{p}" for p in params)


def is_bias(call: LayerCall, weight: str) -> bool:
    """Whether ``weight`` is the call's bias (its kernel otherwise)."""
    return weight != f"{call.module}:{weight_of(call.kind)}"


def vector_role(module: object, param: str) -> str | None:
    """``"bias"``, ``"layer-norm"``, ``"rms-norm"`` for the known vector weights, else None."""
    for cls, params, role in _VECTORS:
        if isinstance(module, cls) and param in params:
            return role
    return None


def unsupported_reason(kind: str, module: Any) -> str | None:
    """Why a recognised layer cannot be normed after all (None when it can)."""
    if kind == "conv":
        if module.mask is not None:
            return f"{type(module).__name__} with a mask"
        if module.feature_group_count != 1:
            return f"{type(module).__name__} with feature_group_count={module.feature_group_count}"
    return None


def capture(
    kind: str, module: Any, args: Sequence[Any], kwargs: Mapping[str, Any]
) -> tuple[jax.Array, tuple[Any, ...]]:
    """Return what a call must keep to norm its weight later, and the call's static settings.

    For a dense or convolution layer: its input. For an embedding: the table row whose
    gradient each id feeds (``-1`` for none), following the layer's lookup style, so that
    negative or out-of-range ids count exactly as the lookup's gradient counts them.
    """
    first = args[0] if args else kwargs["ids" if kind == "embed" else "inputs"]
    if kind == "linear":
        return jnp.asarray(first), ()
    if kind == "conv":
        config = (
            module.num_spatial_dims,
            tuple(module.kernel_shape),
            tuple(module.stride),
            module.padding if isinstance(module.padding, str) else tuple(module.padding),
            tuple(module.lhs_dilation),
            tuple(module.kernel_dilation),
            module.dimension_numbers,
        )
        return jnp.asarray(first), config
    ids = jnp.asarray(first)
    style = (args[1] if len(args) > 1 else kwargs.get("lookup_style")) or module.lookup_style
    if isinstance(style, str):
        style = getattr(hk.EmbedLookupStyle, style.upper())
    vocab = module.vocab_size
    if style == hk.EmbedLookupStyle.ARRAY_INDEX:
        # numpy-style indexing wraps negative ids once; jax's gather then promises in-bounds
        # indices, and the transposed scatter drops the gradient of any still out of range
        # (jax.lax.GatherScatterMode.PROMISE_IN_BOUNDS)
        ids = jnp.where(ids < 0, ids + vocab, ids)
    rows = jnp.where((ids >= 0) & (ids < vocab), ids, -1).astype(jnp.int32)
    return rows, ()


def _unfold(x: jax.Array, config: tuple[Any, ...]) -> jax.Array:
    """A convolution's input as patch rows ``(N, T, prod(kernel) * C)``, by strided slicing.

    Hand-written rather than ``lax.conv_general_dilated_patches``: that one is a convolution
    with a one-hot kernel, ``prod(kernel) * C`` times the work of this copy (measured on CPU,
    bench conv net: 0.57 ms against 2.5 ms for a 3x3x16 layer at batch 64).
    """
    _, kernel, stride, padding, _, dilation, dims = config
    lhs = dims.lhs_spec
    x = jnp.transpose(x, (lhs[0], *lhs[2:], lhs[1]))  # (N, *spatial, C)
    spatial = x.shape[1:-1]
    reach = [(k - 1) * d + 1 for k, d in zip(kernel, dilation, strict=True)]
    if isinstance(padding, str):
        pads = jax.lax.padtype_to_pads(spatial, reach, stride, padding)
    else:
        pads = [tuple(p) for p in padding]
    x = jnp.pad(x, [(0, 0), *pads, (0, 0)])
    out = [
        (size + lo + hi - r) // s + 1
        for size, (lo, hi), r, s in zip(spatial, pads, reach, stride, strict=True)
    ]
    cols = []
    for offset in np.ndindex(*kernel):
        index = tuple(
            slice(o * d, o * d + (n - 1) * s + 1, s)
            for o, d, n, s in zip(offset, dilation, out, stride, strict=True)
        )
        cols.append(x[(slice(None), *index, slice(None))])
    patches = jnp.stack(cols, axis=-2)  # (N, *out, prod(kernel), C)
    return patches.reshape(x.shape[0], -1, patches.shape[-2] * patches.shape[-1])


def _conv_rows(call: LayerCall, x: jax.Array) -> jax.Array:
    """``(n, *one sample's input)`` -> the input's patches as rows, ``(n, T, K)``."""
    n = x.shape[0]
    if x.ndim == call.config[0] + 2:  # the layer was called on an unbatched input
        x = x[:, None]
    return _unfold(x.reshape((-1, *x.shape[2:])), call.config).reshape(n, -1, _patch_width(call))


def _patch_width(call: LayerCall) -> int:
    num_spatial, kernel, dims = call.config[0], call.config[1], call.config[-1]
    shape = call.in_shape if len(call.in_shape) == num_spatial + 2 else (1, *call.in_shape)
    return int(np.prod(kernel)) * int(shape[dims.lhs_spec[1]])


def _conv_grad_rows(call: LayerCall, g: jax.Array) -> jax.Array:
    num_spatial, dims = call.config[0], call.config[-1]
    n = g.shape[0]
    if g.ndim == num_spatial + 2:
        g = g[:, None]
    g = jnp.moveaxis(g.reshape((-1, *g.shape[2:])), dims.out_spec[1], -1)
    return g.reshape(n, -1, g.shape[-1])


def _rows(
    call: LayerCall, act: jax.Array, grad: jax.Array, want_inputs: bool = True
) -> tuple[jax.Array, jax.Array]:
    """A call's kept input and output gradient as rows: ``(n, T, d)`` and ``(n, T, p)``
    (an embedding's input rows are ``(n, T)`` table rows). ``want_inputs=False`` skips the
    input's rows (returned as ``act`` unchanged)."""
    n = act.shape[0]
    if call.kind == "conv":
        rows = _conv_rows(call, act) if want_inputs else act
        return rows, _conv_grad_rows(call, grad)
    out = grad.reshape(n, -1, grad.shape[-1])
    if not want_inputs:
        return act, out
    if call.kind == "embed":
        return act.reshape(n, -1), out
    return act.reshape(n, -1, act.shape[-1]), out


def _row_dims(calls: Sequence[LayerCall]) -> tuple[int, int, int]:
    """``(T, d, p)`` one sample's stacked rows have, over all calls (shapes only)."""
    rows, d_in, d_out = 0, 0, 0
    for call in calls:
        act = jax.ShapeDtypeStruct((1, *call.in_shape), jnp.float32)
        grad = jax.ShapeDtypeStruct((1, *call.out_shape), call.out_dtype)
        x, g = jax.eval_shape(lambda a, b, c=call: _rows(c, a, b), act, grad)
        d_in = 1 if call.kind == "embed" else x.shape[-1]  # an embedding's row: one id
        rows, d_out = rows + x.shape[1], g.shape[-1]
    return rows, d_in, d_out


def _chunk(calls: Sequence[LayerCall], n: int) -> int:
    """Samples normed at once: the norms' intermediates (rows, and the Gram or per-sample
    matrix) may take as much memory as the calls' kept inputs and output gradients, no more.

    Only convolutions need fewer than ``n``: their patch rows are ``prod(kernel)`` times wider
    than their input (dense layers' rows are their inputs, and :func:`outer_method`'s choice
    keeps the matrix within the same bound).
    """
    rows, d_in, d_out = _row_dims(calls)
    kept = sum(int(np.prod(c.in_shape)) + int(np.prod(c.out_shape)) for c in calls)
    if calls[0].kind == "embed":
        extra = rows * rows if rows <= 64 else 0
    else:
        extra = {"rank1": 0, "gram": rows * rows, "direct": d_in * d_out}[
            outer_method(rows, d_in, d_out)
        ]
    need = rows * (d_in + d_out) + extra
    return max(1, min(n, n * kept // max(need, 1)))


class WeightFactors:
    """One normed weight's two factors over all its calls: per-sample norms, clipped sum.

    A weight used by several calls (a layer applied twice, a cell unrolled over time) has the
    sum of the calls' gradients as its per-sample gradient: the calls' rows are stacked, so
    the norm is that of the sum, exactly, and so is the clipped sum.

    Args:
        weight: the weight, ``"module:param"``: a kernel, or a bias (which needs only ``grads``).
        calls: the calls of that weight's layer, all of the same kind.
        acts: what :func:`capture` kept, one per call, with a leading sample axis.
        grads: the gradients of the calls' outputs, one per call, leading sample axis.
    """

    def __init__(
        self,
        weight: str,
        calls: Sequence[LayerCall],
        acts: Sequence[jax.Array],
        grads: Sequence[jax.Array],
    ) -> None:
        self.calls = tuple(calls)
        self.kind = calls[0].kind
        self.bias = is_bias(calls[0], weight)
        self.acts = tuple(acts)
        self.grads = tuple(grads)

    def _bias_grads(self) -> jax.Array:
        """Each sample's bias gradient ``(n, p)``: output gradients summed over rows, calls."""
        total = None
        for call, act, grad in zip(self.calls, self.acts, self.grads, strict=True):
            _, rows = _rows(call, act, grad, want_inputs=False)
            part = jnp.sum(rows.astype(jnp.promote_types(rows.dtype, jnp.float32)), axis=1)
            total = part if total is None else total + part
        assert total is not None
        return total

    def _sq_norms(self, acts: Sequence[jax.Array], grads: Sequence[jax.Array]) -> jax.Array:
        pairs = [_rows(c, a, g) for c, a, g in zip(self.calls, acts, grads, strict=True)]
        rows = jnp.concatenate([r for r, _ in pairs], axis=1)
        out = jnp.concatenate([g for _, g in pairs], axis=1)
        if self.kind == "embed":
            return embedding_sq_norms(rows, out)
        return outer_sq_norms(rows, out)

    def sq_norms(self) -> jax.Array:
        """Each sample's squared gradient norm for this weight, shape ``(n,)``; computed a
        chunk of samples at a time when the whole batch at once would take more memory than
        the step already holds for this weight (see :func:`_chunk`)."""
        if self.bias:
            return jnp.sum(jnp.square(self._bias_grads()), axis=1)
        n = self.acts[0].shape[0]
        chunk = _chunk(self.calls, n)
        if chunk >= n:
            return self._sq_norms(self.acts, self.grads)

        def one(pair: tuple[tuple[jax.Array, ...], tuple[jax.Array, ...]]) -> jax.Array:
            acts, grads = jax.tree_util.tree_map(lambda a: a[None], pair)
            return self._sq_norms(acts, grads)[0]

        return jax.lax.map(one, (self.acts, self.grads), batch_size=chunk)

    def weighted_sum(self, c: jax.Array, like: jax.Array) -> jax.Array:
        """``sum_i c_i * g_i`` for this weight, shaped and typed like the weight ``like``: one
        contraction per call, the same work as a plain backward pass's weight gradient (a
        convolution's is the layer's own kernel gradient, so no patch rows are built)."""
        if self.bias:
            total = jnp.einsum("n,np->p", c.astype(jnp.float32), self._bias_grads())
            return total.reshape(like.shape).astype(like.dtype)
        total = jnp.zeros(like.shape, jnp.promote_types(like.dtype, jnp.float32))
        for call, act, grad in zip(self.calls, self.acts, self.grads, strict=True):
            n = act.shape[0]
            scaled = grad * c.astype(grad.dtype).reshape((n,) + (1,) * (grad.ndim - 1))
            if self.kind == "embed":
                part = embedding_weighted_sum(
                    act.reshape(n, -1), scaled.reshape(n, -1, grad.shape[-1]), like.shape[0]
                )
            elif self.kind == "conv":
                part = _conv_kernel_grad(call, act, scaled, like)
            else:
                x = act.reshape(-1, act.shape[-1])
                part = jnp.matmul(x.T, scaled.reshape(-1, grad.shape[-1])).reshape(like.shape)
            total = total + part.astype(total.dtype)
        return total.astype(like.dtype)


def _conv_kernel_grad(call: LayerCall, x: jax.Array, g: jax.Array, w: jax.Array) -> jax.Array:
    """The layer's kernel gradient for inputs ``x`` and output gradients ``g`` (leading sample
    axis each): the transpose of its own convolution (linear in the kernel)."""
    num_spatial, _, stride, padding, lhs_dil, rhs_dil, dims = call.config
    if x.ndim == num_spatial + 2:
        x, g = x[:, None], g[:, None]
    x = x.reshape((-1, *x.shape[2:]))
    g = g.reshape((-1, *g.shape[2:]))

    def conv(kernel: jax.Array) -> jax.Array:
        return jax.lax.conv_general_dilated(
            x, kernel, stride, padding, lhs_dil, rhs_dil, dimension_numbers=dims
        )

    (grad,) = jax.linear_transpose(conv, w)(g.astype(x.dtype))
    return grad


def layer_method(weight: str, calls: Sequence[LayerCall]) -> str:
    """How :class:`WeightFactors` norms a weight's calls, for reports (``"linear: gram"``)."""
    multiple = f", {len(calls)} calls" if len(calls) > 1 else ""
    if is_bias(calls[0], weight):
        return f"{calls[0].kind}: bias{multiple}"
    rows, d_in, d_out = _row_dims(calls)
    method = "ids" if calls[0].kind == "embed" else outer_method(rows, d_in, d_out)
    return f"{calls[0].kind}: {method}{multiple}"
