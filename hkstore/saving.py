"""Saving and loading HaikuModels as archives: ``save`` / ``load`` / ``dumps`` / ``loads``.

A leaf: nothing inside hkstore imports it (the public names are re-exported by ``hkstore``).
Each function is the model-state hook (:meth:`HaikuModel.export_state` /
:meth:`HaikuModel.from_state`) joined to the store's archive writer or reader:

save: state -> archive content (functions described, weights streamed) -> manifest ->
signature -> atomic rename. load: open (container, manifest) -> signature -> weights with
digests -> functions through the trust gate (only those the caller did not pass) -> one
all-or-nothing rebuild.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable, Mapping
from typing import Any, Literal

from hkstore.model import HaikuModel, ModelState, archive_content, read_state
from hkstore.store import (
    DEFAULT_LIMITS,
    FunctionKind,
    Limits,
    Manifest,
    Signer,
    Trust,
    destination,
    open_archive,
    write_archive,
)

__all__ = ["dumps", "load", "loads", "save"]

Source = str | os.PathLike[str] | bytes | bytearray | memoryview


def save(
    model: HaikuModel | ModelState,
    path: str | os.PathLike[str],
    *,
    functions: FunctionKind = "reference",
    signer: Signer | None = None,
    compression: Literal["zstd"] | None = None,
    metadata: Mapping[str, Any] | None = None,
    workers: int | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> Manifest:
    """Save an initialized model to ``path`` atomically (temp file, fsync, rename).

    ``path`` may also be a URL (``s3://bucket/key.hkz``; the ``cloud`` extra): the archive is
    written to a local temporary file, then uploaded under its key only once complete.

    Args:
        model: an initialized :class:`hkstore.HaikuModel`, or a snapshot of one
            (:meth:`~hkstore.HaikuModel.export_state`).
        path: the archive to write (conventionally ``*.hkz``); replaced atomically.
        functions: how the model and loss functions travel: ``"reference"`` (importable
            ``module:qualname``, the default), ``"pickle"`` (cloudpickle by value, opt-in;
            sign it), or ``"none"`` (the loader supplies them).
        signer: an :class:`hkstore.Ed25519Signer` or :class:`hkstore.HmacKey` to sign with.
        compression: ``None`` (memory-mappable weights) or ``"zstd"``.
        metadata: free JSON-safe user metadata (round number, metrics...).
        workers: threads that hash while the file is written; ``None`` (default) for every
            core the process may use, 1 for none.
        storage_options: for a URL, the filesystem's options (``endpoint_url``, ``key``...).

    Returns:
        The manifest written.

    Raises:
        NotInitializedError: the model has no weights yet.
        NotImportableError: ``functions="reference"`` and a function is a lambda, closure or
            defined in ``__main__`` (use ``functions="pickle"``).
        UnsupportedDtypeError: a weight's dtype cannot be stored exactly.
        ManifestError: ``metadata`` or ``data_info`` is not JSON-safe.

    Example:
        >>> manifest = hkstore.save(model, "round-3.hkz", metadata={"round": 3})
        >>> manifest.metadata
        {'round': 3}
    """
    content = archive_content(_state(model), functions=functions, metadata=metadata)
    with destination(path, storage_options) as handle:
        return write_archive(
            handle, content, signer=signer, compression=compression, workers=workers
        )


def dumps(
    model: HaikuModel | ModelState,
    *,
    functions: FunctionKind = "reference",
    signer: Signer | None = None,
    compression: Literal["zstd"] | None = None,
    metadata: Mapping[str, Any] | None = None,
    workers: int | None = None,
) -> bytes:
    """Return the archive bytes of ``model`` (for messages); arguments as :func:`save`.

    Example:
        >>> blob = hkstore.dumps(model)
        >>> again = hkstore.loads(blob, model=forward_fn, loss=loss_fn)
        >>> again.get_weight_names() == model.get_weight_names()
        True
    """
    content = archive_content(_state(model), functions=functions, metadata=metadata)
    buffer = io.BytesIO()
    write_archive(buffer, content, signer=signer, compression=compression, workers=workers)
    return buffer.getvalue()


def _state(model: HaikuModel | ModelState) -> ModelState:
    if isinstance(model, ModelState):
        return model
    if not isinstance(model, HaikuModel):
        raise TypeError(f"expected a HaikuModel or a ModelState, got {type(model).__name__}")
    return model.export_state()


def load(
    source: Source,
    *,
    model: Callable[..., Any] | None = None,
    loss: Callable[..., Any] | None = None,
    trust: Trust | None = None,
    verify: bool = True,
    limits: Limits = DEFAULT_LIMITS,
    workers: int | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> HaikuModel:
    """Load a model from an archive path, URL or bytes, on the loader's device policy.

    Weights, trainable mask, data info, seed and random state come from the archive. The
    functions come from the caller (``model=``, ``loss=``; nothing in the archive is imported
    or unpickled) or, for those not given, from the archive through ``trust`` (see
    :class:`hkstore.Trust`).

    Args:
        source: a path, a URL (``s3://bucket/key.hkz``: read by range, tensors streamed and
            hashed as they arrive; the ``cloud`` extra), or archive bytes.
        model: the model function (``hk.transform``-able); overrides the archive's.
        loss: the loss function ``loss(y_pred, y_true)``; overrides the archive's.
        trust: what the archive may make this process import or unpickle, and which keys
            verify its signature. Default ``Trust()``: nothing.
        verify: check every tensor's digest (default). ``False`` skips only the tensor
            digests (structure, header and signature are still checked): for archives you
            wrote yourself.
        limits: size and count limits for untrusted input.
        workers: threads that read and hash the weights; ``None`` (default) for every core
            the process may use, 1 for the calling thread only.
        storage_options: for a URL, the filesystem's options (``endpoint_url``...).

    Returns:
        A new, initialized :class:`hkstore.HaikuModel`.

    Raises:
        ArchiveFormatError (and subclasses): malformed, truncated or oversized archive.
        DigestMismatchError: a tensor or member differs from its digest.
        SignatureError, UntrustedKeyError: the signature is missing, bad or untrusted.
        RefusedCodeError: the archive's functions are needed but the policy refuses them.
        WeightsMismatchError: the weights do not fit the model function (all mismatches).
        ModelFunctionError: the model function fails on the stored data info.

    Example:
        >>> m = hkstore.load("round-3.hkz", model=forward_fn, loss=loss_fn)
        >>> m.get_weight_names()[:2]
        ['mlp/~/linear_0:b', 'mlp/~/linear_0:w']
    """
    with open_archive(
        source, limits=limits, workers=workers, storage_options=storage_options
    ) as archive:
        state = read_state(archive, model=model, loss=loss, trust=trust, verify=verify)
    return HaikuModel.from_state(state)


def loads(
    data: bytes | bytearray | memoryview,
    *,
    model: Callable[..., Any] | None = None,
    loss: Callable[..., Any] | None = None,
    trust: Trust | None = None,
    verify: bool = True,
    limits: Limits = DEFAULT_LIMITS,
    workers: int | None = None,
) -> HaikuModel:
    """Load a model from archive bytes (what :func:`dumps` returns); see :func:`load`."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise TypeError(f"loads() takes bytes, got {type(data).__name__}")
    return load(
        data, model=model, loss=loss, trust=trust, verify=verify, limits=limits, workers=workers
    )
