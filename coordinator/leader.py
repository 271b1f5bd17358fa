"""A coordinator process: contends for leadership, and while it leads, drives the engine.

The leader loop is single-threaded. Each turn it takes everything waiting in its inbox
(run events, operator requests, node changes), fires due slots, writes the resulting ledger
changes in one fenced batch, and only then publishes orders and lifecycle events and
acknowledges the messages it consumed. A leader killed at any point therefore leaves a
ledger from which the next one resumes: orders recorded but not published are re-sent
(workers ignore a run id they have seen), messages not acknowledged are redelivered.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

import dramatiq

from coordinator import metrics
from coordinator.adapters.events import EventBus
from coordinator.backoff import Backoff
from coordinator.core.engine import Action, Control, Dispatch, Engine, Record, RefusedError
from coordinator.core.node import Node
from coordinator.core.run import Run, RunState, Trigger
from coordinator.ledger import Ledger, LedgerError
from protocol import (
    DaemonControl,
    ManualRunRequest,
    NodeAnnouncement,
    ProtocolError,
    RunEvent,
    RunOrder,
    RunRecord,
    ServiceUpdate,
    decode,
    decode_as,
    encode,
    transport,
)
from protocol.catalogue import Catalogue
from protocol.clock import Clock
from protocol.coordination import Coordination, Fenced, Term
from protocol.schedule import Cron, FixedTimes, Periodic, Schedule, ScheduleError

log = logging.getLogger("rota.leader")

FaultHook = Callable[[str], None]
REPUBLISH_WINDOW = 300.0  # seconds of finished runs a new leader publishes again


@dataclass
class LeaderOptions:
    order_ttl: float = 60.0  # seconds (clock time) an order may wait before a worker refuses it
    max_batch: int = 5000  # inbox items handled per turn
    idle_wait: float = 0.5  # real seconds between turns when nothing is due
    failed_term_pause: float = 0.5  # first pause after a failed term; doubles up to 60 s
    fault: FaultHook | None = None  # test-only fault points; None in production


class UnknownRun(ValueError):
    """A report about a run this cluster does not know (forged, or long forgotten)."""


@dataclass
class _Turn:
    actions: list[Action] = field(default_factory=list)
    acks: list[transport.Delivery] = field(default_factory=list)
    extra_records: list[RunRecord] = field(default_factory=list)


def record_of(run: Run) -> RunRecord:
    return RunRecord(
        run_id=run.run_id,
        service=run.service,
        node=run.node,
        trigger=run.trigger.value,
        slot=run.slot,
        queued_at=run.queued_at,
        started_at=run.started_at,
        finished_at=run.finished_at,
        state=run.state.value,
        outcome=run.outcome,
        run_groups=sorted(run.run_groups),
        epoch=run.epoch,
        error=run.error,
        output_tail=run.output_tail,
        reason=run.reason,
        attempt=run.attempt,
    )


class Coordinator:
    """One coordinator. `run()` blocks: it contends, leads when elected, and contends again."""

    def __init__(
        self,
        identifier: str,
        catalogue: Catalogue,
        coordination: Coordination,
        broker: dramatiq.Broker,
        events: EventBus,
        clock: Clock,
        *,
        options: LeaderOptions | None = None,
        history_sinks: list[Callable[[RunRecord], None]] | None = None,
    ) -> None:
        self.identifier = identifier
        self.catalogue = catalogue
        self.coordination = coordination
        self.broker = broker
        self.events = events
        self.clock = clock
        self.options = options or LeaderOptions()
        self.history_sinks = list(history_sinks or [])
        self.lock = threading.RLock()  # guards `engine` for readers (table, web page)
        self.engine: Engine | None = None
        self.ledger = Ledger()
        self.leading = threading.Event()
        self._inbox: queue.Queue[tuple[str, object]] = queue.Queue()
        self._stopping = threading.Event()
        self._nodes: dict[str, Node] = {}
        # Daemon intervals seen opening: "daemon:<service>@<node>" -> (began, groups, epoch).
        self._open_daemons: dict[str, tuple[float, list[str], int]] = {}
        self.first_dispatch_at: float | None = None  # real time of this term's first order
        self._publisher = transport.Publisher(broker)
        self._failed_terms = Backoff(self.options.failed_term_pause, 60.0)

    # -- process lifecycle -------------------------------------------------------------
    def run(self) -> None:
        self.coordination.watch_nodes(self._nodes_changed)
        self.coordination.contend(self.identifier, self._lead)

    def _nodes_changed(self, nodes: dict[str, bytes]) -> None:
        with self.lock:
            if self.engine is None:  # following: remember membership for the next term
                self._apply_nodes(nodes)
                return
        self._inbox.put(("nodes", nodes))

    def stop(self) -> None:
        self._stopping.set()
        self._inbox.put(("wake", None))
        self.coordination.stop()

    # -- operator API (in-process callers; remote ones publish to rota.requests) --------
    def request_manual_run(self, service: str, requested_by: str = "operator") -> str:
        request_id = uuid.uuid4().hex[:16]
        msg = ManualRunRequest(
            request_id=request_id, service=service, requested_by=requested_by,
            requested_at=self.clock.now(),
        )
        transport.send(self.broker, transport.REQUESTS, encode(msg))
        return request_id

    # -- leading ----------------------------------------------------------------------
    def reload(self, catalogue: Catalogue) -> None:
        """Use a new (already validated) catalogue: the leader rebuilds from the ledger."""
        self._inbox.put(("reload", catalogue))

    def _lead(self, term: Term) -> None:
        if self._stopping.is_set():
            return
        self._drain_inbox_nodes()  # membership seen while following
        log.info("%s leads with epoch %d", self.identifier, term.epoch)
        metrics.LEADER.set(1)
        metrics.EPOCH.set(term.epoch)
        readers: list[transport.QueueReader] = []
        failed = False
        try:
            while True:
                engine = self._build(term)
                self._failed_terms.reset()
                if not readers:
                    self.leading.set()
                    readers = [
                        transport.QueueReader(
                            self.broker, transport.RESULTS,
                            lambda d: self._inbox.put(("result", d)),
                        ).start(),
                        transport.QueueReader(
                            self.broker, transport.REQUESTS,
                            lambda d: self._inbox.put(("request", d)),
                        ).start(),
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
            self.leading.clear()
            metrics.LEADER.set(0)
            for r in readers:
                r.stop()
            with self.lock:
                self.engine = None
            # Deliveries still in the inbox were never acknowledged: RabbitMQ redelivers them.
            self._drain_inbox_nodes()
        if failed:
            # Pause before stepping down, longer after each failed term in a row: a fault
            # that fails every term (a bad ledger value) must not spin elections.
            pause = self._failed_terms.next()
            log.warning("%s steps down after %d failed term(s) in a row; pausing %.1f s",
                        self.identifier, self._failed_terms.failures, pause)
            term.wait_lost(pause)

    def _build(self, term: Term) -> Engine:
        """A fresh engine resumed from the ledger; its first actions are carried out."""
        self.ledger = Ledger()
        self._open_daemons.clear()  # another leader may have seen them end meanwhile
        state = self.ledger.restore(term.load())
        ended = self.ledger.recent_all(since=float("-inf"))
        # Membership read after the epoch bump, not the watch's view, which may lag: a run
        # adopted on a node missing from it died with its node while no leader was running.
        members = term.nodes()
        engine = Engine(
            self.catalogue.services.values(),
            self.catalogue.timezone,
            order_ttl=self.options.order_ttl,
        )
        for run in ended:  # reports of them may still come, late or twice
            engine.note_ended(run.run_id)
        now = self.clock.now()
        # Events are published after each ledger write, so a leader killed in between never
        # sent some: say again what the ledger knows of the last minutes (at least once).
        recent = [r for r in ended if (r.finished_at or r.queued_at) >= now - REPUBLISH_WINDOW]
        for run in [*state.runs, *recent]:
            self._publish(record_of(run), history=False)
        with self.lock:
            self._apply_nodes(members)
            self.engine = engine
            for node in self._nodes.values():
                engine.node_up(node, now)
            turn = _Turn()
            turn.actions += engine.start(now, state, term.epoch)
            turn.actions += engine.redispatch(now)
        self.first_dispatch_at = None
        self._finish_turn(term, engine, turn)
        return engine

    def _drain_inbox_nodes(self) -> None:
        kept: list[tuple[str, object]] = []
        while True:
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                break
            if item[0] == "nodes":
                kept.append(item)
        for item in kept:
            self._apply_nodes(item[1])  # type: ignore[arg-type]

    def _loop(self, term: Term, engine: Engine) -> bool:
        """Lead until deposed or stopped (False), or until a new catalogue arrives (True)."""
        opts = self.options
        while not self._stopping.is_set() and not term.lost():
            nxt = engine.next_wakeup()
            wait = opts.idle_wait
            if nxt is not None:
                wait = min(wait, max(0.0, self.clock.to_real(nxt - self.clock.now())))
            items: list[tuple[str, object]] = []
            try:
                items.append(self._inbox.get(timeout=wait))
                while len(items) < opts.max_batch:
                    items.append(self._inbox.get_nowait())
            except queue.Empty:
                pass
            turn = _Turn()
            reload: Catalogue | None = None
            with self.lock:
                now = self.clock.now()
                for kind, item in items:
                    if kind == "reload":
                        reload = item  # type: ignore[assignment]
                    else:
                        self._handle(engine, kind, item, now, turn)
                turn.actions += engine.tick(self.clock.now())
            self._finish_turn(term, engine, turn)
            if reload is not None:
                self.catalogue = reload
                return True
        return False

    def _finish_turn(self, term: Term, engine: Engine, turn: _Turn) -> None:
        fault = self.options.fault
        with self.lock:
            changes = engine.drain_changes()
        if changes or changes.finished:
            writes = self.ledger.writes(changes)
            if writes:
                term.commit(writes)  # raises Fenced when deposed: nothing below happens
        dispatches = [a for a in turn.actions if isinstance(a, Dispatch)]
        if log.isEnabledFor(logging.DEBUG) and (dispatches or changes):
            log.debug("epoch %d turn: ledger runs %s cursors %s; orders %s; records %s",
                      term.epoch,
                      {k: (r.state.value if r else "-") for k, r in changes.runs.items()},
                      changes.cursors, [a.run.run_id for a in dispatches],
                      [f"{a.run.run_id}:{a.run.state.value}" for a in turn.actions
                       if isinstance(a, Record)])
        if fault and dispatches:
            fault("after-ledger")
        now = self.clock.now()
        self._send([self._order(a, term.epoch, now) for a in dispatches], term)
        if dispatches:
            metrics.DISPATCHED.inc(len(dispatches))
            if self.first_dispatch_at is None:
                self.first_dispatch_at = time.time()
        if fault and dispatches:
            fault("after-publish")
        self._send([self._control(a, term.epoch, now) for a in turn.actions
                    if isinstance(a, Control)], term)
        for action in turn.actions:
            if isinstance(action, Record):
                self._publish(record_of(action.run))
        for rec in turn.extra_records:
            self._publish(rec)
        for d in turn.acks:
            d.ack()

    # -- inputs -------------------------------------------------------------------------
    def _handle(self, engine: Engine, kind: str, item: object, now: float, turn: _Turn) -> None:
        if kind == "nodes":
            before = dict(self._nodes)
            turn.actions += self._apply_nodes(item, engine, now)  # type: ignore[arg-type]
            for node_id, node in before.items():
                if node_id not in self._nodes:
                    why = f"node {node_id} died"
                elif self._nodes[node_id].incarnation != node.incarnation:
                    why = f"node {node_id} restarted"
                else:
                    continue
                turn.extra_records += self._close_daemons(node_id, now, why)
            return
        if kind not in ("result", "request"):
            return
        delivery: transport.Delivery = item  # type: ignore[assignment]
        turn.acks.append(delivery)
        source = transport.RESULTS if kind == "result" else transport.REQUESTS
        if delivery.error is not None or delivery.payload is None:
            transport.dead_letter(self.broker, source, delivery.raw, delivery.error or "empty",
                                  now)
            metrics.DEAD_LETTERS.labels(source, getattr(delivery.error, "reason", "garbage")).inc()
            return
        try:
            msg = decode(delivery.payload)
            if kind == "result":
                if not isinstance(msg, RunEvent):
                    raise ProtocolError(
                        "unknown_type", f"{source} takes RunEvent, got {type(msg).__name__}"
                    )
                turn.actions += self._on_event(engine, msg, now, turn)
            else:
                turn.actions += self._on_request(engine, msg, now, turn)
        except ProtocolError as exc:
            transport.dead_letter(self.broker, source, delivery.payload, exc, now)
            metrics.DEAD_LETTERS.labels(source, exc.reason).inc()
        except UnknownRun as exc:
            transport.dead_letter(self.broker, source, delivery.payload, str(exc), now)
            metrics.DEAD_LETTERS.labels(source, "unknown_run").inc()

    def _apply_nodes(
        self, raw: dict[str, bytes], engine: Engine | None = None, now: float | None = None
    ) -> list[Action]:
        fresh: dict[str, Node] = {}
        for node_id, data in raw.items():
            try:
                ann = decode_as(data, NodeAnnouncement)
            except ProtocolError as exc:
                log.warning("ignoring node %s: %s", node_id, exc)
                continue
            fresh[node_id] = Node(node_id, frozenset(ann.roles), ann.capacity, ann.version,
                                  ann.incarnation)
        actions: list[Action] = []
        if engine is not None and now is not None:
            for node_id in set(self._nodes) - set(fresh):
                log.info("node %s is gone; its runs are lost", node_id)
                actions += engine.node_down(node_id, now)
            for node_id, node in fresh.items():
                old = self._nodes.get(node_id)
                if old != node:
                    if old is not None and old.incarnation != node.incarnation:
                        log.info("node %s restarted; what it ran before is lost", node_id)
                    actions += engine.node_up(node, now)
        self._nodes = fresh
        metrics.NODES.set(len(fresh))
        return actions

    def _on_event(self, engine: Engine, ev: RunEvent, now: float, turn: _Turn) -> list[Action]:
        if ev.run_id.startswith("daemon:"):
            self._daemon_record(ev, turn)
            return engine.daemon_event(ev.service, ev.node, ev.state, now, epoch=ev.epoch)
        if ev.state == "rejected" and ev.run_id not in engine.runs:
            # An order this leader never gave (forged, or from a deposed leader): show it.
            log.warning("node %s refused order %s: %s", ev.node, ev.run_id, ev.reason)
            turn.extra_records.append(RunRecord(
                run_id=ev.run_id, service=ev.service, node=ev.node, trigger="scheduled",
                slot=None, queued_at=ev.at, started_at=None, finished_at=ev.at,
                state="rejected", outcome="rejected", run_groups=[], epoch=ev.epoch,
                error=None, output_tail="", reason=ev.reason, attempt=1,
            ))
            return []
        if not engine.knows(ev.run_id):
            # Checked before anything is counted: a forged report names any service it likes.
            raise UnknownRun(f"unknown run {ev.run_id!r} (reported {ev.state} by {ev.node})")
        if ev.state == "started":
            return engine.run_started(ev.run_id, ev.node, ev.at, now)
        if ev.state in ("succeeded", "failed", "timed_out", "rejected"):
            run = engine.runs.get(ev.run_id)
            actions = engine.run_finished(
                ev.run_id, ev.node, ev.state, now,
                started_at=ev.started_at, finished_at=ev.finished_at, error=ev.error,
                output_tail=ev.output_tail, reason=ev.reason, metrics=ev.metrics,
            )
            if run is not None and actions:  # counted once, under the run's own service
                if ev.started_at is not None and ev.state != "rejected" and run.slot is not None:
                    metrics.LATENESS.observe(max(0.0, ev.started_at - run.slot))
                metrics.RUNS.labels(run.service, ev.state).inc()
            return actions
        return []

    def _daemon_record(self, ev: RunEvent, turn: _Turn) -> None:
        """A daemon interval as a run record: from a start or resume to a pause, stop or exit.

        The interval is named after the instant the worker started it, which the worker sends
        again with the end event, so any leader can close an interval another one opened.
        """
        key = f"daemon:{ev.service}@{ev.node}"
        svc = self.catalogue.services.get(ev.service)
        groups = sorted(svc.run_groups) if svc else []
        if ev.state in ("started", "resumed"):
            began, finished, state, outcome = ev.at, None, "running", None
            opened = self._open_daemons.get(key)
            if opened is not None and opened[0] != began and ev.state == "started":
                # A fresh start while an interval is open: the node's worker was restarted
                # and the instance it ran ended with it.
                turn.extra_records.append(self._lost_daemon(key, ev.service, ev.node, opened,
                                                            ev.at, "its worker restarted"))
            self._open_daemons[key] = (began, groups, ev.epoch)
        elif ev.state in ("paused", "stopped", "exited") and ev.started_at is not None:
            outcome = "failed" if ev.state == "exited" else "succeeded"
            began, finished, state = ev.started_at, ev.at, outcome
            self._open_daemons.pop(key, None)
        else:
            return
        turn.extra_records.append(RunRecord(
            run_id=f"{key}#{began:.3f}", service=ev.service, node=ev.node, trigger="daemon",
            slot=None, queued_at=began, started_at=began, finished_at=finished, state=state,
            outcome=outcome, run_groups=groups, epoch=ev.epoch, error=ev.error,
            output_tail=ev.output_tail, reason=ev.state, attempt=1,
        ))

    def _close_daemons(self, node_id: str, now: float, reason: str) -> list[RunRecord]:
        """End the daemon intervals of a node that is gone: its daemons died with it."""
        out = []
        for key in [k for k in self._open_daemons if k.rsplit("@", 1)[1] == node_id]:
            service = key[len("daemon:"):].rsplit("@", 1)[0]
            out.append(self._lost_daemon(key, service, node_id, self._open_daemons.pop(key),
                                         now, reason))
        return out

    @staticmethod
    def _lost_daemon(key: str, service: str, node: str, opened: tuple[float, list[str], int],
                     at: float, reason: str) -> RunRecord:
        began, groups, epoch = opened
        return RunRecord(
            run_id=f"{key}#{began:.3f}", service=service, node=node, trigger="daemon",
            slot=None, queued_at=began, started_at=began, finished_at=max(began, at),
            state="lost", outcome="lost", run_groups=groups, epoch=epoch, error=None,
            output_tail="", reason=reason, attempt=1,
        )

    def _on_request(self, engine: Engine, msg: object, now: float, turn: _Turn) -> list[Action]:
        if isinstance(msg, ManualRunRequest):
            try:
                return engine.manual_run(msg.service, now, msg.request_id)
            except RefusedError as exc:
                turn.extra_records.append(self._refusal(msg.request_id, msg.service, str(exc), now))
                return []
        if isinstance(msg, ServiceUpdate):
            try:
                schedule = schedule_of_update(msg)
                return engine.update_service(
                    msg.service, now, enabled=msg.enabled, schedule=schedule
                )
            except (RefusedError, ScheduleError) as exc:
                turn.extra_records.append(self._refusal(msg.request_id, msg.service, str(exc), now))
                return []
        raise ProtocolError("unknown_type", f"{transport.REQUESTS} takes ManualRunRequest or "
                            f"ServiceUpdate, got {type(msg).__name__}")

    def _refusal(self, request_id: str, service: str, reason: str, now: float) -> RunRecord:
        log.warning("refused request %s for %r: %s", request_id, service, reason)
        return RunRecord(
            run_id=f"manual-{request_id}", service=service, node=None, trigger="manual",
            slot=None, queued_at=now, started_at=None, finished_at=now, state="rejected",
            outcome="rejected", run_groups=[], epoch=self.engine.epoch if self.engine else 0,
            error=None, output_tail="", reason=reason, attempt=1,
        )

    # -- outputs ------------------------------------------------------------------------
    def _send(self, items: list[tuple[str, bytes]], term: Term) -> None:
        """Publish a batch, confirmed as a whole; while RabbitMQ is unreachable, retry.

        Gives up only when leadership is lost: the orders are in the ledger, and the next
        leader re-sends them.
        """
        delay = 0.1
        while items:
            try:
                self._publisher.send_many(items)
                if delay > 0.1:
                    log.warning("RabbitMQ is reachable again")
                return
            except Exception as exc:
                if delay == 0.1:
                    log.warning("cannot publish %d message(s) (%s); retrying with backoff",
                                len(items), exc)
                if term.wait_lost(delay) or self._stopping.is_set():
                    raise Fenced("leadership ended while RabbitMQ was unreachable") from exc
                delay = min(delay * 2, 2.0)

    def _order(self, d: Dispatch, epoch: int, now: float) -> tuple[str, bytes]:
        run, svc = d.run, d.service
        assert run.node is not None and run.deadline is not None
        order = RunOrder(
            run_id=run.run_id, service=svc.name, node=run.node, trigger=run.trigger.value,
            slot=run.slot, attempt=run.attempt, epoch=epoch, issued_at=now,
            deadline=run.deadline, timeout=svc.timeout, callable=svc.utility.callable,
            command=list(svc.utility.command) if svc.utility.command else None,
            run_groups=sorted(svc.run_groups), params=self.catalogue.params.get(svc.name, {}),
            allowed_roles=sorted(svc.allowed_roles), incarnation=run.incarnation,
        )
        return transport.node_queue(run.node), encode(order)

    def _control(self, c: Control, epoch: int, now: float) -> tuple[str, bytes]:
        svc, node = c.service, self._nodes.get(c.node)
        msg = DaemonControl(
            control_id=uuid.uuid4().hex[:16], service=svc.name, node=c.node, action=c.action,
            epoch=epoch, issued_at=now, callable=svc.utility.callable,
            command=list(svc.utility.command) if svc.utility.command else None,
            run_groups=sorted(svc.run_groups), params=self.catalogue.params.get(svc.name, {}),
            allowed_roles=sorted(svc.allowed_roles), incarnation=node.incarnation if node else None,
        )
        return transport.node_queue(c.node), encode(msg)

    def _publish(self, rec: RunRecord, history: bool = True) -> None:
        self.events.publish(rec.routing_key, encode(rec))
        final = rec.state in _FINAL or (rec.trigger == "daemon" and rec.finished_at is not None)
        if history and final:
            for sink in self.history_sinks:
                try:
                    sink(rec)
                except Exception:
                    log.exception("history sink failed")


_FINAL = {s.value for s in RunState if s.terminal}


def fault_from_spec(spec: str | None) -> FaultHook | None:
    """Test-only crash points: `after-ledger:N` or `after-publish:N` SIGKILLs this process
    the Nth time the leader reaches that point with orders to send. Unset in production."""
    if not spec:
        return None
    point, _, count = spec.partition(":")
    if point not in ("after-ledger", "after-publish"):
        raise ValueError(f"unknown fault point {point!r}: use after-ledger or after-publish")
    remaining = [int(count or 1)]

    def hook(where: str) -> None:
        if where == point:
            remaining[0] -= 1
            if remaining[0] <= 0:
                import os
                import signal

                log.warning("fault point %s reached: killing this process", where)
                os.kill(os.getpid(), signal.SIGKILL)

    return hook


def schedule_of_update(msg: ServiceUpdate) -> Schedule | None:
    """The new schedule an edit asks for, validated; None when the edit leaves it alone."""
    given = [x for x in (msg.period, msg.run_at, msg.cron) if x is not None]
    if not given:
        if msg.align is not None:
            raise ScheduleError("align needs a period")
        return None
    if len(given) > 1:
        raise ScheduleError("give one of period, run_at or cron")
    if msg.period is not None:
        return Periodic(msg.period, msg.align or 0)
    if msg.run_at is not None:
        return FixedTimes.parse(msg.run_at)
    return Cron(str(msg.cron))


__all__ = ["Coordinator", "LeaderOptions", "record_of", "schedule_of_update", "Trigger"]
