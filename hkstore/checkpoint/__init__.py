"""hkstore.checkpoint: federated rounds that survive crashes and resume bit for bit.

Map: ``_checkpointer`` (:class:`Checkpointer`, :class:`Restored`), ``_state_tree`` (a state
pytree as named tensors plus a JSON tree, and back), ``_background`` (the one-slot writer
thread). The files and their format are the store's (``hkstore.store``: ``_round_dir``,
``_round_record``, ``_rounds``, ``_retention``), which the CLI reads without jax.
"""

from hkstore.checkpoint._checkpointer import Checkpointer as Checkpointer
from hkstore.checkpoint._checkpointer import Restored as Restored

__all__ = ["Checkpointer", "Restored"]
