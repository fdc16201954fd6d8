"""HkstoreCheckpointer and the state conversions it relies on: declearn optimizer states,
random generators and client samplers as arrays plus JSON, and declearn's Checkpointer API
over hkstore rounds (in a process, and driven by declearn's own server and client)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import declearn
import jax.numpy as jnp
import numpy as np
import pytest
from declearn.client_sampler import (
    CompositionClientSampler,
    CriterionClientSampler,
    UniformClientSampler,
    WeightedClientSampler,
)
from declearn.client_sampler.criterion import ConstantCriterion
from declearn.main import FederatedClient, FederatedServer
from declearn.main.config import FLRunConfig
from declearn.main.utils import Checkpointer
from declearn.model.sklearn import NumpyVector
from declearn.optimizer import Optimizer
from federation import Setup, free_port, rounds_on_disk
from federation import forward as federated_forward
from federation import loss as federated_loss
from helpers_models import frozen_mlp_model, xent_loss

import hkstore
from hkstore.errors import (
    CheckpointExistsError,
    CheckpointNotFoundError,
    RefusedCodeError,
    StateMismatchError,
)
from hkstore.integrations.declearn import (
    DeclearnHaikuModel,
    DeclearnJaxVector,
    HkstoreCheckpointer,
    ResumableFederatedServer,
    set_receive_policy,
)
from hkstore.integrations.declearn._states import (
    ClientSet,
    from_tree,
    generator_state,
    order_sampler_clients,
    restore_sampler,
    sampler_state,
    set_generator_state,
    to_tree,
)

INFO = {"data_type": "float32", "features_shape": (5,)}
OPTIMIZERS = {
    "adam": {"lrate": 0.01, "modules": ["adam"]},
    "momentum+clip": {"lrate": 0.1, "modules": [("momentum", {"beta": 0.9}), "l2-clipping"]},
    "yogi+rmsprop": {"lrate": 0.1, "modules": ["yogi", "rmsprop"],
                     "regularizers": ["fedprox"]},
    "scaffold-client": {"lrate": 0.1, "modules": ["scaffold-client", "adagrad"]},
    "scaffold-server": {"lrate": 1.0, "modules": ["scaffold-server"]},
}


def model(seed: int = 0) -> DeclearnHaikuModel:
    wrapped = DeclearnHaikuModel(hkstore.HaikuModel(frozen_mlp_model, xent_loss, seed=seed),
                                 trainable=lambda module, name, value: module != "encoder")
    wrapped.initialize(INFO)
    return wrapped


def stepped(config: dict[str, Any], steps: int = 2) -> tuple[Optimizer, DeclearnHaikuModel]:
    """An optimizer that took ``steps`` steps on a model (its state is not the initial one)."""
    optim, net = Optimizer.from_config(config), model()
    for i in range(steps):
        grads = net.get_weights(trainable=True) * (0.01 * (i + 1))
        optim.apply_gradients(net, grads)
    return optim, net


# --- states -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_an_optimizer_state_goes_through_a_round_and_the_next_step_is_the_same(
    name: str, tmp_path: Path
) -> None:
    optim, net = stepped(OPTIMIZERS[name])
    with HkstoreCheckpointer(tmp_path) as ckpt:
        ckpt.save_round(3, net, optimizer=optim)
    found = HkstoreCheckpointer(tmp_path).restore_round(3, model=net)
    fresh = Optimizer.from_config(found.optimizer_config)
    found.apply_optimizer(fresh)
    for each in (fresh, optim):  # regularizers (FedProx) keep no state across rounds: they
        each.start_round()       # take the weights at the start of each round
    grads = net.get_weights(trainable=True) * 0.03
    assert fresh.compute_updates_from_gradients(net, grads) == \
        optim.compute_updates_from_gradients(net, grads)
    assert str(fresh.get_state()) == str(optim.get_state())


def test_vectors_come_back_as_their_own_class_and_dtype() -> None:
    state = {"a": DeclearnJaxVector({"w": jnp.ones(3, jnp.bfloat16)}),
             "b": [NumpyVector({"w": np.arange(2.0)}), ("name", 0.5, None)]}
    back = from_tree(to_tree(state))
    assert type(back["a"]) is DeclearnJaxVector and back["a"] == state["a"]
    assert back["a"].coefs["w"].dtype == jnp.bfloat16
    assert type(back["b"][0]) is NumpyVector and back["b"][1] == ("name", 0.5, None)


def test_what_cannot_be_stored_is_named_path_by_path() -> None:
    with pytest.raises(StateMismatchError) as err:
        to_tree({"ok": 1, "obj": object(), "keys": {1: 2}, "nested": [{"declearn_vector": 1}]})
    message = str(err.value)
    assert "$['obj']: builtins.object" in message
    assert "$['keys']: key 1 is not a string" in message
    assert "$['nested'][0]: a dict holding the reserved key 'declearn_vector'" in message


def test_a_stored_vector_type_must_be_registered_and_nothing_is_imported(tmp_path: Path) -> None:
    canary = tmp_path / "imported"
    tree = {"v": {"declearn_vector": "mypkg.evil:Vector", "coefs": {"w": np.ones(1)}},
            "u": {"declearn_vector": "numpy", "coefs": {"w": np.ones(1)}},
            "bad": {"declearn_vector": "numpy"}}
    with pytest.raises(StateMismatchError) as err:
        from_tree(tree)
    assert "$['v']: vector type 'mypkg.evil:Vector' is not registered" in str(err.value)
    assert "$['bad']: a stored vector holds" in str(err.value)
    assert "$['u']" not in str(err.value)  # the control: a registered name rebuilds
    assert not canary.exists()


@pytest.mark.parametrize("kind", [np.random.PCG64, np.random.MT19937, np.random.Philox,
                                  np.random.SFC64])
def test_a_generator_state_is_plain_json_and_restores_the_stream(kind: Any) -> None:
    rng = np.random.Generator(kind(7))
    rng.random(5)
    state = json.loads(json.dumps(generator_state(rng)))  # plain JSON, big integers included
    again = np.random.Generator(kind(99))
    set_generator_state(again, state)
    assert np.array_equal(again.random(8), rng.random(8))


def test_a_generator_of_another_kind_is_refused() -> None:
    state = generator_state(np.random.Generator(np.random.MT19937(0)))
    rng = np.random.default_rng(1)
    before = rng.bit_generator.state
    with pytest.raises(StateMismatchError, match="a 'MT19937' generator, this one is a 'PCG64'"):
        set_generator_state(rng, state, where="test generator")
    assert rng.bit_generator.state == before


def samplers() -> dict[str, Any]:
    return {
        "uniform": UniformClientSampler(n_samples=2, seed=5),
        "weighted": WeightedClientSampler(
            n_samples=2, client_to_weight={f"c{i}": i + 1.0 for i in range(5)}, seed=5),
        "criterion": CriterionClientSampler(n_samples=2, criterion=ConstantCriterion(1.0)),
        "composition": CompositionClientSampler([UniformClientSampler(n_samples=1, seed=1),
                                                 UniformClientSampler(n_samples=1, seed=2)]),
    }


@pytest.mark.parametrize("name", ["uniform", "weighted", "criterion", "composition"])
def test_a_client_sampler_draws_the_same_clients_after_a_restore(name: str) -> None:
    clients = {f"c{i}" for i in range(5)}
    first = samplers()[name]
    first.init_clients(clients)
    order_sampler_clients(first)
    for _ in range(3):
        first.run()
    state = json.loads(json.dumps(sampler_state(first)))
    second = samplers()[name]
    second.init_clients(set(reversed(sorted(clients))))
    order_sampler_clients(second)
    restore_sampler(second, state)
    assert [sorted(first.run()) for _ in range(6)] == [sorted(second.run()) for _ in range(6)]


def test_a_sampler_of_another_kind_is_refused() -> None:
    state = sampler_state(UniformClientSampler(n_samples=1, seed=0))
    with pytest.raises(StateMismatchError, match="'UniformClientSampler' sampler's state, "
                                                 "this server uses a 'WeightedClientSampler'"):
        restore_sampler(WeightedClientSampler(n_samples=1, client_to_weight={"a": 1.0}), state)


def test_a_client_set_iterates_sorted_whatever_the_insertion_order() -> None:
    names = [f"client-{i}" for i in range(20)]
    forward_set, backward_set = ClientSet(names), ClientSet(reversed(names))
    assert list(forward_set) == list(backward_set) == sorted(names)
    assert list(forward_set - {"client-3"}) == sorted(set(names) - {"client-3"})
    assert isinstance(forward_set.difference({"x"}), ClientSet)
    assert isinstance(forward_set & {"client-1"}, ClientSet)


# --- HkstoreCheckpointer: declearn's Checkpointer API ---------------------------------------


def test_it_is_a_declearn_checkpointer_that_declearns_classes_accept(tmp_path: Path) -> None:
    ckpt = HkstoreCheckpointer(tmp_path / "a")
    assert isinstance(ckpt, Checkpointer) and Checkpointer.from_specs(ckpt) is ckpt
    built = HkstoreCheckpointer.from_specs({"folder": str(tmp_path / "b"), "keep_last": 2})
    assert isinstance(built, HkstoreCheckpointer) and built.max_history == 2
    from hkstore.integrations.declearn._server import as_hkstore_checkpointer
    with pytest.raises(TypeError, match="resuming needs an HkstoreCheckpointer"):
        as_hkstore_checkpointer(Checkpointer(str(tmp_path / "c")), "test")


def test_checkpoint_numbers_rounds_and_never_mixes_two_runs(tmp_path: Path) -> None:
    net, optim = model(), Optimizer.from_config(OPTIMIZERS["adam"])
    with HkstoreCheckpointer(tmp_path) as ckpt:
        labels = [ckpt.checkpoint(net, optim, first_call=True),
                  ckpt.checkpoint(net, optim, {"loss": 0.5}),
                  ckpt.checkpoint(net, optim, {"loss": np.float32(0.25), "acc": np.nan})]
    assert labels == ["round_0", "round_1", "round_2"]
    again = HkstoreCheckpointer(tmp_path)  # a restart: numbering goes on
    assert again.checkpoint(net, optim, {"loss": 0.1}) == "round_3"
    with pytest.raises(CheckpointExistsError, match=r"already holds rounds \[0, 1, 2, 3\]"):
        again.checkpoint(net, optim, first_call=True)
    again.close()
    history = HkstoreCheckpointer(tmp_path).history()
    assert [(e["round"], e["metrics"]) for e in history] == [
        (0, {}), (1, {"loss": 0.5}), (2, {"acc": "nan", "loss": 0.25}), (3, {"loss": 0.1})]
    with pytest.raises(TypeError, match="needs the model"):
        HkstoreCheckpointer(tmp_path / "x").checkpoint(None, optim)


def test_metrics_saved_apart_are_appended_and_kept_across_restarts(tmp_path: Path) -> None:
    ckpt = HkstoreCheckpointer(tmp_path)
    ckpt.save_metrics({"loss": 1.0}, prefix="metrics_client-1", append=False,
                      timestamp="round_1")
    HkstoreCheckpointer(tmp_path).save_metrics(  # a new run: declearn would start afresh
        {"loss": 0.5, "hist": np.array([1, 2])}, prefix="metrics_client-1", append=False,
        timestamp="round_2")
    path = tmp_path / "declearn-metrics" / "metrics_client-1.jsonl"
    with open(path, "a") as handle:  # a line a crash cut short is skipped
        handle.write('{"label": "round_3", "metr')
    found = HkstoreCheckpointer(tmp_path).load_metrics("metrics_client-1")
    assert list(found) == ["round_1", "round_2"]
    assert np.array_equal(found["round_2"]["hist"], [1, 2])
    assert HkstoreCheckpointer(tmp_path).load_metrics("metrics_client-1", "round_1") == {
        "round_1": {"loss": 1.0}}
    frame = HkstoreCheckpointer(tmp_path).load_scalar_metrics("metrics_client-1")
    assert list(frame.index) == ["round_1", "round_2"] and list(frame["loss"]) == [1.0, 0.5]
    with pytest.raises(ValueError, match="is not a plain name"):
        ckpt.save_metrics({"a": 1}, prefix="../escape")
    with pytest.raises(FileNotFoundError):
        ckpt.load_metrics("nothing")


def test_models_and_optimizers_load_back(tmp_path: Path) -> None:
    optim, net = stepped(OPTIMIZERS["momentum+clip"])
    with HkstoreCheckpointer(tmp_path) as ckpt:
        ckpt.save_round(0, net, optimizer=optim)
        assert ckpt.save_model(net, timestamp="best") == "best"
        assert ckpt.save_model(net, state=False) is None
        with pytest.raises(NotImplementedError, match="with their round"):
            ckpt.save_optimizer(optim)
    ckpt = HkstoreCheckpointer(tmp_path)
    target = DeclearnHaikuModel(hkstore.HaikuModel(frozen_mlp_model, xent_loss, seed=9))
    for label in (None, "round_0", "best"):
        loaded = ckpt.load_model(target, timestamp=label)
        assert loaded is target and loaded.get_weights() == net.get_weights()
        assert loaded.get_weight_names(trainable=True) == net.get_weight_names(trainable=True)
    rebuilt = ckpt.load_optimizer(model=net)
    assert str(rebuilt.get_state()) == str(optim.get_state())
    with pytest.raises(CheckpointNotFoundError, match="not a round label"):
        ckpt.load_optimizer(timestamp="yesterday", model=net)
    with pytest.raises(CheckpointNotFoundError, match="no model 'other'"):
        ckpt.load_model(target, timestamp="other")


def test_loading_without_a_model_follows_the_receive_policy(tmp_path: Path) -> None:
    net = model()
    with HkstoreCheckpointer(tmp_path, functions="reference") as ckpt:
        ckpt.save_round(0, net)
    with pytest.raises(RefusedCodeError):  # the default policy imports nothing it was not told
        HkstoreCheckpointer(tmp_path).load_model()
    set_receive_policy(trust=hkstore.Trust(modules=["helpers_models"]))
    assert HkstoreCheckpointer(tmp_path).load_model().get_weights() == net.get_weights()


def test_functions_auto_stores_references_when_importable_else_none(tmp_path: Path) -> None:
    def local_forward(x: Any) -> Any:  # a closure: not importable
        return frozen_mlp_model(x)

    closure = DeclearnHaikuModel(hkstore.HaikuModel(local_forward, xent_loss, seed=0))
    closure.initialize(INFO)
    for folder, net in (("ref", model()), ("none", closure)):
        with HkstoreCheckpointer(tmp_path / folder) as ckpt:
            ckpt.save_round(0, net)
            ckpt.save_round(1, net)
    kinds = {}
    for folder in ("ref", "none"):
        with hkstore.open_archive(tmp_path / folder / "round-00000001" / "model.hkz") as archive:
            kinds[folder] = archive.manifest.functions.to_dict()["model"]["kind"]
    assert kinds == {"ref": "reference", "none": "none"}
    found = HkstoreCheckpointer(tmp_path / "none").restore_round(1, model=closure)
    assert found.model.get_weights() == closure.get_wrapped_model().get_weights()


def test_only_hkstore_models_are_saved(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="saves hkstore models"):
        HkstoreCheckpointer(tmp_path).save_round(0, object())  # type: ignore[arg-type]
    with pytest.raises(StateMismatchError, match="'optimizer' is reserved"):
        HkstoreCheckpointer(tmp_path).save_round(0, model(), state={"optimizer": 1})
    assert rounds_on_disk(tmp_path) == []


# --- driven by declearn's own FederatedServer and FederatedClient -----------------------------


def test_declearns_own_server_and_clients_write_numbered_rounds(tmp_path: Path) -> None:
    """declearn's classes, unchanged, with HkstoreCheckpointer: rounds 0, 1, 2 on every party,
    the clients' metrics and training losses in the metrics files, the best model; such
    rounds hold no resumable server state, which ResumableFederatedServer says."""
    set_receive_policy(model=federated_forward, loss=federated_loss)
    setup, port = Setup(rounds=2), free_port()
    server = FederatedServer(setup.model(), setup.netwk(port), setup.optim(),
                             checkpoint=HkstoreCheckpointer(tmp_path / "server"))
    clients = []
    for name in setup.clients:
        ours = setup.client(name, None, port)
        clients.append(FederatedClient(ours.netwk, ours.train_data, verbose=False,
                                       checkpoint=HkstoreCheckpointer(tmp_path / name)))
    config = FLRunConfig.from_params(rounds=2, register={"min_clients": 2, "max_clients": 2,
                                                         "timeout": 120},
                                     training={"batch_size": 8}, evaluate={"batch_size": 32})

    async def run() -> None:
        await asyncio.wait_for(asyncio.gather(server.async_run(config),
                                              *(c.async_run() for c in clients)), timeout=300)

    asyncio.run(run())
    for party in ("server", *setup.clients):
        assert rounds_on_disk(tmp_path / party) == [0, 1, 2], party
        assert (tmp_path / party / "model-best.hkz").is_file()
    server_ckpt = HkstoreCheckpointer(tmp_path / "server")
    assert set(server_ckpt.load_metrics()) == {"round_0", "round_1", "round_2"}
    assert set(server_ckpt.load_metrics("metrics_client-1")) == {"round_1", "round_2"}
    losses = HkstoreCheckpointer(tmp_path / "client-1").load_metrics("training_losses")
    assert set(losses) == {"round_1", "round_2"} and len(losses["round_1"]["training_losses"])
    resume, config = setup.server(tmp_path / "server", free_port())
    assert isinstance(resume, ResumableFederatedServer)
    with pytest.raises(StateMismatchError, match="was not saved by a ResumableFederatedServer"):
        asyncio.run(asyncio.wait_for(resume.async_run(config), timeout=60))
    assert declearn.__version__  # the run above used this declearn
