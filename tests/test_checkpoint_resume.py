"""Exact resume: training resumed from a checkpointed round is bit-identical to never stopping.

An optax optimizer (gradient clipping chained with Adam) trains a model whose forward pass
draws random numbers (dropout), on gradients from ``compute_batch_gradients``, with and
without per-sample clipping. One run never stops; the other saves rounds, is thrown away
entirely, and resumes from a round through ``Checkpointer.restore``. Weights, random state and
optimizer state must be bit for bit equal at the end. The controls show the comparison can
fail: resuming without the saved random state, or without the saved optimizer state,
diverges.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
import numpy as np
import optax
import pytest
from helpers_models import device_policy, dropout_mlp_model, xent_loss

from hkstore import Checkpointer, HaikuModel
from hkstore.model import JaxNumpyVector

ROUNDS, RESUME_FROM, STEPS = 6, 2, 2
DATA_INFO = {"data_type": "float32", "features_shape": (5,)}


@pytest.fixture(autouse=True)
def _cpu_policy() -> Iterator[None]:
    with device_policy(gpu=False):
        yield


def optimizer() -> optax.GradientTransformation:
    return optax.chain(optax.clip_by_global_norm(1.0), optax.adam(3e-2))


def batch(round_: int, step: int) -> tuple[np.ndarray, np.ndarray, None]:
    rng = np.random.default_rng(1000 * round_ + step)
    x = rng.normal(size=(8, 5)).astype(np.float32)
    return x, rng.integers(0, 3, size=8).astype(np.int32), None


def train_round(model: HaikuModel, opt_state: Any, round_: int, max_norm: float | None) -> Any:
    opt = optimizer()
    for step in range(STEPS):
        grads = model.compute_batch_gradients(batch(round_, step), max_norm=max_norm)
        params = model.get_weights(trainable=True).coefs
        updates, opt_state = opt.update(grads.coefs, opt_state, params)
        model.apply_updates(JaxNumpyVector(updates))
    return opt_state


def fresh_model() -> HaikuModel:
    model = HaikuModel(dropout_mlp_model, xent_loss, seed=7)
    model.initialize(DATA_INFO)
    return model


def bits(tree: Any) -> list[tuple[str, tuple[int, ...], bytes]]:
    leaves = jax.tree_util.tree_leaves(tree)
    return [(str(np.asarray(x).dtype), np.shape(x), np.asarray(x).tobytes()) for x in leaves]


def run_uninterrupted(folder: Path, max_norm: float | None) -> tuple[HaikuModel, Any]:
    model = fresh_model()
    opt_state = optimizer().init(model.get_weights(trainable=True).coefs)
    with Checkpointer(folder, functions="none") as ckpt:  # saving must not perturb training
        for round_ in range(ROUNDS):
            opt_state = train_round(model, opt_state, round_, max_norm)
            ckpt.save(model, round_, state=opt_state)
    return model, opt_state


def run_resumed(folder: Path, max_norm: float | None, *, keep_rng: bool = True,
                keep_opt: bool = True) -> tuple[HaikuModel, Any]:
    model = fresh_model()
    opt_state = optimizer().init(model.get_weights(trainable=True).coefs)
    with Checkpointer(folder, functions="none", background=True) as ckpt:
        for round_ in range(RESUME_FROM + 1):
            opt_state = train_round(model, opt_state, round_, max_norm)
            ckpt.save(model, round_, state=opt_state)
    del model, opt_state  # the process "crashes": nothing survives but the directory
    template = optimizer().init(fresh_model().get_weights(trainable=True).coefs)
    restored = Checkpointer(folder).restore(RESUME_FROM, model=dropout_mlp_model,
                                            loss=xent_loss, state_like=template)
    assert restored.round == RESUME_FROM
    model, opt_state = restored.model, restored.state if keep_opt else template
    if not keep_rng:
        model.rng_state = fresh_model().rng_state
    for round_ in range(RESUME_FROM + 1, ROUNDS):
        opt_state = train_round(model, opt_state, round_, max_norm)
    return model, opt_state


@pytest.mark.parametrize("max_norm", [None, 0.5], ids=["plain", "clipped"])
def test_resume_from_a_round_is_bit_identical_to_an_uninterrupted_run(
    tmp_path: Path, max_norm: float | None
) -> None:
    reference, reference_opt = run_uninterrupted(tmp_path / "a", max_norm)
    resumed, resumed_opt = run_resumed(tmp_path / "b", max_norm)
    assert bits(resumed.get_weights().coefs) == bits(reference.get_weights().coefs)
    assert resumed.rng_state == reference.rng_state
    assert bits(resumed_opt) == bits(reference_opt)
    assert jax.tree_util.tree_structure(resumed_opt) == jax.tree_util.tree_structure(
        reference_opt)
    # and the round the resumed run started from is the uninterrupted run's, byte for byte
    same = Checkpointer(tmp_path / "a").restore(RESUME_FROM, model=dropout_mlp_model,
                                               loss=xent_loss, state_like=reference_opt)
    again = Checkpointer(tmp_path / "b").restore(RESUME_FROM, model=dropout_mlp_model,
                                                loss=xent_loss, state_like=reference_opt)
    assert bits(same.model.get_weights().coefs) == bits(again.model.get_weights().coefs)
    assert bits(same.state) == bits(again.state)


@pytest.mark.parametrize("lose", ["rng", "optimizer"])
def test_controls_resuming_without_the_saved_state_diverges(tmp_path: Path, lose: str) -> None:
    """The comparison above can fail: drop one part of the saved state and it does."""
    reference, reference_opt = run_uninterrupted(tmp_path / "a", 0.5)
    resumed, resumed_opt = run_resumed(tmp_path / "b", 0.5, keep_rng=lose != "rng",
                                       keep_opt=lose != "optimizer")
    assert bits(resumed.get_weights().coefs) != bits(reference.get_weights().coefs)
    if lose == "optimizer":
        assert bits(resumed_opt) != bits(reference_opt)
