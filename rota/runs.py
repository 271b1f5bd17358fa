"""Where the HTTP API finds finished runs and operator edits.

In memory (`rota up`), the cluster's own bounded list of finished runs and the leader's change
log. On RabbitMQ, the history streams (`rota.history`, `rota.changes`) for queries, and a
bounded list of recent runs fed by the leader's history sink — read back from the stream
once per term — for the service view and request outcomes.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

from coordinator.leader import Coordinator
from protocol import RunRecord, ServiceChange
from rota.embedded import FinishedRuns

log = logging.getLogger("rota.http")

SEED_WINDOW = 3600.0
"""How far back a coordinator that starts leading reads the history stream for recent runs."""


@dataclass(frozen=True)
class RunQuery:
    service: str | None = None
    node: str | None = None
    outcome: str | None = None
    since: float | None = None
    until: float | None = None
    limit: int = 100

    def keep(self, rec: RunRecord) -> bool:
        if self.service is not None and rec.service != self.service:
            return False
        if self.node is not None and rec.node != self.node:
            return False
        if self.outcome is not None and (rec.outcome or rec.state) != self.outcome:
            return False
        at = rec.finished_at or rec.queued_at or 0.0
        if self.since is not None and at < self.since:
            return False
        return not (self.until is not None and at > self.until)


class RunSource(Protocol):
    def recent(self) -> Iterable[RunRecord]:
        """The runs finished lately, oldest first (bounded)."""
        ...

    def query(self, q: RunQuery) -> list[RunRecord]:
        """The newest `q.limit` finished runs passing `q`, newest first."""
        ...

    def changes(self, service: str | None, limit: int) -> list[ServiceChange]:
        """The newest `limit` operator edits, newest first."""
        ...


def _newest(records: Iterable[RunRecord], q: RunQuery) -> list[RunRecord]:
    kept = [r for r in records if q.keep(r)]
    kept.sort(key=lambda r: r.finished_at or r.queued_at or 0.0, reverse=True)
    return kept[: q.limit]


class MemoryRuns:
    """The embedded cluster: its finished runs and its leader's change log, in memory."""

    def __init__(self, finished: FinishedRuns, coordinator: Coordinator) -> None:
        self.finished = finished
        self.coordinator = coordinator

    def recent(self) -> Iterable[RunRecord]:
        return iter(self.finished)

    def query(self, q: RunQuery) -> list[RunRecord]:
        return _newest(self.finished, q)

    def changes(self, service: str | None, limit: int) -> list[ServiceChange]:
        kept = [c for c in list(self.coordinator.changes)
                if service is None or c.service == service]
        return list(reversed(kept))[:limit]


class StreamRuns:
    """A cluster on RabbitMQ: queries read the history streams; recent runs are kept here,
    from this coordinator's own history sink and, once per term, read back from the stream
    (the first time the API asks after this coordinator starts leading, so that reading it
    never competes with the first turns of a new leader)."""

    def __init__(self, amqp_url: str, coordinator: Coordinator, keep: int = 10_000,
                 default_window: float = 86400.0) -> None:
        self.amqp_url = amqp_url
        self.coordinator = coordinator
        self.finished = FinishedRuns(keep)
        self.default_window = default_window
        self._seeded_epoch: int | None = None
        self._seed_lock = threading.Lock()

    def sink(self, rec: RunRecord) -> None:
        self.finished.append(rec)

    def start(self) -> StreamRuns:
        return self

    def stop(self) -> None:
        pass

    def recent(self) -> Iterable[RunRecord]:
        snap = self.coordinator.snapshot()
        if snap is not None and snap.epoch != self._seeded_epoch:
            self._seed(snap.epoch)
        return iter(self.finished)

    def _seed(self, epoch: int) -> None:
        from coordinator.adapters.history import read_history

        with self._seed_lock:
            if self._seeded_epoch == epoch:
                return
            try:
                found = read_history(self.amqp_url, since=time.time() - SEED_WINDOW,
                                     limit=self.finished.keep, idle=0.3, timeout=5.0)
            except Exception as exc:
                log.warning("cannot read recent runs from rota.history: %s", exc)
                return
            seen = {r.run_id for r in self.finished}
            for rec in found.records:
                if rec.run_id not in seen:
                    self.finished.append(rec)
            self._seeded_epoch = epoch

    def query(self, q: RunQuery) -> list[RunRecord]:
        from coordinator.adapters.history import read_history

        since = q.since if q.since is not None else time.time() - self.default_window
        found = read_history(self.amqp_url, since=since, keep=q.keep, limit=q.limit)
        return _newest(found.records, q)

    def changes(self, service: str | None, limit: int) -> list[ServiceChange]:
        from coordinator.adapters.history import read_changes

        try:
            found = read_changes(self.amqp_url, service=service, limit=limit)
        except Exception as exc:  # RabbitMQ unreachable: what this leader saw itself
            log.warning("cannot read rota.changes (%s); answering from memory", exc)
            found = [c for c in list(self.coordinator.changes)
                     if service is None or c.service == service][-limit:]
        return list(reversed(found))


Sink = Callable[[RunRecord], None]
