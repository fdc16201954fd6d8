"""Tests of hkstore.model._model: HaikuModel on four toy models, numerics, and declearn's bugs.

The models live on the second virtual CPU (policy idx=1), so that anything landing on the
default device by accident shows up as a device mismatch.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers_models import (
    CASE_IDS,
    CASES,
    SEEN_SHAPES,
    ToyCase,
    device_policy,
    mlp_model,
    mse_loss,
    noisy_model,
    reference_loss_fn,
    shape_recording_model,
    xent_loss,
)

from hkstore.errors import (
    DataInfoError,
    HkstoreError,
    ModelFunctionError,
    NotInitializedError,
    RngStateError,
    WeightsMismatchError,
)
from hkstore.model import HaikuModel, JaxNumpyVector, ModelState, RngState

DEV1 = jax.devices()[1]
MLP_INFO = {"data_type": "float32", "features_shape": (5,)}


@pytest.fixture(autouse=True)
def _second_cpu() -> Iterator[None]:
    with device_policy(gpu=False, idx=1):
        yield


def host(vector: JaxNumpyVector) -> dict[str, np.ndarray]:
    return {name: np.asarray(value) for name, value in vector.coefs.items()}


def assert_rel_close(got: dict[str, Any], ref: dict[str, Any], rel: float = 1e-6) -> None:
    """Per tensor: max |got - ref| <= rel * max |ref| (same names, same order)."""
    assert list(got) == list(ref)
    for name in ref:
        g, r = np.asarray(got[name], np.float64), np.asarray(ref[name], np.float64)
        assert g.shape == r.shape, name
        scale = max(float(np.max(np.abs(r), initial=0.0)), 1e-30)
        assert float(np.max(np.abs(g - r), initial=0.0)) <= rel * scale, name


_REFERENCES: dict[tuple[str, bool], Any] = {}


def reference_fn(case: ToyCase, grad: bool = True) -> Any:
    """jit(grad(mean loss)) (or jit(mean loss)) with plain haiku and jax, compiled once a case."""
    key = (case.name, grad)
    if key not in _REFERENCES:
        f = reference_loss_fn(case.model, case.loss)
        _REFERENCES[key] = jax.jit(jax.grad(f) if grad else f)
    return _REFERENCES[key]


def reference_grads(
    case: ToyCase, model: HaikuModel, batch: tuple, s_wght: np.ndarray | None = None
) -> dict[str, np.ndarray]:
    """jax.grad of the mean loss w.r.t. the trainable weights, with plain haiku (host arrays)."""
    weights = host(model.get_weights())
    names = model.get_weight_names(trainable=True)
    trainable = {n: jnp.asarray(weights[n]) for n in names}
    frozen = {n: jnp.asarray(v) for n, v in weights.items() if n not in names}
    x, y = jnp.asarray(batch[0]), jnp.asarray(batch[1])
    grads = reference_fn(case)(trainable, frozen, x, y, s_wght)
    return {n: np.asarray(grads[n]) for n in names}


def per_sample_grads(case: ToyCase, model: HaikuModel, batch: tuple) -> list[dict[str, np.ndarray]]:
    """Per-sample gradients by a python loop over batches of one."""
    one = [
        (batch[0][i : i + 1], batch[1][i : i + 1], None) for i in range(batch[0].shape[0])
    ]
    return [reference_grads(case, model, b) for b in one]


# --- the four toy models through every public method -------------------------------------


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_toy_model_through_every_method(case: ToyCase) -> None:
    model = HaikuModel(case.model, case.loss, seed=1)
    assert model.required_data_info == {"data_type", "features_shape"}
    model.initialize(case.data_info)
    assert model.required_data_info == set()
    assert model.data_info == {"data_type": "float32", "features_shape": case.features_shape}
    names = model.get_weight_names()
    assert names == sorted(names, key=lambda n: tuple(n.split(":")))  # haiku's order
    if case.freeze:
        model.set_trainable_weights({layer: list(p) for layer, p in case.freeze.items()})
        frozen = model.get_weight_names(trainable=True)
        model.set_trainable_weights([n for n in names if n not in frozen])
    trainable = model.get_weight_names(trainable=True)
    assert set(trainable) <= set(names) and trainable == [n for n in names if n in trainable]

    # get/set weights
    weights = model.get_weights()
    assert list(weights.coefs) == names
    model.set_weights(weights + 1)
    assert model.get_weights() == weights + 1
    model.set_weights(weights)
    model.set_weights(model.get_weights(trainable=True) * 2, trainable=True)
    doubled = model.get_weights()
    for name in names:
        factor = 2 if name in trainable else 1
        np.testing.assert_array_equal(host(doubled)[name], host(weights)[name] * factor)
    model.set_weights(weights)

    # gradients: right names, no change to the weights, numerically jax.grad's
    batch = case.batch(n=4)
    grads = model.compute_batch_gradients(batch)
    assert list(grads.coefs) == trainable
    assert model.get_weights() == weights
    assert_rel_close(host(grads), reference_grads(case, model, batch))
    [loss] = model.collect_training_losses()
    assert model.collect_training_losses() == []
    expected_loss = reference_fn(case, grad=False)(host(weights), {}, batch[0], batch[1], None)
    assert loss == pytest.approx(float(expected_loss), rel=1e-6)

    # clipped gradients differ from plain ones once the bound bites
    clipped = model.compute_batch_gradients(batch, max_norm=1e-3)
    assert list(clipped.coefs) == trainable
    assert clipped != grads

    # apply_updates moves the trainable weights by exactly the update
    update = -0.1 * grads
    model.apply_updates(update)
    after = host(model.get_weights())
    for name in names:
        expected = host(weights)[name] + (host(update)[name] if name in trainable else 0)
        np.testing.assert_array_equal(after[name], expected)

    # predictions and per-sample losses
    y_true, y_pred, s_wght = model.compute_batch_predictions(batch)
    assert isinstance(y_pred, np.ndarray) and y_pred.shape[0] == 4
    np.testing.assert_array_equal(y_true, batch[1])
    assert s_wght is None
    losses = model.loss_function(y_true, y_pred)
    assert isinstance(losses, np.ndarray) and losses.shape == (4,)
    np.testing.assert_allclose(losses, np.asarray(case.loss(y_pred, y_true)), rtol=1e-6)

    # device round trip keeps everything
    model.update_device_policy()
    assert model.get_weights() == JaxNumpyVector(
        {k: jnp.asarray(v) for k, v in after.items()}
    )


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_numpy_and_jax_inputs_give_identical_gradients(case: ToyCase) -> None:
    model = case.build()
    x, y, _ = case.batch(n=4)
    from_numpy = model.compute_batch_gradients((x, y, None))
    from_jax = model.compute_batch_gradients((jnp.asarray(x), jnp.asarray(y), None))
    from_list = model.compute_batch_gradients(([x], y, None))
    assert from_numpy == from_jax == from_list


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_clipped_gradients_match_a_hand_computation_and_optax(case: ToyCase) -> None:
    model = case.build()
    batch = case.batch(n=4, seed=5)
    per_sample = per_sample_grads(case, model, batch)
    norms = [
        np.sqrt(sum(float(np.sum(g.astype(np.float64) ** 2)) for g in gs.values()))
        for gs in per_sample
    ]
    max_norm = float(np.median(norms))  # clips about half of the samples
    scales = [min(1.0, max_norm / norm) for norm in norms]
    hand = {
        name: np.mean([gs[name] * s for gs, s in zip(per_sample, scales, strict=True)], axis=0)
        for name in per_sample[0]
    }
    clipped = host(model.compute_batch_gradients(batch, max_norm=max_norm))
    assert_rel_close(clipped, hand, rel=2e-6)

    stacked = [np.stack([gs[name] for gs in per_sample]) for name in per_sample[0]]
    summed, n_clipped = optax.per_example_global_norm_clip(stacked, max_norm)
    assert 0 < int(n_clipped) < 4
    via_optax = {name: np.asarray(s) / 4 for name, s in zip(per_sample[0], summed, strict=True)}
    assert_rel_close(clipped, via_optax, rel=2e-6)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_frozen_weights_under_the_three_criterion_forms(case: ToyCase) -> None:
    model = case.build()
    names = model.get_weight_names()
    first_layer = names[0].split(":")[0]
    keep = [n for n in names if not n.startswith(first_layer + ":")]
    model.set_trainable_weights(keep)
    assert model.get_weight_names(trainable=True) == keep
    model.set_trainable_weights(lambda layer, name, value: layer != first_layer)
    assert model.get_weight_names(trainable=True) == keep
    as_dict: dict[str, list[str]] = {}
    for n in keep:
        layer, _, param = n.partition(":")
        as_dict.setdefault(layer, []).append(param)
    model.set_trainable_weights(as_dict)
    assert model.get_weight_names(trainable=True) == keep
    frozen_before = {n: v for n, v in host(model.get_weights()).items() if n not in keep}
    grads = model.compute_batch_gradients(case.batch())
    assert list(grads.coefs) == keep
    model.apply_updates(grads)
    model.set_weights(model.get_weights(trainable=True) * 0, trainable=True)
    after = host(model.get_weights())
    for n, value in frozen_before.items():
        np.testing.assert_array_equal(after[n], value)
    assert all(not after[n].any() for n in keep)


# --- numerics: sample weights, seeds ------------------------------------------------------


def test_sample_weights_scale_the_loss_as_mean_of_w_times_l() -> None:
    case = CASES[0]
    model = case.build()
    x, y, _ = case.batch(n=4)
    w = np.array([0.0, 1.0, 2.0, 0.5], np.float32)
    grads = model.compute_batch_gradients((x, y, w))
    model.compute_batch_gradients((x, y, None))
    weighted, plain = model.collect_training_losses()
    y_pred = jnp.asarray(model.compute_batch_predictions((x, y, w))[1])
    per_sample = np.asarray(xent_loss(y_pred, jnp.asarray(y)))
    assert weighted == pytest.approx(float(np.mean(w * per_sample)), rel=1e-6)
    assert plain == pytest.approx(float(np.mean(per_sample)), rel=1e-6)
    assert_rel_close(host(grads), reference_grads(case, model, (x, y, None), s_wght=w))
    ones = model.compute_batch_gradients((x, y, np.ones(4, np.float32)))
    assert_rel_close(host(ones), reference_grads(case, model, (x, y, None)))
    _, _, s = model.compute_batch_predictions((x, y, w))
    np.testing.assert_array_equal(s, w)


def test_seed_fixes_the_initial_weights_and_none_draws_one() -> None:
    a = HaikuModel(mlp_model, xent_loss, seed=7)
    b = HaikuModel(mlp_model, xent_loss, seed=7)
    c = HaikuModel(mlp_model, xent_loss, seed=8)
    for m in (a, b, c):
        m.initialize(MLP_INFO)
    assert a.get_weights() == b.get_weights() != c.get_weights()
    drawn = HaikuModel(mlp_model, xent_loss)
    assert isinstance(drawn._seed, int) and 0 <= drawn._seed < 2**32
    with pytest.raises(ValueError):
        HaikuModel(mlp_model, xent_loss, seed=2**32)
    with pytest.raises(TypeError):
        HaikuModel(mlp_model, xent_loss, seed=1.5)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        HaikuModel("model", xent_loss)  # type: ignore[arg-type]


# --- batches ----------------------------------------------------------------------------


def test_malformed_batches_raise_typeerror_or_valueerror() -> None:
    model = CASES[0].build()
    x, y, _ = CASES[0].batch(n=3)
    with pytest.raises(TypeError, match="batch inputs must be a numpy or jax array, got str"):
        model.compute_batch_gradients(("x", y, None))
    with pytest.raises(TypeError, match=r"batch inputs\[0\] must be a numpy or jax array"):
        model.compute_batch_gradients((x.tolist(), y, None))
    with pytest.raises(TypeError, match="y_true"):
        model.compute_batch_gradients((x, list(y), None))
    with pytest.raises(TypeError, match="tuple"):
        model.compute_batch_gradients(x)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="disagree on the number of samples"):
        model.compute_batch_gradients((x, y[:2], None))
    with pytest.raises(ValueError, match="1-d"):
        model.compute_batch_gradients((x, y, np.ones((3, 1), np.float32)))
    with pytest.raises(TypeError, match="no y_true"):
        model.compute_batch_predictions((x, None, None))


# --- declearn bug 4: gradients labelled from an unsorted trainable list --------------------


def test_unsorted_trainable_list_gives_correctly_labelled_gradients() -> None:
    case = CASES[0]
    model = case.build()
    names = model.get_weight_names()
    chosen = list(reversed(names))  # not in model order
    model.set_trainable_weights(chosen)
    chosen.clear()  # the model kept a copy
    assert model.get_weight_names(trainable=True) == names
    batch = case.batch()
    grads = model.compute_batch_gradients(batch)
    assert grads.shapes() == model.get_weights().shapes()
    assert_rel_close(host(grads), reference_grads(case, model, batch))
    before = model.get_weights().shapes()
    model.apply_updates(grads)
    assert model.get_weights().shapes() == before
    listed = model.get_weight_names()
    listed.append("junk")
    assert model.get_weight_names() == names


# --- declearn bug 5: no shape/dtype/device validation in set_weights and apply_updates ------


def test_set_weights_names_every_mismatch_in_one_error_and_changes_nothing() -> None:
    model = CASES[0].build()
    before = model.get_weights()
    coefs = dict(before.coefs)
    del coefs["mlp/~/linear_0:b"]
    coefs["mlp/~/linear_9:w"] = jnp.zeros(3)
    coefs["mlp/~/linear_0:w"] = jnp.zeros((1, 8))  # broadcastable to (5, 8): still refused
    coefs["mlp/~/linear_1:b"] = jnp.zeros(3, jnp.int32)
    with pytest.raises(WeightsMismatchError) as info:
        model.set_weights(JaxNumpyVector(coefs))
    assert str(info.value) == (
        "set_weights: 4 mismatch(es) between the weights and the model:\n"
        "  - missing 1 name(s): 'mlp/~/linear_0:b'\n"
        "  - unexpected 1 name(s): 'mlp/~/linear_9:w'\n"
        "  - 'mlp/~/linear_0:w': shape (1, 8) given, model has (5, 8)\n"
        "  - 'mlp/~/linear_1:b': dtype int32 given, model has float32"
    )
    assert isinstance(info.value, KeyError) and isinstance(info.value, HkstoreError)
    assert model.get_weights() == before


def test_set_weights_refuses_float64_instead_of_promoting() -> None:
    model = CASES[0].build()
    as64 = {k: np.asarray(v, dtype=np.float64) for k, v in model.get_weights().coefs.items()}
    with pytest.raises(WeightsMismatchError, match="dtype float64 given, model has float32"):
        model.set_weights(JaxNumpyVector(as64))


def test_set_weights_stores_numpy_as_jax_copies_on_the_model_device() -> None:
    model = CASES[0].build()
    arrays = {k: np.array(v) for k, v in model.get_weights().coefs.items()}
    model.set_weights(JaxNumpyVector(arrays))
    stored = model.get_weights().coefs
    assert all(isinstance(v, jax.Array) and v.devices() == {DEV1} for v in stored.values())
    arrays["mlp/~/linear_0:w"][...] = 42.0  # the caller reuses its buffer
    assert not np.any(np.asarray(stored["mlp/~/linear_0:w"]) == 42.0)


def test_set_weights_and_apply_updates_refuse_other_types() -> None:
    model = CASES[0].build()
    with pytest.raises(TypeError):
        model.set_weights(host(model.get_weights()))  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        model.apply_updates(host(model.get_weights()))  # type: ignore[arg-type]


def test_apply_updates_refuses_mismatches_and_changes_nothing() -> None:
    model = CASES[1].build()  # frozen encoder
    before = model.get_weights()
    all_weights = model.get_weights() * 0  # includes the frozen names
    with pytest.raises(WeightsMismatchError, match="unexpected 2 name"):
        model.apply_updates(all_weights)
    updates = dict(model.get_weights(trainable=True).coefs)
    updates["head:b"] = jnp.zeros((1, 3))  # would broadcast and reshape the bias
    updates["head:w"] = updates["head:w"].astype(jnp.bfloat16)
    with pytest.raises(WeightsMismatchError) as info:
        model.apply_updates(JaxNumpyVector(updates))
    assert "'head:b': shape (1, 3) given, model has (3,)" in str(info.value)
    assert "'head:w': dtype bfloat16 given, model has float32" in str(info.value)
    assert model.get_weights() == before


# --- declearn bug 8: initialize twice, None dims ------------------------------------------


def test_initialize_again_with_other_data_info_is_refused_same_is_a_no_op() -> None:
    model = HaikuModel(mlp_model, xent_loss, seed=0)
    model.initialize(MLP_INFO)
    before = model.get_weights()
    model.initialize({"data_type": "float32", "features_shape": [5], "n_samples": 10})
    assert model.get_weights() == before
    with pytest.raises(DataInfoError, match=r"'features_shape': \(5,\) before, \(6,\) now"):
        model.initialize({"data_type": "float32", "features_shape": (6,)})
    assert model.get_weights() == before


def embed_model(x: jax.Array) -> jax.Array:
    return hk.Linear(1, name="head")(hk.Embed(10, 3, name="embed")(x).mean(axis=1))


def test_initialize_takes_any_dtype_name_numpy_parses_and_records_the_canonical_one() -> None:
    """declearn's tests pass ``data_type="int"``; any name numpy parses means its dtype."""
    spelled = HaikuModel(mlp_model, xent_loss, seed=0)
    spelled.initialize({"data_type": "<f4", "features_shape": (5,)})
    assert spelled.data_info == MLP_INFO
    canonical = HaikuModel(mlp_model, xent_loss, seed=0)
    canonical.initialize(MLP_INFO)
    assert spelled.get_weights() == canonical.get_weights()
    spelled.initialize({"data_type": np.float32, "features_shape": [5]})  # same dtype: no-op
    tokens = HaikuModel(embed_model, mse_loss, seed=0)
    tokens.initialize({"data_type": "int", "features_shape": (4,)})
    assert tokens.data_info["data_type"] == np.dtype(int).name
    x = np.array([[1, 2, 3, 9]] * 2)
    grads = tokens.compute_batch_gradients((x, np.zeros((2, 1), np.float32), None))
    assert set(grads.coefs) == {"embed:embeddings", "head:b", "head:w"}
    with pytest.raises(DataInfoError, match="'object' is 'object', not a numeric dtype"):
        HaikuModel(mlp_model, xent_loss, seed=0).initialize(
            {"data_type": "object", "features_shape": (5,)}
        )


def test_initialize_with_none_dimension_gives_a_clear_error() -> None:
    model = HaikuModel(mlp_model, xent_loss, seed=0)
    with pytest.raises(DataInfoError, match="None \\(unknown\\) dimensions"):
        model.initialize({"data_type": "float32", "features_shape": (None, 5)})
    assert model.required_data_info == {"data_type", "features_shape"}


def test_methods_needing_weights_refuse_before_initialize() -> None:
    model = HaikuModel(mlp_model, xent_loss, seed=0)
    batch = CASES[0].batch()
    calls = [
        lambda: model.set_trainable_weights(["mlp/~/linear_0:w"]),
        lambda: model.get_weights(),
        lambda: model.set_weights(JaxNumpyVector({})),
        lambda: model.apply_updates(JaxNumpyVector({})),
        lambda: model.compute_batch_gradients(batch),
        lambda: model.compute_batch_predictions(batch),
    ]
    for call in calls:
        with pytest.raises(NotInitializedError, match="initialize"):
            call()
    with pytest.raises(ValueError):
        model.set_trainable_weights(["x"])
    assert model.get_weight_names() == []


# --- declearn bug 9: importing turns on jax_enable_x64 -------------------------------------


def test_import_and_use_leave_jax_enable_x64_off() -> None:
    code = (
        "import jax, numpy as np\n"
        "import hkstore, hkstore.model\n"
        "from hkstore.model import HaikuModel, set_device_policy\n"
        "set_device_policy(gpu=False)\n"
        "import helpers_models as h\n"
        "m = HaikuModel(h.mlp_model, h.xent_loss, seed=0)\n"
        "m.initialize({'data_type': 'float32', 'features_shape': (5,)})\n"
        "assert jax.config.jax_enable_x64 is False, 'x64 turned on'\n"
        "assert jax.numpy.zeros(1, dtype=np.float64).dtype == np.float32\n"
        "print('ok')\n"
    )
    import os

    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(__file__), *sys.path])
    out = subprocess.run(
        [sys.executable, "-W", "ignore", "-c", code], capture_output=True, text=True, env=env
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


# --- declearn bug 10: clipping per tensor, unbatched samples, one shared key, max_norm=0 ----


def test_clipping_uses_the_global_norm_over_all_tensors() -> None:
    # identical samples: the clipped mean is g * max_norm / ||g||_global, whatever the tensors
    case = CASES[0]
    model = case.build()
    x, y, _ = case.batch(n=1)
    x, y = np.repeat(x, 4, axis=0), np.repeat(y, 4, axis=0)
    g = host(model.compute_batch_gradients((x, y, None)))
    norm = np.sqrt(sum(np.sum(v.astype(np.float64) ** 2) for v in g.values()))
    clipped = host(model.compute_batch_gradients((x, y, None), max_norm=norm / 4))
    assert_rel_close(clipped, {k: v / 4 for k, v in g.items()}, rel=2e-6)
    per_tensor_ok = all(np.sqrt(np.sum(v.astype(np.float64) ** 2)) <= norm / 4 for v in g.values())
    assert not per_tensor_ok or len(g) == 1  # per-tensor clipping would have left some alone


def test_clipping_calls_the_model_on_batches_of_one() -> None:
    model = HaikuModel(shape_recording_model, mse_loss, seed=0)
    model.initialize({"data_type": "float32", "features_shape": (3,)})
    SEEN_SHAPES.clear()
    x = np.ones((5, 3), np.float32)
    model.compute_batch_gradients((x, np.zeros((5, 1), np.float32), None), max_norm=1.0)
    assert SEEN_SHAPES and set(SEEN_SHAPES) == {(1, 3)}


def test_clipping_draws_a_distinct_key_per_sample() -> None:
    # identical samples, heavily clipped: with one shared key every sample's gradient is the
    # same and the mean has norm max_norm exactly; distinct noise gives distinct directions.
    model = HaikuModel(noisy_model, mse_loss, seed=0)
    model.initialize({"data_type": "float32", "features_shape": (3,)})
    x = np.ones((6, 3), np.float32)
    y = np.zeros((6, 1), np.float32)
    clipped = host(model.compute_batch_gradients((x, y, None), max_norm=1e-3))
    norm = np.sqrt(sum(np.sum(v.astype(np.float64) ** 2) for v in clipped.values()))
    assert norm < 0.99e-3


@pytest.mark.parametrize("bad", [0.0, 0, -1.0, float("nan")])
def test_max_norm_must_be_positive(bad: float) -> None:
    model = CASES[0].build()
    with pytest.raises(ValueError, match="max_norm must be > 0"):
        model.compute_batch_gradients(CASES[0].batch(), max_norm=bad)
    with pytest.raises(TypeError):
        model.compute_batch_gradients(CASES[0].batch(), max_norm="1")  # type: ignore[arg-type]
    assert model.collect_training_losses() == []


# --- declearn bug 11: loss_function returns 0-d for a batch of one -------------------------


def test_loss_function_is_1d_for_a_batch_of_one() -> None:
    model = CASES[0].build()
    x, y, _ = CASES[0].batch(n=1)
    y_true, y_pred, _ = model.compute_batch_predictions((x, y, None))
    losses = model.loss_function(y_true, y_pred)
    assert losses.shape == (1,)
    scalar_loss = HaikuModel(mlp_model, lambda p, t: jnp.sum(xent_loss(p, t)), seed=0)
    assert scalar_loss.loss_function(y_true, y_pred).shape == (1,)


# --- declearn bug 13: partials and callable objects; unknown names -------------------------


def _not_in_layer(layer: str, name: str, value: jax.Array, *, excluded: str) -> bool:
    return layer != excluded


class _OnlyWeights:
    def __call__(self, layer: str, name: str, value: jax.Array) -> bool:
        return name == "w"


def test_set_trainable_weights_accepts_partials_and_callable_objects() -> None:
    model = CASES[0].build()
    model.set_trainable_weights(functools.partial(_not_in_layer, excluded="mlp/~/linear_0"))
    assert model.get_weight_names(trainable=True) == ["mlp/~/linear_1:b", "mlp/~/linear_1:w"]
    model.set_trainable_weights(_OnlyWeights())
    assert model.get_weight_names(trainable=True) == ["mlp/~/linear_0:w", "mlp/~/linear_1:w"]


def test_set_trainable_weights_names_unknown_names_in_a_keyerror() -> None:
    model = CASES[0].build()
    before = model.get_weight_names(trainable=True)
    with pytest.raises(KeyError) as info:
        model.set_trainable_weights(["mlp/~/linear_0:w", "nope:w", "mlp:w"])
    assert "2 name(s) are not weights of the model: 'nope:w', 'mlp:w'" in str(info.value)
    with pytest.raises(KeyError, match="'mlp/~/linear_0:x'"):
        model.set_trainable_weights({"mlp/~/linear_0": {"x": True}})
    with pytest.raises(TypeError):
        model.set_trainable_weights("mlp/~/linear_0:w")
    with pytest.raises(TypeError):
        model.set_trainable_weights(3)  # type: ignore[arg-type]
    assert model.get_weight_names(trainable=True) == before


# --- the model-state hook and the random state ----------------------------------------


def _state(source: HaikuModel, **changes: Any) -> ModelState:
    return dataclasses.replace(source.export_state(), **changes)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_export_state_and_from_state_round_trip(case: ToyCase) -> None:
    model = case.build(seed=4)
    model.apply_updates(model.compute_batch_gradients(case.batch()))
    state = model.export_state()
    assert state.seed == 4 and state.model is case.model and state.loss is case.loss
    assert state.data_info == model.data_info
    assert list(state.trainable) == model.get_weight_names(trainable=True)
    weights = host(model.get_weights())
    assert [(s.name, s.dtype, s.shape) for s in state.weight_specs()] == [
        (n, v.dtype, v.shape) for n, v in weights.items()
    ]
    streamed = state.host_weights()
    assert iter(streamed) is streamed  # lazy: one tensor at a time
    fetched = dict(streamed)
    assert list(fetched) == list(weights)
    for name, value in fetched.items():
        assert isinstance(value, np.ndarray)
        np.testing.assert_array_equal(value, weights[name])

    restored = HaikuModel.from_state(
        _state(model, weights={k: v.copy() for k, v in weights.items()},
               trainable=list(reversed(model.get_weight_names(trainable=True))))
    )
    assert restored.get_weights() == model.get_weights()
    assert restored.get_weight_names(trainable=True) == model.get_weight_names(trainable=True)
    assert restored.data_info == model.data_info and restored.export_state().seed == 4
    assert restored.rng_state == model.rng_state
    assert restored.required_data_info == set()
    assert all(
        isinstance(v, jax.Array) and v.devices() == {DEV1}
        for v in restored.get_weights().coefs.values()
    )
    batch = case.batch(seed=9)
    assert restored.compute_batch_gradients(batch) == model.compute_batch_gradients(batch)


def test_export_state_is_a_snapshot_that_later_training_does_not_change() -> None:
    case = CASES[0]
    model = case.build(seed=1)
    state = model.export_state()
    before = {name: np.array(value) for name, value in state.host_weights()}
    rng_before = state.rng
    model.apply_updates(model.compute_batch_gradients(case.batch()) * -1.0)
    assert model.rng_state != rng_before  # the model moved on
    after = dict(state.host_weights())
    assert all(np.array_equal(after[n], before[n]) for n in before)
    assert state.rng == rng_before


def test_from_state_of_a_model_that_was_not_initialized() -> None:
    model = HaikuModel(mlp_model, xent_loss, seed=5)
    state = model.export_state()
    assert state.data_info is None and dict(state.weights) == {} and not state.initialized
    again = HaikuModel.from_state(state)
    assert again.required_data_info == {"data_type", "features_shape"}
    assert again.rng_state == model.rng_state
    with pytest.raises(WeightsMismatchError, match="without data info cannot have weights"):
        HaikuModel.from_state(dataclasses.replace(state, trainable=("a:w",)))


def test_from_state_names_every_mismatch_and_unknown_trainable_names() -> None:
    model = CASES[0].build()
    weights = host(model.get_weights())
    bad = dict(weights)
    del bad["mlp/~/linear_1:w"]
    bad["extra:w"] = np.zeros(2, np.float32)
    bad["mlp/~/linear_0:b"] = np.zeros(8, np.float64)
    bad["mlp/~/linear_0:w"] = np.zeros((8, 5), np.float32)
    with pytest.raises(WeightsMismatchError) as info:
        HaikuModel.from_state(_state(model, weights=bad, trainable=()))
    message = str(info.value)
    assert message.startswith("from_state: 4 mismatch(es) between the stored weights and the model")
    for part in ("'mlp/~/linear_1:w'", "'extra:w'", "dtype float64", "shape (8, 5) given"):
        assert part in message
    with pytest.raises(WeightsMismatchError, match="'ghost:w'"):
        HaikuModel.from_state(_state(model, trainable=("mlp/~/linear_0:w", "ghost:w")))
    with pytest.raises(DataInfoError):
        HaikuModel.from_state(_state(model, data_info={"data_type": "float32"}))


def test_from_state_does_not_relabel_a_failing_model_function() -> None:
    """A model function that raises while traced is a ModelFunctionError, never a mismatch."""
    model = CASES[0].build()

    def broken(x: jax.Array) -> jax.Array:
        raise ZeroDivisionError("the user's own bug")

    with pytest.raises(ModelFunctionError) as info:
        HaikuModel.from_state(_state(model, model=broken))
    assert not isinstance(info.value, WeightsMismatchError)
    assert isinstance(info.value.__cause__, ZeroDivisionError)
    assert "ZeroDivisionError: the user's own bug" in str(info.value)


def test_from_state_without_rng_keeps_the_state_initialize_would_leave() -> None:
    fresh = HaikuModel(noisy_model, mse_loss, seed=21)
    fresh.initialize({"data_type": "float32", "features_shape": (3,)})
    restored = HaikuModel.from_state(_state(fresh, rng=None, weights=host(fresh.get_weights())))
    assert restored.rng_state == fresh.rng_state
    batch = (np.ones((2, 3), np.float32), np.zeros((2, 1), np.float32), None)
    assert restored.compute_batch_gradients(batch) == fresh.compute_batch_gradients(batch)


def test_rng_state_is_the_current_key_and_setting_it_replays_the_same_draws() -> None:
    model = HaikuModel(noisy_model, mse_loss, seed=3)
    model.initialize({"data_type": "float32", "features_shape": (3,)})
    batch = (np.ones((2, 3), np.float32), np.zeros((2, 1), np.float32), None)
    saved = model.rng_state
    assert saved.impl == "threefry2x32" and len(saved.key_data) == 2
    first = model.compute_batch_gradients(batch)
    assert model.rng_state != saved  # each step splits the key
    second = model.compute_batch_gradients(batch)
    assert first != second  # noisy_model draws from the key: different keys, different grads
    model.rng_state = saved
    assert model.compute_batch_gradients(batch) == first
    assert next(iter(model._rng.devices())) == model._device  # placed on the model's device
    model.rng_state = jax.random.key(11)  # a typed key
    assert model.rng_state == RngState("threefry2x32", (0, 11))
    model.rng_state = jax.random.PRNGKey(12)  # a raw uint32[2] key
    assert model.rng_state == RngState("threefry2x32", (0, 12))


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (RngState.__new__(RngState), None),
        ("threefry", "expected an RngState, a jax PRNG key"),
        (np.zeros(3, np.uint32), "of dtype uint32 and shape (3,)"),
        (jax.random.split(jax.random.key(0)), "expected one key, got keys of shape (2,)"),
    ],
)
def test_rng_state_refuses_what_is_not_one_key(value: Any, message: str | None) -> None:
    model = HaikuModel(mlp_model, xent_loss, seed=0)
    before = model.rng_state
    if message is None:
        with pytest.raises(RngStateError, match="is not one of"):
            RngState("philox", (1, 2))
        with pytest.raises(RngStateError, match="2 unsigned 32-bit words"):
            RngState("threefry2x32", (1, 2**32))
        return
    with pytest.raises(RngStateError, match=re.escape(message)):
        model.rng_state = value
    assert model.rng_state == before


def test_from_state_does_not_copy_aligned_host_buffers_on_cpu() -> None:
    model = CASES[0].build()
    aligned = {}
    for name, value in host(model.get_weights()).items():
        raw = np.empty(value.nbytes + 64, np.uint8)
        start = (-raw.ctypes.data) % 64
        buf = raw[start : start + value.nbytes].view(value.dtype).reshape(value.shape)
        buf[...] = value
        aligned[name] = buf
    restored = HaikuModel.from_state(_state(model, weights=aligned, trainable=()))
    back = restored.get_weights().coefs
    assert all(np.shares_memory(np.asarray(back[n]), aligned[n]) for n in aligned)
