"""What a leader's turn sends out, in the one safe order: the ledger first, then the rest.

A turn's ledger changes are written in one fenced batch; only then are its orders and daemon
controls published (as one batch each, retried with back-off while RabbitMQ is unreachable),
its records published on `rota.events` (and finished ones handed to the history sinks), and
the messages it consumed acknowledged. A leader killed anywhere in between leaves a ledger
from which the next one resumes. Every message the coordinator puts on a queue leaves here.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from coordinator import forms, metrics
from coordinator.adapters.events import Done, Event, EventBus
from coordinator.core.actions import Action, Changes, Control, DaemonInterval, Dispatch, Record
from coordinator.core.node import Node
from coordinator.core.run import RunState
from coordinator.inbox import Outcome, Reply
from coordinator.ledger import Ledger
from protocol import ProtocolError, RunRecord, ServiceChange, encode
from protocol.backoff import Backoff
from protocol.batches import RUN_ORDERS, packs, takes_order_batches
from protocol.catalogue import Catalogue
from protocol.coordination import Fenced, Term
from protocol.run_records import bodies_of
from protocol.transport import REQUESTS, Delivery, Transport, ack_all, node_queue

log = logging.getLogger("rota.leader")

FaultHook = Callable[[str], None]
HistorySink = Callable[[RunRecord], None]
ChangeSink = Callable[[ServiceChange], None]


@dataclass
class Turn:
    """What one turn of the leader produced, to be carried out by `Outbox.finish`."""

    actions: list[Action] = field(default_factory=list)
    acks: list[Delivery] = field(default_factory=list)
    records: list[RunRecord] = field(default_factory=list)  # beside those of the actions
    changes: list[ServiceChange] = field(default_factory=list)  # operator edits, or refusals
    replies: list[tuple[Reply, Outcome]] = field(default_factory=list)
    """In-process requests handled this turn: answered once it is carried out."""
    writes: dict[str, bytes | None] = field(default_factory=dict)
    """Ledger writes beside the engine's (RankingS), committed in the same batch."""
    events: list[tuple[str, bytes]] = field(default_factory=list)
    """Other events for `rota.events` (ranking updates and alerts): (routing key, body)."""


def _unfolded(recorded: list[Record | DaemonInterval]) -> list[Record | DaemonInterval]:
    """The records a turn publishes: a run's `running` record is left out when the same turn
    also records its end (its `started` and final reports came together), as a worker leaves
    out the `started` report of a run that ended before it was sent; the final record carries
    `started_at`. Every other record, and every final one, is published."""
    ended = {a.run.run_id for a in recorded if isinstance(a, Record) and a.run.state.terminal}
    if not ended:
        return recorded
    return [a for a in recorded if not (isinstance(a, Record) and a.run.run_id in ended
                                        and a.run.state is RunState.RUNNING)]


class Outbox:
    def __init__(
        self,
        transport: Transport,
        events: EventBus,
        history_sinks: list[HistorySink],
        stopping: threading.Event,
        fault: FaultHook | None = None,
        change_sinks: list[ChangeSink] | None = None,
    ) -> None:
        self.transport = transport
        self.events = events
        self.history_sinks = history_sinks
        self.change_sinks = list(change_sinks or [])
        self.stopping = stopping
        self.fault = fault
        self._params_catalogue: Catalogue | None = None
        self._params: dict[str, forms.Params] = {}
        self._control_seq = 0  # numbers daemon controls: a worker orders one turn's by it

    def _arm_commit_faults(self, term: Term, *, orders: bool) -> None:
        """Test-only: the fault points inside a ledger commit, for a term that reports its
        steps (ZooKeeper's): `in-delta` after the first part of a commit in several parts,
        `in-flight` once a commit carrying orders is sent."""
        hook = self.fault
        if hook is None or not hasattr(term, "fault"):
            return

        def step(name: str) -> None:
            if name == "delta 0":
                hook("in-delta")
            elif name == "sent" and orders:
                hook("in-flight")

        term.fault = step

    def finish(self, term: Term, ledger: Ledger, changes: Changes, turn: Turn,
               catalogue: Catalogue, nodes: Mapping[str, Node], now: float) -> None:
        """Carry out a turn: ledger, orders, controls, records, acknowledgements."""
        writes = ledger.writes(changes) if changes or changes.finished else {}
        if turn.writes:
            writes = {**writes, **turn.writes}
        dispatches: list[Dispatch] = []
        controls_due: list[Control] = []
        recorded: list[Record | DaemonInterval] = []
        for a in turn.actions:  # one pass: a busy turn has thousands of actions
            if isinstance(a, Record | DaemonInterval):
                recorded.append(a)
            elif isinstance(a, Dispatch):
                dispatches.append(a)
            elif isinstance(a, Control):
                controls_due.append(a)
        if writes:
            if self.fault:
                self._arm_commit_faults(term, orders=bool(dispatches))
            with metrics.LEDGER_COMMIT.time():
                term.commit(writes)  # raises Fenced when deposed: nothing below happens
        if log.isEnabledFor(logging.DEBUG) and (dispatches or changes):
            log.debug("epoch %d turn: ledger runs %s cursors %s; orders %s; records %s",
                      term.epoch,
                      {k: (r.state.value if r else "-") for k, r in changes.runs.items()},
                      changes.cursors, [a.run.run_id for a in dispatches],
                      [f"{a.run.run_id}:{a.run.state.value}" for a in recorded
                       if isinstance(a, Record)])
        if self.fault and dispatches:
            self.fault("after-ledger")
        params = self._params_of(catalogue)
        by_node: dict[str, list[bytes]] = {}
        for a in dispatches:
            by_node.setdefault(a.run.node or "", []).append(encode(
                forms.order_of(a.run, a.service, term.epoch, now, params(a.service.name))))
        self.send(_order_bodies(by_node, nodes), term)
        if dispatches:
            metrics.DISPATCHED.inc(len(dispatches))
        if self.fault and dispatches:
            self.fault("after-publish")
        controls = []
        for c in controls_due:
            node = nodes.get(c.node)
            self._control_seq += 1
            msg = forms.control_of(c, term.epoch, now, params(c.service.name),
                                   node.incarnation if node else None, self._control_seq)
            controls.append((node_queue(c.node), encode(msg)))
        self.send(controls, term)
        records = [forms.record_of(a.run) if isinstance(a, Record) else forms.interval_record(a)
                   for a in _unfolded(recorded)]
        records += turn.records
        acks = turn.acks

        def acknowledge() -> None:
            ack_all(acks)

        # Reports and requests are acknowledged once the events they led to are stored (the
        # bus stores batches in order): a leader killed before then leaves them to its
        # successor, and no event is lost with it.
        self.publish_changes(turn.changes)
        if turn.events:
            self.events.publish_batch(turn.events)
        self.publish_all(records, then=acknowledge)
        metrics.count_ended(a.run for a in recorded if isinstance(a, Record))

    def _params_of(self, catalogue: Catalogue) -> Callable[[str], forms.Params]:
        """A service's order parameters, worked out once per catalogue."""
        if catalogue is not self._params_catalogue:
            self._params_catalogue, self._params = catalogue, {}
        cache = self._params

        def of(name: str) -> forms.Params:
            found = cache.get(name)
            if found is None:
                found = cache[name] = forms.params_of(catalogue.params.get(name, {}))
            return found

        return of

    def send(self, items: list[tuple[str, bytes]], term: Term) -> None:
        """Publish a batch, all stored or none; while RabbitMQ is unreachable, retry it as
        it was encoded the first time.

        Gives up only when leadership is lost: the orders are in the ledger, and the next
        leader re-sends them.
        """
        if not items:
            return
        batch = self.transport.prepare(items)
        backoff = Backoff(0.1, 2.0)
        failed = False
        while True:
            try:
                self.transport.publish(batch)
                if failed:
                    log.warning("RabbitMQ is reachable again")
                return
            except Exception as exc:
                if not failed:
                    log.warning("cannot publish %d message(s) (%s); retrying with backoff",
                                len(items), exc)
                    failed = True
                if term.wait_lost(backoff.next()) or self.stopping.is_set():
                    raise Fenced("leadership ended while RabbitMQ was unreachable") from exc

    def publish(self, rec: RunRecord, history: bool = True) -> None:
        """A record on `rota.events`; a final one also to the history sinks."""
        self.publish_all([rec], history)

    def publish_all(self, recs: list[RunRecord], history: bool = True,
                    then: Done | None = None) -> None:
        """Records on `rota.events` as one batch; final ones also to the history sinks.
        `then` is called once they are stored."""
        if not recs:
            if then is not None:
                then()
            return
        self.events.publish_batch(_batched(recs), then)
        if not history or not self.history_sinks:
            return
        for rec in recs:
            if forms.is_final(rec):
                for sink in self.history_sinks:
                    try:
                        sink(rec)
                    except Exception:
                        log.exception("history sink failed")

    def publish_changes(self, changes: list[ServiceChange]) -> None:
        """Operator edits (applied or refused) on `rota.events`, then to the change sinks."""
        if not changes:
            return
        self.events.publish_batch([(c.routing_key, encode(c)) for c in changes])
        for c in changes:
            for sink in self.change_sinks:
                try:
                    sink(c)
                except Exception:
                    log.exception("change sink failed")

    def request(self, payload: bytes) -> None:
        """An operator request, to whichever coordinator leads."""
        self.transport.send(REQUESTS, payload)

    def dead_letter(self, source: str, payload: bytes, error: ProtocolError | str,
                    now: float, reason: str) -> None:
        self.transport.dead_letter(source, payload, error, now)
        metrics.DEAD_LETTERS.labels(source, reason).inc()


def _batched(recs: list[RunRecord]) -> list[Event]:
    """A turn's records as events: one body per routing key (a batch when several share it,
    `protocol.run_records`). Keys go in lifecycle order (queued, dispatched, running, then
    the ends), so a run that moved twice in the turn is seen to move in order."""
    by_key: dict[str, list[bytes]] = {}
    for rec in recs:
        by_key.setdefault(rec.routing_key, []).append(encode(rec))
    keys = sorted(by_key, key=lambda k: _STAGE.get(k, len(_STAGE)))
    return [(key, body) for key in keys for body in bodies_of(by_key[key])]


_STAGE = {"run.queued": 0, "run.dispatched": 1, "run.running": 2}


def _order_bodies(by_node: dict[str, list[bytes]], nodes: Mapping[str, Node]
                  ) -> list[tuple[str, bytes]]:
    """A turn's encoded orders as messages: one `RunOrders` batch per node that takes them
    (`protocol.batches.takes_order_batches`), one message per order for older workers."""
    out: list[tuple[str, bytes]] = []
    for node_id, encoded in by_node.items():
        queue = node_queue(node_id)
        node = nodes.get(node_id)
        if node is not None and takes_order_batches(node.version):
            out += [(queue, body) for body in packs(RUN_ORDERS, encoded)]
        else:
            out += [(queue, data) for data in encoded]
    return out
