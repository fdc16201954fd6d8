"""In-process federated runs for the resume tests: a server and clients on one event loop,
talking over real websockets on 127.0.0.1, checkpointing with HkstoreCheckpointer.

A *straight* run never stops. An *interrupted* run cancels the server task once its
checkpoint directory lists a given round (the server's network endpoint closes, so the
clients lose their connection as they would if its process died), optionally cancels some
clients too (a client process that dies; it is rebuilt from scratch with the same
directory) or changes the files, then starts a new server on the same directory and port.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
from declearn.dataset import InMemoryDataset
from declearn.main.config import FLOptimConfig, FLRunConfig

import hkstore
from hkstore.integrations.declearn import (
    DeclearnHaikuModel,
    HkstoreCheckpointer,
    ResumableFederatedClient,
    ResumableFederatedServer,
)

FEATURES = 6


def forward(x: jax.Array) -> jax.Array:
    """encoder (frozen) -> hidden with dropout (the model's random state matters) -> head."""
    h = jax.nn.relu(hk.Linear(8, name="encoder")(x))
    h = hk.dropout(hk.next_rng_key(), 0.2, jax.nn.tanh(hk.Linear(8, name="hidden")(h)))
    return hk.Linear(3, name="head")(h)


def loss(y_pred: jax.Array, y_true: jax.Array) -> jax.Array:
    logp = jax.nn.log_softmax(y_pred)
    return -jnp.take_along_axis(logp, y_true[:, None].astype(jnp.int32), axis=-1)[:, 0]


def not_encoder(module: str, name: str, value: object) -> bool:
    return module != "encoder"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def rounds_on_disk(folder: Path) -> list[int]:
    """Complete rounds (``round-N/round.json``), read from the directory listing."""
    if not folder.is_dir():
        return []
    return sorted(int(p.name[6:]) for p in folder.iterdir()
                  if p.name.startswith("round-") and (p / "round.json").is_file())


@dataclass
class Setup:
    """What a run uses; both runs of a comparison share one."""

    clients: tuple[str, ...] = ("client-1", "client-2")
    rounds: int = 4
    server_opt: Any = field(default_factory=lambda: {"lrate": 0.05, "modules": ["adam"]})
    client_opt: Any = field(default_factory=lambda: {
        "lrate": 0.1, "modules": [("momentum", {"beta": 0.9})]})
    sampler: Any = None
    early_stop: dict[str, Any] | None = None
    eval_frequency: int = 1

    def model(self) -> DeclearnHaikuModel:
        """The server's model: not initialized yet, the encoder frozen at initialization."""
        return DeclearnHaikuModel(hkstore.HaikuModel(forward, loss, seed=0),
                                  trainable=not_encoder)

    def optim(self) -> FLOptimConfig:
        return FLOptimConfig.from_params(aggregator="averaging", client_opt=self.client_opt,
                                         server_opt=self.server_opt)

    def netwk(self, port: int) -> dict[str, Any]:
        return {"protocol": "websockets", "host": "127.0.0.1", "port": port,
                "heartbeat": 0.02}

    def server(self, folder: Path, port: int, **kwargs: Any
               ) -> tuple[ResumableFederatedServer, FLRunConfig]:
        server = ResumableFederatedServer(self.model(), self.netwk(port), self.optim(),
                                          client_sampler=self.sampler,
                                          checkpoint=HkstoreCheckpointer(folder), **kwargs)
        params: dict[str, Any] = {
            "rounds": self.rounds,
            "register": {"min_clients": len(self.clients), "max_clients": len(self.clients),
                         "timeout": 300},
            "training": {"batch_size": 8, "shuffle": True},
            "evaluate": {"batch_size": 32, "frequency": self.eval_frequency},
        }
        if self.early_stop is not None:
            params["early_stop"] = self.early_stop
        return server, FLRunConfig.from_params(**params)

    def client(self, name: str, folder: Path | None, port: int, **kwargs: Any
               ) -> ResumableFederatedClient:
        index = self.clients.index(name) + 1
        rng = np.random.default_rng(index)
        x = (rng.normal(size=(32, FEATURES)) + 0.5 * index).astype(np.float32)
        y = (np.argmax(x[:, :3], axis=1) + index) % 3
        data = InMemoryDataset(data=x, target=y.astype(np.int32), seed=100 + index,
                               expose_data_type=True)
        netwk = {"protocol": "websockets", "server_uri": f"ws://127.0.0.1:{port}", "name": name}
        checkpoint = None if folder is None else HkstoreCheckpointer(folder)
        kwargs.setdefault("reconnect_timeout", 120)
        return ResumableFederatedClient(netwk, data, checkpoint=checkpoint, verbose=False,
                                        **kwargs)


async def straight(setup: Setup, folder: Path) -> None:
    """Server and clients, never interrupted (checkpoints in ``folder/<party>``)."""
    port = free_port()
    server, config = setup.server(folder / "server", port)
    await asyncio.wait_for(asyncio.gather(
        server.async_run(config),
        *(setup.client(name, folder / name, port).async_run() for name in setup.clients)),
        timeout=300)


async def until(check: Callable[[], bool], tasks: list[asyncio.Task[Any]], what: str,
                timeout: float = 300.0) -> None:
    """Poll ``check``; fail if a task ends first (with its error) or after ``timeout``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not check():
        for task in tasks:
            if task.done():
                task.result()  # raises the task's error
                raise AssertionError(f"a party finished before {what}")
        if loop.time() > deadline:
            raise TimeoutError(f"{what}: not within {timeout:.0f} s")
        await asyncio.sleep(0.01)


async def cancel(task: asyncio.Task[Any]) -> None:
    """Cancel a party's task and wait for it to end.

    A cancelled server closes its endpoint (the clients' connections are closed, as when its
    process dies), then waits for its connection handlers, which declearn keeps polling
    for messages: they never end, so the wait is cancelled too.
    """
    while not task.done():
        task.cancel()
        await asyncio.wait({task}, timeout=1.0)
    with contextlib.suppress(asyncio.CancelledError):
        await task


@dataclass
class Interruption:
    """What happened to an interrupted run (for the assertions)."""

    server_rounds: list[int] = field(default_factory=list)
    client_rounds: dict[str, list[int]] = field(default_factory=dict)


async def interrupted(
    setup: Setup,
    folder: Path,
    *,
    after: Callable[[Path], bool],
    restart_clients: tuple[str, ...] = (),
    between: Callable[[Path], None] | None = None,
) -> Interruption:
    """Run until ``after(folder)`` holds, stop the server (and the clients in
    ``restart_clients``), call ``between(folder)``, start a new server (and new clients for
    those stopped) on the same directories and port, and finish."""
    port = free_port()
    server, config = setup.server(folder / "server", port)
    clients = {name: asyncio.ensure_future(setup.client(name, folder / name, port).async_run())
               for name in setup.clients}
    first = asyncio.ensure_future(server.async_run(config))
    await until(lambda: after(folder), [first, *clients.values()], "the interruption")
    await cancel(first)
    for name in restart_clients:
        await cancel(clients[name])
    seen = Interruption(rounds_on_disk(folder / "server"),
                        {name: rounds_on_disk(folder / name) for name in setup.clients})
    if between is not None:
        between(folder)
    for name in restart_clients:
        clients[name] = asyncio.ensure_future(
            setup.client(name, folder / name, port).async_run())
    server, config = setup.server(folder / "server", port)
    await asyncio.wait_for(asyncio.gather(server.async_run(config), *clients.values()),
                           timeout=300)
    return seen


def same_bits(a: Any, b: Any) -> bool:
    a, b = np.asarray(a), np.asarray(b)
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def differences(a: Any, b: Any, path: str = "$") -> list[str]:
    """Every path where two restored trees differ (arrays and floats bit for bit)."""
    if isinstance(a, dict) and isinstance(b, dict):
        if set(a) != set(b):
            return [f"{path}: keys {sorted(a)} vs {sorted(b)}"]
        return [d for k in sorted(a) for d in differences(a[k], b[k], f"{path}[{k!r}]")]
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        if type(a) is not type(b) or len(a) != len(b):
            return [f"{path}: {a!r} vs {b!r}"]
        return [d for i, (x, y) in enumerate(zip(a, b, strict=True))
                for d in differences(x, y, f"{path}[{i}]")]
    if hasattr(a, "dtype") or hasattr(b, "dtype") or isinstance(a, float):
        return [] if same_bits(a, b) else [f"{path}: {a!r} vs {b!r}"]
    return [] if a == b else [f"{path}: {a!r} vs {b!r}"]


def scaffold_names(run: Path) -> dict[str, str]:
    """``{uuid: client name}``: Scaffold names each client's state by a random uuid, drawn
    anew in every run (restored on resume); runs are compared with names instead."""
    found = {}
    for folder in run.iterdir():
        rounds = rounds_on_disk(folder)
        if folder.name.startswith("client-") and rounds:
            state = hkstore.Checkpointer(folder).restore(rounds[-1], model=forward,
                                                         loss=loss).state
            for name, module in state["optimizer"]["state"]["modules"]:
                if name == "scaffold-client":
                    found[module["uuid"]] = folder.name
    return found


def renamed(tree: Any, names: dict[str, str]) -> Any:
    """``tree`` with Scaffold's client uuids replaced by names; Scaffold's server keeps its
    clients as a set, saved as a list in set order (string hashing, uuids drawn anew each
    run), so that list is compared sorted."""
    if isinstance(tree, dict):
        return {k: sorted(renamed(v, names)) if k == "clients" and isinstance(v, list)
                else renamed(v, names) for k, v in tree.items()}
    if isinstance(tree, list | tuple):
        return type(tree)(renamed(v, names) for v in tree)
    return names.get(tree, tree) if isinstance(tree, str) else tree


def round_differences(a: Path, b: Path, number: int) -> list[str]:
    """Everything that differs between round ``number`` of two checkpoint directories
    (``RUN/party``): weights, trainable mask, random state, state (Scaffold's client uuids
    replaced by client names) and metrics."""
    ra = hkstore.Checkpointer(a).restore(number, model=forward, loss=loss)
    rb = hkstore.Checkpointer(b).restore(number, model=forward, loss=loss)
    wa, wb = ra.model.get_weights().coefs, rb.model.get_weights().coefs
    found = [f"weight {n}" for n in wa if not same_bits(wa[n], wb[n])]
    if ra.model.get_weight_names(trainable=True) != rb.model.get_weight_names(trainable=True):
        found.append("trainable mask")
    if ra.model.rng_state != rb.model.rng_state:
        found.append("random state")
    state_a = renamed(ra.state, scaffold_names(a.parent))
    state_b = renamed(rb.state, scaffold_names(b.parent))
    found += [f"state {d}" for d in differences(state_a, state_b)]
    if ra.metrics != rb.metrics:
        found.append(f"metrics {ra.metrics} vs {rb.metrics}")
    return found
