"""Asking nodes who they are, without holding up a round for a slow one.

An introduction is a query the coordinator pushes to a node; the node answers with its
site name, task and audit-key fingerprint (client/app.py). A site busy with other work,
or a machine under load, may answer late: the query stays pending, its reply is pulled
whenever the coordinator looks again (each round's start, before updates are accepted,
and once more before the run ends), and a query unanswered for ``retry_after`` seconds
is sent again. So a slow site is introduced when it answers; no honest run ends with a
site whose updates were taken but whose audit key was never recorded.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from flwr.app import Message, MessageType, RecordDict
from flwr.serverapp import Grid

POLL_SECONDS = 0.5
FIRST_WAIT = 30.0
"""How long a run waits at its start for the sites to say who they are; a later answer
is taken when it comes."""


@dataclass(frozen=True)
class _Pending:
    node: int
    sent: float


class Introductions:
    """The introduction queries in flight, and the nodes that answered one."""

    def __init__(self, retry_after: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.retry_after = retry_after
        self._clock = clock
        self._pending: dict[str, _Pending] = {}
        self.answered: set[int] = set()

    def waiting(self) -> set[int]:
        """Nodes with a query in flight that is not yet due to be sent again."""
        now = self._clock()
        return {p.node for p in self._pending.values() if now - p.sent <= self.retry_after}

    def ask(self, grid: Grid, nodes: Iterable[int]) -> list[int]:
        """Push a query to each of ``nodes`` that has none in flight, or only ones older
        than ``retry_after`` (their replies are still taken if they come). Returns the
        nodes asked."""
        targets = sorted(set(nodes) - self.waiting())
        if not targets:
            return []
        queries = [
            Message(RecordDict(), dst_node_id=node, message_type=MessageType.QUERY)
            for node in targets
        ]
        now = self._clock()
        for message_id, query in zip(grid.push_messages(queries), queries, strict=False):
            if message_id:
                self._pending[str(message_id)] = _Pending(query.metadata.dst_node_id, now)
        return targets

    def collect(self, grid: Grid, wait: float = 0.0) -> list[Message]:
        """The replies that arrived (one per node); with ``wait``, keep looking for up to
        that many seconds until every node asked has answered."""
        deadline = self._clock() + wait
        replies: list[Message] = []
        while self._pending:
            for reply in grid.pull_messages(list(self._pending)):
                entry = self._pending.get(reply.metadata.reply_to_message_id)
                if entry is None or entry.node in self.answered:
                    continue
                self.answered.add(entry.node)
                replies.append(reply)
                for message_id, other in list(self._pending.items()):
                    if other.node == entry.node:
                        del self._pending[message_id]
            if not self._pending or self._clock() >= deadline:
                break
            time.sleep(POLL_SECONDS)
        return replies

    def forget(self, node: int) -> None:
        """Ask ``node`` again when it is next seen (its answer could not be used)."""
        self.answered.discard(node)
