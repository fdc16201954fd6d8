"""ResumableFederatedServer: declearn's ``FederatedServer`` that checkpoints every round and
resumes from the latest one.

declearn's server always starts at round 0, and its checkpoints miss what a resumed run needs:
the loss history and best weights it keeps in memory, the client sampler's random generator,
early stopping. This subclass saves, at the end of every round, one
:class:`~hkstore.integrations.declearn.HkstoreCheckpointer` round holding the model, the
server optimizer's config and state (its modules' states included), and
``state["server"]``:

- ``losses`` (the evaluation losses so far), ``best`` (the best trainable weights, or
  ``"model"`` when they are this round's) and ``best_round``;
- ``sampler``: the client sampler's generator and scores (:func:`._states.sampler_state`;
  the sampler draws from its clients in sorted order, :class:`._states.ClientSet`, so that
  the same draws pick the same clients in a restarted process);
- ``early_stop``: the values early stopping was fed (replayed on resume);
- ``stop`` (training had ended after this round) and ``finished`` (the final evaluation ran).

The round's metrics are the evaluation's (``loss`` and the others) plus each client's under
``clients``. On start, with ``resume=True`` and a round on disk, it restores all of that, runs
declearn's initialization (clients register and receive the restored model), asks every
client to restore its own state of that round (:class:`._messages.ResumeRequest`), and goes on
with the next round. What is not restored: fairness controllers and SecAgg (set up again, as
in a new run), a criterion sampler's own history.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from declearn import messaging
from declearn.main import FederatedServer
from declearn.main.config import FLRunConfig
from declearn.main.utils import Checkpointer as DeclearnCheckpointer
from declearn.main.utils import EarlyStopping

from hkstore.errors import CheckpointExistsError, StateMismatchError, WeightsMismatchError
from hkstore.integrations.declearn._checkpointer import HkstoreCheckpointer, RoundState
from hkstore.integrations.declearn._harden import refusal_in
from hkstore.integrations.declearn._messages import ResumeReply, ResumeRequest
from hkstore.integrations.declearn._model import DeclearnHaikuModel
from hkstore.integrations.declearn._states import (
    order_sampler_clients,
    restore_sampler,
    sampler_state,
)
from hkstore.model import check_fit, spec_of

__all__ = ["ResumableFederatedServer", "as_hkstore_checkpointer"]

_LOG = logging.getLogger("hkstore.integrations.declearn")
MessageT = TypeVar("MessageT", bound=messaging.Message)


def as_hkstore_checkpointer(checkpoint: object, where: str) -> HkstoreCheckpointer | None:
    """Return ``checkpoint`` (an instance, a folder, or its keyword arguments) as an
    :class:`HkstoreCheckpointer`.

    Raises:
        TypeError: declearn's own ``Checkpointer``, or anything else.
    """
    if checkpoint is None or isinstance(checkpoint, HkstoreCheckpointer):
        return checkpoint
    if isinstance(checkpoint, DeclearnCheckpointer):
        raise TypeError(f"{where}: resuming needs an HkstoreCheckpointer, got declearn's "
                        f"{type(checkpoint).__name__} (its files hold no resumable state)")
    if isinstance(checkpoint, str | dict):
        return HkstoreCheckpointer.from_specs(checkpoint)
    raise TypeError(f"{where}: checkpoint must be an HkstoreCheckpointer, a folder or its "
                    f"keyword arguments, got {type(checkpoint).__name__}")


def _recording(early_stop: EarlyStopping, fed: list[float]) -> None:
    """Make ``early_stop`` record every value it is fed (in ``fed``)."""
    update: Callable[[float], bool] = early_stop.update

    def recorded(metric: float) -> bool:
        fed.append(metric)
        return update(metric)

    early_stop.update = recorded


class ResumableFederatedServer(FederatedServer):
    """declearn's ``FederatedServer`` that saves every round and resumes from the latest.

    Takes ``FederatedServer``'s arguments (``model`` must be a
    :class:`~hkstore.integrations.declearn.DeclearnHaikuModel` when checkpointing), and:

    Args:
        checkpoint: an :class:`~hkstore.integrations.declearn.HkstoreCheckpointer`, a folder
            or its keyword arguments; ``None``: no checkpoints and no resume (declearn's run).
        resume: when the checkpoint directory holds rounds, resume from the newest one that
            verifies (default); ``False`` refuses such a directory.
        resume_timeout: how long to wait for every client to confirm it restored its state
            (seconds).

    Raises:
        TypeError: declearn's own ``Checkpointer``, or a model that is not a
            ``DeclearnHaikuModel`` with a checkpoint.

    Clients must be :class:`~hkstore.integrations.declearn.ResumableFederatedClient` s: on
    resume the server waits for each one's :class:`ResumeReply` (a declearn
    ``FederatedClient`` does not know the message and stops), and cancels the run, naming the
    clients, when one fails or stays silent.

    Example:
        >>> [cls.__name__ for cls in ResumableFederatedServer.__mro__[:2]]
        ['ResumableFederatedServer', 'FederatedServer']
        >>> server = ResumableFederatedServer(model, netwk, optim,  # doctest: +SKIP
        ...                                   checkpoint={"folder": "runs/server"})
        >>> server.run(config)  # doctest: +SKIP
        >>> server.run(config)  # after a crash: resumes after the latest round  # doctest: +SKIP
    """

    def __init__(
        self,
        model: Any,
        netwk: Any,
        optim: Any,
        metrics: Any = None,
        client_sampler: Any = None,
        secagg: Any = None,
        checkpoint: HkstoreCheckpointer | str | dict[str, Any] | None = None,
        *,
        resume: bool = True,
        resume_timeout: float = 300.0,
    ) -> None:
        ckptr = as_hkstore_checkpointer(checkpoint, "ResumableFederatedServer")
        super().__init__(model, netwk, optim, metrics, client_sampler, secagg, ckptr)
        if ckptr is not None and not isinstance(self.model, DeclearnHaikuModel):
            raise TypeError(f"ResumableFederatedServer checkpoints DeclearnHaikuModel models, "
                            f"got {type(self.model).__name__}")
        self.ckptr: HkstoreCheckpointer | None = ckptr
        self.resume = bool(resume)
        self.resume_timeout = float(resume_timeout)
        #: how long a cancellation waits for each client to collect it (a dead one never does)
        self.notify_timeout = 30.0
        self.resumed_from: int | None = None
        self._evaluated: dict[str, Any] | None = None
        self._best_round: int | None = None
        self._best_seen: object = None
        self._fed_to_early_stop: list[float] = []

    # --- the run ---------------------------------------------------------------------------

    async def async_run(self, config: FLRunConfig) -> None:
        """Run declearn's federated process, from round 0 or after the latest saved round.

        Raises:
            CheckpointExistsError: ``resume=False`` and the directory holds rounds.
            RuntimeError: a client could not restore its state (the run is cancelled).
            HkstoreError: the latest round cannot be restored (names why).
        """
        early_stop = None if config.early_stop is None else config.early_stop.instantiate()
        if early_stop is not None:
            _recording(early_stop, self._fed_to_early_stop)
        try:
            found = self._restore(early_stop)
            async with self.netwk:
                await self.initialization(config)
                self.client_sampler.init_clients(self.netwk.client_names)
                order_sampler_clients(self.client_sampler)
                if found is not None:
                    self._restore_sampler(found)
                    await self._resume_clients(found.round)
                elif self.ckptr is not None:
                    self._save_round(0, stop=False, finished=False)
                await self._rounds(config, early_stop, found)
        finally:
            if self.ckptr is not None:
                self.ckptr.close()

    async def _rounds(self, config: FLRunConfig, early_stop: EarlyStopping | None,
                      found: RoundState | None) -> None:
        server = {} if found is None else found.state["server"]
        round_i = 0 if found is None else found.round
        going = not server.get("stop", False) and (found is None or round_i < config.rounds)
        finished = bool(server.get("finished", False))
        while going:
            train_on = self._select_training_round_participants()
            evaluate_on = self._select_evaluation_round_participants()
            await self.fairness_round(round_i, config.fairness, self.netwk.client_names)
            round_i += 1
            await self.training_round(round_i, config.training, train_on)
            await self.evaluation_round(round_i, config.evaluate, evaluate_on)
            going = self._keep_training(round_i, config.rounds, early_stop)
            # the last round is final unless declearn's closing evaluation is still to come
            finished = not going and not round_i % config.evaluate.frequency
            self._save_round(round_i, stop=not going, finished=finished)
        if self.ckptr is not None:
            if not finished:  # as declearn: with checkpoints, the last model is evaluated
                await self.evaluation_round(round_i, config.evaluate, self.netwk.client_names,
                                            force_run=True)
                self._save_round(round_i, stop=True, finished=True, overwrite=True)
            await self.fairness_round(round_i, config.fairness, self.netwk.client_names,
                                      force_run=True)
        await self.stop_training(round_i)

    # --- saving ----------------------------------------------------------------------------

    def _checkpoint_after_evaluation(self, metrics: Mapping[str, Any],
                                     results: Mapping[str, Any]) -> None:
        """Keep the evaluation's metrics (and each client's) for the end-of-round save.

        declearn saves here, before it records the round's loss and best weights; the round
        is saved once they are (:meth:`_save_round`).
        """
        clients: dict[str, Any] = {}
        for client, reply in results.items():
            scores: dict[str, Any] = {"loss": reply.loss}
            if reply.metrics:
                self.metrics.set_states(reply.metrics)
                scores.update(self.metrics.get_result())
            clients[client] = scores
        self._evaluated = {**metrics, **({"clients": clients} if clients else {})}

    def _save_round(self, round_i: int, *, stop: bool, finished: bool,
                    overwrite: bool = False) -> None:
        if self._best is not self._best_seen:
            self._best_seen, self._best_round = self._best, round_i
        if self.ckptr is None:
            return
        best: Any = self._best
        if best is not None and self._best_round == round_i:
            best = "model"  # this round's trainable weights: not stored twice
        state = {"server": {
            "losses": list(self._losses),
            "best": best,
            "best_round": self._best_round,
            "sampler": sampler_state(self.client_sampler),
            "early_stop": list(self._fed_to_early_stop),
            "stop": stop,
            "finished": finished,
        }}
        metrics, self._evaluated = self._evaluated or {}, None
        replay = self.resumed_from is not None and round_i > self.resumed_from
        self.ckptr.save_round(round_i, self.model, optimizer=self.optim, state=state,
                              metrics=metrics, overwrite=overwrite or replay)
        if round_i == 0:
            _LOG.info("round 0 (the initial model) saved in %s", self.ckptr.folder)
            return
        loss = metrics.get("loss")
        _LOG.info("round %d: loss %s (best %s at round %s); saved in %s", round_i,
                  "-" if loss is None else f"{loss:.6g}",
                  f"{min(self._losses):.6g}" if self._losses else "-", self._best_round,
                  self.ckptr.folder)

    # --- resuming --------------------------------------------------------------------------

    def _restore(self, early_stop: EarlyStopping | None) -> RoundState | None:
        if self.ckptr is None:
            return None
        rounds = self.ckptr.rounds()
        if not rounds:
            return None
        if not self.resume:
            raise CheckpointExistsError(f"{self.ckptr.folder} holds rounds {rounds} and "
                                        "resume=False: use an empty directory")
        started = time.perf_counter()
        assert isinstance(self.model, DeclearnHaikuModel)
        found = self.ckptr.restore_round(None, model=self.model)
        server = found.state.get("server")
        if not isinstance(server, dict) or found.optimizer_state is None:
            raise StateMismatchError(
                f"{self.ckptr.folder} round {found.round} was not saved by a "
                "ResumableFederatedServer (no server state or optimizer state): cannot resume"
            )
        found.apply_optimizer(self.optim)
        self.model.set_wrapped_model(found.model)
        self.model.update_device_policy()
        self._losses = list(server["losses"])
        best = server["best"]
        self._best = self.model.get_weights(trainable=True) if best == "model" else best
        self._best_seen, self._best_round = self._best, server["best_round"]
        if early_stop is not None:
            for value in server["early_stop"]:
                early_stop.update(value)
        self.resumed_from = found.round
        _LOG.info(
            "resuming from round %d of %s (%.0f ms): model (%d weights, %d trainable), "
            "optimizer state (%s), %d evaluation losses, best weights of round %s%s",
            found.round, self.ckptr.folder, 1e3 * (time.perf_counter() - started),
            len(self.model.get_weight_names()), len(self.model.get_weight_names(trainable=True)),
            ", ".join(name for name, _ in found.optimizer_state["modules"]) or "no modules",
            len(self._losses), self._best_round,
            "" if early_stop is None else f", early stopping fed {len(server['early_stop'])} "
            "values",
        )
        return found

    def _restore_sampler(self, found: RoundState) -> None:
        restore_sampler(self.client_sampler, found.state["server"]["sampler"],
                        where=f"round {found.round}: client sampler")

    async def _resume_clients(self, round_i: int) -> None:
        """Ask every client to restore its state of ``round_i``; cancel the run if one fails."""
        clients = self.netwk.client_names
        await self.netwk.broadcast_message(ResumeRequest(round_i=round_i), clients)
        replies, silent = await self.netwk.wait_for_messages_with_timeout(
            self.resume_timeout, clients)
        errors: dict[str, str] = {}
        for client, reply in replies.items():
            if issubclass(reply.message_cls, ResumeReply):
                restored = reply.deserialize().round_i
                if restored != round_i:
                    errors[client] = f"restored round {restored}, not {round_i}"
            elif issubclass(reply.message_cls, messaging.Error):
                errors[client] = reply.deserialize().message
            else:
                errors[client] = f"answered with a {reply.message_cls.__name__}"
        for client in silent:
            errors[client] = (f"no answer within {self.resume_timeout:.0f} s (a declearn "
                              "FederatedClient cannot resume: run a ResumableFederatedClient)")
        if errors:
            reason = (f"clients could not resume from round {round_i}: "
                      + "; ".join(f"{client}: {why}" for client, why in sorted(errors.items())))
            await self._cancel(reason)
            raise RuntimeError(reason)
        _LOG.info("resume: %d clients restored their state of round %d (%s)", len(clients),
                  round_i, ", ".join(sorted(clients)))

    # --- errors ----------------------------------------------------------------------------

    async def _cancel(self, reason: str) -> None:
        """Tell every client the run is cancelled (waiting ``notify_timeout`` at most for each:
        a client that is gone never collects it), and log why."""
        self.logger.error("%s", reason)
        _LOG.error("run cancelled: %s", reason)
        cancel = messaging.CancelTraining(reason)
        with contextlib.suppress(asyncio.TimeoutError):
            await self.netwk.send_messages({client: cancel for client in self.netwk.client_names},
                                           timeout=self.notify_timeout)

    def _misfit(self, reply: messaging.Message) -> str | None:
        """Why a ``TrainReply``'s updates do not fit the model's trainable weights (every
        name, shape and dtype at fault), or ``None``; other messages are not checked.

        Checked for each client before anything is aggregated, so that a bad update leaves the
        model and the server optimizer's state as they were.
        """
        if not isinstance(reply, messaging.TrainReply):
            return None
        vector = getattr(reply.updates, "updates", None)  # declearn's ModelUpdates.updates
        coefs = getattr(vector, "coefs", None)
        if not isinstance(coefs, Mapping):
            return (f"its updates hold a {type(vector).__name__}, not a declearn Vector of "
                    "the trainable weights")
        weights = self.model.get_weights(trainable=True).coefs
        malformed = sorted(name for name, value in coefs.items()
                           if not (hasattr(value, "shape") and hasattr(value, "dtype")))
        if malformed:
            return f"update(s) {malformed} are not arrays"
        try:
            check_fit({name: spec_of(value) for name, value in weights.items()},
                      {str(name): spec_of(value) for name, value in coefs.items()},
                      where="updates", given_as="client's updates")
        except WeightsMismatchError as exc:
            return str(exc)
        return None

    async def _collect_results(self, clients: set[str], msgtype: type[MessageT],
                               context: str) -> dict[str, MessageT]:
        """Wait for one reply of type ``msgtype`` from each client, as declearn does; a reply
        this process refuses to decode (a model payload off the allow-list, an archive the
        receive policy refuses), or a training reply whose updates do not fit the model
        (:meth:`_misfit`), counts as that client's error, named in the log.

        Raises:
            RuntimeError: a client replied with an error, an unexpected message, a refused
                payload or updates that do not fit (the run is cancelled for every client
                first; the model is unchanged).
        """
        replies = await self.netwk.wait_for_messages(clients)
        results: dict[str, MessageT] = {}
        errors: dict[str, str] = {}
        for client, reply in replies.items():
            kind = reply.message_cls
            try:
                if issubclass(kind, msgtype):
                    results[client] = reply.deserialize()
                    misfit = self._misfit(results[client])
                    if misfit is not None:
                        errors[client] = f"its {kind.__name__} was refused: {misfit}"
                elif issubclass(kind, messaging.Error):
                    errors[client] = f"reported an error: {reply.deserialize().message}"
                else:
                    errors[client] = f"sent a {kind.__name__}, expected a {msgtype.__name__}"
            except (TypeError, ValueError) as exc:  # declearn: ValueError("Failed to decode")
                refused = refusal_in(exc)
                errors[client] = (f"its {kind.__name__} was refused: {refused}" if refused
                                  else f"its {kind.__name__} could not be decoded: {exc!r}")
        if errors:
            reason = (f"{context} failed for {len(errors)} client(s): "
                      + "; ".join(f"{client} {why}" for client, why in sorted(errors.items())))
            await self._cancel(reason)
            raise RuntimeError(reason)
        return results
