"""Guarantee 6 on a real cluster: bad input is refused with a clear reason, nothing is lost.

A barrage of malformed and semantically wrong messages is published with pika straight to
every queue it could reach: each live worker's `rota.node.<id>`, `rota.results` and
`rota.requests`. Every message must end up somewhere visible, exactly once:
- bytes that are not a dramatiq envelope, and on a node queue an envelope for an actor the
  worker does not have, in `<queue>.XQ` byte for byte (dramatiq refuses them before Rota
  sees them);
- an envelope whose payload is not an acceptable message in `rota.deadletter`, as a
  `DeadLetter` naming the problem (`reason`, `detail`) and the queue it came from;
- a well-formed request the leader will not carry out (a manual run of a daemon or of an
  unknown service, a schedule edit with a bad period, align or cron), and an order a worker
  refuses, as a `rejected` RunRecord on `rota.events` with a reason saying why.
Meanwhile the scheduled slots keep running (audited over the whole window), every process
stays alive, and the logs mention each refusal once.
"""

from __future__ import annotations

import json
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgpack
import pika

from coordinator.audit import audit
from protocol import (
    MAX_DEAD_LETTER_BYTES,
    MAX_MESSAGE_BYTES,
    DaemonControl,
    DeadLetter,
    ManualRunRequest,
    Message,
    RunEvent,
    RunOrder,
    ServiceUpdate,
    decode_as,
    encode,
    transport,
)
from protocol.catalogue import load_catalogue
from tests.harness import SECONDS_CATALOGUE, THREE_NODES, Cluster, EventRecorder

CATALOGUE = SECONDS_CATALOGUE
NODES = THREE_NODES
RESULTS, REQUESTS, DEAD = transport.RESULTS, transport.REQUESTS, transport.DEAD
DECODE_FAILURE = "Failed to decode message using encoder"
UNDEFINED_ACTOR = "Received message for undefined actor"


# -- the cluster ------------------------------------------------------------------------------


def _start(c: Cluster, rec: EventRecorder, nodes: dict[str, str]) -> int:
    """Workers and one coordinator; returns the leader's epoch once slots are running."""
    for node, roles in nodes.items():
        c.worker(node, roles)
    # The coordinator starts once every worker has announced itself, so the test does not
    # depend on how a leader still building its state takes a node that joins meanwhile.
    deadline = time.monotonic() + 30
    while not all(f"consuming {transport.node_queue(n)}" in c.procs[n].tail() for n in nodes):
        assert time.monotonic() < deadline, f"workers did not start\n{c.logs()}"
        time.sleep(0.1)
    c.coordinator("coord")
    deadline = time.monotonic() + 30
    while c.leader() != "coord":
        assert time.monotonic() < deadline, f"no leader after 30s\n{c.logs()}"
        time.sleep(0.2)
    for node in nodes:  # every worker has run something: its queue is being consumed
        got = rec.wait_for(lambda r, n=node: r.node == n and r.state == "succeeded", 30)
        assert got is not None, f"{node} ran nothing\n{c.logs()}"
    return max(r.epoch for r in rec.snapshot())


def _alive(c: Cluster) -> None:
    dead = [p.name for p in c.procs.values() if not p.alive()]
    assert not dead, f"processes died: {dead}\n{c.logs()}"


def _node_roles(nodes: dict[str, str]) -> dict[str, list[str]]:
    return {n: r.split(",") for n, r in nodes.items()}


# -- building and publishing messages ------------------------------------------------------


def _marker() -> str:
    return uuid.uuid4().hex[:12]


def _wire(msg: Message) -> dict[str, Any]:
    """A valid message as its wire map, to be broken on purpose."""
    out: dict[str, Any] = msgpack.unpackb(encode(msg), raw=False)
    return out


def _pack(obj: object) -> bytes:
    data: bytes = msgpack.packb(obj, use_bin_type=True)
    return data


def envelope(queue: str, args: list[Any], *, kwargs: dict[str, Any] | None = None,
             actor: str | None = None) -> bytes:
    """A dramatiq envelope (msgpack, as Rota's encoder writes it) carrying `args`."""
    return _pack({
        "queue_name": queue,
        "actor_name": actor or transport.actor_name_for(queue),
        "args": args,
        "kwargs": kwargs or {},
        "options": {},
        "message_id": str(uuid.uuid4()),
        "message_timestamp": int(time.time() * 1000),
    })


class Amqp:
    """A pika channel with publisher confirms: a publish to a missing queue raises."""

    def __init__(self, url: str) -> None:
        self.conn = pika.BlockingConnection(pika.URLParameters(url))
        self.ch = self.conn.channel()
        self.ch.confirm_delivery()

    def publish(self, queue: str, body: bytes) -> None:
        self.ch.basic_publish("", queue, body, mandatory=True)

    def exists(self, queue: str) -> bool:
        """Whether `queue` is declared (Rota declares rota.deadletter on its first use)."""
        probe = self.conn.channel()
        try:
            probe.queue_declare(queue, passive=True)
        except pika.exceptions.ChannelClosedByBroker:
            return False
        probe.close()
        return True

    def drain(self, queue: str) -> list[bytes]:
        out: list[bytes] = []
        if not self.exists(queue):
            return out
        while True:
            method, _props, body = self.ch.basic_get(queue, auto_ack=True)
            if method is None:
                return out
            out.append(body)

    def ready(self, queue: str) -> int:
        count: int = self.ch.queue_declare(queue, passive=True).method.message_count
        return count

    def close(self) -> None:
        self.conn.close()


def dead_letters(amqp: Amqp) -> list[DeadLetter]:
    """Everything on rota.deadletter, each unwrapped from its dramatiq envelope."""
    out = []
    for body in amqp.drain(DEAD):
        env = msgpack.unpackb(body, raw=False)
        out.append(decode_as(env["args"][0], DeadLetter))
    return out


def collect_dead_letters(amqp: Amqp, expected: int, timeout: float) -> list[DeadLetter]:
    """Dead letters until `expected` have come (or `timeout`), then a second more of them."""
    out: list[DeadLetter] = []
    deadline = time.monotonic() + timeout
    while len(out) < expected and time.monotonic() < deadline:
        out += dead_letters(amqp)
        time.sleep(0.2)
    time.sleep(1.0)
    return out + dead_letters(amqp)


# -- expectations --------------------------------------------------------------------------


@dataclass(frozen=True)
class ToXQ:
    """Refused by dramatiq before Rota sees it: set aside in `<queue>.XQ` untouched, and
    logged by the consuming process with `log` in the line."""

    log: str = DECODE_FAILURE


@dataclass(frozen=True)
class Dead:
    """Dead-lettered with this reason; `detail` contains every one of `says`."""

    reason: str
    says: tuple[str, ...]
    original: bytes | None  # the payload the dead letter must carry; None: not checked


@dataclass(frozen=True)
class Rejected:
    """A `rejected` RunRecord with this run id whose reason contains every one of `says`."""

    run_id: str
    says: tuple[str, ...]
    log: tuple[tuple[str, str], ...]  # (process, exact log text) mentioned exactly once


@dataclass(frozen=True)
class EditRefusal:
    """A refused `ServiceChange` (routing key service.changed) for this request, naming
    `field`, whose reason contains every one of `says`; never a rejected run record."""

    request_id: str
    field: str
    says: tuple[str, ...]
    log: tuple[tuple[str, str], ...]  # (process, exact log text) mentioned exactly once


@dataclass(frozen=True)
class Probe:
    case: str
    queue: str
    body: bytes
    expect: ToXQ | Dead | Rejected | EditRefusal


class Corpus:
    """The barrage: every case, on every queue it could reach, with what must come of it."""

    def __init__(self, nodes: list[str], epoch: int) -> None:
        self.nodes = nodes
        self.node_queues = [transport.node_queue(n) for n in nodes]
        self.epoch = epoch
        self.now = time.time()
        self.probes: list[Probe] = []

    @property
    def queues(self) -> list[str]:
        return [*self.node_queues, RESULTS, REQUESTS]

    def add(self, case: str, queue: str, body: bytes,
            expect: ToXQ | Dead | Rejected | EditRefusal) -> None:
        self.probes.append(Probe(case, queue, body, expect))

    def payload(self, case: str, queue: str, payload: bytes, reason: str, *says: str,
                actor: str | None = None) -> None:
        """An envelope carrying `payload`, to be dead-lettered for `reason`."""
        self.add(case, queue, envelope(queue, [payload], actor=actor),
                 Dead(reason, says, payload[:MAX_DEAD_LETTER_BYTES]))

    # -- what each queue takes, valid -------------------------------------------------------
    def order(self, node: str, *, service: str = "Tick", run_id: str | None = None) -> RunOrder:
        return RunOrder(
            run_id=run_id or f"bad-input-{_marker()}", service=service, node=node,
            trigger="manual", slot=None, epoch=self.epoch, issued_at=self.now,
            deadline=self.now + 120, timeout=5, callable="workers.demo:noop",
            allowed_roles=["Master", "Processing"],
        )

    def event(self) -> RunEvent:
        return RunEvent(run_id=f"bad-input-{_marker()}", service="Tick", node=self.nodes[0],
                        state="succeeded", at=self.now, epoch=self.epoch)

    def manual(self, service: str) -> ManualRunRequest:
        return ManualRunRequest(request_id=_marker(), service=service,
                                requested_by="bad-input-test", requested_at=self.now)

    def natural(self, queue: str) -> Message:
        """A valid message of the type `queue` takes."""
        if queue == RESULTS:
            return self.event()
        if queue == REQUESTS:
            return self.manual("Tick")
        return self.order(self.nodes[self.node_queues.index(queue)])

    def wrong_queue(self, queue: str, msg: Message) -> None:
        """A valid message published where it does not belong."""
        name = type(msg).__name__
        takes = {RESULTS: "takes RunEvent", REQUESTS: "takes ManualRunRequest or ServiceUpdate"}
        self.payload(f"{name} on the wrong queue", queue, encode(msg), "unknown_type",
                     f"{queue} {takes.get(queue, 'takes RunOrder or DaemonControl')}",
                     f"got {name}")

    # -- the cases ------------------------------------------------------------------------
    def build(self) -> Corpus:
        for q in self.queues:
            m = _marker()
            # Not dramatiq envelopes at all.
            self.add("raw garbage bytes", q, b"\xc1\xff\x00garbage " + m.encode(), ToXQ())
            self.add("bare protocol message, no envelope", q, encode(self.manual(m)), ToXQ())
            self.add("JSON envelope (dramatiq's default encoder)", q, json.dumps({
                "queue_name": q, "actor_name": transport.actor_name_for(q), "args": [m],
                "kwargs": {}, "options": {}, "message_id": m, "message_timestamp": 0,
            }).encode(), ToXQ())
            self.add("envelope without args", q, _pack({
                "queue_name": q, "actor_name": transport.actor_name_for(q), "kwargs": {},
                "options": {}, "message_id": m}), ToXQ())

            # Envelopes whose payload is not a valid message.
            self.payload("garbage payload", q, b"\xc1 not msgpack " + m.encode(), "garbage",
                         "not valid msgpack")
            self.payload("payload not a map", q, _pack(["a", "list", m]), "garbage",
                         "expected a map at the top, got list")
            self.payload("msgpack extension type", q, _pack(msgpack.ExtType(7, m.encode())),
                         "garbage", "extension type 7")

            base = self.natural(q)
            kind = type(base).__name__
            broken = _wire(base)
            broken["v"] = 99
            self.payload("unknown version v=99", q, _pack(broken), "unknown_version",
                         "unsupported schema version 99")
            broken = _wire(base)
            del broken["v"]
            self.payload("no version", q, _pack(broken), "missing_field", "message.v: missing")
            broken = _wire(base)
            broken["t"] = "LaunchMissiles"
            self.payload("unknown message type", q, _pack(broken), "unknown_type",
                         "unknown message type 'LaunchMissiles'")

            broken = _wire(base)
            field, value = {RESULTS: ("at", "yesterday"), REQUESTS: ("service", 42)}.get(
                q, ("epoch", "seven"))
            broken[field] = value
            self.payload("wrong field type", q, _pack(broken), "wrong_type",
                         f"{kind}.{field}: expected")
            broken = _wire(base)
            field = {RESULTS: "state", REQUESTS: "service"}.get(q, "deadline")
            del broken[field]
            self.payload("missing field", q, _pack(broken), "missing_field",
                         f"{kind}.{field}: missing")
            broken = _wire(base)
            broken["sneaky"] = m
            self.payload("unknown field", q, _pack(broken), "unknown_field",
                         f"{kind}.sneaky: unknown field")
            broken = _wire(base)
            field, value = {RESULTS: ("state", "exploded"), REQUESTS: ("requested_at", -5.0)}.get(
                q, ("trigger", "whenever"))
            broken[field] = value
            self.payload("bad field value", q, _pack(broken), "bad_value", f"{kind}.{field}:")

            big = m.encode() + b"x" * (MAX_MESSAGE_BYTES + 1024)
            self.payload("oversized (> 1 MiB)", q, big, "oversized",
                         f"limit is {MAX_MESSAGE_BYTES}")
            self.add("envelope with a str argument", q, envelope(q, [f"text {m}"]),
                     Dead("garbage", ("exactly one bytes argument",), None))

            if q in (RESULTS, REQUESTS):  # the leader reads the payload whatever the actor
                self.payload("envelope for another actor", q, b"\xc1 actor " + m.encode(),
                             "garbage", "not valid msgpack", actor="rota_somebody_else")
            else:
                self.add("envelope for another actor", q, envelope(
                    q, [encode(base)], actor="rota_somebody_else"), ToXQ(UNDEFINED_ACTOR))

            # Valid messages on a queue that does not take them.
            if q != RESULTS:
                self.wrong_queue(q, self.event())
            if q not in (RESULTS, REQUESTS):
                self.wrong_queue(q, self.manual("Tick"))
                self.wrong_queue(q, ServiceUpdate(request_id=m, service="Tick",
                                                  requested_by="bad-input-test", period=5))
            else:
                self.wrong_queue(q, self.order(self.nodes[0], service="No Such Service"))
                self.wrong_queue(q, DaemonControl(
                    control_id=m, service="Calculator", node=self.nodes[0], action="start",
                    epoch=self.epoch, issued_at=self.now, callable="workers.demo:ticker"))
                self.add("envelope with two arguments", q, envelope(q, [encode(base), b"x"]),
                         Dead("garbage", ("exactly one bytes argument",), None))
                self.add("envelope with keyword arguments", q,
                         envelope(q, [encode(base)], kwargs={"extra": 1}),
                         Dead("garbage", ("exactly one bytes argument",), None))

        # An order addressed to another node: the worker refuses it, the leader shows it.
        for here, there in zip(self.nodes, self.nodes[1:] + self.nodes[:1], strict=True):
            order = self.order(there)
            why = f"order for node {there!r} arrived at {here!r}"
            self.add("RunOrder for another node", transport.node_queue(here), envelope(
                transport.node_queue(here), [encode(order)]), Rejected(order.run_id, (why,), (
                    (here, f"refused {order.run_id} ({order.service}): {why}"),
                    ("coord", f"node {here} refused order {order.run_id}: {why}"),
                )))

        # Requests the leader understands and refuses.
        def refused(case: str, msg: ManualRunRequest, *says: str) -> None:
            reason = says[0]
            self.add(case, REQUESTS, envelope(REQUESTS, [encode(msg)]), Rejected(
                f"manual-{msg.request_id}", says, (
                    ("coord", f"refused request {msg.request_id} for {msg.service!r}: "
                              f"{reason}"),)))

        def edit_refused(case: str, msg: ServiceUpdate, field: str, *says: str) -> None:
            self.add(case, REQUESTS, envelope(REQUESTS, [encode(msg)]), EditRefusal(
                msg.request_id, field, says, (
                    ("coord", f"refused request {msg.request_id} for {msg.service!r}: "
                              f"{says[0]}"),)))

        refused("manual run of a daemon", self.manual("Calculator"),
                "'Calculator' is a daemon: daemons cannot be run manually")
        refused("manual run of an unknown service", self.manual("No Such Service"),
                "unknown service 'No Such Service'")
        for case, changes, field, why in (
            ("period 0", {"period": 0}, "period", "period 0 is below 1 minute"),
            ("period 61", {"period": 61}, "period",
             "period 61 is over 60 minutes: use fixed time instead"),
            ("align = period", {"period": 5, "align": 5}, "align",
             "align 5 must be between 0 and period-1 (4)"),
            ("align > period", {"period": 5, "align": 9}, "align",
             "align 9 must be between 0 and period-1 (4)"),
            ("bad cron", {"cron": "61 * * * *"}, "cron", "bad cron expression '61 * * * *'"),
            ("align without period", {"align": 2}, "align", "align needs a period"),
            ("period and cron", {"period": 5, "cron": "* * * * *"}, "cron",
             "give one of period, run_at or cron"),
        ):
            update = ServiceUpdate(request_id=_marker(), service="Tick",
                                   requested_by="bad-input-test", **changes)
            edit_refused(f"ServiceUpdate {case}", update, field, why)
        update = ServiceUpdate(request_id=_marker(), service="Calculator",
                               requested_by="bad-input-test", period=5)
        edit_refused("ServiceUpdate schedule of a daemon", update, "period",
                     "'Calculator' is a daemon: it has no schedule to edit")
        update = ServiceUpdate(request_id=_marker(), service="No Such Service",
                               requested_by="bad-input-test", enabled=False)
        edit_refused("ServiceUpdate of an unknown service", update, "service",
                     "unknown service 'No Such Service'")
        return self


def _process_of(queue: str, nodes: list[str]) -> str:
    for n in nodes:
        if queue == transport.node_queue(n):
            return n
    return "coord"


def _wait(pred: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.2)
    return pred()


# -- the barrage ---------------------------------------------------------------------------


def test_malformed_messages_are_refused_visibly_and_nothing_stops(cluster, amqp_url: str) -> None:  # type: ignore[no-untyped-def]
    c, rec = cluster
    nodes = list(NODES)
    epoch = _start(c, rec, NODES)
    t0 = time.time()
    time.sleep(3)

    corpus = Corpus(nodes, epoch).build()
    probes = corpus.probes
    amqp = Amqp(amqp_url)
    try:
        for p in probes:
            amqp.publish(p.queue, p.body)
        barrage_end = time.time()

        # Every rejection shows on rota.events.
        rejected = [p for p in probes if isinstance(p.expect, Rejected)]
        for p in rejected:
            assert isinstance(p.expect, Rejected)
            want = p.expect
            got = rec.wait_for(lambda r, w=want: r.run_id == w.run_id and r.state == "rejected",
                               20)
            assert got is not None, f"{p.case}: no rejected record\n{c.logs()}"
            for text in want.says:
                assert text in (got.reason or ""), f"{p.case}: reason {got.reason!r}"
            assert got.finished_at is not None, p.case
        # Every refused edit shows as an edit refusal naming its field, never as a run.
        edits = [p for p in probes if isinstance(p.expect, EditRefusal)]
        for p in edits:
            assert isinstance(p.expect, EditRefusal)
            want_edit = p.expect
            change = rec.wait_for_change(
                lambda ch, w=want_edit: ch.request_id == w.request_id, 20)
            assert change is not None, f"{p.case}: no service.changed event\n{c.logs()}"
            assert (change.outcome, change.field, change.by) == (
                "refused", want_edit.field, "bad-input-test"), p.case
            for text in want_edit.says:
                assert text in (change.reason or ""), f"{p.case}: reason {change.reason!r}"
        edit_runs = {f"manual-{p.expect.request_id}" for p in edits
                     if isinstance(p.expect, EditRefusal)}
        assert not [r for r in rec.snapshot() if r.run_id in edit_runs]
        refused_ids = {p.expect.run_id for p in rejected if isinstance(p.expect, Rejected)}
        for r in rec.snapshot():
            if r.run_id in refused_ids:
                assert r.state == "rejected", f"{r.run_id} reached {r.state}"

        # Every dead letter, once each; nothing on rota.deadletter that was not sent.
        expected_dead = [p for p in probes if isinstance(p.expect, Dead)]
        letters = collect_dead_letters(amqp, len(expected_dead), 30)
        assert len(letters) == len(expected_dead), (
            f"{len(letters)} dead letters for {len(expected_dead)} refused messages\n"
            + "\n".join(f"{d.source}: {d.detail}" for d in letters))
        unmatched = list(letters)
        for p in expected_dead:
            assert isinstance(p.expect, Dead)
            want = p.expect
            match = next((d for d in unmatched if d.source == p.queue and d.reason == want.reason
                          and all(s in d.detail for s in want.says)
                          and (want.original is None or d.original == want.original)), None)
            assert match is not None, (
                f"{p.case} on {p.queue}: no dead letter with reason {want.reason!r} saying "
                f"{want.says}; from {p.queue}: "
                + "; ".join(f"{d.reason}: {d.detail}" for d in unmatched if d.source == p.queue))
            unmatched.remove(match)
            assert match.at >= corpus.now - 5
        oversized = [d for d in letters if d.reason == "oversized"]
        assert oversized and all(len(d.original) == MAX_DEAD_LETTER_BYTES for d in oversized)

        # Non-envelopes wait in the queue's .XQ byte for byte.
        for q in corpus.queues:
            set_aside = Counter(amqp.drain(q + ".XQ"))
            sent = Counter(p.body for p in probes if p.queue == q and isinstance(p.expect, ToXQ))
            assert set_aside == sent, f"{q}.XQ holds {sum(set_aside.values())} of " \
                f"{sum(sent.values())} non-envelopes"

        # Nothing is left unconsumed on the input queues.
        assert _wait(lambda: all(amqp.ready(q) == 0 for q in corpus.queues), 10), {
            q: amqp.ready(q) for q in corpus.queues}

        # The cluster still works: slots ran throughout, a manual run goes through.
        _alive(c)
        assert c.leader() == "coord"
        ok = ManualRunRequest(request_id=_marker(), service="Tick", requested_by="after",
                              requested_at=time.time())
        amqp.publish(REQUESTS, envelope(REQUESTS, [encode(ok)]))
        done = rec.wait_for(
            lambda r: r.run_id == f"manual-{ok.request_id}" and r.state == "succeeded", 20)
        assert done is not None, c.logs()
    finally:
        amqp.close()

    # Slots after the barrage count too: the audit window ends 10 s after it.
    time.sleep(max(0.0, barrage_end + 15 - time.time()))
    t1 = time.time()
    report = audit(rec.finals(end=t1), load_catalogue(CATALOGUE), _node_roles(NODES),
                   start=t0, settled=t1 - 5)
    assert report.slots_due >= 20, report.line()
    assert not report.violations, "\n".join(report.violations[:20]) + "\n" + c.logs()
    _alive(c)

    # The logs mention each refusal once, in the process that refused it.
    logs = {p.name: p.log.read_text(errors="replace").splitlines() for p in c.procs.values()}
    per_line = Counter((_process_of(d.source, nodes), f"refused message on {d.source}: {d.detail}")
                       for d in letters)
    for (proc, text), n in per_line.items():
        seen = sum(1 for line in logs[proc] if line.endswith(text))
        assert seen == n, f"{proc} log mentions {text!r} {seen} times, expected {n}"
    for p in [*rejected, *edits]:
        assert isinstance(p.expect, Rejected | EditRefusal)
        for proc, text in p.expect.log:
            seen = sum(1 for line in logs[proc] if text in line)
            assert seen == 1, f"{p.case}: {proc} log mentions {text!r} {seen} times"
    for proc in [*nodes, "coord"]:
        for phrase in (DECODE_FAILURE, UNDEFINED_ACTOR):
            sent = sum(1 for p in probes if p.expect == ToXQ(phrase)
                       and _process_of(p.queue, nodes) == proc)
            seen = sum(1 for line in logs[proc] if phrase in line)
            assert seen == sent, f"{proc} logged {phrase!r} {seen} times for {sent} messages"


# -- refusals not handled yet --------------------------------------------------------------


def _one_worker(c: Cluster, rec: EventRecorder) -> int:
    return _start(c, rec, {"w-master": "Master"})


def test_envelope_the_worker_cannot_call_is_dead_lettered(cluster, amqp_url: str) -> None:  # type: ignore[no-untyped-def]
    c, rec = cluster
    epoch = _one_worker(c, rec)
    q = transport.node_queue("w-master")
    order = encode(Corpus(["w-master"], epoch).order("w-master"))
    bodies = {
        "two arguments": envelope(q, [order, b"extra"]),
        "keyword arguments": envelope(q, [order], kwargs={"extra": 1}),
        "no arguments": envelope(q, []),
    }
    amqp = Amqp(amqp_url)
    try:
        for body in bodies.values():
            amqp.publish(q, body)
        time.sleep(3)
        letters = [d for d in dead_letters(amqp) if d.source == q]
        set_aside = amqp.drain(q + ".XQ")
    finally:
        amqp.close()
    _alive(c)
    assert len(letters) + len(set_aside) == len(bodies), (
        f"{len(bodies)} envelopes the worker cannot call; {len(letters)} dead-lettered, "
        f"{len(set_aside)} in {q}.XQ: the rest were acked and dropped\n{c.logs()}")


def test_dead_letter_keeps_a_refused_envelope(cluster, amqp_url: str) -> None:  # type: ignore[no-untyped-def]
    c, rec = cluster
    _one_worker(c, rec)
    marker = _marker()
    queues = [transport.node_queue("w-master"), RESULTS, REQUESTS]
    amqp = Amqp(amqp_url)
    try:
        for q in queues:
            amqp.publish(q, envelope(q, [f"a str, not bytes {marker}"]))
        letters = collect_dead_letters(amqp, len(queues), 10)
    finally:
        amqp.close()
    assert sorted(d.source for d in letters) == sorted(queues), letters
    for d in letters:
        assert marker.encode() in d.original, f"{d.source}: the dead letter lost the message " \
            f"(original={d.original!r})"


def test_order_for_an_unknown_service_is_refused(cluster, amqp_url: str) -> None:  # type: ignore[no-untyped-def]
    c, rec = cluster
    epoch = _one_worker(c, rec)
    q = transport.node_queue("w-master")
    order = Corpus(["w-master"], epoch).order("w-master", service="No Such Service")
    amqp = Amqp(amqp_url)
    try:
        amqp.publish(q, envelope(q, [encode(order)]))
    finally:
        amqp.close()
    got = rec.wait_for(lambda r: r.run_id == order.run_id, 10)
    time.sleep(1)
    _alive(c)
    ran = [j for j in c.journal() if j.get("run_id") == order.run_id]
    assert not ran, f"the worker ran an order for an unknown service: {ran}"
    assert got is not None and got.state == "rejected", f"no rejected record: {got}"
    assert "No Such Service" in (got.reason or "")


def test_a_refused_order_leaves_the_worker_working(cluster, amqp_url: str) -> None:  # type: ignore[no-untyped-def]
    c, rec = cluster
    epoch = _start(c, rec, {"w-master": "Master", "w-proc": "Processing,Calculation"})
    q = transport.node_queue("w-master")
    forged = Corpus(["w-master", "w-proc"], epoch + 1000).order("w-proc")  # wrong node
    amqp = Amqp(amqp_url)
    try:
        amqp.publish(q, envelope(q, [encode(forged)]))
    finally:
        amqp.close()
    refused = rec.wait_for(lambda r: r.run_id == forged.run_id and r.state == "rejected", 10)
    assert refused is not None and "arrived at 'w-master'" in (refused.reason or "")
    after = time.time() + 1
    time.sleep(8)
    _alive(c)
    stale = [r for r in rec.snapshot() if r.node == "w-master" and r.state == "rejected"
             and r.run_id != forged.run_id]
    assert not stale, f"w-master refuses the leader's orders: {stale[0].reason}"
    ran = [r for r in rec.snapshot() if r.node == "w-master" and r.state == "succeeded"
           and r.trigger == "scheduled" and (r.slot or 0) > after]
    assert ran, "w-master ran no scheduled slot after refusing a forged order"



def test_envelopes_with_a_future_eta_do_not_stall_the_worker(cluster, amqp_url: str) -> None:  # type: ignore[no-untyped-def]
    c, rec = cluster
    _one_worker(c, rec)
    q = transport.node_queue("w-master")
    later = int((time.time() + 86400) * 1000)
    amqp = Amqp(amqp_url)
    try:
        for _ in range(20):
            body = msgpack.unpackb(envelope(q, [b"\xc1 " + _marker().encode()]), raw=False)
            body["options"] = {"eta": later}
            amqp.publish(q, _pack(body))
        time.sleep(2)
        after = time.time()
        time.sleep(8)
        letters = [d for d in dead_letters(amqp) if d.source == q]
    finally:
        amqp.close()
    _alive(c)
    ran = [r for r in rec.snapshot() if r.node == "w-master" and r.state == "succeeded"
           and r.trigger == "scheduled" and (r.slot or 0) > after]
    assert ran, f"w-master ran no scheduled slot since the delayed envelopes\n{c.logs()}"
    assert len(letters) == 20, f"{len(letters)} of 20 delayed envelopes dead-lettered"
