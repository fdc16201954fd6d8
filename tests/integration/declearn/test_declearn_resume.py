"""ResumableFederatedServer / ResumableFederatedClient: a run stopped after round k and
started again finishes exactly as a run that never stopped, and every way a resume cannot
work ends the run with an error naming why.

The runs here are in-process (server and clients on one event loop, real websockets on
127.0.0.1): stopping the server task closes its endpoint as a dead process would. The
multi-process run with SIGKILL is ``test_declearn_federated_run.py``.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import declearn
import numpy as np
import pytest
from declearn.main import FederatedClient
from declearn.utils import set_device_policy as set_declearn_device_policy
from federation import (
    Setup,
    free_port,
    interrupted,
    round_differences,
    rounds_on_disk,
    straight,
)
from federation import forward as federated_forward
from federation import loss as federated_loss
from helpers_models import device_policy

from hkstore.errors import CheckpointExistsError, CheckpointWarning, StateMismatchError
from hkstore.integrations.declearn import HkstoreCheckpointer, set_receive_policy

PARTIES = ("server", "client-1", "client-2")


@pytest.fixture(autouse=True)
def _own_functions() -> None:
    """Receivers use the test's functions (the conftest resets the policy afterwards)."""
    set_receive_policy(model=federated_forward, loss=federated_loss)


def assert_same_runs(a: Path, b: Path) -> None:
    """Every party of run ``b`` holds the rounds of run ``a``, each equal bit for bit."""
    for party in PARTIES:
        rounds = rounds_on_disk(a / party)
        assert rounds_on_disk(b / party) == rounds, party
        for number in rounds:
            assert round_differences(a / party, b / party, number) == [], (party, number)
    for party in PARTIES:
        first = HkstoreCheckpointer(a / party).load_model(timestamp="best").get_weights()
        second = HkstoreCheckpointer(b / party).load_model(timestamp="best").get_weights()
        assert first == second, party


def test_resume_restores_optimizers_sampler_early_stopping_and_a_restarted_client(
    tmp_path: Path,
) -> None:
    """Scaffold (server and client states, aux variables), Adam, a client sampler drawing one
    client per round, early stopping; the server is stopped after round 2, and client-2 with
    it (a new client object: only its checkpoint remains)."""
    setup = Setup(rounds=7, sampler={"strategy": "uniform", "n_samples": 1, "seed": 3},
                  early_stop={"tolerance": 0.0, "patience": 2},
                  client_opt={"lrate": 0.05, "modules": ["scaffold-client"]},
                  server_opt={"lrate": 0.05, "modules": ["scaffold-server", "adam"]})
    asyncio.run(straight(setup, tmp_path / "straight"))
    seen = asyncio.run(interrupted(
        setup, tmp_path / "resumed", after=lambda f: 2 in rounds_on_disk(f / "server"),
        restart_clients=("client-2",)))
    assert seen.server_rounds == [0, 1, 2]
    # early stopping ended both runs after round 4 of 7: had the resumed server fed it only
    # the losses after round 2, it would have gone on
    assert rounds_on_disk(tmp_path / "straight" / "server") == [0, 1, 2, 3, 4]
    assert_same_runs(tmp_path / "straight", tmp_path / "resumed")
    # one client trained per round, and the first draw after the restart (round 3) picked
    # another client than the sampler's first draw ever (round 1): a sampler restarted from
    # its seed would have diverged
    trained = {name: [e["round"] for e in HkstoreCheckpointer(tmp_path / "straight" / name)
                      .history() if "n_steps" in e["metrics"]]
               for name in ("client-1", "client-2")}
    assert sorted(trained["client-1"] + trained["client-2"]) == [1, 2, 3, 4], trained
    assert (1 in trained["client-1"]) != (3 in trained["client-1"]), trained
    history = HkstoreCheckpointer(tmp_path / "straight" / "server").history()
    assert all(len(entry["metrics"]["clients"]) == 2 for entry in history[1:])
    # the metrics history of the resumed server runs across the restart
    resumed = HkstoreCheckpointer(tmp_path / "resumed" / "server")
    assert [e["round"] for e in resumed.history()] == [0, 1, 2, 3, 4]
    assert [e["metrics"] for e in resumed.history()] == [e["metrics"] for e in history]


def test_resume_from_an_older_round_when_the_latest_does_not_verify(tmp_path: Path) -> None:
    """Evaluation every 2 rounds (round 3 is saved after training only), the server stopped
    after round 3, whose state file is then damaged: the server resumes from round 2 (with a
    warning naming round 3), the clients restore their round 2, round 3 is written again,
    and the final evaluation (round 5) closes the run, all as in a straight run."""
    setup = Setup(rounds=5, eval_frequency=2)
    asyncio.run(straight(setup, tmp_path / "straight"))

    def damage(folder: Path) -> None:
        state = folder / "server" / "round-00000003" / "state.safetensors"
        data = bytearray(state.read_bytes())
        data[-1] ^= 0xFF
        state.write_bytes(bytes(data))

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", CheckpointWarning)
        seen = asyncio.run(interrupted(
            setup, tmp_path / "resumed", after=lambda f: 3 in rounds_on_disk(f / "server"),
            between=damage))
    skipped = [str(w.message) for w in caught if issubclass(w.category, CheckpointWarning)]
    assert len(skipped) == 1 and "skipping round 3" in skipped[0], skipped
    assert seen.server_rounds == [0, 1, 2, 3]
    assert all(3 in seen.client_rounds[name] for name in ("client-1", "client-2"))
    assert_same_runs(tmp_path / "straight", tmp_path / "resumed")
    metrics = {e["round"]: e["metrics"] for e in
               HkstoreCheckpointer(tmp_path / "resumed" / "server").history()}
    assert "loss" not in metrics[3] and "loss" in metrics[4] and "loss" in metrics[5]


# --- resuming that cannot work ----------------------------------------------------------------


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A finished one-round run (its directories are copied by each test)."""
    folder = tmp_path_factory.mktemp("finished")
    set_declearn_device_policy(gpu=False, idx=0)
    set_receive_policy(model=federated_forward, loss=federated_loss)
    try:
        with device_policy(gpu=False):
            asyncio.run(straight(Setup(rounds=1), folder))
    finally:
        set_receive_policy()
    yield folder


def copy_run(finished: Path, tmp_path: Path) -> Path:
    shutil.copytree(finished, tmp_path / "run")
    return tmp_path / "run"


async def resume_with(setup: Setup, folder: Path, port: int, clients: list[Any],
                      **server_options: Any) -> list[Any]:
    """Resume the server of ``folder`` with these clients; return every party's outcome."""
    server, config = setup.server(folder / "server", port, **server_options)
    server.notify_timeout = 1.0  # a client that is gone never collects the cancellation
    return await asyncio.wait_for(asyncio.gather(
        server.async_run(config), *(client.async_run() for client in clients),
        return_exceptions=True), timeout=300)


def test_a_client_without_that_round_stops_the_resume_naming_itself(
    finished: Path, tmp_path: Path
) -> None:
    folder = copy_run(finished, tmp_path)
    shutil.rmtree(folder / "client-2")  # its checkpoint is gone
    setup, port = Setup(rounds=1), free_port()
    clients = [setup.client(name, folder / name, port) for name in setup.clients]
    server_out, *client_out = asyncio.run(resume_with(setup, folder, port, clients))
    assert isinstance(server_out, RuntimeError)
    assert "clients could not resume from round 1" in str(server_out)
    assert "client-2: client-2 cannot resume from round 1: CheckpointNotFoundError" in str(
        server_out)
    assert "client-1" not in str(server_out).split("round 1:", 1)[1].split("client-2")[0]
    for outcome in client_out:  # both were told
        assert isinstance(outcome, RuntimeError) and "cancelled" in str(outcome)


def test_require_state_false_lets_a_client_without_that_round_go_on(
    finished: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    folder = copy_run(finished, tmp_path)
    shutil.rmtree(folder / "client-2")
    setup, port = Setup(rounds=1), free_port()
    clients = [setup.client(name, folder / name, port, require_state=(name != "client-2"))
               for name in setup.clients]
    with caplog.at_level(logging.WARNING, logger="hkstore.integrations.declearn"):
        outcomes = asyncio.run(resume_with(setup, folder, port, clients))
    assert outcomes == [None, None, None]
    assert "client-2: no state of round 1 to restore" in caplog.text


def test_a_declearn_client_cannot_resume_and_the_server_says_so(
    finished: Path, tmp_path: Path
) -> None:
    folder = copy_run(finished, tmp_path)
    setup, port = Setup(rounds=1), free_port()
    plain = setup.client("client-2", None, port)
    declearn_client = FederatedClient(plain.netwk, plain.train_data, verbose=False)
    clients = [setup.client("client-1", folder / "client-1", port), declearn_client]
    server_out, _, declearn_out = asyncio.run(
        resume_with(setup, folder, port, clients, resume_timeout=3.0))
    assert isinstance(server_out, RuntimeError)
    assert "client-2: no answer within 3 s" in str(server_out)
    assert "run a ResumableFederatedClient" in str(server_out)
    assert isinstance(declearn_out, ValueError)  # declearn's client: an unknown message


def test_resume_false_refuses_a_directory_that_holds_rounds(
    finished: Path, tmp_path: Path
) -> None:
    folder = copy_run(finished, tmp_path)
    server, config = Setup(rounds=1).server(folder / "server", free_port(), resume=False)
    with pytest.raises(CheckpointExistsError, match=r"holds rounds \[0, 1\] and resume=False"):
        asyncio.run(asyncio.wait_for(server.async_run(config), timeout=60))
    assert rounds_on_disk(folder / "server") == [0, 1]


def test_a_saved_optimizer_state_that_does_not_fit_changes_nothing(
    finished: Path, tmp_path: Path
) -> None:
    """Resuming with another server optimizer (momentum instead of Adam) fails before any
    network activity, naming the round; the model and optimizer are left as they were."""
    folder = copy_run(finished, tmp_path)
    setup = Setup(rounds=1, server_opt={"lrate": 0.05, "modules": ["momentum"]})
    server, config = setup.server(folder / "server", free_port())
    before = server.optim.get_state()
    with pytest.raises(StateMismatchError, match="round 1: the saved optimizer state does not"):
        asyncio.run(asyncio.wait_for(server.async_run(config), timeout=60))
    assert server.model.required_data_info  # still the constructor's uninitialized model
    assert str(server.optim.get_state()) == str(before)


def test_every_round_a_resumable_client_saves_is_numbered_as_the_servers(
    finished: Path,
) -> None:
    """Round 0 after initialization, then one round per training round (evaluated)."""
    for name in ("client-1", "client-2"):
        ckpt = HkstoreCheckpointer(finished / name)
        assert ckpt.rounds() == [0, 1]
        found = ckpt.restore_round(1, model=None)
        assert found.metrics["n_steps"] == 4 and len(found.metrics["training_losses"]) == 4
        assert "loss" in found.metrics  # the evaluation's
        assert set(found.state["client"]["generators"]) == {"train_data"}
        assert found.optimizer_config is not None
    server = HkstoreCheckpointer(finished / "server").restore_round(1, model=None)
    assert server.state["server"]["stop"] is True and server.state["server"]["finished"]
    assert np.isfinite(server.metrics["loss"])
    assert set(server.metrics["clients"]) == {"client-1", "client-2"}


def test_tripwire_the_declearn_internals_resuming_relies_on(tmp_path: Path) -> None:
    """What the resumable classes read or override in declearn 2.9 is where they expect it;
    this fails naming the declearn version when it moves."""
    from declearn.client_sampler import UniformClientSampler
    from declearn.communication.api import NetworkServer
    from declearn.dataset import InMemoryDataset
    from declearn.main import FederatedServer
    from declearn.main.utils import Checkpointer, EarlyStopping

    missing = [f"FederatedServer.{name}" for name in (
        "_checkpoint_after_evaluation", "_keep_training", "_collect_results",
        "_select_training_round_participants", "_select_evaluation_round_participants",
        "initialization", "fairness_round", "training_round", "evaluation_round",
        "stop_training") if not callable(getattr(FederatedServer, name, None))]
    missing += [f"FederatedClient.{name}" for name in (
        "register", "initialize", "handle_message", "training_round", "evaluation_round",
        "cancel_training") if not callable(getattr(FederatedClient, name, None))]
    missing += [f"NetworkServer.{name}" for name in ("wait_for_messages",
                "wait_for_messages_with_timeout", "send_messages", "broadcast_message")
                if not callable(getattr(NetworkServer, name, None))]
    data = InMemoryDataset(data=np.zeros((2, 1)), target=np.zeros(2), seed=0)
    for owner in (data, UniformClientSampler(n_samples=1, seed=0)):
        if not isinstance(getattr(owner, "_rng", None), np.random.Generator):
            missing.append(f"{type(owner).__name__}._rng (a numpy Generator)")
    early = EarlyStopping()
    if not callable(getattr(early, "update", None)):
        missing.append("EarlyStopping.update")
    ckpt = HkstoreCheckpointer(tmp_path)
    if Checkpointer.from_specs(ckpt) is not ckpt:
        missing.append("Checkpointer.from_specs(instance)")
    assert not missing, (f"declearn {declearn.__version__}: the resumable server and client "
                         f"rely on what moved: {missing}")
