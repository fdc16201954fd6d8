"""Set-up of the Flower integration tests (they run in .venv-flower only).

Flower's telemetry is off before flwr is imported (no network but loopback in tests), its
log is quiet, and hkstore models live on the CPU.
"""

from __future__ import annotations

import os

os.environ["FLWR_TELEMETRY_ENABLED"] = "0"

import logging
from collections.abc import Iterator

import pytest
from helpers_models import device_policy

#: Scripts run in child processes: not test modules.
collect_ignore = ["resume_child.py"]


@pytest.fixture(autouse=True)
def _cpu_and_quiet() -> Iterator[None]:
    logging.getLogger("flwr").setLevel(logging.WARNING)
    with device_policy(gpu=False):
        yield
