"""harden(): declearn's decoders refuse model payloads outside the allow-list.

Canaries (payloads that create a file if they run) go through every path a peer's bytes
reach in declearn -- a registered peer's message, a ``.mpk`` file, a lazily registered type,
JSON configs (``Model.from_config``, ``FederatedServer(model=path)``, ``Checkpointer``) and a
real websocket frame from a peer that never registered, sent to a running
``FederatedServer`` -- each once hardened and once unhardened (the control: the canary does
fire). Those run in their own processes, which have declearn's own unpickling ``HaikuModel``
decoder registered.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import declearn
import msgpack
import numpy as np
import pytest
from canary_payloads import haiku_model_dump, join_frame, message_bytes, wrapped
from declearn import messaging
from declearn.aggregator import AveragingAggregator
from declearn.communication.api.backend import flags
from declearn.communication.api.backend.actions import ActionMessage, Reject
from declearn.model.api import Model, VectorSpec
from declearn.model.sklearn import NumpyVector
from declearn.optimizer import Optimizer
from declearn.utils.serialize import (
    json_deserialize,
    json_serialize,
    msgpack_deserialize,
    msgpack_serialize,
)
from helpers_cli import subprocess_env
from helpers_models import mlp_model, xent_loss
from websockets.sync.client import connect

import hkstore
from hkstore.errors import FrameworkVersionError, RefusedPayloadError, UnsafeTrustWarning
from hkstore.integrations.declearn import (
    DeclearnHaikuModel,
    check_declearn_internals,
    harden,
    is_hardened,
    set_receive_policy,
    unharden,
)

HERE = Path(__file__).resolve().parent
INFO = {"data_type": "float32", "features_shape": (5,)}
REFUSED = "declearn payload refused"


class RecordingModel(Model):
    """A model type off the allow-list whose decoder records that it ran (an in-process canary)."""

    typekey = "hkstore-test-recording"
    decoded: ClassVar[list[Any]] = []

    @classmethod
    def from_config(cls, config: dict[str, Any], allow_bin: bool = False) -> Any:
        cls.decoded.append(config)
        return config


@pytest.fixture(autouse=True)
def _fresh_recording() -> Iterator[None]:
    RecordingModel.decoded.clear()
    yield
    RecordingModel.decoded.clear()


# --- the tripwire -----------------------------------------------------------------------------


def test_tripwire_the_internals_the_guard_relies_on_are_in_place() -> None:
    """Fails, naming declearn's version, when declearn moves what the guard replaces."""
    check_declearn_internals()
    assert is_hardened()


def test_tripwire_names_the_version_and_what_moved(monkeypatch: pytest.MonkeyPatch) -> None:
    import declearn.utils.serialize._msgpack as declearn_msgpack

    monkeypatch.setattr(declearn_msgpack, "msgpack_load", lambda path: None)
    monkeypatch.delattr(declearn_msgpack, "_msgpack_decode")
    with pytest.raises(FrameworkVersionError) as moved:
        check_declearn_internals()
    text = str(moved.value)
    assert f"declearn {declearn.__version__}" in text
    assert "_msgpack_decode is not a function" in text
    assert "msgpack_load no longer reads _msgpack_decode" in text
    with pytest.raises(FrameworkVersionError):
        harden()  # refuses to half-install


def test_importing_the_engine_part_hardens_and_the_package_alone_does_not_import_declearn() -> (
    None
):
    code = (
        "import sys\n"
        "import hkstore.integrations.declearn as package\n"
        "print('declearn' in sys.modules)\n"
        "from hkstore.integrations.declearn import is_hardened\n"
        "print(is_hardened())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=subprocess_env(), timeout=300, check=True).stdout
    assert out.split() == ["False", "True"]


# --- the rules, in this process ---------------------------------------------------------------


def test_unharden_restores_declearns_decoders_with_a_warning_and_harden_is_idempotent() -> None:
    import declearn.utils.serialize._msgpack as declearn_msgpack

    guard = declearn_msgpack._msgpack_decode
    harden()
    assert declearn_msgpack._msgpack_decode is guard  # no second layer
    with pytest.warns(UnsafeTrustWarning, match="unchecked again"):
        unharden()
    assert not is_hardened()
    assert declearn_msgpack._msgpack_decode.__module__ == "declearn.utils.serialize._msgpack"
    assert Model.__dict__["from_config"].__func__.__module__ == "declearn.model.api._model"
    harden()
    assert is_hardened()


def test_a_model_type_off_the_allow_list_is_refused_before_its_decoder_runs(
    caplog: pytest.LogCaptureFixture,
) -> None:
    wire = msgpack_serialize({"x": wrapped("RecordingModel", {"a": 1})})
    with pytest.raises(RefusedPayloadError, match="model type 'RecordingModel'"):
        msgpack_deserialize(wire)
    with pytest.raises(RefusedPayloadError, match="typekey 'hkstore-test-recording'"):
        Model.from_config({"typekey": "hkstore-test-recording"})
    assert RecordingModel.decoded == []
    assert "model type 'RecordingModel'" in caplog.text  # a log line names why
    harden(allow=[RecordingModel])  # the control: allowed, its decoder runs
    assert msgpack_deserialize(wire) == {"x": {"a": 1}}
    assert Model.from_config({"typekey": "hkstore-test-recording"}) == {
        "typekey": "hkstore-test-recording"}
    assert len(RecordingModel.decoded) == 2


def test_refusals_go_through_declearns_bad_message_handling() -> None:
    payload = {"action": "x", "params": {"m": wrapped("RecordingModel", {})}}
    frame = message_bytes(messaging.GenericMessage.typekey, payload)
    with pytest.raises(ValueError, match="Failed to decode") as rejected:
        messaging.SerializedMessage.from_bin_message(frame).deserialize()
    assert isinstance(rejected.value.__cause__, RefusedPayloadError)
    with pytest.raises(ValueError, match="Failed to parse 'ActionMessage'"):
        ActionMessage.deserialize(join_frame("2.9.1", extra=wrapped("RecordingModel", {})))
    assert RecordingModel.decoded == []


@pytest.mark.parametrize(
    ("obj", "message"),
    [
        (wrapped(3, {}), "type name must be a string"),  # type: ignore[arg-type]
        (wrapped("HkstoreNeverRegistered", {}), None),  # unknown: declearn returns it as is
    ],
)
def test_odd_type_names(obj: Any, message: str | None) -> None:
    wire = msgpack.packb({"v": obj})
    if message is None:
        with pytest.warns(UserWarning, match="seemingly-packed object"):
            assert msgpack_deserialize(wire) == {"v": obj}
    else:
        with pytest.raises(RefusedPayloadError, match=message):
            msgpack_deserialize(wire)


def test_harden_allow_takes_model_classes_only() -> None:
    with pytest.raises(TypeError, match="declearn Model classes"):
        harden(allow=[NumpyVector])
    with pytest.raises(TypeError, match="declearn Model classes"):
        harden(allow=["RecordingModel"])  # type: ignore[list-item]


def test_legitimate_hkstore_traffic_still_decodes_while_hardened() -> None:
    set_receive_policy(trust=hkstore.Trust(modules=["helpers_models"]))
    model = DeclearnHaikuModel(hkstore.HaikuModel(mlp_model, xent_loss, seed=0))
    model.initialize(INFO)
    weights = model.get_weights()
    optim = Optimizer(lrate=0.1, modules=["adam"])
    optim.compute_updates_from_gradients(model, weights)
    shared = AveragingAggregator().prepare_for_sharing(weights, n_steps=3)
    traffic = {
        "model": model,
        "weights": weights,
        "numpy": NumpyVector({"a": np.ones(2)}),
        "optimizer": optim,
        "state": optim.get_state(),
        "updates": shared,
        "spec": weights.flatten()[1],
        "array": np.arange(3),
        "set": {1, 2},
    }
    back = msgpack_deserialize(msgpack_serialize(traffic))
    assert isinstance(back["model"], DeclearnHaikuModel)
    assert back["model"].get_weights() == weights
    assert back["weights"] == weights and isinstance(back["spec"], VectorSpec)
    assert isinstance(back["optimizer"], Optimizer) and back["set"] == {1, 2}
    assert back["updates"].updates == shared.updates
    assert json_deserialize(json_serialize({"w": weights}))["w"] == weights
    assert is_hardened()


# --- canaries: every path, in processes with declearn's unpickling decoder ---------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Child:
    """A child process, its output folder and its stderr file."""

    process: subprocess.Popen[bytes]
    folder: Path
    log: Path
    port: int = 0

    def stderr(self) -> str:
        return self.log.read_text(errors="replace")


def start(script: str, *args: object, folder: Path) -> Child:
    folder.mkdir(parents=True, exist_ok=True)
    log = folder / "stderr.txt"
    with log.open("wb") as handle:
        process = subprocess.Popen(
            [sys.executable, str(HERE / script), *map(str, args)],
            stdout=subprocess.DEVNULL, stderr=handle, env=subprocess_env([HERE]),
        )
    return Child(process, folder, log)


@pytest.fixture(scope="module")
def children(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Child]]:
    """The four processes, started together (their start-up is mostly imports)."""
    base = tmp_path_factory.mktemp("canaries")
    started = {}
    for mode in ("hardened", "control"):
        started[f"run-{mode}"] = start("canary_run.py", mode, base / f"run-{mode}",
                                       folder=base / f"run-{mode}")
        port = free_port()
        started[f"server-{mode}"] = start("ws_server.py", mode, port,
                                          folder=base / f"server-{mode}")
        started[f"server-{mode}"].port = port
    try:
        yield started
    finally:
        for child in started.values():
            if child.process.poll() is None:
                child.process.kill()
            child.process.wait(timeout=60)


def runner_results(child: Child) -> dict[str, Any]:
    code = child.process.wait(timeout=600)
    assert code == 0, child.stderr()
    return json.loads((child.folder / "results.json").read_text())


PATHS = ["message", "mpk", "lazy", "json", "server", "checkpoint"]


@pytest.mark.parametrize("path", PATHS)
def test_canary_path_is_refused_hardened_and_fires_unhardened(
    children: dict[str, Child], path: str
) -> None:
    hardened = runner_results(children["run-hardened"])
    control = runner_results(children["run-control"])
    assert hardened["hardened"] is True and control["hardened"] is False
    assert control[path]["fired"], f"control: the {path} canary did not fire: {control[path]}"
    assert not hardened[path]["fired"], f"hardened: the {path} canary fired"
    assert REFUSED in hardened[path]["error"], hardened[path]["error"]
    if path == "lazy":  # refused before declearn imports the module named for the type
        assert hardened["lazy"]["module_imported"] is False
        assert hardened["lazy"]["import_canary"] is False
        assert control["lazy"]["module_imported"] and control["lazy"]["import_canary"]
        assert "only lazily registered" in hardened["lazy"]["error"]
    else:
        assert "'haiku'" in hardened[path]["error"] or "'HaikuModel'" in hardened[path]["error"]


def wait_for_server(child: Child, timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if child.process.poll() is not None:
            pytest.fail(f"the server exited ({child.process.returncode}): {child.stderr()}")
        try:
            with socket.create_connection(("127.0.0.1", child.port), timeout=1):
                return
        except OSError:
            time.sleep(0.5)
    pytest.fail(f"the server did not listen within {timeout}s: {child.stderr()}")


def send_frame(port: int, frame: bytes) -> ActionMessage:
    with connect(f"ws://127.0.0.1:{port}", open_timeout=60) as peer:
        peer.send(frame)
        reply = peer.recv(timeout=60)
    assert isinstance(reply, bytes)
    return ActionMessage.deserialize(reply)


@pytest.mark.parametrize("mode", ["hardened", "control"])
def test_a_websocket_frame_from_an_unregistered_peer(
    children: dict[str, Child], mode: str
) -> None:
    """One frame, before any registration, to a running FederatedServer on 127.0.0.1."""
    server = children[f"server-{mode}"]
    wait_for_server(server)
    canary = server.folder / "frame-canary"
    hostile = join_frame(declearn.__version__, extra=wrapped("HaikuModel",
                                                             haiku_model_dump(canary)))
    reply = send_frame(server.port, hostile)
    assert reply == Reject(flags.INVALID_MESSAGE)  # rejected either way...
    if mode == "control":
        assert canary.exists(), "control: the frame's canary did not fire in the server"
        return
    assert not canary.exists()  # ...but hardened, nothing ran
    assert server.process.poll() is None  # the server keeps running
    log = server.stderr()
    assert "hardened=True" in log
    assert f"{REFUSED}: model type 'HaikuModel'" in log  # a log line naming why
    welcome = send_frame(server.port, msgpack.packb(
        {"action": "join", "name": "honest", "version": declearn.__version__}))
    assert welcome.flag == flags.REGISTERED_WELCOME  # and still registers peers
    assert server.process.poll() is None
