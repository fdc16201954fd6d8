"""``CheckpointedStrategy`` and ``resume``: Flower runs that save every round and continue.

Flower's ``Strategy.start`` always counts rounds from 1 and has no checkpoint. The wrapper
runs Flower's own loop and delegates every strategy method to the strategy it wraps, adding
only two things: real round numbers (a run resumed after round ``k`` hands ``k + 1, k + 2...``
to the wrapped strategy, whose results may depend on them -- FedAdam's bias correction does)
and, at the end of each round, one :class:`hkstore.Checkpointer` round: the global model, the
strategy's state, the global random states and the run's history.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy

import hkstore
from hkstore.errors import CheckpointExistsError, StrategyStateError
from hkstore.integrations.flower._history import History, plain_metrics
from hkstore.integrations.flower._records import fit_record, numpy_record, to_arrayrecord
from hkstore.integrations.flower._state import (
    capture_random,
    capture_strategy,
    restore_random,
    spec_for,
    strategy_setter,
)

__all__ = ["STATE_FORMAT", "CheckpointedStrategy", "resume"]

_log = logging.getLogger("hkstore.integrations.flower")

#: ``format`` of the state tree each round stores (``version`` 1).
STATE_FORMAT = "hkstore-flower-strategy"


class CheckpointedStrategy(Strategy):
    """Wrap a Flower strategy so that each round is saved, and a run can be resumed exactly.

    Every strategy method is delegated to ``inner``, with the run's real round number (see
    :func:`resume`); other attributes are read from ``inner`` too. ``start()`` is Flower's
    own loop; at the end of each round (after the federated and centralized evaluations) it
    saves one round through ``checkpointer``:

    - the model: ``like``'s functions, data info, trainable mask and random state with the
      round's global arrays (cast to ``like``'s dtypes: a float64 FedAdam result is stored as
      the float32 model it is for, so any hkstore tool reads the archive);
    - the state: the strategy's attributes from hkstore's state table (FedAdam/FedYogi/
      FedAdagrad ``current_arrays``, ``m_t``, ``v_t``; FedAvgM ``current_arrays``,
      ``momentum_vector``; the DP wrappers' ``clipping_norm`` and the strategy they wrap...),
      Python's ``random`` and NumPy's global generator states, the global arrays' exact
      values where their dtype differs from ``like``'s, and the run's metrics so far --
      arrays and JSON, never pickled;
    - the metrics: the round's numbers as ``"train.<name>"``, ``"evaluate.<name>"``,
      ``"server.<name>"`` (for ``keep_best`` and ``hkstore inspect``).

    Args:
        inner: any ``flwr.serverapp.strategy.Strategy``.
        checkpointer: where the rounds go.
        like: the initialized :class:`hkstore.HaikuModel` the global arrays are weights of.
        state_attributes: the attributes of ``inner`` that hold its state, for a class that
            is not in the table (or to replace the table's entry). Values may be arrays,
            ``ArrayRecord`` values, dicts, lists, tuples and JSON scalars.

    Raises:
        TypeError: an argument of the wrong type (``inner`` already wrapped included).
        StrategyStateError: ``inner``'s class is not in the table and no ``state_attributes``
            were given, or one of them does not exist (names the class and attributes).
        NotInitializedError: ``like`` has no weights yet.

    Example:
        >>> from flwr.serverapp.strategy import FedAdam
        >>> ckpt = hkstore.Checkpointer("runs/fl", keep_last=3)
        >>> strategy = CheckpointedStrategy(FedAdam(fraction_train=0.5), ckpt, like=model)
        >>> last_round, arrays = resume(ckpt, strategy, like=model)
        >>> last_round  # nothing saved yet: the run starts at round 1
        0
        >>> result = strategy.start(grid, arrays, num_rounds=10 - last_round)  # doctest: +SKIP
    """

    def __init__(
        self,
        inner: Strategy,
        checkpointer: hkstore.Checkpointer,
        *,
        like: hkstore.HaikuModel,
        state_attributes: Sequence[str] | None = None,
    ) -> None:
        if not isinstance(inner, Strategy) or isinstance(inner, CheckpointedStrategy):
            raise TypeError(f"CheckpointedStrategy: inner must be a flwr Strategy (not already "
                            f"wrapped), got {type(inner).__name__}")
        if not isinstance(checkpointer, hkstore.Checkpointer):
            raise TypeError(f"CheckpointedStrategy: checkpointer must be an hkstore.Checkpointer, "
                            f"got {type(checkpointer).__name__}")
        if not isinstance(like, hkstore.HaikuModel):
            raise TypeError(f"CheckpointedStrategy: like= expects an hkstore.HaikuModel, got "
                            f"{type(like).__name__}")
        if isinstance(state_attributes, str):
            raise TypeError("CheckpointedStrategy: state_attributes is a list of names, not a str")
        like.get_weights()  # NotInitializedError
        self._inner = inner
        self._spec = spec_for(inner, state_attributes)
        self._ckpt = checkpointer
        self._like = like
        self._last_round = 0
        self._resumed_from: int | None = None
        self._offset: int | None = None  # set while start() runs
        self._history = History()

    def __repr__(self) -> str:
        return f"CheckpointedStrategy({self._inner!r}, {self._ckpt!r})"

    def __getattr__(self, name: str) -> Any:
        inner = self.__dict__.get("_inner")
        if inner is None or name.startswith("_"):
            raise AttributeError(f"'CheckpointedStrategy' object has no attribute {name!r}")
        return getattr(inner, name)

    @property
    def inner(self) -> Strategy:
        """The wrapped strategy."""
        return self._inner

    @property
    def checkpointer(self) -> hkstore.Checkpointer:
        """Where the rounds are saved."""
        return self._ckpt

    @property
    def last_round(self) -> int:
        """The last round completed and saved (or restored by :func:`resume`); 0 before any."""
        return self._last_round

    def history(self) -> Result:
        """The run's metrics by real round number (restored rounds included), as a Result
        whose ``arrays`` is empty."""
        return self._history.result(ArrayRecord())

    # -- the delegated methods, with real round numbers ------------------------------------

    def _real(self, server_round: int) -> int:
        return server_round + (self._offset or 0)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """``inner.configure_train`` at the real round number."""
        return self._inner.configure_train(self._real(server_round), arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """``inner.aggregate_train`` at the real round number (its metrics are recorded)."""
        real = self._real(server_round)
        arrays, metrics = self._inner.aggregate_train(real, replies)
        if metrics is not None:
            self._history.train[real] = plain_metrics(metrics)
        return arrays, metrics

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """``inner.configure_evaluate`` at the real round number."""
        return self._inner.configure_evaluate(self._real(server_round), arrays, config, grid)

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """``inner.aggregate_evaluate`` at the real round number (its metrics are recorded)."""
        real = self._real(server_round)
        metrics = self._inner.aggregate_evaluate(real, replies)
        if metrics is not None:
            self._history.evaluate[real] = plain_metrics(metrics)
        return metrics

    def summary(self) -> None:
        """Log where rounds are saved, then ``inner.summary()``."""
        _log.info("CheckpointedStrategy: rounds saved to %s; next round %d",
                  self._ckpt.directory, self._last_round + 1)
        self._inner.summary()

    # -- the run --------------------------------------------------------------------------

    def start(
        self,
        grid: Grid,
        initial_arrays: ArrayRecord,
        num_rounds: int = 3,
        timeout: float = 3600,
        train_config: ConfigRecord | None = None,
        evaluate_config: ConfigRecord | None = None,
        evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None,
    ) -> Result:
        """Run ``num_rounds`` rounds after :attr:`last_round`, saving each one.

        Flower's ``Strategy.start`` with real round numbers: the wrapped strategy, the
        clients (``config["server-round"]``) and ``evaluate_fn`` see ``last_round + 1`` to
        ``last_round + num_rounds``. ``evaluate_fn(0, initial_arrays)`` runs only on a fresh
        run (a resumed run's initial arrays were evaluated as the last round's).

        Returns:
            Flower's ``Result`` with the final arrays and the metrics of every round of the
            run, restored rounds included, keyed by real round numbers.

        Raises:
            CheckpointExistsError: the directory already holds rounds and this strategy was
                neither resumed (:func:`resume`) nor has run before: nothing is run.
            HkstoreError: a round could not be saved (the run stops at that round).
        """
        if self._offset is not None:
            raise RuntimeError("CheckpointedStrategy.start: already running")
        if self._resumed_from is None and self._last_round == 0:
            latest = self._ckpt.latest()
            if latest is not None:
                raise CheckpointExistsError(
                    f"{self._ckpt.directory} already holds rounds up to {latest}: call "
                    "resume(checkpointer, strategy, like=model) first to continue that run, "
                    "or use another directory")
        offset = self._last_round

        def round_end(local_round: int, arrays: ArrayRecord) -> MetricRecord | None:
            real = local_round + offset
            if local_round == 0 and offset > 0:
                return None
            metrics = None if evaluate_fn is None else evaluate_fn(real, arrays)
            if metrics is not None:
                self._history.server[real] = plain_metrics(metrics)
            if local_round > 0:
                self._save(real, arrays)
            return metrics

        self._offset = offset
        try:
            result = Strategy.start(self, grid, initial_arrays, num_rounds=num_rounds,
                                    timeout=timeout, train_config=train_config,
                                    evaluate_config=evaluate_config, evaluate_fn=round_end)
            self._ckpt.wait()
        finally:
            self._offset = None
        return self._history.result(result.arrays)

    def _save(self, round_: int, arrays: ArrayRecord) -> None:
        state = self._like.export_state()
        weights, exact = fit_record(arrays, {s.name: (s.shape, s.dtype)
                                             for s in state.weight_specs()})
        tree = {
            "format": STATE_FORMAT,
            "version": 1,
            "round": round_,
            "strategy": capture_strategy(self._inner, self._spec),
            "random": capture_random(),
            "arrays": {"names": list(arrays), "exact_names": list(exact),
                       "exact": list(exact.values())},
            "history": self._history.to_tree(),
        }
        overwrite = self._resumed_from is not None and round_ > self._resumed_from
        self._ckpt.save(dataclasses.replace(state, weights=weights), round_, state=tree,
                        metrics=self._history.round_metrics(round_), overwrite=overwrite)
        self._last_round = round_

    # -- resuming -------------------------------------------------------------------------

    def _resume(self, restored: hkstore.Restored) -> ArrayRecord:
        """Check ``restored`` fully, then put its state back (all or nothing)."""
        number, tree = restored.round, restored.state
        if not (isinstance(tree, Mapping) and tree.get("format") == STATE_FORMAT):
            raise StrategyStateError(
                f"resume: round {number} of {self._ckpt.directory} has no Flower strategy state "
                "(it was not saved by a CheckpointedStrategy)")
        if tree.get("version") != 1 or tree.get("round") != number:
            raise StrategyStateError(f"resume: round {number}'s strategy state is of version "
                                     f"{tree.get('version')!r} (this reader knows 1) or malformed")
        assignments = strategy_setter(self._inner, self._spec, tree.get("strategy"),
                                      round_=number)
        history = History.from_tree(tree.get("history"), number)
        record = _global_arrays(restored, tree.get("arrays"), self._like)
        restore_random(tree.get("random"), round_=number)
        for owner, name, value in assignments:
            setattr(owner, name, value)
        self._history = history
        self._last_round = self._resumed_from = number
        return record


def _global_arrays(restored: hkstore.Restored, tree: Any, like: hkstore.HaikuModel
                   ) -> ArrayRecord:
    """The round's global ArrayRecord as the run had it: the model's weights in the stored
    order, with the exact values kept for those whose dtype differed from the model's."""
    number = restored.round
    weights = dict(restored.model.export_state().host_weights())
    ok = isinstance(tree, Mapping) and isinstance(tree.get("names"), list) and sorted(
        tree["names"]) == sorted(weights) and isinstance(tree.get("exact_names"), list) and (
        isinstance(tree.get("exact"), list)) and len(tree["exact"]) == len(tree["exact_names"])
    if not ok:
        raise StrategyStateError(f"resume: round {number}'s array list does not match its model "
                                 f"archive ({sorted(weights)[:5]}...)")
    exact = dict(zip(tree["exact_names"], tree["exact"], strict=True))
    if not set(exact) <= set(weights) or not all(
            isinstance(a, np.ndarray) and a.shape == weights[n].shape for n, a in exact.items()):
        raise StrategyStateError(f"resume: round {number}'s exact arrays do not match its model")
    record = numpy_record({name: exact.get(name, weights[name]) for name in tree["names"]})
    fit_record(record, {s.name: (s.shape, s.dtype) for s in like.export_state().weight_specs()})
    return record


def resume(
    checkpointer: hkstore.Checkpointer,
    strategy: CheckpointedStrategy,
    *,
    like: hkstore.HaikuModel,
    trust: hkstore.Trust | None = None,
) -> tuple[int, ArrayRecord]:
    """Put a checkpointed run's last round back into ``strategy``; return where to go on.

    Restores the newest round that verifies (``checkpointer.restore``: a corrupt newer round
    is skipped with a warning), checks everything, then puts back the wrapped strategy's
    state, Python's ``random`` and NumPy's global generator states and the run's history, and
    sets ``strategy.last_round``. ``strategy.start(grid, arrays, num_rounds=n)`` then runs
    rounds ``last_round + 1`` to ``last_round + n`` as the interrupted run would have.

    Args:
        checkpointer: the run's checkpoint directory.
        strategy: a new :class:`CheckpointedStrategy` over the same strategy class and
            settings as the interrupted run's.
        like: the model whose functions rebuild the stored one (nothing stored is imported
            or unpickled).
        trust: signature requirements for the rounds (``hkstore.Trust(keys=...,
            require_signature=True)``); functions always come from ``like``.

    Returns:
        ``(last_round, arrays)``: the last completed round (0 when nothing was saved: then
        nothing is changed and ``arrays`` is ``like``'s weights) and the global arrays for
        ``strategy.start`` -- exactly the run's (dtypes, and key order, kept).

    Raises:
        StrategyStateError: the round was written for another strategy class, other state
            attributes, or not by a CheckpointedStrategy (names the round and classes).
        ArrayRecordMismatchError: the stored model does not fit ``like`` (names each tensor).
        CheckpointNotFoundError, SignatureError, WeightsMismatchError: as
            ``Checkpointer.restore``.

    Example:
        >>> from flwr.serverapp.strategy import FedAvg
        >>> ckpt = hkstore.Checkpointer("runs/fl")
        >>> strategy = CheckpointedStrategy(FedAvg(), ckpt, like=model)
        >>> last_round, arrays = resume(ckpt, strategy, like=model)
        >>> last_round, list(arrays) == model.get_weight_names()
        (0, True)
        >>> strategy.start(grid, arrays, num_rounds=total - last_round)  # doctest: +SKIP
    """
    if not isinstance(strategy, CheckpointedStrategy):
        raise TypeError(f"resume: strategy must be a CheckpointedStrategy, got "
                        f"{type(strategy).__name__}")
    if not isinstance(checkpointer, hkstore.Checkpointer):
        raise TypeError(f"resume: checkpointer must be an hkstore.Checkpointer, got "
                        f"{type(checkpointer).__name__}")
    if not isinstance(like, hkstore.HaikuModel):
        raise TypeError(f"resume: like= expects an hkstore.HaikuModel, got {type(like).__name__}")
    if checkpointer.latest() is None:
        strategy._resumed_from = 0
        return 0, to_arrayrecord(like)
    functions = like.export_state()
    restored = checkpointer.restore(model=functions.model, loss=functions.loss, trust=trust)
    arrays = strategy._resume(restored)
    _log.info("resume: round %d restored from %s", restored.round, checkpointer.directory)
    return restored.round, arrays
