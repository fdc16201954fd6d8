"""Per-sample gradient norms from a layer's two factors, without building per-sample gradients.

For a weight ``W`` used as ``out[t] = x[t] @ W`` over the rows ``t`` of one sample (a time
axis, image positions seen through patches, or a single row), the sample's gradient is
``X.T @ G`` (``X``: the rows of input, ``G``: the gradients of the loss w.r.t. the output
rows). Its squared Frobenius norm is available two ways:

- *Gram*: ``sum((X @ X.T) * (G @ G.T))``: ``T*T*(d+p)`` flops and a ``T x T`` matrix a sample;
- *direct*: ``sum((X.T @ G) ** 2)``: ``T*d*p`` flops and a ``d x p`` matrix a sample.

:func:`outer_sq_norms` takes the cheaper. Whichever it takes, its intermediate is no larger
than the sample's ``X`` and ``G`` together (direct is taken only when ``d*p < T*(d+p)``, Gram
only when ``T*T <= T*(d+p)`` follows), so memory stays bounded by the activations the step
holds anyway. An embedding's gradient is ``G`` scattered into the rows of the looked-up ids:
:func:`embedding_sq_norms` sums the gradients of equal ids (Gram of the one-hot ids, or a
sort and segment sum for long sequences). Everything is accumulated in float32 or wider.

Example:
    >>> import numpy as np
    >>> x = np.ones((2, 3, 4), np.float32); g = np.ones((2, 3, 5), np.float32)
    >>> [float(v) for v in outer_sq_norms(x, g)]  # each sample: X.T @ G is 4 x 5 of 3s
    [180.0, 180.0]
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = [
    "embedding_sq_norms",
    "embedding_weighted_sum",
    "outer_method",
    "outer_sq_norms",
]

_HIGHEST = jax.lax.Precision.HIGHEST
#: Above this many rows a sample, embedding norms sort and segment-sum instead of forming the
#: ``T x T`` equality Gram. Measured on CPU (64 samples, widths 16 and 128): the Gram is 1.9-3x
#: faster at 32-64 rows, about even at 128, 4-6x slower at 256.
_EMBED_GRAM_MAX_ROWS = 64


def _wide(a: jax.Array) -> jax.Array:
    return a.astype(jnp.promote_types(a.dtype, jnp.float32))


def outer_method(rows: int, d_in: int, d_out: int) -> str:
    """Return ``"rank1"``, ``"gram"`` or ``"direct"``: how :func:`outer_sq_norms` will work.

    Args:
        rows: rows ``T`` a sample (1 for a plain dense layer on vectors).
        d_in: input width ``d``; ``d_out``: output width ``p``.

    Example:
        >>> outer_method(1, 512, 512), outer_method(16, 512, 512), outer_method(784, 27, 16)
        ('rank1', 'gram', 'direct')
    """
    if rows == 1:
        return "rank1"
    return "gram" if rows * (d_in + d_out) <= d_in * d_out else "direct"


def outer_sq_norms(x: jax.Array, g: jax.Array) -> jax.Array:
    """Squared norms of the per-sample gradients ``X_i.T @ G_i`` of a dense weight.

    Args:
        x: inputs, shape ``(n, T, d)``.
        g: output gradients, shape ``(n, T, p)``.

    Returns:
        Shape ``(n,)``, float32 (or wider): ``||X_i.T @ G_i||_F ** 2``.

    Raises:
        ValueError: ``x`` and ``g`` disagree on ``n`` or ``T``, or are not 3-d.
    """
    if x.ndim != 3 or g.ndim != 3 or x.shape[:2] != g.shape[:2]:
        raise ValueError(f"outer_sq_norms: shapes {x.shape} and {g.shape} do not pair up")
    x, g = _wide(x), _wide(g)
    method = outer_method(x.shape[1], x.shape[2], g.shape[2])
    if method == "rank1":
        return jnp.sum(jnp.square(x), axis=(1, 2)) * jnp.sum(jnp.square(g), axis=(1, 2))
    if method == "gram":
        xx = jnp.einsum("ntd,nsd->nts", x, x, precision=_HIGHEST)
        gg = jnp.einsum("ntp,nsp->nts", g, g, precision=_HIGHEST)
        return jnp.sum(xx * gg, axis=(1, 2))
    per_sample = jnp.einsum("ntd,ntp->ndp", x, g, precision=_HIGHEST)
    return jnp.sum(jnp.square(per_sample), axis=(1, 2))


def _segment_sq_norm(rows: jax.Array, g: jax.Array) -> jax.Array:
    """One sample: ``sum_r ||sum_{t: rows[t] == r} g[t]||**2`` by sorting the rows."""
    order = jnp.argsort(rows)
    ordered = rows[order]
    starts = jnp.concatenate([jnp.zeros((1,), bool), ordered[1:] != ordered[:-1]])
    segment = jnp.cumsum(starts)
    summed = jnp.zeros_like(g).at[segment].add(g[order])
    return jnp.sum(jnp.square(summed))


def embedding_sq_norms(rows: jax.Array, g: jax.Array) -> jax.Array:
    """Squared norms of per-sample embedding-table gradients.

    Args:
        rows: the table row each position reads, shape ``(n, T)`` (int); ``-1`` marks a
            position that reads no row (its gradient goes nowhere).
        g: output gradients, shape ``(n, T, D)``.

    Returns:
        Shape ``(n,)``: ``sum over rows r of ||sum_{t: rows[t] == r} g[t]||**2``.

    Example:
        >>> import numpy as np
        >>> g = np.ones((1, 3, 2), np.float32)
        >>> float(embedding_sq_norms(np.array([[4, 4, 7]]), g)[0])  # (2*1)^2*2 + 1*2
        10.0
    """
    if rows.ndim != 2 or g.ndim != 3 or rows.shape != g.shape[:2]:
        raise ValueError(f"embedding_sq_norms: shapes {rows.shape} and {g.shape} do not pair up")
    g = _wide(g) * (rows >= 0)[..., None]
    if rows.shape[1] == 1:
        return jnp.sum(jnp.square(g), axis=(1, 2))
    if rows.shape[1] <= _EMBED_GRAM_MAX_ROWS:
        same = (rows[:, :, None] == rows[:, None, :]).astype(g.dtype)
        gg = jnp.einsum("ntd,nsd->nts", g, g, precision=_HIGHEST)
        return jnp.sum(same * gg, axis=(1, 2))
    return jax.vmap(_segment_sq_norm)(rows, g)


def embedding_weighted_sum(rows: jax.Array, scaled: jax.Array, vocab: int) -> jax.Array:
    """The embedding table's gradient for output gradients ``scaled``: a scatter-add.

    Args:
        rows: ``(n, T)`` table rows (``-1``: none); scaled: ``(n, T, D)`` output gradients,
            each sample's already scaled by its clipping factor; vocab: the table's rows.

    Returns:
        Shape ``(vocab, D)``.
    """
    width = scaled.shape[-1]
    target = jnp.where(rows >= 0, rows, vocab)  # out of range: dropped by the scatter
    table = jnp.zeros((vocab, width), scaled.dtype)
    return table.at[target.reshape(-1)].add(scaled.reshape(-1, width), mode="drop")
