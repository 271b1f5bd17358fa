"""The leader's inbox: what reaches the turn loop from other threads, as typed items.

Queue readers put deliveries, the membership watch puts node views, operators put catalogue
reloads; `stop` puts a wake-up. The turn loop takes them in batches.
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass, field
from enum import StrEnum

from coordinator.core.edits import Edit
from protocol import ServiceChange
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


@dataclass(frozen=True, slots=True)
class RunRequest:
    """An operator's manual run, handed over in process (the HTTP API of the leader)."""

    request_id: str
    service: str
    by: str
    node: str | None = None


@dataclass(frozen=True, slots=True)
class EditRequest:
    """An operator's edit, handed over in process or taken from a `ServiceUpdate`."""

    request_id: str
    service: str
    by: str
    edit: Edit


@dataclass(frozen=True, slots=True)
class ScheduleRequest:
    """RankingSv1.ScheduleQueries: schedule a tenant's rankings (all of them with no ids)."""

    request_id: str
    tenant: str
    ranking_ids: tuple[str, ...]
    by: str


@dataclass(frozen=True)
class RunOutcome:
    request_id: str
    run_ids: list[str] = field(default_factory=list)
    refused: str | None = None


@dataclass(frozen=True)
class EditOutcome:
    request_id: str
    changes: list[ServiceChange] = field(default_factory=list)
    """Applied field changes (none when the edit changed nothing), or the one refusal."""

    @property
    def refused(self) -> ServiceChange | None:
        return next((c for c in self.changes if c.outcome == "refused"), None)


@dataclass(frozen=True)
class ScheduleOutcome:
    request_id: str
    scheduled: int = 0
    refused: str | None = None
    """Why nothing was scheduled (an unknown ranking id)."""


Outcome = RunOutcome | EditOutcome | ScheduleOutcome


class Reply:
    """Where a caller waits for the turn that handles its request: resolved once that turn's
    ledger write is done and its events are published, or abandoned with a reason."""

    def __init__(self) -> None:
        self._done = threading.Event()
        self.outcome: Outcome | None = None
        self.abandoned: str | None = None

    def resolve(self, outcome: Outcome) -> None:
        self.outcome = outcome
        self._done.set()

    def abandon(self, why: str) -> None:
        if not self._done.is_set():
            self.abandoned = why
            self._done.set()

    def wait(self, timeout: float) -> bool:
        return self._done.wait(timeout)


@dataclass(frozen=True, slots=True)
class Submitted:
    request: RunRequest | EditRequest | ScheduleRequest
    reply: Reply


Item = Delivered | NodesChanged | Reload | Wake | Submitted


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
            elif isinstance(item, Submitted):
                item.reply.abandon("this coordinator stopped leading before handling it")

    def empty(self) -> bool:
        return self._queue.empty()
