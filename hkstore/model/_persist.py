"""A :class:`ModelState` as the store's archive content, and an open archive as a ModelState.

The two directions every writer and reader of model archives shares (``hkstore.save`` /
``load``, the checkpoint manager, the integrations):

- :func:`archive_content`: describe the functions (reference, pickle or none), record the
  weights' dtypes and shapes and stream them one tensor at a time, with data info, trainable
  names, seed, random state and writer versions;
- :func:`read_state`: signature, weights with digests, functions through the trust gate (only
  those the caller did not pass), as one ModelState ready for
  :meth:`~hkstore.HaikuModel.from_state`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

import haiku
import jax
import numpy as np

from hkstore.errors import HkstoreError, NotInitializedError
from hkstore.model._device import early_placement
from hkstore.model._model import require_functions
from hkstore.model._state import ModelState, RngState
from hkstore.store import (
    ROLES,
    Archive,
    ArchiveContent,
    FunctionKind,
    TensorSpec,
    Trust,
    code_for_dtype,
    describe_functions,
    json_safe,
    pickle_runtime,
    writer_versions,
)

__all__ = ["archive_content", "read_state"]


def archive_content(
    state: ModelState,
    *,
    functions: FunctionKind = "reference",
    metadata: Mapping[str, Any] | None = None,
) -> ArchiveContent:
    """Return what :func:`hkstore.store.write_archive` writes for ``state``.

    Args:
        state: an initialized model's state (:meth:`HaikuModel.export_state`).
        functions: ``"reference"``, ``"pickle"`` or ``"none"`` (see :func:`hkstore.save`).
        metadata: free JSON-safe user metadata.

    Returns:
        The content; its ``fetch`` copies one tensor at a time to the host, in model order.

    Raises:
        NotInitializedError: the state has no weights.
        NotImportableError: a function cannot be stored as ``functions`` says.
        UnsupportedDtypeError: a weight's dtype cannot be stored exactly.
        ManifestError: data info or metadata is not JSON-safe.
    """
    if state.data_info is None:
        raise NotInitializedError("cannot save a model that is not initialized")
    specs = [
        TensorSpec(name=s.name, dtype=code_for_dtype(s.dtype, where=f"weight {s.name!r}"),
                   shape=s.shape)
        for s in state.weight_specs()
    ]
    described, blob, raw_size = describe_functions(
        {"model": state.model, "loss": state.loss}, functions
    )
    extra = {"jax": jax.__version__, "haiku": haiku.__version__}
    if blob is not None:
        extra["cloudpickle"] = pickle_runtime()["cloudpickle"]
    return ArchiveContent(
        specs=specs,
        fetch=_in_order(state.host_weights()),
        trainable=list(state.trainable),
        data_info=json_safe(state.data_info, where="data_info"),
        seed=state.seed,
        functions=described,
        pickle_blob=blob,
        pickle_raw_size=raw_size,
        metadata=json_safe(dict(metadata or {}), where="metadata"),
        writer=writer_versions(extra),
        rng=None if state.rng is None else state.rng.to_dict(),
    )


def _in_order(items: Iterator[tuple[str, np.ndarray]]) -> Callable[[str], np.ndarray]:
    """Adapt the state's host-weights iterator to the codec's ``fetch(name)`` calls."""

    def fetch(name: str) -> np.ndarray:
        got, array = next(items)
        if got != name:  # pragma: no cover - both sides follow the model order
            raise HkstoreError(f"weights out of order: expected {name!r}, got {got!r}")
        return array

    return fetch


def read_state(
    archive: Archive,
    *,
    model: Callable[..., Any] | None = None,
    loss: Callable[..., Any] | None = None,
    trust: Trust | None = None,
    verify: bool = True,
) -> ModelState:
    """Read an open archive into a :class:`ModelState`, as far as ``trust`` allows.

    Order: the signature (with ``trust``'s keys), every tensor (digests checked unless
    ``verify=False``), the pickle member when there is one (digest, frame, opcodes; never
    unpickled unless the gate allows it below), then the functions the caller did not pass,
    through the trust gate: the order of :meth:`~hkstore.store.Archive.verify`.

    Args:
        archive: an open archive (:func:`hkstore.open_archive`).
        model, loss: the functions; those given override the archive's and nothing is
            imported or unpickled for them.
        trust: the caller's policy (default ``Trust()``: nothing runs).
        verify: check every tensor's digest.

    Returns:
        The state (weights as fresh, aligned numpy arrays; on an accelerator, device arrays
        whose host-to-device copies were started as each tensor's digest matched).

    Raises:
        As :func:`hkstore.load`.
    """
    trust = Trust() if trust is None else trust
    # The same checks, in the same order, as Archive.verify(): one verdict everywhere.
    archive.check_signature(trust)
    placement = early_placement()  # on an accelerator: each verified tensor sent right away
    host = archive.read_weights(verify=verify, ready=placement)
    weights = host if placement is None else placement.placed(host)
    archive.check_pickle()  # checked even when the caller passes both functions
    given: dict[str, Callable[..., Any] | None] = {"model": model, "loss": loss}
    missing = [role for role in ROLES if given[role] is None]
    if missing:
        given.update(archive.functions(trust, roles=missing))
    model_fn, loss_fn = require_functions(given, where="archive")
    manifest = archive.manifest
    rng = manifest.rng
    return ModelState(
        model=model_fn,
        loss=loss_fn,
        seed=manifest.seed,
        data_info=manifest.data_info,
        weights={name: weights[name] for name in manifest.names},
        trainable=manifest.trainable,
        rng=None if rng is None else RngState(rng.impl, rng.key_data),
    )
