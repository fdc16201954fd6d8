"""Set-up of the declearn integration tests (they run in the declearn venv only).

Models live on the CPU for both hkstore's and declearn's device policies; every test starts
from the default receive policy and a hardened process, and leaves them so.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from declearn.utils import set_device_policy as set_declearn_device_policy
from helpers_models import device_policy

from hkstore.integrations.declearn import harden, is_hardened, set_receive_policy


def pytest_configure(config: pytest.Config) -> None:
    # declearn 2.9's own NetworkServer passes the argument it deprecated to its own handler
    # (every server built from a config warns); only that warning, only from declearn
    config.addinivalue_line(
        "filterwarnings",
        "ignore:Argument 'logger' is deprecated:DeprecationWarning:declearn.*",
    )


#: Scripts run in child processes (and the canary module a child imports): not test modules.
collect_ignore = ["canary_lazy.py", "canary_run.py", "ws_server.py"]


@pytest.fixture(autouse=True)
def _cpu_and_defaults() -> Iterator[None]:
    set_declearn_device_policy(gpu=False, idx=0)
    set_receive_policy()
    with device_policy(gpu=False):
        yield
    set_receive_policy()
    if not is_hardened():  # a control left the process unguarded: guard it again
        harden()
    harden()  # and back to the default allow-list
