"""One party of the demo's federated run (declearn's engine, websockets on 127.0.0.1).

Usage::

    python federated.py server --dir runs/server --port 8765 [--rounds 4]
    python federated.py client --name client-1 --dir runs/client-1 --port 8765
    python federated.py straight --dir runs/straight --port 8766 [--rounds 4]

``server`` runs a :class:`ResumableFederatedServer`: started again on the same directory after
a crash, it resumes after the latest saved round. ``client`` runs a
:class:`ResumableFederatedClient` (client ``client-N`` holds ``nets.client_data(N)``), which
reconnects when the server restarts and restores its own state of the round the server resumes
from. ``straight`` runs the server and both clients in this one process, uninterrupted, with
checkpoints in ``DIR/server``, ``DIR/client-1``, ``DIR/client-2`` (the reference a resumed run
is compared with). Logs go to stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path

import declearn.utils
import nets
from declearn.dataset import InMemoryDataset
from declearn.main.config import FLOptimConfig, FLRunConfig

import hkstore
from hkstore.integrations.declearn import (
    DeclearnHaikuModel,
    HkstoreCheckpointer,
    ResumableFederatedClient,
    ResumableFederatedServer,
    set_receive_policy,
)

CLIENTS = ("client-1", "client-2")


def server(folder: Path, port: int, rounds: int) -> tuple[ResumableFederatedServer, FLRunConfig]:
    """The server: an hkstore model whose encoder is frozen, FedAvg with Adam on the server."""
    model = DeclearnHaikuModel(hkstore.HaikuModel(nets.forward, nets.loss, seed=0),
                               trainable=nets.frozen)
    optim = FLOptimConfig.from_params(
        aggregator="averaging",
        client_opt={"lrate": 0.05, "modules": [("momentum", {"beta": 0.9})]},
        server_opt={"lrate": 0.05, "modules": ["adam"]},
    )
    # heartbeat: how often the server polls for messages (declearn's default: every second)
    netwk = {"protocol": "websockets", "host": "127.0.0.1", "port": port, "heartbeat": 0.05}
    config = FLRunConfig.from_params(
        rounds=rounds,
        register={"min_clients": len(CLIENTS), "max_clients": len(CLIENTS), "timeout": 600},
        training={"batch_size": 16, "shuffle": True},  # shuffled: the data generator matters
        evaluate={"batch_size": 96},
    )
    return ResumableFederatedServer(model, netwk, optim,
                                    checkpoint=HkstoreCheckpointer(folder)), config


def client(name: str, folder: Path, port: int) -> ResumableFederatedClient:
    """Client ``name``: its data, its checkpoint directory; it runs nothing from the wire."""
    x, y = nets.client_data(CLIENTS.index(name) + 1)
    data = InMemoryDataset(data=x, target=y, seed=CLIENTS.index(name) + 10,
                           expose_data_type=True)
    netwk = {"protocol": "websockets", "server_uri": f"ws://127.0.0.1:{port}", "name": name}
    return ResumableFederatedClient(netwk, data, checkpoint=HkstoreCheckpointer(folder),
                                    verbose=False)


async def straight(folder: Path, port: int, rounds: int) -> None:
    """Server and clients in this process, one event loop, no interruption."""
    srv, config = server(folder / "server", port, rounds)
    await asyncio.gather(srv.async_run(config),
                         *(client(name, folder / name, port).async_run() for name in CLIENTS))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("role", choices=["server", "client", "straight"])
    parser.add_argument("--dir", type=Path, required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--name", choices=CLIENTS, default=CLIENTS[0])
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args(argv)
    party = args.name if args.role == "client" else args.role
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format=f"%(asctime)s {party:<8} %(message)s")
    logging.getLogger("hkstore.integrations.declearn").setLevel(logging.INFO)
    declearn.utils.set_device_policy(gpu=False)  # the demo runs on the CPU
    hkstore.set_device_policy(gpu=False)
    # receivers use their own functions: nothing named on the wire is imported or unpickled
    set_receive_policy(model=nets.forward, loss=nets.loss)
    if args.role == "server":
        srv, config = server(args.dir, args.port, args.rounds)
        srv.run(config)
    elif args.role == "client":
        client(args.name, args.dir, args.port).run()
    else:
        asyncio.run(straight(args.dir, args.port, args.rounds))
    return 0


if __name__ == "__main__":
    sys.exit(main())
