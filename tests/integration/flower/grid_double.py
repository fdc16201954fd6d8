"""A test double of Flower's transport: a Grid that runs the ClientApp in this process.

Every message goes through Flower's own wire form (``flwr.common.serde`` protobuf, serialized
to bytes and parsed back) both ways, so the client sees what a real SuperNode would receive
and the server what it would get back. Node ids are fixed and listed in order, as a
deployment's long-lived SuperNodes keep theirs; node ``NODE_BASE + i`` holds partition ``i``.
"""

from __future__ import annotations

from collections.abc import Iterable

from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.common.serde import message_from_proto, message_to_proto
from flwr.proto.message_pb2 import Message as ProtoMessage
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

NODE_BASE = 1000


def over_the_wire(message: Message) -> Message:
    """``message`` serialized to Flower's protobuf bytes and parsed back."""
    return message_from_proto(ProtoMessage.FromString(message_to_proto(message)
                                                      .SerializeToString()))


def as_server(run_id: int = 1) -> None:
    """What Flower's runtime sets in a ServerApp's process before it runs (messages the
    server creates take their run id from it)."""
    TaskIdentity.task_id, TaskIdentity.run_id = 1, run_id
    TaskIdentity.node_id = SUPERLINK_NODE_ID


class LoopbackGrid(Grid):
    """``num_nodes`` clients running ``client_app`` in this process, called in message order."""

    def __init__(self, client_app: ClientApp, num_nodes: int, run_id: int = 1) -> None:
        as_server(run_id)
        self._app = client_app
        self._run_id = run_id
        self._nodes = [NODE_BASE + i for i in range(num_nodes)]
        self._contexts = {
            node: Context(run_id=run_id, node_id=node,
                          node_config={"partition-id": i, "num-partitions": num_nodes},
                          state=RecordDict(), run_config={})
            for i, node in enumerate(self._nodes)
        }
        self._sent = 0
        self._replies: dict[str, Message] = {}
        self.messages_sent: list[tuple[str, int]] = []  # (message type, node) in order

    def set_run(self, run: object) -> None:  # the double has one run
        pass

    @property
    def run(self) -> object:
        raise NotImplementedError("LoopbackGrid has no Run object")

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int,
                       group_id: str, ttl: float | None = None) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self._nodes)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for message in messages:
            self._sent += 1
            message_id = f"m{self._sent}"
            message.metadata.__dict__["_message_id"] = message_id
            message.metadata.__dict__["_run_id"] = self._run_id
            node = message.metadata.dst_node_id
            self.messages_sent.append((message.metadata.message_type, node))
            received = over_the_wire(message)
            reply = self._app(received, self._contexts[node])
            self._replies[message_id] = over_the_wire(reply)
            ids.append(message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._replies.pop(i) for i in message_ids if i in self._replies]

    def send_and_receive(self, messages: Iterable[Message], *,
                         timeout: float | None = None) -> Iterable[Message]:
        return list(self.pull_messages(list(self.push_messages(messages))))
