"""A module declearn would import to decode a lazily registered type (the canary's module).

Importing it is code execution: it creates ``$HKSTORE_CANARY_DIR/lazy-import``, then defines
a ``Model`` whose decoder unpickles its payload (as declearn's ``TorchModel`` does).
"""

from __future__ import annotations

import io
import os
import pathlib
import pickle
from typing import Any

from declearn.model.api import Model

pathlib.Path(os.environ["HKSTORE_CANARY_DIR"], "lazy-import").touch()


class HkstoreCanaryLazyModel(Model):  # only the decoder matters here
    typekey = "hkstore-canary-lazy"

    @classmethod
    def from_config(cls, config: dict[str, Any], allow_bin: bool = False) -> Any:
        return pickle.load(io.BytesIO(config["model"]))  # what a pickling decoder does
