"""The leader's inbox: what reaches the turn loop from other threads, as typed items.

Queue readers put deliveries, the membership watch puts node views, operators put catalogue
reloads; `stop` puts a wake-up. The turn loop takes them in batches.
"""

from __future__ import annotations

import queue
from dataclasses import dataclass
from enum import StrEnum

from protocol.catalogue import Catalogue
from protocol.transport import REQUESTS, RESULTS, Delivery


class Source(StrEnum):
    """The queues the leader reads."""

    RESULTS = RESULTS  # run and daemon events from the workers
    REQUESTS = REQUESTS  # operator requests


@dataclass(frozen=True, slots=True)
class Delivered:
    source: Source
    delivery: Delivery


@dataclass(frozen=True, slots=True)
class NodesChanged:
    """The whole membership as the watch saw it: node id -> announcement."""

    nodes: dict[str, bytes]


@dataclass(frozen=True, slots=True)
class Reload:
    catalogue: Catalogue


@dataclass(frozen=True, slots=True)
class Wake:
    """Nothing to do: look at the stop flag."""


Item = Delivered | NodesChanged | Reload | Wake


class Inbox:
    def __init__(self) -> None:
        self._queue: queue.Queue[Item] = queue.Queue()

    def put(self, item: Item) -> None:
        self._queue.put(item)

    def take(self, wait: float, most: int) -> list[Item]:
        """Up to `most` items: waits up to `wait` seconds for the first, not for the rest."""
        items: list[Item] = []
        try:
            items.append(self._queue.get(timeout=wait))
            while len(items) < most:
                items.append(self._queue.get_nowait())
        except queue.Empty:
            pass
        return items

    def clear(self) -> Catalogue | None:
        """Forget what waits: deliveries never acknowledged are redelivered by RabbitMQ,
        and a new term reads membership afresh. Returns the last catalogue reload among
        them, which must not be forgotten."""
        reload: Catalogue | None = None
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return reload
            if isinstance(item, Reload):
                reload = item.catalogue

    def empty(self) -> bool:
        return self._queue.empty()
