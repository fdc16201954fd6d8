"""A running declearn FederatedServer (websockets, 127.0.0.1) for the action-frame canary.

Usage: ``python ws_server.py hardened|control PORT``. The process has declearn's own
``HaikuModel`` decoder registered (``import declearn.model.haiku``), serves an hkstore model
and waits for clients until it is killed; "control" runs it after ``unharden()``. Logs go to
stderr (the test reads them).
"""

from __future__ import annotations

import logging
import sys
import warnings

import declearn.model.haiku  # noqa: F401  (the vulnerable decoder, registered)
from declearn.main import FederatedServer
from declearn.main.config import FLRunConfig
from helpers_models import mlp_model, xent_loss

import hkstore
import hkstore.integrations.declearn as integration

mode, port = sys.argv[1], int(sys.argv[2])
logging.basicConfig(level=logging.INFO, stream=sys.stderr)
if mode == "control":
    with warnings.catch_warnings(record=True):
        integration.unharden()
print(f"hardened={integration.is_hardened()}", file=sys.stderr, flush=True)
model = integration.DeclearnHaikuModel(hkstore.HaikuModel(mlp_model, xent_loss, seed=0))
server = FederatedServer(
    model,
    netwk={"protocol": "websockets", "host": "127.0.0.1", "port": port},
    optim={"client_opt": 0.1},
)
# two clients are needed, so one registration keeps it in the waiting room until killed
server.run(FLRunConfig.from_params(rounds=1, register={"min_clients": 2, "timeout": 600},
                                   training={"batch_size": 4}))
