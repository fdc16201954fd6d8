"""DeclearnJaxVector in declearn's machinery: registries, codecs, aggregators, optimizers, DP
noise, SecAgg. Each engine path is compared with the same path on declearn's ``NumpyVector``
(its own reference vector), so a wrong operation shows up as a wrong number."""

from __future__ import annotations

from typing import Any

import haiku as hk
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from declearn.aggregator import (
    AveragingAggregator,
    GradientMaskedAveraging,
    SumAggregator,
)
from declearn.model.api import Vector, VectorSpec
from declearn.model.api._vector import VECTOR_TYPES
from declearn.model.sklearn import NumpyVector
from declearn.optimizer import Optimizer
from declearn.secagg.masking import MaskingDecrypter, MaskingEncrypter
from declearn.utils import access_registered, access_registration_info
from declearn.utils.serialize import (
    json_deserialize,
    json_serialize,
    msgpack_deserialize,
    msgpack_serialize,
)

import hkstore
from hkstore.errors import WeightsMismatchError
from hkstore.integrations.declearn import DeclearnHaikuModel, DeclearnJaxVector

NAMES = ("mlp/~/linear_0:b", "mlp/~/linear_0:w", "head:w")
SHAPES = ((8,), (5, 8), (8, 3))


def values(seed: int, dtype: Any = np.float32) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {n: rng.normal(size=s).astype(dtype) for n, s in zip(NAMES, SHAPES, strict=True)}


def jvec(seed: int, dtype: Any = np.float32) -> DeclearnJaxVector:
    return DeclearnJaxVector({k: jnp.asarray(v) for k, v in values(seed, dtype).items()})


def nvec(seed: int, dtype: Any = np.float32) -> NumpyVector:
    return NumpyVector(values(seed, dtype))


def close(jax_vector: Vector, np_vector: NumpyVector, rtol: float = 1e-5) -> None:
    assert isinstance(jax_vector, DeclearnJaxVector)
    assert list(jax_vector.coefs) == list(np_vector.coefs)
    for name, value in np_vector.coefs.items():
        got = np.asarray(jax_vector.coefs[name])
        assert got.dtype == value.dtype, name
        np.testing.assert_allclose(got, value, rtol=rtol, atol=1e-6, err_msg=name)


# --- registration and codecs ---------------------------------------------------------------


def test_registered_for_a_type_of_its_own_leaving_jax_arrays_to_declearn() -> None:
    assert access_registered("hkstore-jax", group="Vector") is DeclearnJaxVector
    assert access_registration_info(DeclearnJaxVector) == ("hkstore-jax", "Vector")
    array_types = {type(jnp.zeros(1)), jax.Array}
    assert all(VECTOR_TYPES.get(t) is not DeclearnJaxVector for t in array_types)
    assert DeclearnJaxVector in VECTOR_TYPES.values()


@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16, np.int32])
def test_json_and_msgpack_hooks_round_trip_exactly(dtype: Any) -> None:
    vector = jvec(0, dtype)
    for carried in (
        json_deserialize(json_serialize(vector)),
        msgpack_deserialize(msgpack_serialize(vector)),
    ):
        assert isinstance(carried, DeclearnJaxVector)
        assert carried == vector
        assert carried.dtypes() == vector.dtypes()


@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16, np.uint8])
def test_hkstores_plain_pack_form_goes_through_declearns_hooks(dtype: Any) -> None:
    plain = hkstore.JaxNumpyVector({k: jnp.asarray(v) for k, v in values(3, dtype).items()})
    packed = plain.pack()
    for carried in (json_deserialize(json_serialize(packed)),
                    msgpack_deserialize(msgpack_serialize(packed))):
        assert carried == packed
        assert hkstore.JaxNumpyVector.unpack(carried) == plain


def test_msgpack_carries_raw_bytes_json_base64() -> None:
    vector = jvec(1)
    raw = np.asarray(vector.coefs["mlp/~/linear_0:w"]).tobytes()
    assert raw in msgpack_serialize(vector)
    size = sum(np.asarray(v).nbytes for v in vector.coefs.values())
    assert len(msgpack_serialize(vector)) < size + 300  # no text encoding overhead
    assert len(json_serialize(vector)) > 4 * size // 3


def test_flatten_gives_declearns_spec_and_build_from_specs_rebuilds_it() -> None:
    vector = jvec(2, np.float32)
    vector.coefs["head:w"] = jnp.asarray(np.arange(24, dtype=np.int32).reshape(8, 3))
    flat, spec = vector.flatten()
    assert isinstance(spec, VectorSpec)
    assert spec.names == list(NAMES)
    assert spec.shapes == dict(zip(NAMES, SHAPES, strict=True))
    assert spec.dtypes == {NAMES[0]: "float32", NAMES[1]: "float32", NAMES[2]: "int32"}
    assert spec.v_type == ("hkstore-jax", "Vector")
    again = msgpack_deserialize(msgpack_serialize(spec))  # SecAgg sends specs around
    rebuilt = Vector.build_from_specs(flat, again)
    assert isinstance(rebuilt, DeclearnJaxVector) and rebuilt == vector


def test_numpy_vectors_combine_on_either_side_and_other_vectors_are_refused() -> None:
    left, right = jvec(0), nvec(1)
    close(left - right, NumpyVector({k: values(0)[k] - values(1)[k] for k in NAMES}))
    close(right - left, NumpyVector({k: values(1)[k] - values(0)[k] for k in NAMES}))
    close(left.maximum(right), NumpyVector({k: np.maximum(values(0)[k], values(1)[k])
                                            for k in NAMES}))
    with pytest.raises(WeightsMismatchError, match="names differ"):
        _ = left + NumpyVector({"other:w": np.zeros(1, np.float32)})

    class Unknown(Vector):  # a declearn vector type it was not told about
        pass

    with pytest.raises(TypeError):
        _ = left + Unknown.__new__(Unknown)


# --- aggregators, optimizers, DP noise, SecAgg ---------------------------------------------


@pytest.mark.parametrize(
    "aggregator",
    [AveragingAggregator(), AveragingAggregator(steps_weighted=False), SumAggregator(),
     GradientMaskedAveraging()],
    ids=["averaging", "averaging-unweighted", "sum", "gradient-masked"],
)
def test_aggregators_give_what_they_give_on_numpy_vectors(aggregator: Any) -> None:
    def aggregate(make: Any) -> Vector:
        shared = [aggregator.prepare_for_sharing(make(s), n_steps=s + 1) for s in (0, 1, 2)]
        shared = [msgpack_deserialize(msgpack_serialize(s)) for s in shared]  # over the wire
        total = shared[0] + shared[1] + shared[2]
        return aggregator.finalize_updates(total)

    close(aggregate(jvec), aggregate(nvec))


OPTIMIZERS = {
    "sgd": {"lrate": 0.1},
    "sgd-weight-decay": {"lrate": 0.1, "w_decay": 0.01},
    "momentum": {"lrate": 0.1, "modules": [("momentum", {"beta": 0.9})]},
    "adam": {"lrate": 0.01, "modules": ["adam"]},
    "rmsprop": {"lrate": 0.01, "modules": ["rmsprop"]},
    "adagrad": {"lrate": 0.01, "modules": ["adagrad"]},
    "clipping": {"lrate": 0.1, "modules": [("l2-clipping", {"max_norm": 0.5})]},
    "global-clipping": {"lrate": 0.1, "modules": [("l2-global-clipping", {"max_norm": 0.5})]},
    "momentum+clipping": {
        "lrate": 0.1,
        "modules": [("l2-global-clipping", {"max_norm": 0.5}), ("momentum", {"beta": 0.9})],
    },
}


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_optimizers_give_what_they_give_on_numpy_vectors(name: str) -> None:
    """Three steps of each optimizer, with its state saved and restored between steps."""

    def run(make: Any) -> tuple[Vector, dict[str, Any]]:
        optim = Optimizer.from_config(OPTIMIZERS[name])
        weights = make(10)
        for step in range(3):
            updates = optim.compute_updates_from_gradients(_FakeModel(weights), make(step))
            weights = weights + updates
            state = msgpack_deserialize(msgpack_serialize(optim.get_state()))
            optim = Optimizer.from_config(OPTIMIZERS[name])
            optim.set_state(state)
        return weights, state

    ours, state = run(jvec)
    theirs, _ = run(nvec)
    close(ours, theirs)
    if name in ("adam", "momentum"):  # their states hold vectors of our type, decoded again
        assert any(isinstance(v, DeclearnJaxVector) for v in _leaves(state))


class _FakeModel:
    """What ``compute_updates_from_gradients`` reads of a model: its trainable weights."""

    def __init__(self, weights: Vector) -> None:
        self.weights = weights

    def get_weights(self, trainable: bool = False) -> Vector:
        return self.weights


def _leaves(tree: Any) -> list[Any]:
    if isinstance(tree, dict):
        return [leaf for value in tree.values() for leaf in _leaves(value)]
    if isinstance(tree, list | tuple):
        return [leaf for value in tree for leaf in _leaves(value)]
    return [tree]


def test_scaffold_client_and_server_exchange_our_vectors() -> None:
    """Scaffold's auxiliary variables (vectors) travel server <-> clients and combine."""

    def run(make: Any) -> Vector:
        server = Optimizer(lrate=1.0, modules=["scaffold-server"])
        clients = [Optimizer(lrate=0.1, modules=["scaffold-client"]) for _ in range(2)]
        weights = make(10)
        for _ in range(2):  # two rounds
            for client in clients:
                client.process_aux_var(msgpack_deserialize(msgpack_serialize(
                    server.collect_aux_var())))
            updates = []
            for seed, client in enumerate(clients):
                local = weights
                for step in range(2):
                    local = local + client.compute_updates_from_gradients(
                        _FakeModel(local), make(seed * 10 + step))
                updates.append(local - weights)
            aux = [msgpack_deserialize(msgpack_serialize(c.collect_aux_var())) for c in clients]
            server.process_aux_var({"scaffold": aux[0]["scaffold"] + aux[1]["scaffold"]})
            weights = weights + server.compute_updates_from_gradients(
                _FakeModel(weights), (updates[0] + updates[1]) / 2)
        return weights

    close(run(jvec), run(nvec))


def test_dp_gaussian_noise_adds_numpy_noise_to_our_vector() -> None:
    config = {"lrate": 1.0, "modules": [("gaussian-noise", {"std": 0.5, "safe_mode": False,
                                                             "seed": 7})]}
    grads = jvec(0)
    ours = Optimizer.from_config(config).compute_updates_from_gradients(_FakeModel(grads), grads)
    theirs = Optimizer.from_config(config).compute_updates_from_gradients(
        _FakeModel(nvec(0)), nvec(0))
    close(ours, theirs)
    assert ours != -1.0 * grads  # noise was added


def test_secagg_masking_sums_our_flattened_vectors() -> None:
    """Two clients mask their updates; the server sums the masked values and decrypts."""
    seed = 12345
    encrypters = [MaskingEncrypter(pos_masks_seeds=[seed], neg_masks_seeds=[]),
                  MaskingEncrypter(pos_masks_seeds=[], neg_masks_seeds=[seed])]
    decrypter = MaskingDecrypter(n_peers=2)
    aggregator = AveragingAggregator()
    shared = [aggregator.prepare_for_sharing(jvec(s), n_steps=1) for s in (0, 1)]
    masked = [msgpack_deserialize(msgpack_serialize(enc.encrypt_aggregate(s)))
              for enc, s in zip(encrypters, shared, strict=True)]
    total = decrypter.decrypt_aggregate(masked[0] + masked[1])
    result = aggregator.finalize_updates(total)
    plain = aggregator.finalize_updates(shared[0] + shared[1])
    close(result, NumpyVector({k: np.asarray(v) for k, v in plain.coefs.items()}), rtol=1e-4)


def test_a_model_takes_vectors_that_came_through_the_engine() -> None:
    model = DeclearnHaikuModel(hkstore.HaikuModel(_linear, _mse, seed=0))
    model.initialize({"data_type": "float32", "features_shape": (3,)})
    weights = model.get_weights()
    noisy = msgpack_deserialize(msgpack_serialize(weights + NumpyVector(
        {k: np.ones(np.shape(v), np.float32) for k, v in weights.coefs.items()})))
    model.set_weights(noisy)
    assert model.get_weights() == weights + 1.0


def _linear(x: jax.Array) -> jax.Array:
    return hk.Linear(2, name="lin")(x)


def _mse(y_pred: jax.Array, y_true: jax.Array) -> jax.Array:
    return jnp.mean((y_pred - y_true) ** 2, axis=-1)
