"""Doctest collection of the package: modules that need an optional framework are skipped
here when it is not installed, and their doctests run in that framework's own venv instead
(``make test-declearn``, ``make test-flower``). Nothing else is left out.

Every doctest runs in a fresh temporary folder (its working directory), holding a small
example world built once per session: ``round-3.hkz`` (``model`` saved with
``metadata={"round": 3}``), ``runs/exp1`` (a checkpoint directory with rounds 3 and 4) and
``ckpt`` (``model`` in a declearn 2.x checkpoint folder).
Its namespace holds, besides the module's own names, only the names its examples use among:
``hkstore``, ``np``, ``jax``, ``jnp``, ``hk``, ``optax``, ``Path``, ``tmp`` (the folder),
``forward_fn``/``forward`` and ``loss_fn``/``loss`` (a small haiku MLP and its per-sample MSE),
``model`` (a fresh ``hkstore.HaikuModel`` of them, seed 0, initialized for 3 float32
features), ``batch`` (8 samples of it), ``opt_state`` (an optax SGD-with-momentum state of
``model``'s weights) and ``signer``/``verifier`` (an Ed25519 key pair). jax and haiku are
imported only when a doctest runs.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import pickle
import re
import shutil
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from _pytest.doctest import DoctestItem

#: Modules whose import needs declearn: the engine part of hkstore.integrations.declearn.
_DECLEARN_MODULES = ["_checkpointer.py", "_client.py", "_engine.py", "_harden.py", "_messages.py",
                     "_model.py", "_policy.py", "_server.py", "_states.py", "_vector.py"]

#: Modules whose import needs flwr: all of hkstore.integrations.flower but its package file,
#: whose doctest needs flwr too.
_FLOWER_MODULES = ["__init__.py", "_history.py", "_records.py", "_state.py", "_strategy.py"]

collect_ignore_glob: list[str] = []
if importlib.util.find_spec("declearn") is None:
    collect_ignore_glob += [f"hkstore/integrations/declearn/{name}" for name in _DECLEARN_MODULES]
if importlib.util.find_spec("flwr") is None:
    collect_ignore_glob += [f"hkstore/integrations/flower/{name}" for name in _FLOWER_MODULES]


# --- the doctests' example world ----------------------------------------------------------

def forward_fn(x: Any) -> Any:
    """The examples' model: a two-layer haiku MLP (4 hidden units, 1 output)."""
    import haiku as hk

    return hk.nets.MLP([4, 1])(x)


def loss_fn(y_pred: Any, y_true: Any) -> Any:
    """The examples' per-sample loss: mean squared error over the last axis."""
    import jax.numpy as jnp

    return jnp.mean((y_pred - y_true) ** 2, axis=-1)


# The examples store both functions by reference, so ``module:qualname`` must find them. This
# file and tests/conftest.py are both imported as ``conftest`` (the later one replaces the
# other in sys.modules), so the functions are given a module name of their own.
_WORLD_MODULE = "hkstore_doctest_world"
sys.modules[_WORLD_MODULE] = sys.modules[__name__]
forward_fn.__module__ = loss_fn.__module__ = _WORLD_MODULE


def _new_model() -> Any:
    import hkstore

    model = hkstore.HaikuModel(forward_fn, loss_fn, seed=0)
    model.initialize({"data_type": "float32", "features_shape": (3,)})
    return model


def _batch() -> Any:
    import numpy as np

    x = np.linspace(-1.0, 1.0, 24, dtype=np.float32).reshape(8, 3)
    return x, x.sum(axis=1, keepdims=True), None


def _opt_state(model: Any) -> Any:
    import optax

    return optax.sgd(0.1, momentum=0.9).init(dict(model.get_weights().coefs))


def _keypair(folder: Path) -> tuple[Any, Any]:
    import hkstore

    hkstore.generate_ed25519_keypair(folder / "doctest-key")
    return (hkstore.load_signer(folder / "doctest-key.key"),
            hkstore.load_verifier(folder / "doctest-key.pub"))


@contextlib.contextmanager
def _on_the_cpu() -> Iterator[None]:
    """The CPU device policy (the default asks for a GPU, and warns on a machine without)."""
    if importlib.util.find_spec("jax") is None:  # the bare package: no model to place
        yield
        return
    from hkstore.model import get_device_policy, set_device_policy

    before = get_device_policy()
    set_device_policy(gpu=False)
    try:
        yield
    finally:
        set_device_policy(gpu=before.gpu, idx=before.idx)


def _declearn_checkpoint(folder: Path, model: Any) -> None:
    """``model`` as a declearn 2.x ``Checkpointer`` folder holds it, written without declearn:
    ``model_config.json`` (the functions pickled by reference, as hex) and one
    ``model_state_<YY-MM-DD_HH-MM-SS>.mpk`` (the weights as a MessagePack JaxNumpyVector)."""
    import msgpack
    import numpy as np

    folder.mkdir()
    config = {"typekey": "haiku", "model": pickle.dumps(forward_fn, protocol=4).hex(),
              "loss": pickle.dumps(loss_fn, protocol=4).hex(), "data_info": model.data_info}
    (folder / "model_config.json").write_text(json.dumps(config), encoding="utf-8")
    dump = {}
    for name, value in model.get_weights().coefs.items():
        array = np.asarray(value)
        dump[name] = {"__type__": "np.ndarray",
                      "dump": [array.tobytes(), array.dtype.char, list(array.shape)]}
    state = msgpack.packb({"__type__": "JaxNumpyVector", "dump": dump}, use_bin_type=True)
    (folder / "model_state_26-11-29_12-00-00.mpk").write_bytes(state)


@pytest.fixture(scope="session")
def _doctest_world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The files every doctest finds in its folder, built once per session."""
    import hkstore

    world = tmp_path_factory.mktemp("doctest-world")
    with _on_the_cpu():
        model = _new_model()
        hkstore.save(model, world / "round-3.hkz", metadata={"round": 3})
        with hkstore.Checkpointer(world / "runs" / "exp1") as ckpt:
            for number in (3, 4):
                ckpt.save(model, number, state=_opt_state(model),
                          metrics={"loss": 0.5 / number})
        _declearn_checkpoint(world / "ckpt", model)
    return world


def _names_used(item: DoctestItem) -> set[str]:
    """The names the doctest's examples use that its module does not define itself."""
    assert item.dtest is not None
    return {name for example in item.dtest.examples
            for name in re.findall(r"[A-Za-z_]\w*", example.source)} - set(item.dtest.globs)


@pytest.fixture(autouse=True)
def _doctest_setup(request: pytest.FixtureRequest) -> Iterator[None]:
    """For doctests only: run in a fresh copy of the example world, with its names.

    Other tests get nothing, not even ``tmp_path`` or ``monkeypatch`` set up earlier than they
    ask for them (that would change the order their fixtures are torn down in)."""
    if not isinstance(request.node, DoctestItem):
        yield
        return
    tmp_path: Path = request.getfixturevalue("tmp_path")
    monkeypatch: pytest.MonkeyPatch = request.getfixturevalue("monkeypatch")
    shutil.copytree(request.getfixturevalue("_doctest_world"), tmp_path, dirs_exist_ok=True)
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, Any] = request.getfixturevalue("doctest_namespace")
    used = _names_used(request.node)
    made: dict[str, Any] = {}

    def get(name: str) -> Any:
        if name not in made:
            made[name] = _MAKERS[name](get, tmp_path)
        return made[name]

    added = [name for name in _MAKERS if name in used and not name.startswith("_")]
    with _on_the_cpu():
        for name in added:
            namespace[name] = get(name)
        yield
    for name in added:
        namespace.pop(name, None)


def _module(name: str) -> Callable[[Callable[[str], Any], Path], Any]:
    return lambda get, tmp: importlib.import_module(name)


def _signer(get: Callable[[str], Any], tmp: Path) -> Any:
    return get("_keys")[0]


def _verifier(get: Callable[[str], Any], tmp: Path) -> Any:
    return get("_keys")[1]


_MAKERS: dict[str, Callable[[Callable[[str], Any], Path], Any]] = {
    "hkstore": _module("hkstore"),
    "np": _module("numpy"),
    "jax": _module("jax"),
    "jnp": _module("jax.numpy"),
    "hk": _module("haiku"),
    "optax": _module("optax"),
    "Path": lambda get, tmp: Path,
    "tmp": lambda get, tmp: tmp,
    "forward_fn": lambda get, tmp: forward_fn,
    "forward": lambda get, tmp: forward_fn,
    "loss_fn": lambda get, tmp: loss_fn,
    "loss": lambda get, tmp: loss_fn,
    "model": lambda get, tmp: _new_model(),
    "batch": lambda get, tmp: _batch(),
    "opt_state": lambda get, tmp: _opt_state(get("model")),
    "_keys": lambda get, tmp: _keypair(tmp),
    "signer": _signer,
    "verifier": _verifier,
}
