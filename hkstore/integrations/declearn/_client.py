"""ResumableFederatedClient: declearn's ``FederatedClient`` that outlives a server restart and
restores its own state of the round the server resumes from.

When the server process dies, declearn's client stops with a connection error. This one:

- **reconnects**: on a lost connection it connects again (for up to ``reconnect_timeout``
  seconds), registers again and takes the restarted server's ``InitRequest`` as at the start
  (its model comes from there: the server's restored weights, frozen ones included);
- **restores its state** on the server's :class:`._messages.ResumeRequest` ``(round_i=k)``:
  the optimizer's state (momentum, Adam moments, Scaffold's correction...), the model's random
  state and its datasets' random generators, read back from its own
  :class:`~hkstore.integrations.declearn.HkstoreCheckpointer` round ``k``; a client that was
  restarted too (a new process) does the same. It answers :class:`._messages.ResumeReply`,
  or an ``Error`` naming what it could not restore (the server then cancels the run);
- **saves a round** after each training round and again (replacing it) after the round's
  evaluation, numbered as the server numbers rounds, before it replies: so whenever the server
  has saved round ``k``, every client holds its own state at the end of round ``k``. Round 0
  is the state right after initialization. The round's metrics are the training losses and
  step count, then the evaluation's metrics.

What is not restored: a DP-SGD accountant (declearn sets DP-SGD up again), fairness
controllers, SecAgg keys (set up again by the server). Reconnecting covers websockets (the
connection-closed error) and any ``OSError``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

from declearn import messaging
from declearn.main import FederatedClient
from declearn.messaging import SerializedMessage
from declearn.secagg import messaging as secagg_messaging

from hkstore.errors import CheckpointNotFoundError, StateMismatchError
from hkstore.integrations.declearn._checkpointer import HkstoreCheckpointer, RoundState
from hkstore.integrations.declearn._harden import refusal_in
from hkstore.integrations.declearn._messages import ResumeReply, ResumeRequest
from hkstore.integrations.declearn._model import DeclearnHaikuModel
from hkstore.integrations.declearn._server import as_hkstore_checkpointer
from hkstore.integrations.declearn._states import (
    generator_of,
    generator_state,
    set_generator_state,
)

__all__ = ["ResumableFederatedClient", "connection_lost_errors"]

_LOG = logging.getLogger("hkstore.integrations.declearn")
_DATASETS = ("train_data", "valid_data")


def connection_lost_errors() -> tuple[type[BaseException], ...]:
    """The errors that mean the connection to the server is gone or cannot be made.

    ``OSError`` (refused, reset), ``EOFError``, and websockets' own errors: a closed
    connection, or a handshake cut short by a server that is going down or coming up.
    """
    errors: list[type[BaseException]] = [OSError, EOFError]
    try:
        from websockets.exceptions import WebSocketException
    except ImportError:  # websockets is declearn's optional transport
        pass
    else:
        errors.append(WebSocketException)
    return tuple(errors)


class ResumableFederatedClient(FederatedClient):
    """declearn's ``FederatedClient`` that reconnects to a restarted server and resumes.

    Takes ``FederatedClient``'s arguments (``checkpoint``: an
    :class:`~hkstore.integrations.declearn.HkstoreCheckpointer`, a folder or its keyword
    arguments), and:

    Args:
        reconnect_timeout: how long to keep trying to connect, at the start and after the
            connection is lost (seconds).
        require_state: on a ``ResumeRequest``, a client without that round in its checkpoint
            (or without a checkpoint) refuses to resume (default); ``False`` lets it go on
            with its current state, logging a warning.

    Raises:
        TypeError: declearn's own ``Checkpointer``.

    Example:
        >>> [cls.__name__ for cls in ResumableFederatedClient.__mro__[:2]]
        ['ResumableFederatedClient', 'FederatedClient']
        >>> client = ResumableFederatedClient(netwk, train_data,  # doctest: +SKIP
        ...                                   checkpoint="runs/client-1", verbose=False)
        >>> client.run()  # survives a server restart; run again after a crash  # doctest: +SKIP
    """

    def __init__(
        self,
        netwk: Any,
        train_data: Any,
        valid_data: Any = None,
        checkpoint: HkstoreCheckpointer | str | dict[str, Any] | None = None,
        secagg: Any = None,
        share_metrics: bool = True,
        verbose: bool = True,
        *,
        reconnect_timeout: float = 300.0,
        require_state: bool = True,
    ) -> None:
        ckptr = as_hkstore_checkpointer(checkpoint, "ResumableFederatedClient")
        super().__init__(netwk, train_data, valid_data, ckptr, secagg, share_metrics,
                         verbose=verbose)
        self.ckptr: HkstoreCheckpointer | None = ckptr
        self.reconnect_timeout = float(reconnect_timeout)
        self.require_state = bool(require_state)
        self.resumed_from: int | None = None
        self._trained: dict[int, dict[str, Any]] = {}

    # --- connection --------------------------------------------------------------------------

    async def async_run(self) -> None:
        """Take part in the run; after a lost connection, connect again and go on.

        Raises:
            OSError: no connection within ``reconnect_timeout`` (the last error).
            RuntimeError: the server cancelled the run (declearn's behaviour).
        """
        lost = connection_lost_errors()
        try:
            while True:
                await self._connect(time.monotonic() + self.reconnect_timeout)
                try:
                    await self.register()
                    await self.initialize()
                    while True:
                        received = await self.netwk.recv_message()
                        if await self.handle_message(received):
                            return
                except lost as exc:
                    _LOG.warning("%s: lost the connection to the server (%s: %s); connecting "
                                 "again for up to %.0f s", self.netwk.name, type(exc).__name__,
                                 exc, self.reconnect_timeout)
                finally:
                    with contextlib.suppress(*lost):
                        await self.netwk.stop()
        finally:
            if self.ckptr is not None:
                self.ckptr.close()

    async def _connect(self, deadline: float) -> None:
        retried: tuple[type[BaseException], ...] = (TimeoutError, *connection_lost_errors())
        while True:
            try:
                await self.netwk.start()  # declearn's own attempts: ten, a second apart
                return
            except retried:
                if time.monotonic() >= deadline:
                    raise
                await asyncio.sleep(1.0)

    async def initialize(self) -> None:
        """declearn's initialization; then, in a new run (no round saved yet), save round 0.

        declearn's own first checkpoint (which would start the directory afresh) is replaced:
        after a reconnection the rounds already saved are kept.
        """
        ckptr, self.ckptr = self.ckptr, None
        try:
            await super().initialize()
        except (TypeError, ValueError) as exc:
            await self._report_refusal(exc)
        finally:
            self.ckptr = ckptr
        self._trained.clear()
        if ckptr is not None and ckptr.latest_round() is None:
            self._save(0, {})

    async def handle_message(self, ser_msg: SerializedMessage) -> bool:
        """Handle a :class:`ResumeRequest`, or any declearn message as declearn does."""
        try:
            if issubclass(ser_msg.message_cls, ResumeRequest):
                await self._resume(ser_msg.deserialize())
                return False
            return await super().handle_message(ser_msg)
        except (TypeError, ValueError) as exc:
            await self._report_refusal(exc)
            raise  # not reached: _report_refusal raises

    async def _report_refusal(self, exc: TypeError | ValueError) -> None:
        """When ``exc`` is (or was caused by) a refusal to decode a server message: tell the
        server (which cancels the run), then stop with the server's cancellation.

        Raises:
            RuntimeError: the server cancelled the run (its reason), the refusal chained.
            TypeError, ValueError: ``exc`` itself, when it is no refusal; the refusal, when
                the server answers with anything but a cancellation.
        """
        refused = refusal_in(exc)
        if refused is None:
            raise exc
        error = f"{self.netwk.name} refused a message from the server: {refused}"
        _LOG.error("%s", error)
        await self.netwk.send_message(messaging.Error(error))
        received = await self.netwk.recv_message()
        if issubclass(received.message_cls, messaging.CancelTraining):
            reason = received.deserialize().reason
            raise RuntimeError(f"the server cancelled the run: {reason}") from refused
        raise refused

    # --- rounds ----------------------------------------------------------------------------

    def _model(self) -> DeclearnHaikuModel:
        assert self.trainmanager is not None
        model = self.trainmanager.model
        if not isinstance(model, DeclearnHaikuModel):
            raise TypeError(f"ResumableFederatedClient checkpoints DeclearnHaikuModel models, "
                            f"the server sent a {type(model).__name__}")
        return model

    def _local_state(self) -> dict[str, Any]:
        generators = {}
        for name in _DATASETS:
            rng = generator_of(getattr(self, name))
            if rng is not None:
                generators[name] = generator_state(rng)
        return {"client": {"generators": generators}}

    def _save(self, round_i: int, metrics: dict[str, Any], *, overwrite: bool = False) -> None:
        assert self.ckptr is not None and self.trainmanager is not None
        replay = self.resumed_from is not None and round_i > self.resumed_from
        self.ckptr.save_round(round_i, self._model(), optimizer=self.trainmanager.optim,
                              state=self._local_state(), metrics=metrics,
                              overwrite=overwrite or replay)

    async def _refused_without_secagg(self, round_i: int, what: str) -> bool:
        """With SecAgg configured but not set up, tell the server (an ``Error``) and say so."""
        if self.secagg is None or self._encrypter is not None:
            return False
        refusal = (f"{self.netwk.name} will not take part in {what} round {round_i}: SecAgg is "
                   "configured but was not set up")
        self.logger.error(refusal)
        await self.netwk.send_message(messaging.Error(refusal))
        return True

    async def training_round(self, message: messaging.TrainRequest) -> None:
        """Train as declearn does, save the round, then reply."""
        assert self.trainmanager is not None
        if await self._refused_without_secagg(message.round_i, "training"):
            return
        reply: messaging.Message = self.trainmanager.training_round(message)
        losses = self.trainmanager.model.collect_training_losses()
        if isinstance(reply, messaging.TrainReply):
            self._trained[message.round_i] = {"training_losses": losses,
                                              "n_steps": reply.n_steps}
            _LOG.info("%s: round %d trained, %d steps, mean loss %s", self.netwk.name,
                      message.round_i, reply.n_steps,
                      f"{sum(losses) / len(losses):.6g}" if losses else "-")
            if self.ckptr is not None:
                self._save(message.round_i, self._trained[message.round_i])
            if self._encrypter is not None:
                reply = secagg_messaging.SecaggTrainReply.from_cleartext_message(
                    cleartext=reply, encrypter=self._encrypter)
        await self.netwk.send_message(reply)

    async def evaluation_round(self, message: messaging.EvaluationRequest) -> None:
        """Evaluate as declearn does, save the round again (now evaluated), then reply."""
        assert self.trainmanager is not None
        if await self._refused_without_secagg(message.round_i, "evaluation"):
            return
        reply: messaging.Message = self.trainmanager.evaluation_round(message)
        if isinstance(reply, messaging.EvaluationReply):
            if self.ckptr is not None:
                metrics = {**self._trained.get(message.round_i, {}),
                           **self.trainmanager.metrics.get_result()}
                self._save(message.round_i, metrics, overwrite=True)
            if not self.share_metrics:
                reply.metrics.clear()
            if self._encrypter is not None:
                reply = secagg_messaging.SecaggEvaluationReply.from_cleartext_message(
                    cleartext=reply, encrypter=self._encrypter)
        await self.netwk.send_message(reply)

    # --- resuming --------------------------------------------------------------------------

    async def _resume(self, message: ResumeRequest) -> None:
        round_i = message.round_i
        try:
            done = self._restore(round_i)
        except Exception as exc:  # reported to the server, which cancels the run
            if not self.require_state and isinstance(exc, CheckpointNotFoundError):
                _LOG.warning("%s: no state of round %d to restore (%s); going on with the "
                             "current state", self.netwk.name, round_i, exc)
                done = "nothing (require_state=False)"
            else:
                error = (f"{self.netwk.name} cannot resume from round {round_i}: "
                         f"{type(exc).__name__}: {exc}")
                _LOG.error("%s", error)
                await self.netwk.send_message(messaging.Error(error))
                return
        self.resumed_from = round_i
        _LOG.info("%s: resumed from round %d: %s", self.netwk.name, round_i, done)
        await self.netwk.send_message(ResumeReply(round_i=round_i))

    def _restore(self, round_i: int) -> str:
        """Put back this client's state of ``round_i``; return what was restored."""
        if self.ckptr is None:
            raise CheckpointNotFoundError("this client has no checkpoint to restore from")
        assert self.trainmanager is not None
        found: RoundState = self.ckptr.restore_round(round_i, model=self._model())
        stored = found.state.get("client", {}).get("generators")
        if not isinstance(stored, dict):
            raise StateMismatchError(f"{self.ckptr.folder} round {round_i} was not saved by a "
                                     "ResumableFederatedClient (no client state)")
        generators = {name: generator_of(getattr(self, name)) for name in stored}
        missing = [name for name, rng in generators.items() if rng is None]
        if missing:
            raise StateMismatchError(f"round {round_i} holds random generators for {missing}, "
                                     "which this client's datasets do not have")
        found.apply_optimizer(self.trainmanager.optim)
        self._model().get_wrapped_model().rng_state = found.model.rng_state
        for name, rng in generators.items():
            assert rng is not None
            set_generator_state(rng, stored[name], where=f"round {round_i}: {name} generator")
        modules = [name for name, _ in (found.optimizer_state or {}).get("modules", [])]
        return (f"optimizer state ({', '.join(modules) or 'no modules'}), model random state, "
                f"{len(generators)} data generator(s) from {self.ckptr.folder}")
