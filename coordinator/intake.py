"""What a turn does with each item of the inbox: worker reports, operator requests and node
membership become engine calls; what cannot be taken is dead-lettered with its reason."""

from __future__ import annotations

import logging
from collections.abc import Mapping

from coordinator import forms, metrics
from coordinator.core import edits
from coordinator.core.actions import Action, RefusedError
from coordinator.core.edits import Edit, EditRefused
from coordinator.core.engine import Engine
from coordinator.core.node import Node
from coordinator.inbox import (
    Delivered,
    EditOutcome,
    EditRequest,
    RunOutcome,
    RunRequest,
    Source,
    Submitted,
)
from coordinator.outbox import Outbox, Turn
from protocol import (
    ManualRunRequest,
    NodeAnnouncement,
    ProtocolError,
    RunEvent,
    RunRecord,
    ServiceUpdate,
    decode,
    decode_as,
)
from protocol.batches import RUN_EVENTS, is_batch, unpack
from protocol.schedule import Cron, FixedTimes, Periodic, Schedule, ScheduleError
from protocol.service import Service

log = logging.getLogger("rota.leader")

FINISHED = ("succeeded", "failed", "timed_out", "rejected")


class UnknownRun(ValueError):
    """A report about a run this cluster does not know (forged, or long forgotten)."""


# -- membership ----------------------------------------------------------------------------
def nodes_of(raw: Mapping[str, bytes]) -> dict[str, Node]:
    """The live nodes of a membership view; announcements that do not decode are left out."""
    fresh: dict[str, Node] = {}
    for node_id, data in raw.items():
        try:
            ann = decode_as(data, NodeAnnouncement)
        except ProtocolError as exc:
            log.warning("ignoring node %s: %s", node_id, exc)
            continue
        fresh[node_id] = Node(node_id, frozenset(ann.roles), ann.capacity, ann.version,
                              ann.incarnation, ann.started_at)
    return fresh


def nodes_changed(engine: Engine, raw: Mapping[str, bytes], now: float) -> list[Action]:
    fresh = nodes_of(raw)
    for node_id, old in engine.nodes.items():
        new = fresh.get(node_id)
        if new is None:
            log.info("node %s is gone; its runs are lost", node_id)
        elif new.incarnation != old.incarnation:
            log.info("node %s restarted; what it ran before is lost", node_id)
    metrics.NODES.set(len(fresh))
    return engine.set_nodes(fresh, now)


# -- deliveries ------------------------------------------------------------------------------
def delivered(engine: Engine, item: Delivered, now: float, turn: Turn, outbox: Outbox) -> None:
    """Take one message from a queue; it is acknowledged once the turn is carried out."""
    delivery, source = item.delivery, item.source
    turn.acks.append(delivery)
    if delivery.error is not None or delivery.payload is None:
        outbox.dead_letter(source, delivery.raw, delivery.error or "empty", now,
                           getattr(delivery.error, "reason", "garbage"))
        return
    if source is Source.RESULTS and is_batch(delivery.payload, RUN_EVENTS):
        _reports(engine, delivery.payload, now, turn, outbox)
        return
    try:
        msg = decode(delivery.payload)
        if source is Source.RESULTS:
            if not isinstance(msg, RunEvent):
                raise ProtocolError(
                    "unknown_type", f"{source} takes RunEvent, got {type(msg).__name__}"
                )
            turn.actions += on_event(engine, msg, now, turn)
        else:
            turn.actions += on_request(engine, msg, now, turn)
    except ProtocolError as exc:
        outbox.dead_letter(source, delivery.payload, exc, now, exc.reason)
    except UnknownRun as exc:
        outbox.dead_letter(source, delivery.payload, str(exc), now, "unknown_run")


def _reports(engine: Engine, payload: bytes, now: float, turn: Turn, outbox: Outbox) -> None:
    """A worker's reports sent as one `RunEvents` batch: each taken as if it came alone; one
    that is not valid, or names a run this leader does not know, is dead-lettered with its
    own bytes, and the others are taken."""
    source = Source.RESULTS
    try:
        found = unpack(payload, RUN_EVENTS)
    except ProtocolError as exc:
        outbox.dead_letter(source, payload, exc, now, exc.reason)
        return
    for raw, ev in found:
        if isinstance(ev, ProtocolError):
            outbox.dead_letter(source, raw, ev, now, ev.reason)
            continue
        try:
            turn.actions += on_event(engine, ev, now, turn)
        except UnknownRun as exc:
            outbox.dead_letter(source, raw, str(exc), now, "unknown_run")


def on_event(engine: Engine, ev: RunEvent, now: float, turn: Turn) -> list[Action]:
    if ev.run_id.startswith("daemon:"):
        if ev.state == "exited" and ev.service in engine.services and ev.node in engine.nodes:
            metrics.DAEMON_EXITS.labels(ev.service, ev.node).inc()
        return engine.daemon_event(
            ev.service, ev.node, ev.state, now, epoch=ev.epoch, at=ev.at,
            started_at=ev.started_at, error=ev.error, output_tail=ev.output_tail,
        )
    if ev.state == "rejected" and ev.run_id not in engine.runs:
        # An order this leader never gave (forged, or from a deposed leader): show it.
        log.warning("node %s refused order %s: %s", ev.node, ev.run_id, ev.reason)
        turn.records.append(forms.refused_order_record(ev))
        return []
    if ev.state == "rejected" and ev.epoch < engine.epoch:
        # The order of a deposed leader, refused: this leader adopted the run from the
        # ledger and sends it again in its own epoch, which the node takes.
        log.info("node %s refused the epoch-%d order of %s (now epoch %d): %s", ev.node,
                 ev.epoch, ev.run_id, engine.epoch, ev.reason)
        return []
    if not engine.knows(ev.run_id):
        # Checked before anything is counted: a forged report names any service it likes.
        raise UnknownRun(f"unknown run {ev.run_id!r} (reported {ev.state} by {ev.node})")
    if ev.state == "started":
        return engine.run_started(ev.run_id, ev.node, ev.at, now)
    if ev.state not in FINISHED:
        return []
    # Counted when the run's final record is published (coordinator/metrics.py).
    return engine.run_finished(
        ev.run_id, ev.node, ev.state, now,
        started_at=ev.started_at, finished_at=ev.finished_at, error=ev.error,
        output_tail=ev.output_tail, reason=ev.reason, metrics=ev.metrics,
    )


def on_request(engine: Engine, msg: object, now: float, turn: Turn) -> list[Action]:
    """A request taken from `rota.requests` (the `rota run` / `rota set` messages)."""
    if isinstance(msg, ManualRunRequest):
        req = RunRequest(msg.request_id, msg.service, msg.requested_by)
        return on_run(engine, req, now, turn)[0]
    if isinstance(msg, ServiceUpdate):
        edit = EditRequest(msg.request_id, msg.service, msg.requested_by, Edit(
            enabled=msg.enabled, period=msg.period, align=msg.align, run_at=msg.run_at,
            cron=msg.cron))
        return on_edit(engine, edit, now, turn)[0]
    raise ProtocolError("unknown_type", f"{Source.REQUESTS} takes ManualRunRequest or "
                        f"ServiceUpdate, got {type(msg).__name__}")


def on_submitted(engine: Engine, item: Submitted, now: float, turn: Turn) -> list[Action]:
    """A request handed over in process; its outcome is given once the turn is carried out."""
    req = item.request
    if isinstance(req, RunRequest):
        actions, run_outcome = on_run(engine, req, now, turn)
        turn.replies.append((item.reply, run_outcome))
        return actions
    assert isinstance(req, EditRequest), "schedule requests are the leader's (RankingS)"
    actions, edit_outcome = on_edit(engine, req, now, turn)
    turn.replies.append((item.reply, edit_outcome))
    return actions


def on_run(engine: Engine, req: RunRequest, now: float,
           turn: Turn) -> tuple[list[Action], RunOutcome]:
    try:
        actions = engine.manual_run(req.service, now, req.request_id, req.node)
    except RefusedError as exc:
        turn.records.append(_refused(engine, req.request_id, req.service, str(exc), now))
        return [], RunOutcome(req.request_id, refused=str(exc))
    run_ids = engine.runs_of_request(req.request_id)
    return actions, RunOutcome(req.request_id, run_ids)


def on_edit(engine: Engine, req: EditRequest, now: float,
            turn: Turn) -> tuple[list[Action], EditOutcome]:
    """Check an edit field by field; apply it, or refuse it naming the field. Either way the
    turn publishes a `ServiceChange` per field on `rota.events`."""
    current = engine.services.get(req.service)
    try:
        if current is None:
            raise EditRefused("service", f"unknown service {req.service!r}")
        plan = edits.plan(current, req.edit, engine.tz)
        actions = []
        if plan.changes:
            actions = engine.update_service(req.service, now, enabled=plan.enabled,
                                            schedule=plan.schedule)
    except (EditRefused, RefusedError, ScheduleError) as exc:
        where = exc.field if isinstance(exc, EditRefused) else "service"
        log.warning("refused request %s for %r: %s", req.request_id, req.service, exc)
        given = req.edit.given().get(where)
        change = forms.change_of(req.request_id, now, req.by, req.service, where,
                                 _value_of(current, where), given, engine.epoch,
                                 refused=str(exc))
        turn.changes.append(change)
        return [], EditOutcome(req.request_id, [change])
    applied = [forms.change_of(req.request_id, now, req.by, req.service, c.field, c.old, c.new,
                               engine.epoch) for c in plan.changes]
    for c in applied:
        log.info("%s changed %s of %r: %s -> %s", req.by, c.field, req.service, c.old, c.new)
    turn.changes += applied
    return actions, EditOutcome(req.request_id, applied)


def _value_of(svc: Service | None, name: str) -> object:
    """The current value of the field an edit was refused for, as the change log shows it."""
    if svc is None:
        return None
    if name == "enabled":
        return svc.enabled
    if name == "service":
        return None
    return edits.describe(svc.schedule)


def _refused(engine: Engine, request_id: str, service: str, reason: str,
             now: float) -> RunRecord:
    log.warning("refused request %s for %r: %s", request_id, service, reason)
    return forms.refused_request_record(request_id, service, reason, now, engine.epoch)


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
