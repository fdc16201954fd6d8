"""Payloads whose decoding would run code: each creates a file (the canary) if it runs.

The pickles stand for what a hostile peer sends: declearn's own ``HaikuModel`` decoder
unpickles ``dump["model"]`` (``joblib.load``), so a pickle whose ``__reduce__`` touches a file
shows whether the decoder ran. Nothing here runs the payload; the tests and the scripts
beside them hand it to declearn.
"""

from __future__ import annotations

import pathlib
import pickle
from typing import Any

import msgpack


class _Touch:
    """Pickles as a call to ``Path.touch(path)``: unpickling it creates the file."""

    def __init__(self, path: pathlib.Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return (pathlib.Path.touch, (pathlib.Path(self.path),))


def touching_pickle(path: pathlib.Path) -> bytes:
    """Return a pickle that creates ``path`` when it is loaded."""
    return pickle.dumps(_Touch(path), protocol=4)


def haiku_model_dump(path: pathlib.Path) -> dict[str, Any]:
    """declearn's ``HaikuModel`` msgpack dump (``allow_bin=True``) carrying the canary."""
    blob = touching_pickle(path)
    return {"model": blob, "loss": blob, "data_info": {}}


def haiku_model_config(path: pathlib.Path) -> dict[str, Any]:
    """declearn's ``HaikuModel`` JSON config (``typekey`` "haiku", hex pickles)."""
    blob = touching_pickle(path).hex()
    return {"typekey": "haiku", "model": blob, "loss": blob, "data_info": {}}


def wrapped(type_name: str, dump: Any) -> dict[str, Any]:
    """declearn's serialized-object map."""
    return {"__type__": type_name, "dump": dump}


def message_bytes(typekey: str, payload: dict[str, Any]) -> bytes:
    """A declearn ``Message`` frame: one length byte, the typekey, the msgpack payload."""
    key = typekey.encode("utf-8")
    return bytes([len(key)]) + key + msgpack.packb(payload)


def join_frame(version: str, extra: Any = None) -> bytes:
    """A websocket action frame asking to join, optionally with an extra (hostile) field."""
    data: dict[str, Any] = {"action": "join", "name": "peer", "version": version}
    if extra is not None:
        data["extra"] = extra
    return msgpack.packb(data)
