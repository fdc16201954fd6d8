"""The two declearn messages of a resumed run (registered with declearn on import).

A :class:`~hkstore.integrations.declearn.ResumableFederatedServer` that resumes from round
``k`` initializes its clients as declearn does (their models come with the ``InitRequest``),
then sends :class:`ResumeRequest` ``(round_i=k)``: each
:class:`~hkstore.integrations.declearn.ResumableFederatedClient` puts back its own state of
round ``k`` (optimizer, model random state, data generators) from its checkpoint and answers
:class:`ResumeReply`, or an ``Error`` naming what it could not restore.

Example:
    >>> from declearn.messaging import SerializedMessage
    >>> wire = ResumeRequest(round_i=2).serialize()
    >>> SerializedMessage.from_bin_message(wire).deserialize()
    ResumeRequest(round_i=2)
"""

from __future__ import annotations

import dataclasses

from declearn.messaging import Message

__all__ = ["ResumeReply", "ResumeRequest"]


@dataclasses.dataclass
class ResumeRequest(Message):
    """Server to clients: the run resumes after round ``round_i``; restore your state of it."""

    typekey = "hkstore-resume-request"

    round_i: int


@dataclasses.dataclass
class ResumeReply(Message):
    """Client to server: the state of round ``round_i`` is restored."""

    typekey = "hkstore-resume-reply"

    round_i: int
