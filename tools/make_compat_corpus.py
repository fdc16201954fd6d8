"""Write the cross-version compatibility archives of one hkstore release.

Usage: python tools/make_compat_corpus.py OUT_DIR

Writes, with the public API of the hkstore installed (run it once per release, from that
release's checkout, and commit the folder as ``tests/corpus/compat/<version>/``):

- ``unsigned.hkz``: functions ``none``, no signature;
- ``signed-ed25519.hkz``: the same model, signed with the fixed test key below;
- ``zstd.hkz``: weights compressed with zstd, unsigned;
- ``pickle-signed.hkz``: model and loss pickled by value (cloudpickle), signed;
- ``compat-test.pub``: the public key of the fixed test key (its seed is 32 bytes 0x01; it is
  a published test key, never a real one);
- ``expected.json``: per archive, its SHA-256 and each tensor's dtype, shape and the SHA-256
  of its raw bytes, taken from the model's weights (not from the archive), so a reader's
  output can be checked independently of the digests the archive records.

The model has float32, bfloat16 and int32 weights, a 0-d one and a zero-size one, so the
archives exercise more than one dtype and the shape edge cases.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import Any

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np

TEST_KEY_SEED = b"\x01" * 32
FEATURES = 4


def compat_model(x: jax.Array) -> jax.Array:
    """A small MLP plus a bfloat16 scale, an int32 counter, and a zero-size tensor."""
    h = jax.nn.relu(hk.Linear(8, name="hidden")(x))
    y = hk.Linear(3, name="head")(h)
    scale = hk.get_parameter("scale", (), jnp.bfloat16, init=hk.initializers.Constant(1.5))
    steps = hk.get_parameter("steps", (2,), jnp.int32, init=hk.initializers.Constant(7))
    empty = hk.get_parameter("empty", (0, 3), jnp.float32, init=jnp.zeros)
    bias = (steps.sum() + empty.sum()).astype(jnp.float32)
    return y * scale.astype(jnp.float32) + bias * 0.0


def compat_loss(y_pred: jax.Array, y_true: jax.Array) -> jax.Array:
    """Per-sample mean squared error."""
    return jnp.mean(jnp.square(y_pred - y_true), axis=-1)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print(__doc__.split("\n\n")[1], file=sys.stderr)
        return 2
    import hkstore
    from hkstore.store._keys import public_key_pem

    out = Path(args[0])
    # cloudpickle stores the defining module's __file__ with a by-value function: keep this
    # machine's path out of the committed archives
    globals()["__file__"] = Path(__file__).name
    out.mkdir(parents=True, exist_ok=True)
    hkstore.set_device_policy(gpu=False)
    model = hkstore.HaikuModel(compat_model, compat_loss, seed=3)
    model.initialize({"data_type": "float32", "features_shape": [FEATURES]})
    model.set_trainable_weights(["hidden:w", "hidden:b", "head:w", "head:b"])
    signer = hkstore.Ed25519Signer.from_private_bytes(TEST_KEY_SEED)
    (out / "compat-test.pub").write_bytes(public_key_pem(signer.verifier()))
    meta = {"round": 5, "note": "compat corpus"}
    cases: dict[str, dict[str, Any]] = {
        "unsigned.hkz": {"functions": "none"},
        "signed-ed25519.hkz": {"functions": "none", "signer": signer},
        "zstd.hkz": {"functions": "none", "compression": "zstd"},
        "pickle-signed.hkz": {"functions": "pickle", "signer": signer},
    }
    weights = {
        name: np.asarray(value) for name, value in model.get_weights().coefs.items()
    }
    tensors = {
        name: {
            "dtype": str(array.dtype),
            "shape": list(array.shape),
            "sha256": hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest(),
        }
        for name, array in weights.items()
    }
    expected: dict[str, Any] = {
        "hkstore": hkstore.__version__,
        "key_id": signer.key_id,
        "trainable": model.get_weight_names(trainable=True),
        "metadata": meta,
        "tensors": tensors,
        "archives": {},
    }
    for name, kwargs in cases.items():
        path = out / name
        hkstore.save(model, path, metadata=meta, **kwargs)
        expected["archives"][name] = {
            "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
            "signed": "signer" in kwargs,
            "functions": kwargs["functions"],
            "compression": kwargs.get("compression"),
        }
    (out / "expected.json").write_text(
        json.dumps(expected, indent=1, sort_keys=True) + "\n", encoding="utf-8"
    )
    print(f"wrote {len(cases)} archives to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
