"""A coordinator process: contends for leadership, and while it leads, drives the engine.

The leader loop is single-threaded. Each turn it takes everything waiting in its inbox
(run events, operator requests, node changes), fires due slots, and hands the turn to the
outbox, which writes the resulting ledger changes in one fenced batch and only then publishes
orders and lifecycle events and acknowledges the messages consumed. A leader killed at any
point therefore leaves a ledger from which the next one resumes: orders recorded but not
published are re-sent (workers ignore a run id they have seen), messages not acknowledged are
redelivered. After each turn the leader builds an immutable `Snapshot` of what the page and
the table show; they read it without taking any lock.

The parts: `inbox` (typed items from other threads), `intake` (what a turn does with each),
`outbox` (ledger first, then publish), `forms` (a run as order, record and ledger entry),
`view` (the table rows and the snapshot), `ledger` (the store's keys), `rankings` (RankingS:
fed by the runs each turn ends, computed on schedule, published as an immutable view).
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from coordinator import forms, intake, metrics, view
from coordinator.adapters.events import EventBus
from coordinator.core.actions import Record
from coordinator.core.engine import Engine
from coordinator.inbox import (
    Delivered,
    EditRequest,
    Inbox,
    NodesChanged,
    Outcome,
    Reload,
    Reply,
    RunRequest,
    ScheduleOutcome,
    ScheduleRequest,
    Source,
    Submitted,
    Wake,
)
from coordinator.intake import schedule_of_update
from coordinator.ledger import REPUBLISH_WINDOW, Ledger, LedgerError
from coordinator.outbox import ChangeSink, FaultHook, Outbox, Turn
from coordinator.rankings import LeaderRankings, RankingsView
from protocol import ManualRunRequest, RunRecord, ServiceChange, encode
from protocol.backoff import Backoff
from protocol.catalogue import Catalogue
from protocol.clock import Clock
from protocol.coordination import Coordination, Fenced, Term
from protocol.rankings import RankingError
from protocol.schedule import Cron, Schedule, warm, zone
from protocol.transport import Consumer, Delivery, Transport

if TYPE_CHECKING:
    import dramatiq

log = logging.getLogger("rota.leader")
GAUGES_EVERY = 1.0  # seconds between two settings of the state gauges
WARM_EVERY = 20.0  # real seconds between two passes computing cron slots ahead
SNAPSHOT_EVERY = 0.25  # seconds between two snapshots while the leader is busy
FLUSH_WAIT = 5.0  # seconds `stop` waits for the leader to store its rankings
KEEP_CHANGES = 1000
"""Operator edits (applied or refused) a coordinator keeps in memory for its change log."""


class NotLeading(RuntimeError):
    """Raised by `Coordinator.submit` when this coordinator does not lead."""


@dataclass
class LeaderOptions:
    order_ttl: float = 60.0  # seconds (clock time) an order may wait before a worker refuses it
    lead_time: float = 1.5  # seconds (clock time) an order may leave before its slot; 0: off
    max_batch: int = 5000  # inbox items handled per turn
    idle_wait: float = 0.5  # real seconds between turns when nothing is due
    failed_term_pause: float = 0.5  # first pause after a failed term; doubles up to 60 s
    fault: FaultHook | None = None  # test-only fault points; None in production


class Coordinator:
    """One coordinator. `run()` blocks: it contends, leads when elected, and contends again."""

    def __init__(
        self,
        identifier: str,
        catalogue: Catalogue,
        coordination: Coordination,
        transport: Transport | dramatiq.Broker,
        events: EventBus,
        clock: Clock,
        *,
        options: LeaderOptions | None = None,
        history_sinks: list[Callable[[RunRecord], None]] | None = None,
        change_sinks: list[ChangeSink] | None = None,
    ) -> None:
        self.identifier = identifier
        self.catalogue = catalogue
        self.coordination = coordination
        self.transport = _transport_of(transport)
        self.events = events
        self.clock = clock
        self.options = options or LeaderOptions()
        self.leading = threading.Event()
        self._inbox = Inbox()
        self._stopping = threading.Event()
        self._in_term = False  # membership changes go to the inbox only while leading
        self._snapshot: view.Snapshot | None = None
        self._groups_of: tuple[Catalogue | None, set[str]] = (None, set())
        """The run groups of the catalogue they were collected from (for the gauges)."""
        self._gauges_at = float("-inf")  # monotonic time the state gauges were last set
        self._snapshot_at = float("-inf")  # and the snapshot built
        self._snapshot_stale = False  # a turn changed what readers see since
        self._failed_terms = Backoff(self.options.failed_term_pause, 60.0)
        self._failed_in_a_row = 0
        self.ledger = Ledger()
        self._rankings: LeaderRankings | None = None  # the leader thread's only
        self._rankings_view: RankingsView | None = None
        self._flushed = threading.Event()  # set once a stopping leader stored its rankings
        self.changes: deque[ServiceChange] = deque(maxlen=KEEP_CHANGES)
        """The latest operator edits this coordinator made as leader, oldest first."""
        self.outbox = Outbox(self.transport, events, list(history_sinks or []), self._stopping,
                             self.options.fault,
                             change_sinks=[self.changes.append, *(change_sinks or [])])

    # -- process lifecycle -------------------------------------------------------------
    def run(self) -> None:
        threading.Thread(target=self._warm_slots, name="warm-slots", daemon=True).start()
        self.coordination.watch_nodes(self._nodes_changed)
        self.coordination.contend(self.identifier, self._lead)

    def _warm_slots(self) -> None:
        """Keep the next slot of every cron expression of the catalogue computed ahead
        (`protocol.schedule.warm`), so that a follower that starts leading finds the slots
        of 100,000 services from memory instead of computing each (seconds at that size).
        Only expressions whose next slot has passed are computed again."""
        crons_of: tuple[Catalogue | None, list[Schedule]] = (None, [])
        while not self._stopping.is_set():
            catalogue = self.catalogue
            try:
                if crons_of[0] is not catalogue:  # one of each expression, once per catalogue
                    crons = {svc.schedule.expr: svc.schedule
                             for svc in catalogue.services.values()
                             if isinstance(svc.schedule, Cron)}
                    crons_of = (catalogue, list(crons.values()))
                warm(crons_of[1], zone(catalogue.timezone), self.clock.now())
            except Exception:  # an optimisation only: the leader computes what it needs
                log.exception("%s could not compute slots ahead", self.identifier)
            self._stopping.wait(WARM_EVERY)

    def _nodes_changed(self, nodes: dict[str, bytes]) -> None:
        if self._in_term:
            self._inbox.put(NodesChanged(nodes))
        else:  # following: a new term reads membership afresh
            metrics.NODES.set(len(nodes))

    def stop(self) -> None:
        self._stopping.set()
        self._inbox.put(Wake())
        if self.leading.is_set():  # let the leader store its rankings while it still leads
            self._flushed.wait(FLUSH_WAIT)
        self.coordination.stop()

    # -- what others read ----------------------------------------------------------------
    def snapshot(self) -> view.Snapshot | None:
        """The table as of the last turn; None while not leading. Never blocks."""
        return self._snapshot

    def rankings(self) -> RankingsView | None:
        """The rankings as of the last turn; None while not leading. Never blocks."""
        return self._rankings_view

    # -- operator API (in-process callers; remote ones publish to rota.requests) --------
    def request_manual_run(self, service: str, requested_by: str = "operator") -> str:
        request_id = uuid.uuid4().hex[:16]
        msg = ManualRunRequest(
            request_id=request_id, service=service, requested_by=requested_by,
            requested_at=self.clock.now(),
        )
        self.outbox.request(encode(msg))
        return request_id

    def submit(self, request: RunRequest | EditRequest | ScheduleRequest,
               timeout: float = 10.0) -> Outcome:
        """Hand a request to this leader's next turn and wait for its outcome, which comes
        once the turn's ledger write is done. Raises NotLeading when this coordinator does
        not lead (or stops leading first), TimeoutError when no turn handled it in time
        (it may still be handled)."""
        if not self.leading.is_set():
            raise NotLeading("this coordinator is not the leader")
        reply = Reply()
        self._inbox.put(Submitted(request, reply))
        if not self.leading.is_set():  # the term ended while the item was put: say so
            reply.abandon("this coordinator stopped leading before handling it")
        if not reply.wait(timeout):
            raise TimeoutError(f"the leader did not handle request {request.request_id} "
                               f"within {timeout:g} s")
        if reply.outcome is None:
            raise NotLeading(reply.abandoned or "this coordinator stopped leading")
        return reply.outcome

    def reload(self, catalogue: Catalogue) -> None:
        """Use a new (already validated) catalogue: the leader rebuilds from the ledger."""
        self._inbox.put(Reload(catalogue))

    # -- the term ------------------------------------------------------------------------
    def _lead(self, term: Term) -> None:
        if self._stopping.is_set():
            return
        self._clear_inbox()
        self._flushed.clear()
        self._in_term = True
        log.info("%s leads with epoch %d", self.identifier, term.epoch)
        metrics.LEADER.set(1)
        metrics.EPOCH.set(term.epoch)
        readers: list[Consumer] = []
        failed = False
        try:
            while True:
                engine = self._build(term)
                self._failed_terms.reset()
                self._failed_in_a_row = 0
                if not readers:
                    self.leading.set()
                    readers = [
                        self.transport.consume(source.value, self._reader_of(source))
                        for source in (Source.RESULTS, Source.REQUESTS)
                    ]
                if not self._loop(term, engine):
                    if term.lost() and not self._stopping.is_set():
                        log.warning("%s was deposed: epoch %d: its term ended",
                                    self.identifier, term.epoch)
                    break
                log.info("%s rebuilds its state from the ledger with the new catalogue",
                         self.identifier)
        except Fenced as exc:
            log.warning("%s was deposed: %s", self.identifier, exc)
        except LedgerError as exc:
            log.error("%s cannot resume from the ledger: %s (key %s); repair or delete that "
                      "key", self.identifier, exc, exc.key)
            failed = True
        except Exception:
            # Whatever broke, stop leading: the ledger is intact and the next term resumes it.
            log.exception("%s stops leading after an unexpected error", self.identifier)
            failed = True
        finally:
            self._flushed.set()
            self.leading.clear()
            self._in_term = False
            metrics.LEADER.set(0)
            metrics.forget_state()
            self._gauges_at = self._snapshot_at = float("-inf")
            for r in readers:
                r.stop()
            self._snapshot = None
            self._rankings_view = None
            self._rankings = None
            # Deliveries still in the inbox were never acknowledged: RabbitMQ redelivers them.
            self._clear_inbox()
        if failed:
            # Pause before stepping down, longer after each failed term in a row: a fault
            # that fails every term (a bad ledger value) must not spin elections.
            pause = self._failed_terms.next()
            self._failed_in_a_row += 1
            log.warning("%s steps down after %d failed term(s) in a row; pausing %.1f s",
                        self.identifier, self._failed_in_a_row, pause)
            term.wait_lost(pause)

    def _clear_inbox(self) -> None:
        reload = self._inbox.clear()
        if reload is not None:  # a reload asked while following is used by the next term
            self.catalogue = reload

    def _reader_of(self, source: Source) -> Callable[[Delivery], None]:
        def put(delivery: Delivery) -> None:
            self._inbox.put(Delivered(source, delivery))

        return put

    def _build(self, term: Term) -> Engine:
        """A fresh engine resumed from the ledger; its first actions are carried out."""
        began = time.perf_counter()
        self.ledger = Ledger()
        loaded = term.load()
        read = time.perf_counter()
        state = self.ledger.restore(loaded)
        ended = self.ledger.recent_all(since=float("-inf"))
        # Membership read after the epoch bump, not the watch's view, which may lag: a run
        # adopted on a node missing from it died with its node while no leader was running.
        members = term.nodes()
        now = self.clock.now()
        rankings = self._rankings = LeaderRankings(self.catalogue.rankings,
                                                   zone(self.catalogue.timezone))
        rankings.start(loaded, ended, now)
        self._rankings_view = rankings.view
        engine = Engine(
            self.catalogue.services.values(),
            self.catalogue.timezone,
            order_ttl=self.options.order_ttl,
            lead=self.options.lead_time,
            rank=rankings.rank,
        )
        engine.nodes_out = rankings.nodes_out()
        for run in ended:  # reports of them may still come, late or twice
            engine.note_ended(run.run_id)
        # Events are published after each ledger write, so a leader killed in between never
        # sent some: say again what the ledger knows of the last minutes (at least once).
        recent = [r for r in ended if (r.finished_at or r.queued_at) >= now - REPUBLISH_WINDOW]
        self.outbox.publish_all([forms.record_of(run) for run in [*state.runs, *recent]],
                                history=False)
        built = time.perf_counter()
        turn = Turn()
        turn.actions += intake.nodes_changed(engine, members, now)
        turn.actions += engine.start(now, state, term.epoch)
        turn.actions += engine.redispatch(now)
        started = time.perf_counter()
        self._finish_turn(term, engine, turn)
        done = time.perf_counter()
        log.info("epoch %d resumed in %.3f s: ledger read %.3f s (%d keys), state %.3f s, "
                 "engine start %.3f s, first turn %.3f s (%d runs adopted)", term.epoch,
                 done - began, read - began, len(loaded), built - read, started - built,
                 done - started, len(state.runs))
        return engine

    def _loop(self, term: Term, engine: Engine) -> bool:
        """Lead until deposed or stopped (False), or until a new catalogue arrives (True)."""
        opts = self.options
        rankings = self._rankings
        assert rankings is not None
        while not self._stopping.is_set() and not term.lost():
            nxt = _earliest(engine.next_wakeup(), rankings.next_wakeup())
            wait = opts.idle_wait
            if nxt is not None:
                wait = min(wait, max(0.0, self.clock.to_real(nxt - self.clock.now())))
            items = self._inbox.take(wait, opts.max_batch)
            began = time.perf_counter()
            turn = Turn()
            reload: Catalogue | None = None
            now = self.clock.now()
            rankings.now = now
            for item in items:
                if isinstance(item, Reload):
                    reload = item.catalogue
                elif isinstance(item, NodesChanged):
                    turn.actions += intake.nodes_changed(engine, item.nodes, now)
                elif isinstance(item, Delivered):
                    intake.delivered(engine, item, now, turn, self.outbox)
                elif isinstance(item, Submitted) and isinstance(item.request, ScheduleRequest):
                    turn.replies.append((item.reply, _schedule(rankings, item.request, now)))
                elif isinstance(item, Submitted):
                    turn.actions += intake.on_submitted(engine, item, now, turn)
            turn.actions += engine.tick(self.clock.now())
            self._finish_turn(term, engine, turn, quiet=not items and not turn.actions)
            if items or turn.actions:
                metrics.TURN.observe(time.perf_counter() - began)
            if reload is not None:
                self._flush_rankings(term)
                self.catalogue = reload
                return True
        if self._stopping.is_set() and not term.lost():
            self._flush_rankings(term)
        self._flushed.set()
        return False

    def _flush_rankings(self, term: Term) -> None:
        """A clean shutdown (or a reload) stores the rankings changed since the last store,
        and the state."""
        if self._rankings is None:
            return
        writes = self._rankings.flush(self.clock.now())
        try:
            term.commit(writes)
        except Exception as exc:  # deposed, or the store went away: the last state stands
            log.warning("%s could not store the rankings: %s", self.identifier, exc)

    def _quiet_ahead(self, engine: Engine) -> float:
        """Real seconds until something is due (at most `idle_wait`, the longest wait)."""
        rankings = self._rankings
        nxt = _earliest(engine.next_wakeup(), rankings.next_wakeup() if rankings else None)
        if nxt is None:
            return self.options.idle_wait
        return min(self.options.idle_wait, self.clock.to_real(nxt - self.clock.now()))

    def _finish_turn(self, term: Term, engine: Engine, turn: Turn, quiet: bool = False) -> None:
        """Store and publish what the turn decided, then refresh what readers see. A `quiet`
        turn (nothing taken from the inbox, nothing decided) that changed nothing leaves the
        snapshot as it is: an idle leader does no work in proportion to its services."""
        rankings = self._rankings
        if rankings is not None:
            now = self.clock.now()
            rankings.feed([a.run for a in turn.actions if isinstance(a, Record)], now)
            out = rankings.turn(now, term.epoch)
            turn.writes.update(out.writes)
            turn.events += out.events
            engine.nodes_out = rankings.nodes_out()
            self._rankings_view = rankings.view
        transactions, ops, written = term.transactions, term.ops, term.written
        changes = engine.drain_changes()
        quiet = quiet and not changes and not changes.finished and not turn.writes
        try:
            self.outbox.finish(term, self.ledger, changes, turn, self.catalogue,
                               engine.nodes, self.clock.now())
        except BaseException:
            for reply, _ in turn.replies:
                reply.abandon("leadership ended while the request was being recorded")
            raise
        finally:
            metrics.LEDGER_TRANSACTIONS.inc(term.transactions - transactions)
            metrics.LEDGER_WRITES.inc(term.ops - ops)
            metrics.LEDGER_BYTES.inc(term.written - written)
        now = time.monotonic()
        # The snapshot costs O(services): while turns come often it is rebuilt at most every
        # SNAPSHOT_EVERY, and once the leader is about to wait longer than that (nothing in
        # the inbox, nothing due before); a turn that answers an operator always rebuilds it.
        # What a turn changed shows within about `idle_wait` at most.
        self._snapshot_stale |= not quiet
        if self._snapshot is None or self._snapshot_stale and (
                turn.replies or now - self._snapshot_at >= SNAPSHOT_EVERY
                or (self._inbox.empty() and self._quiet_ahead(engine) >= SNAPSHOT_EVERY)):
            self._snapshot = view.snapshot(engine, self.identifier)
            self._snapshot_at = now
            self._snapshot_stale = False
        for reply, outcome in turn.replies:
            reply.resolve(outcome)
        if now - self._gauges_at >= GAUGES_EVERY:
            self._gauges_at = now
            self._show_state(engine)

    def _show_state(self, engine: Engine) -> None:
        waiting_groups, waiting_room, oldest = engine.waiting()
        if self._groups_of[0] is not self.catalogue:
            groups = {g for svc in self.catalogue.services.values() for g in svc.run_groups}
            self._groups_of = (self.catalogue, groups)
        metrics.show_state(
            roles=self.catalogue.roles,
            groups=self._groups_of[1],
            live_roles=[n.roles for n in engine.nodes.values()],
            held=engine.groups_held(), waiting_for_groups=waiting_groups,
            waiting_for_capacity=waiting_room,
            oldest_wait=0.0 if oldest is None else max(0.0, self.clock.now() - oldest),
        )


def _earliest(*times: float | None) -> float | None:
    present = [t for t in times if t is not None]
    return min(present) if present else None


def _schedule(rankings: LeaderRankings, req: ScheduleRequest, now: float) -> ScheduleOutcome:
    try:
        return ScheduleOutcome(req.request_id,
                               rankings.schedule_queries(req.tenant, req.ranking_ids, now))
    except RankingError as exc:
        return ScheduleOutcome(req.request_id, refused=str(exc))


def _transport_of(given: Transport | dramatiq.Broker) -> Transport:
    """The transport to use: given, or the one under a broker made by `make_broker` (callers
    that still hold a dramatiq broker)."""
    if isinstance(given, Transport):
        return given
    found = getattr(given, "rota_transport", None)
    if not isinstance(found, Transport):
        raise TypeError("give a Transport, or a broker made by protocol.transport.make_broker")
    return found


FAULT_POINTS = ("after-ledger", "after-publish", "in-delta", "in-flight")
"""Test-only crash points (`ROTA_FAULT=point:N`): after a turn's ledger commit, after its
orders are published, after the first part of a commit in several parts, and while a commit
with orders is in flight (sent, its reply not read)."""
IN_FLIGHT_DELAY = 0.02
"""Seconds between sending the transaction and the kill at `in-flight`, for the request to
reach ZooKeeper (which then applies it or not: the successor must cope with either)."""


def fault_from_spec(spec: str | None) -> FaultHook | None:
    """Test-only crash points: `<point>:N` SIGKILLs this process the Nth time the leader
    reaches that point (see `FAULT_POINTS`). Unset in production."""
    if not spec:
        return None
    point, _, count = spec.partition(":")
    if point not in FAULT_POINTS:
        raise ValueError(f"unknown fault point {point!r}: use one of {', '.join(FAULT_POINTS)}")
    remaining = [int(count or 1)]

    def hook(where: str) -> None:
        if where == point:
            remaining[0] -= 1
            if remaining[0] <= 0:
                import os
                import signal

                log.warning("fault point %s reached: killing this process", where)
                if where == "in-flight":
                    time.sleep(IN_FLIGHT_DELAY)
                os.kill(os.getpid(), signal.SIGKILL)

    return hook


__all__ = [
    "FAULT_POINTS", "REPUBLISH_WINDOW", "Coordinator", "LeaderOptions", "NotLeading",
    "fault_from_spec",
    "schedule_of_update",
]
