"""Bad peers in a real run (websockets on 127.0.0.1): a model that the receive policy refuses,
and updates that do not fit the model. The message is rejected, the run ends on every side
with an error naming the peer and why (and a log line), nothing runs and nothing changes.

The canary: model functions pickled by value (signed by the sender's own key) whose
unpickling creates a file. The control decodes the same bytes under a policy that trusts
that key and allows pickles: the file appears.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from canary_payloads import _Touch
from declearn import messaging
from declearn.utils.serialize import msgpack_deserialize, msgpack_serialize
from federation import Setup, free_port, rounds_on_disk
from federation import forward as federated_forward
from federation import loss as federated_loss
from helpers_models import frozen_mlp_model, xent_loss

import hkstore
from hkstore.errors import RefusedPayloadError
from hkstore.integrations.declearn import (
    DeclearnHaikuModel,
    DeclearnJaxVector,
    HkstoreCheckpointer,
    ResumableFederatedClient,
    set_receive_policy,
)

INFO = {"data_type": "float32", "features_shape": (6,)}


def canary_model(canary: Path, signer_stem: Path, *, initialized: bool) -> DeclearnHaikuModel:
    """A model whose functions travel pickled by value, signed by ``signer_stem``'s key; its
    forward function carries a default argument that creates ``canary`` when unpickled."""
    touch = _Touch(canary)

    def forward(x: Any, _canary: Any = touch) -> Any:  # a closure: pickled by value
        return frozen_mlp_model(x)

    model = DeclearnHaikuModel(hkstore.HaikuModel(forward, xent_loss, seed=0),
                               functions="pickle",
                               signer=hkstore.load_signer(signer_stem.with_suffix(".key")))
    if initialized:
        model.initialize(INFO)
    return model


@pytest.fixture
def attacker(tmp_path: Path) -> Path:
    stem = tmp_path / "attacker"
    hkstore.generate_ed25519_keypair(stem)
    return stem


def permissive(attacker: Path) -> None:
    """The control's policy: pickles signed by the attacker's key run."""
    set_receive_policy(trust=hkstore.Trust(allow_pickle=True,
                                           keys=[attacker.with_suffix(".pub")]))


async def run(server: Any, config: Any, clients: list[Any]) -> list[Any]:
    server.notify_timeout = 10.0
    return await asyncio.wait_for(asyncio.gather(
        server.async_run(config), *(client.async_run() for client in clients),
        return_exceptions=True), timeout=300)


def test_a_client_refuses_the_servers_model_and_the_run_ends_naming_why(
    tmp_path: Path, attacker: Path, caplog: pytest.LogCaptureFixture
) -> None:
    canary = tmp_path / "canary"
    setup, port = Setup(clients=("client-1",), rounds=1), free_port()
    server, config = setup.server(tmp_path / "server", port)
    server.model = canary_model(canary, attacker, initialized=False)
    client = setup.client("client-1", tmp_path / "client-1", port, reconnect_timeout=30)
    with caplog.at_level(logging.WARNING, logger="hkstore.integrations.declearn"):
        server_out, client_out = asyncio.run(run(server, config, [client]))
    assert not canary.exists()
    assert isinstance(server_out, RuntimeError)
    assert "Initialization failed for 1 client(s): client-1 reported an error: client-1 " \
           "refused a message from the server" in str(server_out)
    assert "RefusedCodeError" in str(server_out) and "allow_pickle" in str(server_out)
    assert isinstance(client_out, RuntimeError) and "the server cancelled the run" in str(
        client_out)
    assert isinstance(client_out.__cause__, RefusedPayloadError)
    assert "refused a DeclearnHaikuModel payload: RefusedCodeError" in caplog.text
    # the control: the model the server sent, decoded where pickles by that key are allowed
    sent = msgpack_serialize({"model": server.model})
    permissive(attacker)
    msgpack_deserialize(sent)
    assert canary.exists()


class _Frame:
    """Raw message bytes, sent as they are (a peer does not have to use declearn's classes)."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    def serialize(self) -> bytes:
        return self.data


def hostile_reply(canary: Path, attacker: Path) -> bytes:
    """A ``TrainReply`` frame whose updates are a model carrying the canary."""
    payload = msgpack_serialize({"updates": canary_model(canary, attacker, initialized=True),
                                 "aux_var": {}, "n_epoch": 1, "n_steps": 1, "t_spent": 0.0})
    key = messaging.TrainReply.typekey.encode()
    return bytes([len(key)]) + key + payload


def test_the_server_refuses_a_clients_model_and_the_run_ends_naming_the_client(
    tmp_path: Path, attacker: Path, caplog: pytest.LogCaptureFixture
) -> None:
    canary = tmp_path / "canary"
    frame = hostile_reply(canary, attacker)

    class Hostile(ResumableFederatedClient):
        async def training_round(self, message: messaging.TrainRequest) -> None:
            await self.netwk.send_message(_Frame(frame))  # type: ignore[arg-type]

    setup, port = Setup(rounds=1), free_port()
    server, config = setup.server(tmp_path / "server", port)
    honest = setup.client("client-1", tmp_path / "client-1", port, reconnect_timeout=30)
    other = setup.client("client-2", tmp_path / "client-2", port, reconnect_timeout=30)
    hostile = Hostile(other.netwk, other.train_data, verbose=False, reconnect_timeout=30)
    # receivers take the server's model by reference to the test helpers: nothing else runs
    set_receive_policy(trust=hkstore.Trust(modules=["federation"]))
    with caplog.at_level(logging.WARNING, logger="hkstore.integrations.declearn"):
        server_out, honest_out, hostile_out = asyncio.run(run(server, config, [honest, hostile]))
    assert not canary.exists()
    assert isinstance(server_out, RuntimeError)
    assert "training failed for 1 client(s): client-2 its TrainReply was refused" in str(
        server_out)
    assert "RefusedCodeError" in str(server_out)
    for outcome in (honest_out, hostile_out):  # both were told, neither hangs
        assert isinstance(outcome, RuntimeError) and "cancelled" in str(outcome)
    assert "refused a DeclearnHaikuModel payload" in caplog.text
    # the control: the same frame, decoded where that key's pickles are allowed
    permissive(attacker)
    messaging.SerializedMessage.from_bin_message(frame).deserialize()
    assert canary.exists()


def test_updates_that_do_not_fit_are_refused_naming_every_mismatch_and_change_nothing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """client-2 trains, then bends its updates: one trainable weight left out, a frozen one
    added, a shape and a dtype changed. The server names the client and all four mismatches,
    cancels the run for both clients, and its model and optimizer are those of round 0."""

    class Bending(ResumableFederatedClient):
        async def training_round(self, message: messaging.TrainRequest) -> None:
            assert self.trainmanager is not None
            reply = self.trainmanager.training_round(message)
            assert isinstance(reply, messaging.TrainReply)
            coefs = dict(reply.updates.updates.coefs)
            del coefs["head:b"]
            coefs["encoder:w"] = np.zeros((6, 8), np.float32)
            coefs["hidden:w"] = np.zeros((8, 7), np.float32)
            coefs["hidden:b"] = np.asarray(coefs["hidden:b"], np.float16)
            reply.updates.updates = DeclearnJaxVector(coefs)
            await self.netwk.send_message(reply)

    setup, port = Setup(rounds=1), free_port()
    server, config = setup.server(tmp_path / "server", port)
    honest = setup.client("client-1", tmp_path / "client-1", port, reconnect_timeout=30)
    other = setup.client("client-2", tmp_path / "client-2", port, reconnect_timeout=30)
    bending = Bending(other.netwk, other.train_data, verbose=False, reconnect_timeout=30)
    set_receive_policy(model=federated_forward, loss=federated_loss)
    with caplog.at_level(logging.ERROR, logger="hkstore.integrations.declearn"):
        server_out, honest_out, bending_out = asyncio.run(
            run(server, config, [honest, bending]))
    assert isinstance(server_out, RuntimeError)
    message = str(server_out)
    assert "training failed for 1 client(s): client-2 its TrainReply was refused" in message
    assert "client-1" not in message.split("client(s):", 1)[1]
    for mismatch in ("4 mismatch(es)", "missing 1 name(s): 'head:b'",
                     "unexpected 1 name(s): 'encoder:w'",
                     "'hidden:w': shape (8, 7) given, model has (8, 8)",
                     "'hidden:b': dtype float16 given, model has float32"):
        assert mismatch in message, mismatch
    assert "run cancelled: training failed" in caplog.text  # the log line
    for outcome in (honest_out, bending_out):
        assert isinstance(outcome, RuntimeError) and "cancelled" in str(outcome)
    # nothing was aggregated: the model and the optimizer are those saved at round 0
    assert rounds_on_disk(tmp_path / "server") == [0]
    initial = HkstoreCheckpointer(tmp_path / "server").restore_round(0, model=server.model)
    assert server.model.get_weights() == DeclearnJaxVector(initial.model.get_weights().coefs)
    assert server.optim.get_state() == initial.optimizer_state
