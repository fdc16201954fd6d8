"""Hand each canary payload to one of declearn's decoding paths; report which canaries fired.

Usage: ``python canary_run.py hardened|control OUT_DIR``. Runs in its own process because it
imports ``declearn.model.haiku`` (registering declearn's unpickling ``HaikuModel`` decoder,
as any process that uses declearn's Haiku support has; it also turns on ``jax_enable_x64``).
"hardened": as the integration leaves it; "control": after ``unharden()``. Writes
``OUT_DIR/results.json``: for each path, whether its canary file exists, the error raised (if
any) and, for the lazy path, whether the lazily registered module was imported.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
import warnings
from pathlib import Path
from typing import Any

import declearn.model.haiku  # noqa: F401  (the vulnerable decoder, registered)
import msgpack
from canary_payloads import (
    haiku_model_config,
    haiku_model_dump,
    message_bytes,
    wrapped,
)
from declearn import messaging
from declearn.main import FederatedServer
from declearn.main.utils import Checkpointer
from declearn.model.api import Model
from declearn.utils.serialize import (
    add_lazy_serial_support,
    json_dump,
    msgpack_deserialize,
    msgpack_load,
)

import hkstore.integrations.declearn as integration

mode, out = sys.argv[1], Path(sys.argv[2])
os.environ["HKSTORE_CANARY_DIR"] = str(out)
if mode == "control":
    with warnings.catch_warnings(record=True):
        integration.unharden()
results: dict[str, Any] = {"hardened": integration.is_hardened()}


def attempt(name: str, action: Any) -> None:
    canary = out / name
    try:
        action(canary)
        error = None
    except Exception as exc:  # the outcome is what the test checks
        chain = []
        while exc is not None:
            chain.append(f"{type(exc).__name__}: {exc}")
            exc = exc.__cause__ or exc.__context__
        error = " <- ".join(chain)
    results[name] = {"fired": canary.exists(), "error": error}


def message_path(canary: Path) -> None:  # a registered peer's message, either side
    payload = {"action": "train", "params": {"model": wrapped("HaikuModel",
                                                              haiku_model_dump(canary))}}
    frame = message_bytes(messaging.GenericMessage.typekey, payload)
    messaging.SerializedMessage.from_bin_message(frame).deserialize()


def mpk_path(canary: Path) -> None:  # a tampered checkpoint file
    path = out / "state.mpk"
    path.write_bytes(msgpack.packb({"weights": wrapped("HaikuModel", haiku_model_dump(canary))}))
    msgpack_load(str(path))


def lazy_path(canary: Path) -> None:  # a type declearn only knows by the module to import
    add_lazy_serial_support("HkstoreCanaryLazyModel", module="canary_lazy")
    dump = haiku_model_dump(canary)
    msgpack_deserialize(msgpack.packb(wrapped("HkstoreCanaryLazyModel", dump)))


def json_path(canary: Path) -> None:  # Model.from_config on a JSON config
    Model.from_config(haiku_model_config(canary))


def server_path(canary: Path) -> None:  # FederatedServer(model=<JSON file>)
    path = out / "model.json"
    json_dump(haiku_model_config(canary), str(path))
    FederatedServer(model=str(path), netwk={"protocol": "websockets", "host": "127.0.0.1",
                                            "port": 0}, optim={"client_opt": 0.1})


def checkpoint_path(canary: Path) -> None:  # Checkpointer.load_model() on a folder
    folder = out / "ckpt"
    folder.mkdir()
    json_dump(haiku_model_config(canary), str(folder / "model_config.json"))
    Checkpointer(str(folder)).load_model()


for name, action in [("message", message_path), ("mpk", mpk_path), ("lazy", lazy_path),
                     ("json", json_path), ("server", server_path),
                     ("checkpoint", checkpoint_path)]:
    attempt(name, action)
results["lazy"]["module_imported"] = "canary_lazy" in sys.modules
results["lazy"]["import_canary"] = (out / "lazy-import").exists()
try:
    (out / "results.json").write_text(json.dumps(results, indent=1))
except Exception:  # pragma: no cover - report why the runner failed
    traceback.print_exc()
    raise
