"""hkstore demo: train, save signed, reload elsewhere, and refuse code nobody vouched for.

1. Train a small MLP with a frozen first layer on per-sample clipped gradients (SGD with
   momentum), saving every round with a ``hkstore.Checkpointer``; halfway, throw the model
   away (a crash) and resume from the newest round: the result is bit-identical to a run that
   never stopped.
2. Save it signed (Ed25519), weights only; reload it on the other (virtual) device with the
   default trust policy (nothing imported or unpickled): mask and data info restored.
3. Save a model whose loss is a closure as a signed pickle; loading it is refused without
   trust and accepted with the signer's public key.

Run: ``make demo`` (or ``.venv/bin/python tools/demo.py``; two virtual CPU devices are set up
below when no accelerator is configured).
"""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=2")

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np

import hkstore
from hkstore.model import HaikuModel, JaxNumpyVector, set_device_policy

FEATURES = 8
CLASSES = 3
FROZEN_LAYER = "mlp/~/linear_0"


def mlp(x: jax.Array) -> jax.Array:
    """The model: a three-layer MLP classifier."""
    return hk.nets.MLP([16, 16, CLASSES], name="mlp")(x)


def xent_loss(y_pred: jax.Array, y_true: jax.Array) -> jax.Array:
    """Per-sample softmax cross-entropy with integer labels."""
    logp = jax.nn.log_softmax(y_pred)
    return -jnp.take_along_axis(logp, y_true[:, None], axis=-1)[:, 0]


def make_data(n: int = 512, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Synthetic, learnable data: labels from a fixed random linear map of the features."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, FEATURES)).astype(np.float32)
    y = np.argmax(x @ rng.normal(size=(FEATURES, CLASSES)), axis=1).astype(np.int32)
    return x, y


def choose_device() -> str:
    """Use a GPU when jax has one, the CPU otherwise (without the fallback warning)."""
    gpu = any(device.platform == "gpu" for device in jax.devices())
    policy = set_device_policy(gpu=gpu)
    return f"{'gpu' if policy.gpu else 'cpu'} ({jax.devices()[0]})"


def build_model(seed: int = 0) -> HaikuModel:
    """Wrap and initialize the MLP, then freeze its first layer."""
    model = HaikuModel(mlp, xent_loss, seed=seed)
    model.initialize({"data_type": "float32", "features_shape": (FEATURES,)})
    model.set_trainable_weights(lambda layer, name, value: layer != FROZEN_LAYER)
    return model


def show_weights(model: HaikuModel) -> None:
    """Print which weights train and which are frozen."""
    trainable = model.get_weight_names(trainable=True)
    frozen = [name for name in model.get_weight_names() if name not in trainable]
    print(f"trainable ({len(trainable)}): {', '.join(trainable)}")
    print(f"frozen    ({len(frozen)}): {', '.join(frozen)}")


def train_round(
    model: HaikuModel,
    velocity: dict[str, jax.Array],
    x: np.ndarray,
    y: np.ndarray,
    *,
    batch_size: int = 32,
    learning_rate: float = 0.2,
    momentum: float = 0.9,
    max_norm: float = 1.0,
) -> tuple[dict[str, jax.Array], float]:
    """One round (epoch) of SGD with momentum on per-sample clipped gradients.

    Returns:
        The new momentum and the round's mean training loss.
    """
    for start in range(0, len(x), batch_size):
        batch = (x[start : start + batch_size], y[start : start + batch_size], None)
        grads = model.compute_batch_gradients(batch, max_norm=max_norm).coefs
        velocity = {k: momentum * velocity[k] + grads[k] for k in grads}
        model.apply_updates(JaxNumpyVector({k: -learning_rate * v for k, v in velocity.items()}))
    return velocity, float(np.mean(model.collect_training_losses()))


def zero_velocity(model: HaikuModel) -> dict[str, jax.Array]:
    """The momentum of a fresh run: zeros like the trainable weights."""
    return {k: jnp.zeros_like(v) for k, v in model.get_weights(trainable=True).coefs.items()}


def train(x: np.ndarray, y: np.ndarray, folder: Path, *, rounds: int = 6,
          crash_after: int = 3) -> tuple[HaikuModel, list[float]]:
    """Train ``rounds`` rounds, saving each; "crash" after ``crash_after`` and resume.

    Returns:
        The trained model and the mean loss of each round.
    """
    model = build_model(seed=0)
    show_weights(model)
    before = {k: np.asarray(v) for k, v in model.get_weights().coefs.items()}
    velocity = zero_velocity(model)
    ckpt = hkstore.Checkpointer(folder, keep_last=2, background=True, functions="none")
    for round_ in range(1, crash_after + 1):
        velocity, loss = train_round(model, velocity, x, y)
        ckpt.save(model, round_, state={"velocity": velocity}, metrics={"loss": loss})
        print(f"round {round_}: mean training loss {loss:.4f} (saved in the background)")
    ckpt.close()
    del model, velocity  # the crash: nothing survives but the checkpoint directory
    ckpt = hkstore.Checkpointer(folder, keep_last=2, background=True, functions="none")
    restored = ckpt.restore(model=mlp, loss=xent_loss)
    model, velocity = restored.model, restored.state["velocity"]
    print(f"restarted: resumed from round {restored.round} (weights, trainable mask, random "
          "state and momentum restored)")
    for round_ in range(restored.round + 1, rounds + 1):
        velocity, loss = train_round(model, velocity, x, y)
        ckpt.save(model, round_, state={"velocity": velocity}, metrics={"loss": loss})
        print(f"round {round_}: mean training loss {loss:.4f}")
    ckpt.close()
    history = [entry["metrics"]["loss"] for entry in ckpt.history()]
    print(f"checkpoint: rounds on disk {ckpt.rounds()}, history of {len(history)} rounds")
    check_frozen(model, before)
    reference = build_model(seed=0)  # the same run, never stopped
    reference_velocity = zero_velocity(reference)
    for _ in range(rounds):
        reference_velocity, _ = train_round(reference, reference_velocity, x, y)
    same = (reference.get_weights() == model.get_weights()
            and reference.rng_state == model.rng_state
            and all(np.array_equal(reference_velocity[k], velocity[k]) for k in velocity))
    print(f"bit-identical to a run that never stopped: {same}")
    if not same:
        raise SystemExit("the resumed run diverged")
    return model, history


def check_frozen(model: HaikuModel, before: dict[str, np.ndarray]) -> None:
    """Confirm that the frozen weights did not move."""
    after = {k: np.asarray(v) for k, v in model.get_weights().coefs.items()}
    frozen = [name for name in before if name not in model.get_weight_names(trainable=True)]
    unchanged = all(np.array_equal(before[name], after[name]) for name in frozen)
    print(f"frozen weights unchanged: {unchanged}")
    if not unchanged:
        raise SystemExit("frozen weights changed")


def save_and_reload(model: HaikuModel, folder: Path) -> HaikuModel:
    """Save signed (weights only), reload on the last device with the default trust policy."""
    key_id = hkstore.generate_ed25519_keypair(folder / "server")
    signer = hkstore.load_signer(folder / "server.key")
    path = folder / "round-1.hkz"
    hkstore.save(model, path, functions="none", signer=signer, metadata={"round": 1})
    print(f"saved {path.name}: {path.stat().st_size} bytes, signed by {key_id}")
    devices = jax.devices()
    set_device_policy(gpu=devices[0].platform == "gpu", idx=len(devices) - 1)
    trust = hkstore.Trust(keys=[folder / "server.pub"], require_signature=True)
    again = hkstore.load(path, model=mlp, loss=xent_loss, trust=trust)
    weights_equal = again.get_weights() == model.get_weights()
    where = {arr.device for arr in again.get_weights().coefs.values()}
    print(f"reloaded on {sorted(map(str, where))}: weights equal {weights_equal}")
    same_mask = again.get_weight_names(trainable=True) == model.get_weight_names(trainable=True)
    print(f"  trainable restored: {same_mask}")
    print(f"  data info restored: {again.data_info}")
    if not weights_equal:
        raise SystemExit("reloaded weights differ")
    return again


def make_smoothed_loss(smoothing: float) -> Callable[[jax.Array, jax.Array], jax.Array]:
    """Return a label-smoothed cross-entropy: a closure, which only a pickle can carry."""

    def loss(y_pred: jax.Array, y_true: jax.Array) -> jax.Array:
        logp = jax.nn.log_softmax(y_pred)
        target = jax.nn.one_hot(y_true, CLASSES) * (1 - smoothing) + smoothing / CLASSES
        return -jnp.sum(target * logp, axis=-1)

    return loss


def pickled_closure(model: HaikuModel, folder: Path) -> None:
    """A signed pickle of a closure: refused without trust, accepted with the signer's key."""
    closure_model = HaikuModel(mlp, make_smoothed_loss(0.1), seed=1)
    closure_model.initialize(model.data_info)
    closure_model.set_weights(model.get_weights())
    signer = hkstore.load_signer(folder / "server.key")
    blob = hkstore.dumps(closure_model, functions="pickle", signer=signer)
    print(f"pickled-closure archive: {len(blob)} bytes")
    try:
        hkstore.loads(blob)
    except hkstore.HkstoreError as exc:
        print(f"  default trust -> refused ({type(exc).__name__}): {str(exc)[:90]}...")
    else:
        raise SystemExit("an unsigned-by-trusted-key pickle was accepted")
    trust = hkstore.Trust(allow_pickle=True, keys=[folder / "server.pub"])
    accepted = hkstore.loads(blob, trust=trust)
    x, y = make_data(8, seed=1)
    same = np.allclose(
        accepted.loss_function(y, accepted.compute_batch_predictions((x, y, None))[1]),
        closure_model.loss_function(y, closure_model.compute_batch_predictions((x, y, None))[1]),
    )
    print(f"  trusted signer's key -> accepted; closure computes the same loss: {same}")


def main() -> int:
    """Run the demo; return the exit status."""
    print(f"device: {choose_device()}")
    x, y = make_data()
    with tempfile.TemporaryDirectory() as tmp:
        model, history = train(x, y, Path(tmp) / "rounds")
        print(f"loss went from {history[0]:.4f} to {history[-1]:.4f}")
        save_and_reload(model, Path(tmp))
        pickled_closure(model, Path(tmp))
    return 0 if history[-1] < history[0] else 1


if __name__ == "__main__":
    sys.exit(main())
