"""``hkstore.Checkpointer``: federated rounds that survive crashes and resume bit for bit.

One directory, one folder per round (``docs/FORMAT.md`` section 13): the model archive, the
state as named tensors plus a JSON tree (never pickled), and a record written last. Rounds
appear atomically and durably, retention never removes the newest complete round, one writer
at a time holds the directory's lock, and ``restore()`` returns the newest round that
verifies. The files themselves are the store's business (``hkstore.store``: no jax); this
module joins them to the model-state hook and to the caller's state.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Literal

import jax
import numpy as np

from hkstore.checkpoint._background import BackgroundWorker
from hkstore.checkpoint._state_tree import FlatState, flatten_state, rebuild_state
from hkstore.errors import (
    ArchiveFormatError,
    CheckpointExistsError,
    CheckpointNotFoundError,
    CheckpointWarning,
    HkstoreError,
    IntegrityError,
)
from hkstore.model import HaikuModel, ModelState, archive_content, read_state
from hkstore.store import (
    DEFAULT_LIMITS,
    FunctionKind,
    Lease,
    Retention,
    Signer,
    StateContent,
    Trust,
    WriterLock,
    json_safe,
    open_round,
    reconcile_history,
    resolve_workers,
    round_directory,
    round_history,
    rounds_metrics,
    write_round,
)

__all__ = ["Checkpointer", "Restored"]



def _skippable(exc: BaseException) -> bool:
    """Whether ``restore()`` skips a round that raised ``exc``: it does not verify, or it
    vanished or became unreadable while being read. Anything else (a refused function, a
    model or template that does not fit) is the caller's to see, and is raised."""
    if isinstance(exc, ArchiveFormatError | IntegrityError | CheckpointNotFoundError):
        return True
    return isinstance(exc, OSError) and not isinstance(exc, HkstoreError)


@dataclass(frozen=True)
class Restored:
    """What :meth:`Checkpointer.restore` returns.

    Attributes:
        round: the round number.
        model: a new :class:`hkstore.HaikuModel` with the round's weights, trainable mask,
            data info and random state.
        state: the state saved with the round (``None`` when none was).
        metrics: the metrics saved with the round.
    """

    round: int
    model: HaikuModel
    state: Any
    metrics: dict[str, Any]


def _plain_metrics(metrics: Mapping[str, Any] | None) -> dict[str, Any]:
    """Metrics as JSON (jax and numpy scalars become numbers); NaN and infinities refused."""
    def host(value: Any) -> Any:
        if isinstance(value, jax.Array):
            return np.asarray(value)
        if isinstance(value, Mapping):
            return {k: host(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [host(v) for v in value]
        return value

    if metrics is None:
        return {}
    if not isinstance(metrics, Mapping):
        raise TypeError(f"metrics: expected a mapping of names to values, got "
                        f"{type(metrics).__name__}")
    plain: dict[str, Any] = json_safe(host(dict(metrics)), where="metrics")
    return plain


class Checkpointer:
    """Save federated rounds to a directory and restore them, crash-safe and verified.

    Args:
        directory: the checkpoint directory (created by the first save).
        keep_last: keep the ``n`` newest rounds.
        keep_every: also keep every round divisible by ``k``.
        keep_best: also keep the ``n`` best rounds by a metric: ``(name, "min" | "max", n)``.
            Retention never removes the newest complete round; a round is kept if any rule
            keeps it; no rule at all keeps every round.
        background: ``save()`` returns once it has captured the model's arrays; one worker
            writes (at most one save in flight); its error is raised by the next ``save()``,
            ``wait()`` or ``close()``.
        signer: signs each round's record and model archive (an :class:`hkstore.Ed25519Signer`
            or :class:`hkstore.HmacKey`).
        functions: how the model and loss functions are stored (see :func:`hkstore.save`).
        compression: ``None`` or ``"zstd"`` for the model archive's weights.
        workers: threads hashing and copying tensors when saving and restoring; ``None`` for
            every core the process may use (``os.sched_getaffinity``), as :func:`hkstore.save`.
        storage_options: for a URL ``directory`` (``s3://bucket/runs/exp1``: a prefix in
            object storage, through fsspec, the ``cloud`` extra), the filesystem's options.

    In object storage a round becomes visible when its record, uploaded after its other
    files, exists; retention deletes the record first; the lock is a lease object (see
    ``docs/FORMAT.md`` section 13).

    Raises:
        TypeError: ``workers`` is not an int.
        ValueError: a retention rule that is not an integer >= 1 (or a malformed
            ``keep_best``), an unknown ``functions`` or ``compression``, ``workers`` below 1.

    The lock on the directory (one writer at a time, this process or another) is taken by
    the first ``save()`` and released by ``close()``; reading needs no lock. Opening the
    directory removes what an interrupted writer left (temp folders), unless another writer
    holds the lock. A Checkpointer is used from one thread at a time.

    Example:
        >>> with hkstore.Checkpointer("runs/exp2", keep_last=3) as ckpt:
        ...     ckpt.save(model, 1, state=opt_state, metrics={"loss": 0.4})
        ...     r = ckpt.restore(model=forward, loss=loss, state_like=opt_state)
        >>> r.round, r.metrics
        (1, {'loss': 0.4})
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        keep_last: int | None = None,
        keep_every: int | None = None,
        keep_best: tuple[str, Literal["min", "max"], int] | None = None,
        background: bool = False,
        signer: Signer | None = None,
        functions: FunctionKind = "reference",
        compression: Literal["zstd"] | None = None,
        workers: int | None = None,
        storage_options: Mapping[str, Any] | None = None,
    ) -> None:
        self._retention = Retention.from_args(keep_last=keep_last, keep_every=keep_every,
                                              keep_best=keep_best)
        if functions not in ("reference", "pickle", "none"):
            raise ValueError(f"functions: expected 'reference', 'pickle' or 'none', got "
                             f"{functions!r}")
        if compression not in (None, "zstd"):
            raise ValueError(f"compression: expected None or 'zstd', got {compression!r}")
        if workers is not None:
            resolve_workers(workers)  # a bad count fails here, not in the first save
        self._workers = workers
        self._dir = round_directory(directory, storage_options)
        self._signer = signer
        self._functions: FunctionKind = functions
        self._compression = compression
        self._worker = BackgroundWorker() if background else None
        self._lock: WriterLock | Lease | None = None
        self._metrics: dict[int, dict[str, Any]] | None = None  # complete rounds (under lock)
        self._closed = False
        self._clean_if_free()

    def __repr__(self) -> str:
        return f"Checkpointer({str(self._dir.path)!r})"

    @property
    def directory(self) -> os.PathLike[str] | str:
        """The checkpoint directory (a path), or its URL in object storage."""
        return self._dir.path

    # -- the lock ---------------------------------------------------------------------------

    def _clean_if_free(self) -> None:
        """At open: if no writer holds the directory, remove what interrupted writers left.

        The lock is tried only when there is something to do, so that opening a directory
        to read it writes nothing.
        """
        if not self._dir.exists() or not self._dir.needs_cleaning():
            return
        try:
            lock = self._dir.lock()
        except HkstoreError:
            return  # a writer is at work (its temp folder is live), or we cannot lock
        try:
            self._dir.clean()
            reconcile_history(self._dir)
        except HkstoreError:
            pass  # a read-only directory: reading works, writing will say why it cannot
        finally:
            lock.release()

    def _take_lock(self) -> None:
        if self._lock is not None:
            return
        self._dir.create()
        self._lock = self._dir.lock()
        self._dir.clean()
        reconcile_history(self._dir)
        self._metrics = rounds_metrics(self._dir)

    # -- saving -----------------------------------------------------------------------------

    def save(
        self,
        model: HaikuModel | ModelState,
        round: int,
        *,
        state: Any = None,
        metrics: Mapping[str, Any] | None = None,
        overwrite: bool = False,
    ) -> None:
        """Save a round: the model, the caller's ``state`` and ``metrics``.

        Everything is checked here, synchronously (round number, metrics, state leaves,
        functions, the lock, an existing round); with ``background=True`` the writing then
        happens on the worker and this returns.

        Args:
            model: an initialized :class:`hkstore.HaikuModel` (or its
                :meth:`~hkstore.HaikuModel.export_state`).
            round: the round number, an integer >= 0.
            state: optimizer or strategy state: any pytree of arrays (numpy or jax, any dtype
                of the format, bfloat16 included) and JSON scalars; never pickled.
            metrics: JSON-safe numbers and strings (jax and numpy scalars accepted).
            overwrite: replace the round if it exists.

        Raises:
            CheckpointExistsError: the round exists and ``overwrite`` is false.
            CheckpointLockedError: another Checkpointer holds the directory (names it).
            CheckpointWriteError: a file could not be written (names it); earlier rounds are
                intact and nothing partial appears.
            StateMismatchError: ``state`` holds something that cannot be stored.
            NotInitializedError, NotImportableError, UnsupportedDtypeError, ManifestError: as
                :func:`hkstore.save`.
            HkstoreError: the error of the previous background save (this save is then not
                started).
        """
        self._check_open()
        if type(round) is not int or round < 0:
            raise ValueError(f"round: expected an integer >= 0, got {round!r}")
        if self._worker is not None:
            self._worker.join()
            self._raise_pending()
        snapshot = model if isinstance(model, ModelState) else _export(model)
        if self._worker is not None:  # numpy arrays are mutable: the worker gets copies
            snapshot = dataclasses.replace(snapshot, weights={
                name: np.array(value) if isinstance(value, np.ndarray) else value
                for name, value in snapshot.weights.items()})
        content = archive_content(snapshot, functions=self._functions)
        plain = _plain_metrics(metrics)
        flat = None if state is None else flatten_state(state, copy_numpy=self._worker is not None)
        self._take_lock()
        if not overwrite and round in (self._metrics or {}):
            raise CheckpointExistsError(
                f"round {round} is already saved in {self._dir.path} (pass overwrite=True to "
                "replace it)"
            )

        def job() -> None:
            self._write(round, content, flat, plain, overwrite)

        if self._worker is None:
            job()
        else:
            self._worker.submit(job)

    def _write(self, round_: int, content: Any, flat: FlatState | None,
               metrics: dict[str, Any], overwrite: bool) -> None:
        state = None
        if flat is not None:
            state = StateContent(specs=flat.specs, fetch=flat.host, structure=flat.structure)
        if self._lock is not None:
            self._lock.renew()  # an object store's lease: still ours, and extended
        try:
            write_round(self._dir, round_, content, state=state, metrics=metrics,
                        retention=self._retention, signer=self._signer,
                        compression=self._compression, overwrite=overwrite,
                        workers=self._workers)
        except BaseException:
            self._metrics = rounds_metrics(self._dir)  # the round may have appeared anyway
            raise
        assert self._metrics is not None
        self._metrics[round_] = metrics
        for number in self._retention.to_remove(self._metrics):
            self._dir.remove(number)
            del self._metrics[number]

    def wait(self) -> None:
        """Wait for the background save in flight; raise its error, if it failed."""
        if self._worker is not None:
            self._worker.join()
            self._raise_pending()

    def _raise_pending(self) -> None:
        if self._worker is not None:
            error = self._worker.take_error()
            if error is not None:
                raise error

    def close(self) -> None:
        """Finish the save in flight, release the lock; raise the save's error, if any.

        Idempotent. The Checkpointer can still read afterwards, not save.
        """
        if self._closed:
            return
        self._closed = True
        try:
            if self._worker is not None:
                self._worker.shutdown()
        finally:
            if self._lock is not None:
                self._lock.release()
                self._lock = None
        self._raise_pending()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, exc_type: object, exc: BaseException | None, tb: object) -> None:
        if exc is None:
            self.close()
            return
        try:
            self.close()
        except BaseException as late:  # never hide it, never replace the error in flight
            exc.add_note(f"also, closing the Checkpointer raised {type(late).__name__}: {late}")

    def _check_open(self) -> None:
        if self._closed:
            raise HkstoreError(f"{self!r} is closed: open a new one to save")

    def _settle(self) -> None:
        """Reads see every save made before them: wait for the one in flight (errors kept)."""
        if self._worker is not None:
            self._worker.join()

    # -- reading ----------------------------------------------------------------------------

    def rounds(self) -> list[int]:
        """The complete rounds on disk, ascending."""
        self._settle()
        return self._dir.rounds()

    def latest(self) -> int | None:
        """The newest complete round, or ``None``."""
        rounds = self.rounds()
        return rounds[-1] if rounds else None

    def best(self) -> int | None:
        """The best complete round by ``keep_best``'s metric, or ``None`` (no rule, no round
        with that metric)."""
        self._settle()
        ranked = self._retention.best(rounds_metrics(self._dir))
        return ranked[0] if ranked else None

    def history(self) -> list[dict[str, Any]]:
        """Every round ever saved here, in round order, removed ones included.

        Returns:
            ``[{"round": 3, "time": "2026-...Z", "metrics": {...}}, ...]``.
        """
        self._settle()
        return [{"round": e.round, "time": e.time, "metrics": e.metrics}
                for e in round_history(self._dir)]

    def restore(
        self,
        round: int | None = None,
        *,
        model: Callable[..., Any] | None = None,
        loss: Callable[..., Any] | None = None,
        trust: Trust | None = None,
        state_like: Any = None,
    ) -> Restored:
        """Restore a round, every digest checked.

        Args:
            round: the round; ``None``: the newest round that verifies (a corrupt or
                incomplete newer round is skipped with a :class:`~hkstore.errors.
                CheckpointWarning` naming it and why).
            model, loss: the model and loss functions (as :func:`hkstore.load`: those given
                are used, and nothing is imported or unpickled for them).
            trust: the policy for the stored functions and signatures (as
                :func:`hkstore.load`); with ``require_signature``, unsigned rounds fail.
            state_like: a template of the state's structure, needed when the state holds named
                tuples or other registered pytree nodes (e.g. ``optimizer.init(params)``).

        Returns:
            A :class:`Restored`: ``round``, ``model`` (a new HaikuModel), ``state``, ``metrics``.

        Raises:
            CheckpointNotFoundError: no such round, or no round that verifies (each listed
                with its reason).
            DigestMismatchError, SignatureError, CheckpointFormatError, ...: ``round`` was
                given and does not verify.
            RefusedCodeError: a function is needed and ``trust`` refuses it.
            WeightsMismatchError: the model function's weights differ from the stored ones
                (every mismatch named).
            StateMismatchError: ``state_like`` differs from the stored structure (every
                difference named), or is needed and missing.
        """
        self._settle()
        if round is not None:
            if type(round) is not int or round < 0:
                raise ValueError(f"round: expected an integer >= 0 or None, got {round!r}")
            return self._restore(round, model, loss, trust, state_like)
        rounds = self._dir.rounds()
        if not rounds:
            raise CheckpointNotFoundError(f"{self._dir.path}: no complete round to restore")
        failures = []
        for number in reversed(rounds):
            try:
                return self._restore(number, model, loss, trust, state_like)
            except Exception as exc:
                if not _skippable(exc):
                    raise
                reason = f"{type(exc).__name__}: {exc}"
                failures.append(f"round {number}: {reason}")
                warnings.warn(f"restore: skipping round {number} of {self._dir.path}, which "
                              f"does not verify ({reason})", CheckpointWarning, stacklevel=2)
        raise CheckpointNotFoundError(
            f"{self._dir.path}: no round verifies ({len(failures)} tried):\n  "
            + "\n  ".join(failures)
        )

    def _restore(self, number: int, model: Callable[..., Any] | None,
                 loss: Callable[..., Any] | None, trust: Trust | None,
                 state_like: Any) -> Restored:
        trust = Trust() if trust is None else trust
        found = open_round(self._dir, number, limits=DEFAULT_LIMITS)
        record = found.record
        record.check_signature(trust)
        # The state file is read (and every digest checked) on its own thread while this one
        # reads the archive: each reader hashes one tensor per core at a time.
        with ThreadPoolExecutor(1, thread_name_prefix="hkstore-state") as pool:
            state_job = pool.submit(found.read_state_tensors, verify=True,
                                    workers=self._workers)
            try:
                with found.open_model(workers=self._workers) as archive:
                    if archive.manifest.pickle is not None:
                        archive.pickle_globals()  # its digest and frame, even if not unpickled
                    snapshot = read_state(archive, model=model, loss=loss, trust=trust,
                                          verify=True)
            except BaseException:
                state_job.cancel()
                raise
            tensors = state_job.result()
        restored = HaikuModel.from_state(snapshot)
        state = None
        if record.state is not None:
            first = next(iter(restored.get_weights().coefs.values()), None)
            device = next(iter(first.devices())) if isinstance(first, jax.Array) else None
            state = rebuild_state(record.state.structure, tensors, like=state_like,
                                  device=device)
        return Restored(round=number, model=restored, state=state, metrics=record.metrics)


def _export(model: Any) -> ModelState:
    if not isinstance(model, HaikuModel):
        raise TypeError(f"save: expected a HaikuModel or a ModelState, got "
                        f"{type(model).__name__}")
    return model.export_state()
