"""HkstoreCheckpointer: declearn's ``Checkpointer`` writing :class:`hkstore.Checkpointer` rounds.

declearn's own checkpointer names its files by a second-resolution timestamp (two rounds in one
second share a name), never learns the round, writes optimizer states as msgpack (whose
decoder unpickles model payloads) and deletes the metrics files when a run starts again.
:class:`HkstoreCheckpointer` is a drop-in ``checkpoint=`` for ``FederatedServer`` and
``FederatedClient`` (declearn's ``Checkpointer.from_specs`` accepts an instance) that instead
writes one :class:`hkstore.Checkpointer` round per call:

- the model as an hkstore archive (weights, trainable mask, data info, random state);
- the declearn optimizer's config and state as arrays plus JSON (never pickled), and whatever
  state a resumable server or client adds (:mod:`._states`);
- the metrics in the round's record, so that :meth:`history` keeps every round ever saved,
  restarts included.

Rounds are numbered ``0`` (``first_call``) then one more per call when declearn drives it; the
resumable server and client (:class:`~hkstore.integrations.declearn.ResumableFederatedServer`,
:class:`~hkstore.integrations.declearn.ResumableFederatedClient`) pass the real round number
to :meth:`save_round`. Metrics declearn records apart from a round (client-wise metrics,
training losses, fairness) are appended to ``DIR/declearn-metrics/<prefix>.jsonl`` and never
truncated. The final ("best") model declearn saves at the end of a run is ``DIR/model-best.hkz``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import numpy as np
from declearn.main.utils import Checkpointer as DeclearnCheckpointer
from declearn.model.api import Model
from declearn.optimizer import Optimizer

import hkstore
from hkstore.errors import (
    CheckpointExistsError,
    CheckpointNotFoundError,
    NotImportableError,
    StateMismatchError,
)
from hkstore.integrations.declearn._model import DeclearnHaikuModel
from hkstore.integrations.declearn._policy import get_receive_policy
from hkstore.integrations.declearn._states import from_tree, to_tree

__all__ = ["METRICS_FOLDER", "HkstoreCheckpointer", "RoundState", "plain_metrics"]

_LOG = logging.getLogger("hkstore.integrations.declearn")
#: Where metrics saved apart from a round go, one JSON line per call.
METRICS_FOLDER = "declearn-metrics"
_LABEL = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")
_ROUND_LABEL = re.compile(r"round_(\d+)")
FunctionsForm = Literal["auto", "reference", "pickle", "none"]


@dataclass(frozen=True)
class RoundState:
    """A round read back by :meth:`HkstoreCheckpointer.restore_round`.

    Attributes:
        round: the round number.
        model: the round's model, a new :class:`hkstore.HaikuModel` (weights, trainable mask,
            data info, random state).
        optimizer_config: the declearn optimizer's config (``None``: no optimizer was saved).
        optimizer_state: its state, vectors rebuilt, ready for ``Optimizer.set_state``.
        state: the rest of the saved state (what a resumable server or client added).
        metrics: the round's metrics.
    """

    round: int
    model: hkstore.HaikuModel
    optimizer_config: dict[str, Any] | None
    optimizer_state: dict[str, Any] | None
    state: dict[str, Any]
    metrics: dict[str, Any]

    def apply_optimizer(self, optimizer: Optimizer) -> None:
        """Put ``optimizer`` in the saved state.

        Raises:
            CheckpointNotFoundError: the round holds no optimizer state.
            StateMismatchError: the state does not fit ``optimizer`` (other modules); the
                optimizer is then unchanged.
        """
        if self.optimizer_state is None:
            raise CheckpointNotFoundError(f"round {self.round} holds no optimizer state")
        try:
            optimizer.set_state(self.optimizer_state)
        except (KeyError, TypeError, ValueError) as exc:
            raise StateMismatchError(
                f"round {self.round}: the saved optimizer state does not fit this optimizer "
                f"(saved config {self.optimizer_config}): {type(exc).__name__}: {exc}"
            ) from exc


def plain_metrics(metrics: Mapping[str, Any] | None) -> dict[str, Any]:
    """Metrics as JSON: arrays as lists, numpy scalars as numbers, NaN and infinities as the
    strings ``"nan"``, ``"inf"``, ``"-inf"`` (a round record holds exact JSON only).

    Example:
        >>> plain_metrics({"loss": np.float32(0.5), "hist": np.array([1, 2]), "bad": np.nan})
        {'loss': 0.5, 'hist': [1, 2], 'bad': 'nan'}
    """
    def plain(value: Any) -> Any:
        if isinstance(value, Mapping):
            return {str(k): plain(v) for k, v in value.items()}
        if isinstance(value, np.ndarray):
            return plain(value.tolist())
        if isinstance(value, list | tuple):
            return [plain(v) for v in value]
        if isinstance(value, np.generic):
            return plain(value.item())
        if isinstance(value, float) and not math.isfinite(value):
            return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
        return value

    return plain(dict(metrics or {}))


def _inner(model: object, where: str) -> hkstore.HaikuModel:
    if isinstance(model, DeclearnHaikuModel):
        return model.get_wrapped_model()
    if isinstance(model, hkstore.HaikuModel):
        return model
    raise TypeError(f"{where}: an HkstoreCheckpointer saves hkstore models "
                    f"(DeclearnHaikuModel), got {type(model).__name__}")


def _label_round(timestamp: str | None) -> int | None:
    match = _ROUND_LABEL.fullmatch(timestamp or "")
    return None if match is None else int(match.group(1))


class HkstoreCheckpointer(DeclearnCheckpointer):
    """A declearn ``Checkpointer`` whose rounds are :class:`hkstore.Checkpointer` rounds.

    Args:
        folder: the checkpoint directory.
        max_history: declearn's name for ``keep_last`` (used when ``keep_last`` is not given).
        keep_last, keep_every, keep_best, background, signer, compression: as
            :class:`hkstore.Checkpointer`.
        functions: how the model's functions are stored: ``"reference"``, ``"pickle"``,
            ``"none"``, or ``"auto"`` (default: references when importable, else none;
            restoring always uses the live model's functions, so none are needed).

    Raises:
        ValueError: a retention rule that is not an integer >= 1, an unknown ``functions`` or
            ``compression``.

    Example:
        >>> import tempfile
        >>> ckpt = HkstoreCheckpointer(tempfile.mkdtemp(), keep_last=3)
        >>> ckpt.rounds(), ckpt.latest_round(), ckpt.max_history
        ([], None, 3)
        >>> FederatedServer(model, netwk, optim, checkpoint=ckpt).run(config)  # doctest: +SKIP
        >>> [entry["round"] for entry in ckpt.history()]  # doctest: +SKIP
        [0, 1, 2, 3]
    """

    def __init__(
        self,
        folder: str | os.PathLike[str],
        max_history: int | None = None,
        *,
        keep_last: int | None = None,
        keep_every: int | None = None,
        keep_best: tuple[str, Literal["min", "max"], int] | None = None,
        background: bool = False,
        signer: Any = None,
        functions: FunctionsForm = "auto",
        compression: Literal["zstd"] | None = None,
    ) -> None:
        if functions not in ("auto", "reference", "pickle", "none"):
            raise ValueError(f"functions: expected 'auto', 'reference', 'pickle' or 'none', "
                             f"got {functions!r}")
        if max_history is not None and keep_last is None:
            keep_last = max_history
        self._options: dict[str, Any] = {
            "keep_last": keep_last, "keep_every": keep_every, "keep_best": keep_best,
            "background": background, "signer": signer, "compression": compression,
        }
        self._functions: FunctionsForm = functions
        kind = "reference" if functions == "auto" else functions
        self._store = hkstore.Checkpointer(folder, functions=kind, **self._options)
        self.folder = os.fspath(folder)
        self.max_history = keep_last
        self._last_round: int | None = None

    def __repr__(self) -> str:
        return f"HkstoreCheckpointer({self.folder!r})"

    @property
    def store(self) -> hkstore.Checkpointer:
        """The :class:`hkstore.Checkpointer` holding the rounds."""
        return self._store

    # --- rounds ---------------------------------------------------------------------------

    def rounds(self) -> list[int]:
        """The complete rounds on disk, ascending."""
        return self._store.rounds()

    def latest_round(self) -> int | None:
        """The newest complete round, or ``None``."""
        return self._store.latest()

    def history(self) -> list[dict[str, Any]]:
        """Every round ever saved here (restarts included): ``[{"round", "time", "metrics"}]``."""
        return self._store.history()

    def checkpoint(
        self,
        model: Model | None = None,
        optimizer: Optimizer | None = None,
        metrics: Mapping[str, Any] | None = None,
        first_call: bool = False,
    ) -> str:
        """Save a round (declearn calls this once at the start and after each evaluation).

        The round is ``0`` with ``first_call``, else one more than the last one saved here
        (or on disk). declearn's meaning of ``first_call`` (delete the metrics of a previous
        run) is replaced by a refusal: rounds of another run are never mixed in or deleted.

        Returns:
            The round's label, ``"round_<n>"``.

        Raises:
            CheckpointExistsError: ``first_call`` in a directory that already holds rounds.
            TypeError: no model, or not an hkstore model.
        """
        if model is None:
            raise TypeError("HkstoreCheckpointer.checkpoint needs the model: a round is a model "
                            "archive")
        if first_call:
            existing = self.rounds()
            if existing:
                raise CheckpointExistsError(
                    f"{self.folder} already holds rounds {existing}: a new run needs an empty "
                    "directory (ResumableFederatedServer resumes from the latest round)"
                )
            number = 0
        else:
            latest = self._last_round if self._last_round is not None else self.latest_round()
            number = 0 if latest is None else latest + 1
        return self.save_round(number, model, optimizer=optimizer, metrics=metrics)

    def save_round(
        self,
        round: int,
        model: Model | hkstore.HaikuModel,
        *,
        optimizer: Optimizer | None = None,
        state: Mapping[str, Any] | None = None,
        metrics: Mapping[str, Any] | None = None,
        overwrite: bool = False,
    ) -> str:
        """Save round ``round``: the model, the optimizer's config and state, ``state``, metrics.

        Args:
            round: the round number.
            model: a :class:`DeclearnHaikuModel` (or an :class:`hkstore.HaikuModel`).
            optimizer: a declearn ``Optimizer`` whose config and state are saved.
            state: more state, a dict of trees of arrays and JSON (declearn vectors allowed);
                its key ``"optimizer"`` is reserved.
            metrics: JSON-able metrics (arrays become lists, NaN the string ``"nan"``).
            overwrite: replace the round if it exists.

        Returns:
            The round's label, ``"round_<n>"``.

        Raises:
            CheckpointExistsError: the round exists and ``overwrite`` is false.
            StateMismatchError: the optimizer state or ``state`` holds something that cannot be
                stored (every path named).
            TypeError: ``model`` is not an hkstore model.
            HkstoreError: as :meth:`hkstore.Checkpointer.save`.
        """
        inner = _inner(model, "save_round")
        full: dict[str, Any] = {"optimizer": None}
        if optimizer is not None:
            full["optimizer"] = {
                "config": to_tree(optimizer.get_config(), what="optimizer config"),
                "state": to_tree(optimizer.get_state(), what="optimizer state"),
            }
        for key, value in (state or {}).items():
            if key == "optimizer":
                raise StateMismatchError("save_round: state key 'optimizer' is reserved")
            full[key] = to_tree(value, what=f"state {key!r}")
        started = time.perf_counter()
        self._save(inner, round, full, plain_metrics(metrics), overwrite)
        self._last_round = round
        _LOG.debug("checkpoint: round %d saved in %s (%.0f ms)", round, self.folder,
                  1e3 * (time.perf_counter() - started))
        return f"round_{round}"

    def _save(self, inner: hkstore.HaikuModel, number: int, state: dict[str, Any],
              metrics: dict[str, Any], overwrite: bool) -> None:
        try:
            self._store.save(inner, number, state=state, metrics=metrics, overwrite=overwrite)
        except NotImportableError:
            if self._functions != "auto":
                raise
            # "auto": the functions are not importable (a script's __main__, a closure), so
            # the rounds store none; restoring passes the live model's functions anyway.
            self._store.close()
            self._functions = "none"
            self._store = hkstore.Checkpointer(self.folder, functions="none", **self._options)
            self._store.save(inner, number, state=state, metrics=metrics, overwrite=overwrite)

    def restore_round(
        self,
        round: int | None = None,
        *,
        model: Model | hkstore.HaikuModel | None = None,
    ) -> RoundState:
        """Read a round back, every digest checked.

        Args:
            round: the round; ``None``: the newest that verifies (see
                :meth:`hkstore.Checkpointer.restore`).
            model: a model whose functions the restored model uses (nothing stored is
                imported or unpickled); ``None``: the receive policy's functions and trust
                (:func:`~hkstore.integrations.declearn.set_receive_policy`).

        Returns:
            A :class:`RoundState`.

        Raises:
            CheckpointNotFoundError: no such round, or none that verifies.
            StateMismatchError: a stored vector type declearn does not know here.
            HkstoreError: as :meth:`hkstore.Checkpointer.restore`.
        """
        if model is not None:
            snapshot = _inner(model, "restore_round").export_state()
            restored = self._store.restore(round, model=snapshot.model, loss=snapshot.loss)
        else:
            policy = get_receive_policy()
            restored = self._store.restore(round, model=policy.model, loss=policy.loss,
                                           trust=policy.trust)
        state = dict(restored.state or {})
        optim = state.pop("optimizer", None)
        where = f"{self.folder} round {restored.round}"
        config = opt_state = None
        if isinstance(optim, Mapping):
            config = from_tree(optim.get("config"), what=f"{where}: optimizer config")
            opt_state = from_tree(optim.get("state"), what=f"{where}: optimizer state")
        state = {key: from_tree(value, what=f"{where}: state {key!r}")
                 for key, value in state.items()}
        return RoundState(restored.round, restored.model, config, opt_state, state,
                          dict(restored.metrics))

    def close(self) -> None:
        """Finish a background save in flight and release the directory's lock."""
        self._store.close()

    def __enter__(self) -> HkstoreCheckpointer:
        return self

    def __exit__(self, exc_type: object, exc: BaseException | None, tb: object) -> None:
        self._store.__exit__(exc_type, exc, tb)

    # --- declearn's other saving methods --------------------------------------------------

    def save_metrics(
        self,
        metrics: Mapping[str, Any],
        prefix: str = "metrics",
        append: bool = True,
        timestamp: str | None = None,
    ) -> str:
        """Append ``metrics`` to ``DIR/declearn-metrics/<prefix>.jsonl`` (one line, fsynced).

        ``append=False`` (declearn's "start the file again") is ignored: the history is
        kept across restarts.

        Returns:
            The label (``timestamp``, or the current UTC time).

        Raises:
            ValueError: a ``prefix`` or ``timestamp`` that is not a plain name.
        """
        label = timestamp or _now()
        for name, value in (("prefix", prefix), ("timestamp", label)):
            if not _LABEL.fullmatch(value):
                raise ValueError(f"save_metrics: {name} {value!r} is not a plain name "
                                 "(letters, digits, '_', '.', '-')")
        line = json.dumps({"label": label, "time": _now(), "metrics": plain_metrics(metrics)},
                          sort_keys=True, allow_nan=False)
        folder = Path(self.folder) / METRICS_FOLDER
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / f"{prefix}.jsonl", "a", encoding="utf-8") as handle:
            handle.write(line + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        return label

    def save_model(
        self,
        model: Model,
        config: bool = True,
        state: bool = True,
        timestamp: str | None = None,
    ) -> str | None:
        """Save ``model`` as the archive ``DIR/model-<timestamp>.hkz`` (atomically).

        declearn calls ``save_model(model, timestamp="best")`` when a run ends (the weights
        with the lowest evaluation loss). With ``state=False`` nothing is written (a round's
        archive already holds the config).

        Returns:
            The label, or ``None`` when nothing was written.
        """
        if not state:
            return None
        label = timestamp or _now()
        if not _LABEL.fullmatch(label):
            raise ValueError(f"save_model: timestamp {label!r} is not a plain name")
        inner = _inner(model, "save_model")
        kind = "reference" if self._functions == "auto" else self._functions
        path = Path(self.folder) / f"model-{label}.hkz"
        options = {"signer": self._options["signer"], "compression": self._options["compression"]}
        try:
            hkstore.save(inner, path, functions=kind, **options)
        except NotImportableError:
            if self._functions != "auto":
                raise
            hkstore.save(inner, path, functions="none", **options)
        _LOG.info("checkpoint: model %r saved as %s", label, path)
        return label

    def save_optimizer(
        self,
        optimizer: Optimizer,
        config: bool = True,
        state: bool = True,
        timestamp: str | None = None,
    ) -> str | None:
        """Not supported on its own: an optimizer's state is saved with its round.

        Raises:
            NotImplementedError: always; use :meth:`checkpoint` or :meth:`save_round`.
        """
        raise NotImplementedError(
            "HkstoreCheckpointer saves optimizer states with their round: use checkpoint() or "
            "save_round(); load_optimizer() reads them back"
        )

    # --- declearn's loading methods -------------------------------------------------------

    def _round_of(self, timestamp: str | None, where: str) -> int | None:
        if timestamp is None:
            return None
        number = _label_round(timestamp)
        if number is None:
            raise CheckpointNotFoundError(f"{where}: {timestamp!r} is not a round label "
                                          "('round_<n>')")
        return number

    def load_model(
        self,
        model: Model | None = None,
        timestamp: str | None = None,
        load_state: bool = True,
    ) -> DeclearnHaikuModel:
        """Load a round's model (``timestamp``: ``"round_<n>"``, ``None`` for the newest, or
        the label of a :meth:`save_model` archive such as ``"best"``).

        With ``model`` (a :class:`DeclearnHaikuModel`), its functions are used and it wraps
        the loaded model; without, the receive policy's functions and trust are. Every round
        archive holds its weights, so ``load_state`` is accepted and ignored.

        Raises:
            CheckpointNotFoundError: no such round or archive.
            TypeError: ``model`` is not a :class:`DeclearnHaikuModel`.
            HkstoreError: as :func:`hkstore.load` / :meth:`hkstore.Checkpointer.restore`.
        """
        if model is not None and not isinstance(model, DeclearnHaikuModel):
            raise TypeError(f"load_model: expected a DeclearnHaikuModel, got "
                            f"{type(model).__name__}")
        if timestamp is not None and _label_round(timestamp) is None:
            loaded = self._load_archive(timestamp, model)
        else:
            loaded = self.restore_round(self._round_of(timestamp, "load_model"),
                                        model=model).model
        if model is None:
            return DeclearnHaikuModel(loaded)
        model.set_wrapped_model(loaded)
        return model

    def _load_archive(self, label: str, model: DeclearnHaikuModel | None) -> hkstore.HaikuModel:
        path = Path(self.folder) / f"model-{label}.hkz"
        if not _LABEL.fullmatch(label) or not path.is_file():
            raise CheckpointNotFoundError(f"load_model: no model {label!r} in {self.folder}")
        if model is not None:
            snapshot = model.get_wrapped_model().export_state()
            return hkstore.load(path, model=snapshot.model, loss=snapshot.loss)
        policy = get_receive_policy()
        return hkstore.load(path, model=policy.model, loss=policy.loss, trust=policy.trust,
                            limits=policy.limits)

    def load_optimizer(
        self,
        optimizer: Optimizer | None = None,
        timestamp: str | None = None,
        load_state: bool = True,
        *,
        model: Model | None = None,
    ) -> Optimizer:
        """Rebuild (``optimizer=None``: from the saved config) and/or reset an optimizer from a
        round (``timestamp``: ``"round_<n>"`` or ``None`` for the newest).

        The round's model archive is read and checked too: ``model`` gives its functions
        (default: the receive policy's).

        Raises:
            CheckpointNotFoundError: no such round, or it holds no optimizer.
            StateMismatchError: the state does not fit ``optimizer``.
        """
        found = self.restore_round(self._round_of(timestamp, "load_optimizer"), model=model)
        if found.optimizer_config is None:
            raise CheckpointNotFoundError(f"load_optimizer: round {found.round} of "
                                          f"{self.folder} holds no optimizer")
        if optimizer is None:
            optimizer = Optimizer.from_config(found.optimizer_config)
        if load_state:
            found.apply_optimizer(optimizer)
        return optimizer

    def load_metrics(
        self,
        prefix: str = "metrics",
        timestamp: str | None = None,
    ) -> dict[str, dict[str, Any]]:
        """Return ``{label: {name: value}}``: for ``"metrics"``, every round's metrics
        (``"round_<n>"``, from the history) and any saved apart; for another prefix, the
        lines of its ``.jsonl`` file (a later line wins for the same label). Lists come back
        as numpy arrays, as declearn's do.

        Raises:
            FileNotFoundError: nothing saved under ``prefix``.
            KeyError: ``timestamp`` given and not found.
        """
        found: dict[str, dict[str, Any]] = {}
        if prefix == "metrics":
            for entry in self.history():
                found[f"round_{entry['round']}"] = dict(entry["metrics"])
        path = Path(self.folder) / METRICS_FOLDER / f"{prefix}.jsonl"
        if _LABEL.fullmatch(prefix) and path.is_file():
            found.update(_read_lines(path))
        elif not found:
            raise FileNotFoundError(f"load_metrics: no metrics {prefix!r} in {self.folder}")
        if timestamp is not None:
            if timestamp not in found:
                raise KeyError(f"load_metrics: no {timestamp!r} entry in {prefix!r} metrics")
            found = {timestamp: found[timestamp]}
        return {label: {k: np.array(v) if isinstance(v, list) else v for k, v in values.items()}
                for label, values in found.items()}

    def load_scalar_metrics(self, prefix: str = "metrics") -> Any:
        """Return the scalar metrics as a pandas ``DataFrame`` indexed by label."""
        import pandas as pd  # a declearn dependency

        rows = {label: {k: v for k, v in values.items() if isinstance(v, int | float)}
                for label, values in self.load_metrics(prefix).items()}
        frame = pd.DataFrame.from_dict(rows, orient="index")
        frame.index.name = "timestamp"
        return frame


def _now() -> str:
    return datetime.now(UTC).strftime("%Y%m%dT%H%M%S.%fZ")


def _read_lines(path: Path) -> dict[str, dict[str, Any]]:
    found: dict[str, dict[str, Any]] = {}
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            try:
                entry = json.loads(line)
                found[str(entry["label"])] = dict(entry["metrics"])
            except (ValueError, KeyError, TypeError):  # a line cut short by a crash
                _LOG.warning("load_metrics: %s line %d is not a metrics entry; skipped",
                             path, number)
    return found

