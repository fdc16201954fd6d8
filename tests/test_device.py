"""Tests of hkstore.model._device and of where HaikuModel puts its arrays (2 virtual CPUs)."""

from __future__ import annotations

import ast
import pathlib
import warnings
from collections.abc import Iterator
from typing import Any

import jax
import numpy as np
import pytest
from helpers_models import (
    CASE_IDS,
    CASES,
    ToyCase,
    device_policy,
    mlp_model,
    mse_loss,
    noisy_model,
    xent_loss,
)

import hkstore.model
from hkstore.model import DevicePolicy, HaikuModel, get_device_policy, set_device_policy
from hkstore.model._device import select_device

DEV0, DEV1 = jax.devices()[:2]


@pytest.fixture(autouse=True)
def _cpu_policy() -> Iterator[None]:
    with device_policy(gpu=False):
        yield


def on(device: jax.Device, *arrays: object) -> bool:
    leaves = jax.tree_util.tree_leaves(arrays)
    return bool(leaves) and all(leaf.devices() == {device} for leaf in leaves)


def params_of(model: HaikuModel) -> list[Any]:
    return list(model.get_weights().coefs.values())


# --- the policy ------------------------------------------------------------------------


def test_device_policy_checks_its_fields() -> None:
    assert DevicePolicy(gpu=False) == DevicePolicy(gpu=False, idx=None)
    with pytest.raises(TypeError):
        DevicePolicy(gpu="yes")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        DevicePolicy(gpu=False, idx=-1)
    with pytest.raises(ValueError):
        DevicePolicy(gpu=False, idx=True)


def test_set_device_policy_is_global_and_returned() -> None:
    policy = set_device_policy(gpu=False, idx=1)
    assert policy == DevicePolicy(gpu=False, idx=1) == get_device_policy()
    assert select_device() == DEV1
    model = HaikuModel(mlp_model, xent_loss, seed=0)
    assert model.device_policy == policy


def test_default_policy_prefers_gpu() -> None:
    set_device_policy(gpu=True)
    if not any(d.platform == "gpu" for d in jax.devices()):
        with pytest.warns(RuntimeWarning, match="asks for a GPU but jax sees none"):
            assert select_device() == DEV0
        with pytest.warns(RuntimeWarning, match="GPU"):
            model = HaikuModel(mlp_model, xent_loss, seed=0)
        # declearn's meaning: the device in use (cpu:0), not the policy asked for
        assert model.device_policy == DevicePolicy(gpu=False, idx=0)
        model.update_device_policy(model.device_policy)  # no warning: it names cpu:0 itself
        assert on(DEV0, model._rng)


def test_index_past_the_last_device_falls_back_to_device_0_with_a_warning() -> None:
    with pytest.warns(RuntimeWarning, match="device 7 but there are only 2"):
        assert select_device(DevicePolicy(gpu=False, idx=7)) == DEV0
    set_device_policy(gpu=False, idx=7)
    with pytest.warns(RuntimeWarning, match="device 7"):
        model = HaikuModel(mlp_model, xent_loss, seed=0)
    assert model.device_policy == DevicePolicy(gpu=False, idx=0)  # where it really lives


@pytest.mark.parametrize("idx", [None, 0, 1])
def test_device_policy_reports_the_device_in_use(idx: int | None) -> None:
    set_device_policy(gpu=False, idx=idx)
    model = HaikuModel(mlp_model, xent_loss, seed=0)
    expected = DevicePolicy(gpu=False, idx=idx or 0)
    assert model.device_policy == expected  # idx=None is reported as the index it chose
    assert select_device(model.device_policy) == (DEV1 if idx == 1 else DEV0)


def test_select_device_refuses_other_objects() -> None:
    with pytest.raises(TypeError):
        select_device("cpu")  # type: ignore[arg-type]


# --- models live on their policy's device -----------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_weights_gradients_predictions_live_on_the_policy_device(case: ToyCase) -> None:
    set_device_policy(gpu=False, idx=1)
    model = case.build()
    batch = case.batch()
    assert on(DEV1, params_of(model))
    grads = model.compute_batch_gradients(batch)
    clipped = model.compute_batch_gradients(batch, max_norm=0.5)
    assert on(DEV1, list(grads.coefs.values()), list(clipped.coefs.values()))
    model.apply_updates(-0.1 * grads)
    assert on(DEV1, params_of(model), model._rng)
    # predictions are computed on DEV1: the jitted step follows its committed arguments
    fns = model._functions()
    _, y_pred = fns.predict(model._params, model._rng, (jax.device_put(batch[0], DEV1),))
    assert on(DEV1, y_pred)
    _, y_np, _ = model.compute_batch_predictions(batch)
    np.testing.assert_array_equal(y_np, np.asarray(y_pred))
    # and back to device 0
    model.update_device_policy(DevicePolicy(gpu=False, idx=0))
    assert on(DEV0, params_of(model), model._rng)
    assert on(DEV0, list(model.compute_batch_gradients(batch).coefs.values()))


def test_update_device_policy_before_anything_was_compiled() -> None:
    """declearn bug 6: changing device before any prediction crashed (AttributeError)."""
    model = HaikuModel(noisy_model, xent_loss, seed=3)
    model.update_device_policy(DevicePolicy(gpu=False, idx=1))  # not even initialized
    assert on(DEV1, model._rng)
    model.initialize({"data_type": "float32", "features_shape": (2,)})
    assert on(DEV1, params_of(model))
    model.update_device_policy(DevicePolicy(gpu=False, idx=0))  # initialized, nothing compiled
    assert on(DEV0, params_of(model), model._rng)
    assert model.device_policy == DevicePolicy(gpu=False, idx=0)


def test_update_device_policy_moves_params_and_rng_state_and_keeps_results() -> None:
    x = np.arange(6, dtype=np.float32).reshape(3, 2)
    batch = (x, np.zeros((3, 1), np.float32), None)

    def run(move: bool) -> list[np.ndarray]:
        model = HaikuModel(noisy_model, mse_loss, seed=11)
        model.initialize({"data_type": "float32", "features_shape": (2,)})
        model.compute_batch_gradients(batch)  # compiled on DEV0
        if move:
            model.update_device_policy(DevicePolicy(gpu=False, idx=1))
            assert on(DEV1, params_of(model), model._rng)
        grads = model.compute_batch_gradients(batch)
        assert on(DEV1 if move else DEV0, list(grads.coefs.values()))
        return [np.asarray(g) for g in grads.coefs.values()]

    # same random state after the move: the noisy model gives the very same gradients
    for moved, stayed in zip(run(True), run(False), strict=True):
        np.testing.assert_array_equal(moved, stayed)


def test_update_device_policy_none_takes_the_global_policy() -> None:
    model = HaikuModel(mlp_model, xent_loss, seed=0)
    model.initialize({"data_type": "float32", "features_shape": (5,)})
    set_device_policy(gpu=False, idx=1)
    model.update_device_policy()
    assert model.device_policy == DevicePolicy(gpu=False, idx=1)
    assert on(DEV1, params_of(model))
    with pytest.raises(TypeError):
        model.update_device_policy("cpu:1")  # type: ignore[arg-type]


def test_set_weights_places_arrays_on_the_model_device() -> None:
    set_device_policy(gpu=False, idx=1)
    model = HaikuModel(mlp_model, xent_loss, seed=0)
    model.initialize({"data_type": "float32", "features_shape": (5,)})
    host = {k: np.asarray(v) for k, v in model.get_weights().coefs.items()}
    elsewhere = {k: jax.device_put(v, DEV0) for k, v in host.items()}
    for coefs in (host, elsewhere):
        model.set_weights(hkstore.model.JaxNumpyVector(coefs))
        assert on(DEV1, params_of(model))
        assert all(isinstance(v, jax.Array) for v in params_of(model))


# --- declearn bug 7: jit(device=...) with its deprecation warning silenced -----------------


def test_model_code_never_passes_device_to_jit_nor_silences_warnings() -> None:
    root = pathlib.Path(hkstore.model.__file__).parent
    offenders = []
    for path in sorted(root.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Call):
                continue
            func = ast.unparse(node.func)
            keywords = {kw.arg for kw in node.keywords}
            if func.endswith("jit") and keywords & {"device", "backend"}:
                offenders.append(f"{path.name}:{node.lineno} {func}")
            if func in {"warnings.filterwarnings", "warnings.simplefilter"}:
                offenders.append(f"{path.name}:{node.lineno} {func}")
    assert offenders == []


def test_a_device_move_and_training_emit_no_warning_at_all() -> None:
    model = HaikuModel(mlp_model, xent_loss, seed=0)
    model.initialize({"data_type": "float32", "features_shape": (5,)})
    batch = (np.ones((2, 5), np.float32), np.array([0, 1], np.int32), None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # DeprecationWarnings from jax included
        model.update_device_policy(DevicePolicy(gpu=False, idx=1))
        model.compute_batch_gradients(batch, max_norm=1.0)
        model.compute_batch_predictions(batch)
    assert [str(w.message) for w in caught] == []


# --- staging to host and early placement (CPU-safe paths; the GPU side: tools/gpu_check.py) --


def test_to_host_stream_keeps_order_and_values_and_views_on_cpu() -> None:
    from hkstore.model._device import to_host_stream

    values = {f"t{i}": jax.device_put(np.arange(i * 1000, dtype=np.float32), DEV0)
              for i in range(5)}
    out = list(to_host_stream(values.items(), ahead_bytes=4000))
    assert [name for name, _ in out] == list(values)
    for (name, host), value in zip(out, values.values(), strict=True):
        assert isinstance(host, np.ndarray)
        assert np.array_equal(host, np.asarray(value)), name


def test_to_host_stream_starts_copies_ahead_within_the_byte_bound() -> None:
    from hkstore.model import _device

    started: list[str] = []
    real = _device.start_host_copy

    def spy(value: jax.Array) -> Any:
        started.append(str(len(started)))
        return real(value)

    arrays = [(f"t{i}", jax.device_put(np.zeros(250, np.float32), DEV0)) for i in range(6)]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(_device, "start_host_copy", spy)
        stream = _device.to_host_stream(arrays, ahead_bytes=2500)  # 2.5 arrays of 1000 B
        next(stream)
        assert len(started) == 3  # the first handed out once more than 2500 B were started
        rest = list(stream)
    assert len(rest) == 5 and len(started) == 6


def test_early_placement_only_for_an_accelerator() -> None:
    from hkstore.model import early_placement

    assert early_placement(DevicePolicy(gpu=False)) is None
    assert early_placement(DevicePolicy(gpu=True)) is None  # this box has no GPU: CPU path


def test_early_placement_sends_each_verified_tensor_to_its_device(tmp_path: pathlib.Path) -> None:
    from helpers_archives import default_tensors, make_content, write_test_archive

    from hkstore.model._device import EarlyPlacement
    from hkstore.store._archive import open_archive

    tensors = default_tensors()
    path = write_test_archive(tmp_path / "a.hkz", make_content(tensors))
    placement = EarlyPlacement(DEV1)  # a second (virtual) CPU stands in for an accelerator
    with open_archive(path) as archive:
        host = archive.read_weights(ready=placement)
    placed = placement.placed(host)
    for name, array in tensors.items():
        assert isinstance(placed[name], jax.Array) and placed[name].devices() == {DEV1}
        assert np.array_equal(np.asarray(placed[name]), array)
