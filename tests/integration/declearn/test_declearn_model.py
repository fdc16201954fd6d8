"""DeclearnHaikuModel: declearn's Model API over an hkstore.HaikuModel, its two wire forms
(archive for msgpack, config for JSON), the receive policy, frozen layers and bad updates."""

from __future__ import annotations

import copy
import sys
from pathlib import Path
from typing import Any

import haiku as hk
import jax
import ml_dtypes
import numpy as np
import pytest
from declearn.model.api import Model
from declearn.optimizer import Optimizer
from declearn.utils import DevicePolicy as DeclearnPolicy
from declearn.utils import access_registered
from declearn.utils import set_device_policy as set_declearn_device_policy
from declearn.utils.serialize import (
    json_deserialize,
    json_serialize,
    msgpack_deserialize,
    msgpack_serialize,
)
from helpers_models import CASES, frozen_mlp_model, mlp_model, mse_loss, xent_loss

import hkstore
from hkstore.errors import (
    NotImportableError,
    NotInitializedError,
    RefusedCodeError,
    RefusedPayloadError,
    WeightsMismatchError,
)
from hkstore.integrations.declearn import (
    TYPEKEY,
    DeclearnHaikuModel,
    DeclearnJaxVector,
    set_receive_policy,
)

INFO = {"data_type": "float32", "features_shape": (5,)}
TOYS = hkstore.Trust(modules=["helpers_models"])
ENCODER = ["encoder:b", "encoder:w"]


def frozen_server_model(seed: int = 0) -> DeclearnHaikuModel:
    """A server-side model: not initialized yet, the encoder to be frozen at initialize."""
    return DeclearnHaikuModel(
        hkstore.HaikuModel(frozen_mlp_model, xent_loss, seed=seed),
        trainable=lambda module, name, value: module != "encoder",
    )


def host(vector: Any) -> dict[str, np.ndarray]:
    return {name: np.asarray(value) for name, value in vector.coefs.items()}


# --- construction ---------------------------------------------------------------------------


def test_a_declearn_model_of_its_own_name_wrapping_an_hkstore_model() -> None:
    assert DeclearnHaikuModel.typekey == TYPEKEY == "hkstore-haiku"
    assert access_registered(TYPEKEY, group="Model") is DeclearnHaikuModel
    assert DeclearnHaikuModel.__name__ not in ("HaikuModel",) and TYPEKEY != "haiku"
    inner = hkstore.HaikuModel(mlp_model, xent_loss, seed=4)
    wrapped = DeclearnHaikuModel(inner)
    assert isinstance(wrapped, Model) and wrapped.get_wrapped_model() is inner
    # declearn's HaikuModel(model, loss, seed) form builds the same model
    dropin = DeclearnHaikuModel(mlp_model, xent_loss, 4)
    wrapped.initialize(INFO)
    dropin.initialize(INFO)
    assert dropin.get_weights() == wrapped.get_weights()
    assert isinstance(wrapped.get_weights(), DeclearnJaxVector)


def test_every_engine_name_of_the_package_resolves() -> None:
    import hkstore.integrations.declearn as package
    from hkstore.integrations.declearn import _engine

    assert package._ENGINE <= set(package.__all__)
    for name in sorted(package._ENGINE):
        assert getattr(package, name) is getattr(_engine, name), name


@pytest.mark.parametrize(
    ("args", "kwargs", "message"),
    [
        (("an hkstore model", xent_loss), {}, "as it is"),
        ((mlp_model,), {}, "needs a loss"),
        (("mlp",), {}, "got str"),
        ((mlp_model, xent_loss), {"functions": "eval"}, "functions must be one of"),
    ],
)
def test_construction_refuses_what_it_cannot_use(args: tuple, kwargs: dict, message: str) -> None:
    if args[0] == "an hkstore model":
        args = (hkstore.HaikuModel(mlp_model, xent_loss, seed=0), *args[1:])
    with pytest.raises(TypeError, match=message):
        DeclearnHaikuModel(*args, **kwargs)


def test_declearn_device_policy_is_followed_and_reported_as_the_device_in_use() -> None:
    set_declearn_device_policy(gpu=False, idx=1)
    model = DeclearnHaikuModel(mlp_model, xent_loss, 0)  # built on declearn's policy
    model.initialize(INFO)
    cpu0, cpu1 = jax.devices("cpu")[:2]
    assert model.device_policy == DeclearnPolicy(gpu=False, idx=1)
    assert all(v.devices() == {cpu1} for v in model.get_weights().coefs.values())
    model.update_device_policy(DeclearnPolicy(gpu=False, idx=0))
    assert model.device_policy == DeclearnPolicy(gpu=False, idx=0)
    assert all(v.devices() == {cpu0} for v in model.get_weights().coefs.values())
    model.update_device_policy()  # None: declearn's global policy
    assert model.device_policy == DeclearnPolicy(gpu=False, idx=1)
    assert hkstore.get_device_policy() == hkstore.DevicePolicy(gpu=False)  # left as it was


def test_params_and_weight_names_read_as_with_declearns_haiku_model() -> None:
    model = DeclearnHaikuModel(frozen_mlp_model, xent_loss, 0)
    assert model._params == {}
    model.initialize(INFO)
    params = model._params
    assert list(params) == ["encoder", "head", "hidden"]
    assert [f"{m}:{p}" for m, inner in params.items() for p in inner] == model.get_weight_names()
    model.set_trainable_weights({k: v for i, (k, v) in enumerate(params.items()) if i != 1})
    assert model.get_weight_names(trainable=True) == [*ENCODER, "hidden:b", "hidden:w"]
    before = model.get_weights()
    params["head"]["w"] = params["head"]["w"] + 1.0  # a copy: the model does not change
    assert model.get_weights() == before


# --- frozen layers: the criterion is applied where declearn's server can't reach --------------


def test_trainable_criterion_is_applied_inside_initialize() -> None:
    model = frozen_server_model()
    assert model.required_data_info == {"data_type", "features_shape"}
    model.initialize(INFO)  # what FederatedServer does after collecting the data info
    assert model.required_data_info == set()
    trainable = model.get_weight_names(trainable=True)
    assert trainable == ["head:b", "head:w", "hidden:b", "hidden:w"]
    assert set(model.get_weights(trainable=True).coefs) == set(trainable)
    grads = model.compute_batch_gradients(CASES[1].batch())
    assert list(grads.coefs) == trainable and isinstance(grads, DeclearnJaxVector)
    # an already initialized model gets the criterion at once
    ready = hkstore.HaikuModel(frozen_mlp_model, xent_loss, seed=0)
    ready.initialize(INFO)
    assert DeclearnHaikuModel(ready, trainable=ENCODER).get_weight_names(True) == ENCODER


def test_a_criterion_that_does_not_fit_leaves_the_model_uninitialized() -> None:
    model = DeclearnHaikuModel(hkstore.HaikuModel(mlp_model, xent_loss, seed=0),
                               trainable=["no/such:w"])
    with pytest.raises(WeightsMismatchError, match="'no/such:w'"):
        model.initialize(INFO)
    assert model.required_data_info == {"data_type", "features_shape"}
    with pytest.raises(NotInitializedError):
        model.get_weights()


def test_msgpack_form_is_an_archive_that_keeps_frozen_weights_mask_and_rng() -> None:
    """declearn's InitRequest carries the server's model: clients get every weight exactly."""
    server = frozen_server_model(seed=1)
    server.initialize(INFO)
    server.compute_batch_gradients(CASES[1].batch())  # the random state moves on
    dump = server.get_config(allow_bin=True)
    assert set(dump) == {"typekey", "archive"} and dump["typekey"] == TYPEKEY
    with hkstore.open_archive(dump["archive"]) as archive:
        assert archive.manifest.trainable == ("head:b", "head:w", "hidden:b", "hidden:w")
        assert archive.manifest.data_info == {"data_type": "float32", "features_shape": [5]}
    set_receive_policy(model=frozen_mlp_model, loss=xent_loss)
    client = msgpack_deserialize(msgpack_serialize(server))  # what a client decodes
    assert isinstance(client, DeclearnHaikuModel)
    inner, original = client.get_wrapped_model(), server.get_wrapped_model()
    assert client.get_weights() == server.get_weights()  # frozen ones included
    assert client.get_weight_names(trainable=True) == server.get_weight_names(trainable=True)
    assert inner.rng_state == original.rng_state and inner.data_info == original.data_info
    # after the InitRequest declearn sends trainable weights only: they fit on the client
    client.set_weights(server.get_weights(trainable=True) * 2.0, trainable=True)


def test_json_form_is_the_hkstore_config_and_declearns_dispatch_reads_it() -> None:
    model = frozen_server_model(seed=2)
    model.initialize(INFO)
    config = json_deserialize(json_serialize(model.get_config()))
    assert set(config) == {"typekey", "config"}
    assert config["config"]["format"] == "hkstore-config"
    assert config["config"]["trainable"] == model.get_weight_names(trainable=True)
    with pytest.raises(RefusedPayloadError, match="module 'helpers_models' is not in the allow"):
        Model.from_config(copy.deepcopy(config))
    set_receive_policy(trust=TOYS)
    again = Model.from_config(copy.deepcopy(config))  # FederatedServer(model=dict) does this
    assert isinstance(again, DeclearnHaikuModel)
    assert again.get_weights() == model.get_weights()  # same seed, same weights
    assert again.get_config() == model.get_config()


def test_an_uninitialized_model_travels_as_a_config_in_both_forms() -> None:
    model = DeclearnHaikuModel(hkstore.HaikuModel(mlp_model, xent_loss, seed=5))
    assert set(model.get_config(allow_bin=True)) == {"typekey", "config"}
    set_receive_policy(trust=TOYS)
    again = msgpack_deserialize(msgpack_serialize(model))
    assert again.required_data_info == {"data_type", "features_shape"}
    again.initialize(INFO)
    model.initialize(INFO)
    assert again.get_weights() == model.get_weights()


def test_functions_auto_sends_references_or_nothing_never_code() -> None:
    def local_forward(x: jax.Array) -> jax.Array:  # a closure: not importable
        return hk.Linear(2, name="lin")(x)

    local = DeclearnHaikuModel(local_forward, mse_loss, 0)
    local.initialize({"data_type": "float32", "features_shape": (3,)})
    functions = local.get_config()["config"]["functions"]
    assert {role: spec["kind"] for role, spec in functions.items()} == {
        "model": "none", "loss": "none"}
    with hkstore.open_archive(local.get_config(True)["archive"]) as archive:
        assert archive.manifest.functions.model.kind == "none"
    importable = DeclearnHaikuModel(mlp_model, xent_loss, 0).get_config()["config"]["functions"]
    assert importable["model"] == {"kind": "reference", "ref": "helpers_models:mlp_model",
                                   "kwargs": {}}
    strict = DeclearnHaikuModel(local_forward, mse_loss, 0, functions="reference")
    with pytest.raises(NotImportableError):
        strict.get_config()
    # the receiver passes its own functions
    set_receive_policy(model=local_forward, loss=mse_loss)
    received = msgpack_deserialize(msgpack_serialize(local))
    assert received.get_weights() == local.get_weights()


def test_signed_pickled_functions_need_the_receivers_key() -> None:
    offset = 0.5

    def shifted(x: jax.Array) -> jax.Array:
        return hk.Linear(2, name="lin")(x) + offset

    key = hkstore.HmacKey.generate()
    sender = DeclearnHaikuModel(shifted, mse_loss, 0, functions="pickle", signer=key)
    sender.initialize({"data_type": "float32", "features_shape": (3,)})
    wire = msgpack_serialize(sender)
    for trust in (hkstore.Trust(), hkstore.Trust(allow_pickle=True),
                  hkstore.Trust(allow_pickle=True, keys=[hkstore.HmacKey.generate()])):
        set_receive_policy(trust=trust)
        with pytest.raises(RefusedPayloadError) as refused:
            msgpack_deserialize(wire)
        assert isinstance(refused.value.__cause__, RefusedCodeError | hkstore.errors.SignatureError)
    set_receive_policy(trust=hkstore.Trust(allow_pickle=True, keys=[key]))
    received = msgpack_deserialize(wire)
    x = np.ones((2, 3), np.float32)
    np.testing.assert_array_equal(
        received.compute_batch_predictions((x, np.zeros((2, 2), np.float32), None))[1],
        sender.compute_batch_predictions((x, np.zeros((2, 2), np.float32), None))[1],
    )


def test_the_default_policy_imports_nothing_named_by_the_wire(tmp_path: Path) -> None:
    """Canary: a config naming a module whose import would create a file."""
    canary = tmp_path / "imported"
    module = tmp_path / "hkstore_wire_canary.py"
    module.write_text(
        "import pathlib\n"
        f"pathlib.Path({str(canary)!r}).touch()\n"
        "import helpers_models\n"
        "def forward(x):\n    return helpers_models.mlp_model(x)\n"
        "def loss(y_pred, y_true):\n    return helpers_models.xent_loss(y_pred, y_true)\n"
    )
    model = DeclearnHaikuModel(mlp_model, xent_loss, 0)
    model.initialize(INFO)
    config = model.get_config()
    for role, name in (("model", "forward"), ("loss", "loss")):
        config["config"]["functions"][role]["ref"] = f"hkstore_wire_canary:{name}"
    sys.path.insert(0, str(tmp_path))
    try:
        with pytest.raises(RefusedPayloadError, match="hkstore_wire_canary"):
            Model.from_config(copy.deepcopy(config))
        assert not canary.exists() and "hkstore_wire_canary" not in sys.modules
        set_receive_policy(trust=hkstore.Trust(modules=["hkstore_wire_canary"]))  # control
        again = Model.from_config(copy.deepcopy(config))
        assert canary.exists()
        assert again.get_weights() == model.get_weights()
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("hkstore_wire_canary", None)


@pytest.mark.parametrize(
    "payload",
    [
        "not a dict",
        {"typekey": "haiku", "config": {}},
        {"typekey": TYPEKEY},
        {"typekey": TYPEKEY, "config": {}, "archive": b""},
        {"typekey": TYPEKEY, "archive": "text, not bytes"},
        {"typekey": TYPEKEY, "archive": b"PK\x05\x06 truncated"},
        {"typekey": TYPEKEY, "config": {"format": "hkstore-config"}},
    ],
    ids=["not-a-dict", "other-typekey", "empty", "both", "text-archive", "bad-archive",
         "bad-config"],
)
def test_malformed_payloads_are_refused_clearly(payload: Any, caplog: Any) -> None:
    with pytest.raises(RefusedPayloadError, match="refused a DeclearnHaikuModel payload"):
        DeclearnHaikuModel.from_config(payload, allow_bin=True)
    assert "refused a DeclearnHaikuModel payload" in caplog.text  # and logged


# --- updates that do not fit --------------------------------------------------------------


def test_an_update_that_does_not_fit_is_refused_naming_every_mismatch() -> None:
    model = frozen_server_model()
    model.initialize(INFO)
    before = host(model.get_weights())
    good = model.get_weights(trainable=True)
    coefs = dict(good.coefs)
    del coefs["head:b"]  # missing
    coefs["extra:w"] = np.zeros(2, np.float32)  # unexpected
    coefs["hidden:w"] = np.zeros((6, 4), np.float32)  # wrong shape
    coefs["hidden:b"] = np.zeros(5, ml_dtypes.bfloat16)  # wrong dtype
    bad = DeclearnJaxVector(coefs)
    with pytest.raises(WeightsMismatchError) as refused:
        Optimizer(lrate=0.1).apply_gradients(model, bad)  # through declearn's optimizer
    message = str(refused.value)
    for fragment in ("'head:b'", "'extra:w'", "'hidden:w'", "(6, 4)", "'hidden:b'", "bfloat16"):
        assert fragment in message
    with pytest.raises(WeightsMismatchError):
        model.set_weights(bad, trainable=True)
    with pytest.raises(TypeError, match="JaxNumpyVector"):
        model.set_weights(host(good), trainable=True)  # type: ignore[arg-type]
    after = host(model.get_weights())  # nothing changed
    assert after.keys() == before.keys()
    assert all(np.array_equal(after[name], before[name]) for name in before)
    Optimizer(lrate=0.1).apply_gradients(model, good)  # a fitting one goes through
    assert not np.array_equal(np.asarray(model.get_weights().coefs["head:w"]), before["head:w"])
    np.testing.assert_array_equal(np.asarray(model.get_weights().coefs["encoder:w"]),
                                  before["encoder:w"])  # frozen stays frozen
