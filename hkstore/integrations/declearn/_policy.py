"""The receive policy: what this process accepts in the hkstore models declearn hands it.

declearn rebuilds a model from a peer's message, a ``.mpk`` file or a JSON config by calling
``Model.from_config(config, allow_bin)``: no trust argument reaches it. So a
:class:`~hkstore.integrations.declearn.DeclearnHaikuModel` built that way takes its code and
its limits from one process-level policy, set here. The default imports and unpickles
nothing from the wire: the receiver passes the functions itself (``model=``, ``loss=``), or
names the modules or keys it trusts (``trust=``).

Example:
    >>> import hkstore
    >>> from hkstore.integrations.declearn import get_receive_policy, set_receive_policy
    >>> get_receive_policy().trust
    Trust(keys=(), modules=()) [weights only]
    >>> set_receive_policy(trust=hkstore.Trust(modules=["mypkg.nets"])).trust.modules
    ('mypkg.nets',)
    >>> _ = set_receive_policy()  # back to the default
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import hkstore
from hkstore.store import DEFAULT_LIMITS, Limits, Trust

__all__ = ["ReceivePolicy", "get_receive_policy", "set_receive_policy"]


@dataclass(frozen=True)
class ReceivePolicy:
    """What a received ``DeclearnHaikuModel`` may take from the wire.

    Attributes:
        model: the model function to use for every received model (nothing from the wire is
            imported or unpickled for it); ``None``: the archive's or config's, as ``trust``
            allows.
        loss: the same for the loss function.
        trust: which modules a reference may import, which keys verify signatures, whether a
            signed pickle may run (:class:`hkstore.Trust`; default: nothing runs).
        limits: size and count limits for received archives (:class:`hkstore.Limits`).
    """

    model: Callable[..., Any] | None = None
    loss: Callable[..., Any] | None = None
    trust: Trust = field(default_factory=Trust)
    limits: Limits = DEFAULT_LIMITS


_POLICY = ReceivePolicy()


def set_receive_policy(
    *,
    model: Callable[..., Any] | None = None,
    loss: Callable[..., Any] | None = None,
    trust: Trust | None = None,
    limits: Limits | None = None,
) -> ReceivePolicy:
    """Set the whole receive policy of this process (a field left out takes its default).

    Args:
        model: the model function received models use (``None``: from the wire, as ``trust``
            allows).
        loss: the loss function received models use (same).
        trust: an :class:`hkstore.Trust` (``None``: ``Trust()``, nothing runs).
        limits: an :class:`hkstore.Limits` (``None``: the defaults).

    Returns:
        The new policy.

    Raises:
        TypeError: a function that is not callable, or a ``trust`` / ``limits`` of another
            type (the policy is then unchanged).
    """
    global _POLICY
    bad = [
        f"{name}= must be callable or None, got {type(fn).__name__}"
        for name, fn in (("model", model), ("loss", loss))
        if fn is not None and not callable(fn)
    ]
    if trust is not None and not isinstance(trust, hkstore.Trust):
        bad.append(f"trust= must be an hkstore.Trust, got {type(trust).__name__}")
    if limits is not None and not isinstance(limits, hkstore.Limits):
        bad.append(f"limits= must be an hkstore.Limits, got {type(limits).__name__}")
    if bad:
        raise TypeError("set_receive_policy: " + "; ".join(bad))
    _POLICY = ReceivePolicy(
        model=model,
        loss=loss,
        trust=Trust() if trust is None else trust,
        limits=DEFAULT_LIMITS if limits is None else limits,
    )
    return _POLICY


def get_receive_policy() -> ReceivePolicy:
    """Return this process's receive policy (see :func:`set_receive_policy`)."""
    return _POLICY
