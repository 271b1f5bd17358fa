"""A worker node: announces itself, takes orders from its queue, runs utilities, reports.

Orders arrive on `rota.node.<id>`, served by the node's `Transport` on a few consumer
threads. The handler only checks the order and hands it to the node's run pool, so the message
is acknowledged at once: a run can last hours without tripping RabbitMQ's consumer timeout.
A node that dies mid-run is seen by the leader through its vanished session, and the run is
marked lost.

An order is refused (a `rejected` event with the reason) when it is addressed to another
node, carries an epoch older than the newest this node has seen (a deposed leader), is past
its deadline, or names a service none of this node's roles may run. A run id seen before is
ignored: a new leader re-sends orders it cannot prove were delivered.

An order sent ahead of its slot (`start_at` in the future) is held on one timer (a heap, not
a thread per order) and started at that instant, after the same checks again: epoch, deadline,
session, roles. A held order whose leader was superseded meanwhile (a newer epoch seen) does
not start and is forgotten: the successor adopts the run from the ledger and sends it again,
and that order is taken as new. A re-sent order arriving while the run is still held replaces
the held one when it carries a newer epoch; either way the run starts once.

Run events go to `rota.results` through a bounded outbox and one reporter thread, the events
waiting together sent as one `RunEvents` batch message (`protocol/batches.py`). While
RabbitMQ is unreachable the reporter retries with backoff and keeps every event; once the
outbox holds `OUTBOX_LIMIT` events, whoever reports waits for room: consumer threads stop
taking orders (RabbitMQ keeps them in the queue), finished runs wait to be reported. No event
is dropped. A run whose report carries a value that cannot be sent (a NaN metric, text that is
not UTF-8) is reported `failed` with an error naming the value. A run that ends while its
`started` report is still in the outbox is reported once: its final report (which carries
`started_at`) takes the place of the `started` one.

Given a coordination that tells of session trouble (ZooKeeper's does), the node stops every run
and daemon holding run groups once its session has been in doubt for the coordination's grace
(ZooKeeper: `protocol.zk.suspend_grace`, 0.33 s for a 2 s session, computed so the stop
completes before the session can expire and another node take the groups), or at once when it
expired. A connection back in the same session within the grace (a ZooKeeper ensemble member
died and the client moved to another) stops nothing. While the session is in doubt no run or
daemon holding run groups starts.
"""

from __future__ import annotations

import logging
import math
import queue
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from functools import partial
from typing import Any

from protocol import (
    MAX_ERROR_CHARS,
    MAX_OUTPUT_TAIL_CHARS,
    DaemonControl,
    NodeAnnouncement,
    ProtocolError,
    RunEvent,
    RunOrder,
    decode,
    encode,
)
from protocol.backoff import Backoff
from protocol.batches import RUN_EVENTS, RUN_ORDERS, is_batch, packs, unpack
from protocol.catalogue import Catalogue
from protocol.clock import Clock
from protocol.coordination import Coordination
from protocol.service import Utility
from protocol.transport import RESULTS, Consumer, Delivery, Transport, node_queue
from workers import metrics
from workers.daemon import DaemonEvent, DaemonSupervisor
from workers.executor import Executor, RunOutcome
from workers.journal import Journal
from workers.threads import ThreadPool
from workers.timer import Timer

log = logging.getLogger("rota.worker")

VERSION = "0.2.0"
"""Announced to the leader; 0.2 takes orders in `RunOrders` batches (`protocol/batches.py`)."""
SEEN_LIMIT = 100_000
RESENT_LIMIT = 10_000
"""Successors' orders kept for runs whose predecessor's order was taken (see `_on_order`)."""
OUTBOX_LIMIT = 10_000
"""Run events the outbox holds while RabbitMQ is unreachable; reporters wait beyond it."""
REPORT_BATCH = 500
"""Most run events published in one batch."""
REPORT_LINGER = 0.005
"""Seconds the reporter waits before sending a `started` report that heads the outbox, so that
a run ending within it is reported once (its final report replaces the `started` one)."""
STARTS_FIRST = 0.05
"""Longest the reporter waits, before publishing, for runs being started to have started: at
an instant when many runs start, their starts go before the reports of the first ones."""


class WorkerNode:
    def __init__(
        self,
        node_id: str,
        roles: list[str],
        transport: Transport,
        coordination: Coordination,
        clock: Clock,
        *,
        capacity: int = 256,
        consumer_threads: int = 4,
        metrics_url: str | None = None,
        journal: str | None = None,
        catalogue: Catalogue | None = None,
    ) -> None:
        if not roles:
            raise ValueError("a worker node needs at least one role")
        self.node_id = node_id
        self.roles = frozenset(roles)
        self.transport = transport
        self.coordination = coordination
        self.clock = clock
        self.capacity = capacity
        self.metrics_url = metrics_url
        self.catalogue = catalogue  # when given, orders for other services are refused
        self.queue = node_queue(node_id)
        self.executor = Executor(clock)
        self.daemons = DaemonSupervisor(clock, self._daemon_report, node=node_id)
        self._pool = ThreadPool(f"run:{node_id}")
        self._seen: OrderedDict[str, int] = OrderedDict()  # run id -> epoch of its order
        # A successor's order for a run taken from its predecessor and maybe not started yet:
        # used if that one turns out superseded (under _seen_lock).
        self._resent: OrderedDict[str, RunOrder] = OrderedDict()
        self._seen_lock = threading.Lock()
        self._running: dict[str, frozenset[str]] = {}  # run id -> run groups
        self._held: dict[str, RunOrder] = {}  # orders waiting for start_at (under _seen_lock)
        self._timer: Timer | None = None
        self._epoch = 0  # the newest leader epoch seen; only `_raise_epoch` writes it
        self._epoch_lock = threading.Lock()
        self._daemon_epoch = 0
        # Controls are taken by several consumer threads: apply them one at a time, and never
        # one issued before the last applied for the same daemon (a late resume must not undo
        # the pause that followed it, even when both were sent in one turn).
        self._control_lock = threading.Lock()
        self._last_control: dict[str, tuple[int, float, int]] = {}
        self.incarnation: str | None = None  # names this node's current ZooKeeper session
        self._consumer_threads = consumer_threads
        self._served: Consumer | None = None
        self._journal = Journal(journal) if journal else None
        self._daemon_groups: dict[str, list[str]] = {}
        self._daemon_since: dict[str, float] = {}  # service -> start of its current interval
        self._outbox = _Outbox(OUTBOX_LIMIT)
        self._starting = 0  # runs handed to the pool that have not started their utility yet
        self._starts = threading.Condition()
        self._reporter_thread = threading.Thread(
            target=self._reporter, name=f"report:{node_id}", daemon=True
        )

    # -- lifecycle ----------------------------------------------------------------------
    def start(self) -> WorkerNode:
        self._reporter_thread.start()
        self._timer = Timer(self.clock, self._start_held, f"hold:{self.node_id}")
        self.coordination.watch_epoch(self._see_epoch)
        # Not every coordination can tell (the in-memory one has no session to lose).
        on_trouble = getattr(self.coordination, "on_session_trouble", None)
        if on_trouble is not None:
            on_trouble(lambda: self.stop_lock_holders("ZooKeeper session in doubt"),
                       lambda: self.stop_lock_holders("ZooKeeper session expired"))
        self._served = self.transport.serve(
            self.queue, self._on_delivery, threads=self._consumer_threads,
            refused=lambda reason: metrics.DEAD_LETTERS.labels(self.node_id, reason).inc(),
        )
        self.announce()
        log.info("node %s up with roles %s", self.node_id, ", ".join(sorted(self.roles)))
        return self

    def announce(self) -> None:
        started_at = self.clock.now()

        def make() -> bytes:
            # Called for each ZooKeeper session that creates the entry: a new session gets a
            # new incarnation, and orders meant for an earlier one are refused from then on.
            incarnation = uuid.uuid4().hex[:16]
            data = encode(NodeAnnouncement(
                node=self.node_id, roles=sorted(self.roles), capacity=self.capacity,
                version=VERSION, started_at=started_at, metrics_url=self.metrics_url,
                incarnation=incarnation,
            ))
            self.incarnation = incarnation
            return data

        self.coordination.announce(self.node_id, make)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop taking orders, stop daemons (reported as stopped), finish what runs."""
        if self._served is not None:
            self._served.stop(timeout)
            self._served = None
        if self._timer is not None:
            self._timer.stop(timeout)
            self._timer = None
            with self._seen_lock:
                held, self._held = len(self._held), {}
            if held:  # their runs end lost when this node's session ends
                log.warning("node %s stops with %d order(s) held for later", self.node_id,
                            held)
        self.daemons.stop_all()
        self._pool.shutdown()
        self.executor.close()
        try:  # send what is queued, then stop reporting
            self._outbox.put(None, timeout=timeout)
        except queue.Full:
            log.error("node %s stops with %d run events it could not publish",
                      self.node_id, self._outbox.qsize())
        self._reporter_thread.join(timeout)
        if self._journal is not None:
            self._journal.close()

    def kill_session(self) -> None:
        """Leave the cluster as a dead node would (tests and the embedded cluster)."""
        self.coordination.withdraw(self.node_id)

    def stop_lock_holders(self, reason: str) -> None:
        """Before this node's session can expire (or once it has): stop every run and daemon
        that holds run groups. Stopping them again is harmless."""
        for run_id, groups in list(self._running.items()):
            if groups:
                self.executor.cancel(run_id, reason)
        self.daemons.stop_all()

    def _see_epoch(self, epoch: int) -> None:
        self._raise_epoch(epoch)

    def _raise_epoch(self, epoch: int) -> int:
        """Take `epoch` as seen; the newest seen, which never goes backwards."""
        with self._epoch_lock:
            if epoch > self._epoch:
                self._epoch = epoch
            return self._epoch

    # -- messages -----------------------------------------------------------------------
    def _on_delivery(self, delivery: Delivery) -> None:
        now = self.clock.now()
        if delivery.payload is None:
            error = delivery.error or ProtocolError("garbage", "no payload")
            self.transport.dead_letter(self.queue, delivery.raw, error, now)
            metrics.DEAD_LETTERS.labels(self.node_id, error.reason).inc()
            return
        payload = delivery.payload
        if is_batch(payload, RUN_ORDERS):
            self._on_orders(payload, now)
            return
        try:
            msg = decode(payload)
        except ProtocolError as exc:
            self.transport.dead_letter(self.queue, payload, exc, now)
            metrics.DEAD_LETTERS.labels(self.node_id, exc.reason).inc()
            return
        if isinstance(msg, RunOrder):
            self._on_order(msg, now)
        elif isinstance(msg, DaemonControl):
            self._on_control(msg)
        else:
            wrong = ProtocolError(
                "unknown_type", f"{self.queue} takes RunOrder or DaemonControl, "
                f"got {type(msg).__name__}",
            )
            self.transport.dead_letter(self.queue, payload, wrong, now)
            metrics.DEAD_LETTERS.labels(self.node_id, wrong.reason).inc()

    def _on_orders(self, payload: bytes, now: float) -> None:
        """A leader turn's orders for this node as one batch: each taken as if it came
        alone; an element that is not a valid order is dead-lettered with its own bytes."""
        try:
            found = unpack(payload, RUN_ORDERS)
        except ProtocolError as exc:
            self.transport.dead_letter(self.queue, payload, exc, now)
            metrics.DEAD_LETTERS.labels(self.node_id, exc.reason).inc()
            return
        for raw, order in found:
            if isinstance(order, ProtocolError):
                self.transport.dead_letter(self.queue, raw, order, now)
                metrics.DEAD_LETTERS.labels(self.node_id, order.reason).inc()
            else:
                self._on_order(order, now)

    def _refusal(self, order: RunOrder, now: float) -> str | None:
        if order.node != self.node_id:
            return f"order for node {order.node!r} arrived at {self.node_id!r}"
        if order.epoch < self._epoch:
            return f"stale epoch {order.epoch} < {self._epoch}"
        if now > order.deadline:
            return f"past its deadline by {now - order.deadline:.3f}s"
        if order.incarnation is not None and order.incarnation != self.incarnation:
            return (f"sent to an ended session of node {self.node_id} ({order.incarnation}; "
                    f"now {self.incarnation}): the leader has already ended that run")
        if order.run_groups and not self.coordination.session_ok():
            return ("ZooKeeper session in doubt: a run holding run groups "
                    f"({', '.join(order.run_groups)}) must not start")
        if self.catalogue is not None:
            svc = self.catalogue.services.get(order.service)
            if svc is None:
                return f"unknown service {order.service!r}: not in this node's catalogue"
            if (svc.utility.callable != order.callable
                    or (svc.utility.command or None) != (tuple(order.command or ()) or None)):
                return f"utility of {order.service!r} differs from this node's catalogue"
            if self.roles.isdisjoint(svc.allowed_roles):
                return (f"node roles {', '.join(sorted(self.roles))} may not run "
                        f"{order.service!r}")
        allowed = order.allowed_roles
        if allowed and self.roles.isdisjoint(allowed):
            return (f"node roles {', '.join(sorted(self.roles))} are not among the allowed "
                    f"roles {', '.join(sorted(allowed))}")
        return None

    def _on_order(self, order: RunOrder, now: float) -> None:
        with self._seen_lock:
            held = self._held.get(order.run_id)
            if held is not None:
                # Sent again while held: a successor's order takes the place of its
                # predecessor's (same run, same start instant), so the run starts once.
                if order.epoch > held.epoch and order.node == self.node_id:
                    self._held[order.run_id] = order
                    self._raise_epoch(order.epoch)
                else:
                    metrics.DUPLICATES.labels(self.node_id).inc()
                return
            taken = self._seen.get(order.run_id)
            if taken is not None:
                if order.epoch > taken and order.node == self.node_id:
                    # Taken from a predecessor, perhaps not started yet: if it turns out
                    # superseded before it starts, this one is started in its place.
                    self._resent[order.run_id] = order
                    if len(self._resent) > RESENT_LIMIT:
                        self._resent.popitem(last=False)
                    self._raise_epoch(order.epoch)
                metrics.DUPLICATES.labels(self.node_id).inc()
                return
            self._seen[order.run_id] = order.epoch
            if len(self._seen) > SEEN_LIMIT:
                self._seen.popitem(last=False)
        if self._refuse(order, now):
            if order.epoch < self._epoch:
                # From a deposed leader: its successor adopted the run from the ledger and
                # sends it again; that order must be taken.
                with self._seen_lock:
                    self._seen.pop(order.run_id, None)
            return
        self._raise_epoch(order.epoch)
        if order.start_at is not None and order.start_at > now and self._timer is not None:
            with self._seen_lock:
                self._held[order.run_id] = order
                waiting = len(self._held)
            self._timer.at(order.start_at, order.run_id)
            # The threads these runs start on, started now rather than at their instant.
            self._pool.reserve(waiting)
            return
        self._begin(order)

    def _start_held(self, run_id: str) -> None:
        """A held order's start instant came: check it again, then start it."""
        with self._seen_lock:
            order = self._held.pop(run_id, None)
            if order is None:
                return
            if self._superseded(order, "held order"):
                return
        if not self._refuse(order, self.clock.now()):
            self._begin(order)

    def _superseded(self, order: RunOrder, what: str) -> bool:
        """Whether a newer leader than `order`'s was seen; if so the order is forgotten, so
        that the successor, which adopted the run from the ledger and sends it again, has its
        order taken. Called with `_seen_lock` held."""
        if order.epoch >= self._epoch:
            return False
        self._seen.pop(order.run_id, None)
        log.info("%s %s (%s) not started: epoch %d superseded by %d; waiting for the current "
                 "leader to send it again", what, order.run_id, order.service, order.epoch,
                 self._epoch)
        metrics.SUPERSEDED.labels(self.node_id).inc()
        return True

    def _refuse(self, order: RunOrder, now: float) -> bool:
        """Refuse `order` if it must not run (reported `rejected` with the reason)."""
        reason = self._refusal(order, now)
        if reason is None:
            return False
        log.warning("refused %s (%s): %s", order.run_id, order.service, reason)
        metrics.REJECTED.labels(self.node_id, reason.split()[0]).inc()
        self._report(RunEvent(
            run_id=order.run_id, service=order.service, node=self.node_id,
            state="rejected", at=now, epoch=order.epoch, reason=reason,
        ))
        return True

    def _begin(self, order: RunOrder) -> None:
        self._running[order.run_id] = frozenset(order.run_groups)
        with self._starts:
            self._starting += 1
        self._pool.submit(partial(self._execute, order))

    def _started_one(self) -> None:
        with self._starts:
            self._starting -= 1
            if not self._starting:
                self._starts.notify_all()

    def _execute(self, order: RunOrder) -> None:
        """On a pool thread: check the order again, start its utility (counted out of
        `_starting` once, when it has started or when this returns, whichever is first)."""
        pending = [True]

        def begun() -> None:
            if pending:
                pending.clear()
                self._started_one()

        try:
            self._start_utility(order, begun)
        finally:
            begun()

    def _start_utility(self, order: RunOrder, begun: Callable[[], None]) -> None:
        # Checked again as the run really starts: with many orders at one instant, the pool
        # may take it some time after it was accepted, and a successor may be known by then.
        with self._seen_lock:
            seen = self._epoch
            again = self._resent.pop(order.run_id, None)
            superseded = self._superseded(order, "order")
        if superseded:
            self._running.pop(order.run_id, None)
            if again is not None:  # the successor's order came meanwhile: it is taken now
                self._on_order(again, self.clock.now())
            return
        utility = Utility(
            callable=order.callable,
            command=tuple(order.command) if order.command else None,
        )
        task = self._pool.current()

        def started(at: float) -> None:
            self._write_journal("start", order, at, seen_epoch=seen)
            self._report(RunEvent(
                run_id=order.run_id, service=order.service, node=self.node_id,
                state="started", at=at, epoch=order.epoch, started_at=at,
            ), foldable=True)
            begun()

        def ended(out: RunOutcome) -> None:
            # On this thread, or on another when the utility was abandoned after its timeout.
            try:
                self._write_journal("end", order, out.finished_at, out.outcome)
                metrics.RUNS.labels(self.node_id, out.outcome).inc()
                self._report_event(
                    run_id=order.run_id, service=order.service, node=self.node_id,
                    state=out.outcome, at=out.finished_at, epoch=order.epoch,
                    started_at=out.started_at, finished_at=out.finished_at,
                    exit_status=out.exit_status, error=out.error, output_tail=out.output_tail,
                    metrics=out.metrics, fold=True,
                )
            finally:
                self._running.pop(order.run_id, None)
                with self._seen_lock:
                    self._resent.pop(order.run_id, None)
                if task is not None:  # an abandoned utility no longer holds up `stop`
                    task.detach()

        try:
            self.executor.start(
                utility, run_id=order.run_id, service=order.service, node=self.node_id,
                timeout=order.timeout, params=dict(order.params), on_start=started,
                on_end=ended,
            )
        except Exception:
            log.exception("run %s of %s crashed the executor", order.run_id, order.service)
            self._running.pop(order.run_id, None)

    def _write_journal(
        self, what: str, order: RunOrder, at: float, outcome: str | None = None,
        seen_epoch: int | None = None,
    ) -> None:
        """One JSON line per run start and end: this node's own account of what it ran. A
        start names the newest epoch seen when the node decided to start it."""
        if self._journal is None:
            return
        self._journal.write({
            "event": what, "run_id": order.run_id, "service": order.service,
            "node": self.node_id, "slot": order.slot, "epoch": order.epoch,
            "seen_epoch": self._epoch if seen_epoch is None else seen_epoch,
            "at": at, "outcome": outcome,
            "run_groups": order.run_groups, "start_at": order.start_at,
        })

    def _on_control(self, c: DaemonControl) -> None:
        with self._control_lock:
            last = self._last_control.get(c.service)
            if last is not None and (c.epoch, c.issued_at, c.seq) <= last:
                log.info("ignored daemon control %s %s: issued before the last one applied "
                         "(or delivered twice)", c.action, c.service)
                return
            if self._apply_control(c):
                self._last_control[c.service] = (c.epoch, c.issued_at, c.seq)

    def _apply_control(self, c: DaemonControl) -> bool:
        if (
            c.node != self.node_id
            or c.epoch < self._epoch
            or (c.allowed_roles and self.roles.isdisjoint(c.allowed_roles))
            or (c.incarnation is not None and c.incarnation != self.incarnation)
            or (c.action in ("start", "resume") and c.run_groups
                and not self.coordination.session_ok())
        ):
            log.warning("refused daemon control %s %s: epoch %d (newest %d), node %s, roles %s, "
                        "session %s (now %s)", c.action, c.service, c.epoch, self._epoch, c.node,
                        c.allowed_roles, c.incarnation, self.incarnation)
            return False
        self._raise_epoch(c.epoch)
        self._daemon_epoch = c.epoch
        utility = Utility(callable=c.callable, command=tuple(c.command) if c.command else None)
        self._daemon_groups[c.service] = list(c.run_groups)
        if c.action == "start":
            if self.daemons.status().get(c.service) in ("running", "backoff"):
                # Already running: tell the (new) leader since when.
                self._report(RunEvent(
                    run_id=f"daemon:{c.service}@{self.node_id}", service=c.service,
                    node=self.node_id, state="started",
                    at=self._daemon_since.get(c.service, self.clock.now()), epoch=c.epoch,
                ))
            elif self.daemons.status().get(c.service) == "paused":
                self.daemons.resume(c.service)
            else:
                self.daemons.start(c.service, utility, dict(c.params))
        elif c.action == "stop":
            self.daemons.stop(c.service)
        elif c.action == "pause":
            self.daemons.pause(c.service)
        elif c.action == "resume":
            self.daemons.resume(c.service)
        return True

    def _daemon_report(self, ev: DaemonEvent) -> None:
        since: float | None = None
        if ev.state in ("started", "resumed"):
            self._daemon_since[ev.service] = ev.at
        else:
            since = self._daemon_since.pop(ev.service, None)
        if self._journal is not None:
            self._journal.write({
                "event": "daemon-" + ev.state, "run_id": f"daemon:{ev.service}@{self.node_id}",
                "service": ev.service, "node": self.node_id, "at": ev.at,
                "run_groups": self._daemon_groups.get(ev.service, []),
            })
        self._report_event(
            run_id=f"daemon:{ev.service}@{self.node_id}", service=ev.service, node=self.node_id,
            state=ev.state, at=ev.at, epoch=self._daemon_epoch, error=ev.error,
            output_tail=ev.output_tail or "", started_at=since,
        )

    def _report_event(self, *, fold: bool = False, **fields: Any) -> None:
        """Report a run event built from `fields`; one carrying a value that cannot be sent
        (a NaN or infinite metric, text that is not UTF-8, too much of it) is reported
        instead without that value, `failed` if it said `succeeded`, with an error naming
        the value: a run must end, whatever its utility reported. `fold`: a run's final
        report, which replaces its `started` report if that is still queued."""
        try:
            self._report(RunEvent(**fields), fold=fold)
            return
        except ProtocolError as exc:
            problem = f"the utility reported a value that cannot be sent: {exc}"
        metrics.BAD_REPORTS.labels(self.node_id).inc()
        log.warning("run %s of %s: %s", fields.get("run_id"), fields.get("service"), problem)
        if fields.get("state") == "succeeded":
            fields["state"] = "failed"
        earlier = fields.get("error")
        fields["error"] = _clip(problem + (f"; {earlier}" if earlier else ""), MAX_ERROR_CHARS)
        fields["metrics"] = {
            str(k): v for k, v in (fields.get("metrics") or {}).items()
            if isinstance(v, float) and math.isfinite(v)
        }
        tail = str(fields.get("output_tail") or "")
        fields["output_tail"] = tail.encode("utf-8", "replace").decode("utf-8")[
            -MAX_OUTPUT_TAIL_CHARS:]
        try:
            self._report(RunEvent(**fields), fold=fold)
        except ProtocolError:  # still not sendable: the run's end, its error, nothing else
            keep = ("run_id", "service", "node", "state", "at", "epoch", "started_at",
                    "finished_at")
            self._report(RunEvent(**{k: fields[k] for k in keep if k in fields},
                                  error=_clip(problem, MAX_ERROR_CHARS)), fold=fold)

    def _report(self, ev: RunEvent, *, foldable: bool = False, fold: bool = False) -> None:
        """Queue a run event for the reporter thread (which keeps them in order); waits for
        room while the outbox is full. `foldable`: a run's `started` report, which its final
        report (`fold`) replaces while both are unsent."""
        data = encode(ev)
        if fold and self._outbox.fold(ev.run_id, data):
            return
        report = _Report(data, ev.run_id if foldable else None)
        try:
            self._outbox.put_nowait(report)
        except queue.Full:
            metrics.OUTBOX_FULL.labels(self.node_id).inc()
            log.warning("outbox full (%d run events not yet published): waiting for RabbitMQ",
                        self._outbox.maxsize)
            self._outbox.put(report)
        metrics.OUTBOX.labels(self.node_id).set(self._outbox.qsize())

    def _reporter(self) -> None:
        """Publishes queued run events to rota.results in batches, each stored all or none;
        while RabbitMQ is unreachable it keeps them and retries with backoff, so none is
        lost."""
        closing = False
        backoff = Backoff()
        while not closing:
            if self._outbox.wait_head() and REPORT_LINGER > 0:
                time.sleep(REPORT_LINGER)
            with self._starts:
                self._starts.wait_for(lambda: not self._starting, STARTS_FIRST)
            item = self._outbox.get()
            items: list[bytes] = []
            while True:
                if item is None:
                    closing = True
                    break
                items.append(item.data)
                if len(items) >= REPORT_BATCH:
                    break
                try:
                    item = self._outbox.get_nowait()
                except queue.Empty:
                    break
            if not items:
                continue
            # A RunEvents batch per message (protocol/batches.py), encoded once, however
            # often it is retried.
            batch = self.transport.prepare([(RESULTS, body) for body in packs(RUN_EVENTS, items)])
            while True:
                try:
                    self.transport.publish(batch)
                    backoff.reset()
                    break
                except Exception as exc:  # broker down: keep the events, retry with backoff
                    wait = backoff.next()
                    log.warning("cannot report %d event(s) (%s); retrying in %.1fs",
                                len(items), exc, wait)
                    time.sleep(wait)
            metrics.OUTBOX.labels(self.node_id).set(self._outbox.qsize())


class _Report:
    """One queued run event; `run_id` is set while it is a `started` report that the run's
    final report may still replace."""

    __slots__ = ("data", "run_id")

    def __init__(self, data: bytes, run_id: str | None = None) -> None:
        self.data = data
        self.run_id = run_id


class _Outbox(queue.Queue["_Report | None"]):
    """The reporter's bounded queue, which knows the `started` reports it still holds."""

    def _init(self, maxsize: int) -> None:
        super()._init(maxsize)
        self._started: dict[str, _Report] = {}

    def _put(self, item: _Report | None) -> None:
        super()._put(item)
        if item is not None and item.run_id is not None:
            self._started[item.run_id] = item

    def _get(self) -> _Report | None:
        item: _Report | None = super()._get()
        if item is not None and item.run_id is not None:
            self._started.pop(item.run_id, None)
        return item

    def fold(self, run_id: str, data: bytes) -> bool:
        """Put `data` (the final report of `run_id`) in place of its `started` report, if
        that is still queued; False when it was already taken."""
        with self.mutex:
            report = self._started.pop(run_id, None)
            if report is None:
                return False
            report.data, report.run_id = data, None
            return True

    def wait_head(self) -> bool:
        """Wait until something is queued; whether the first item is a `started` report
        that may still be folded."""
        with self.not_empty:
            while not self._qsize():
                self.not_empty.wait()
            head = self.queue[0]
            return head is not None and head.run_id is not None


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."
