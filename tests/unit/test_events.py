"""The RabbitMQ event bus keeps a bounded number of events while RabbitMQ is away."""

from __future__ import annotations

import socket
import threading
import time

from coordinator.adapters.events import RabbitEventBus


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port  # nothing listens there once the socket is closed


def test_publish_waits_at_the_bound_instead_of_dropping_an_event() -> None:
    bus = RabbitEventBus(f"amqp://guest:guest@127.0.0.1:{_closed_port()}/%2F", max_pending=3)
    try:
        for i in range(3):
            bus.publish("run.succeeded", b"%d" % i)
        fourth = threading.Thread(target=bus.publish, args=("run.failed", b"3"), daemon=True)
        fourth.start()
        fourth.join(1.0)
        assert fourth.is_alive(), "the event beyond the bound was not kept waiting"
        assert bus.waits_full == 1
    finally:
        began = time.monotonic()
        bus.close()
    fourth.join(5)
    assert not fourth.is_alive(), "closing the bus left a publisher waiting"
    assert time.monotonic() - began < 15


def test_a_batch_waits_for_room_as_a_whole_and_one_over_the_bound_goes_alone() -> None:
    bus = RabbitEventBus(f"amqp://guest:guest@127.0.0.1:{_closed_port()}/%2F", max_pending=3)
    try:
        bus.publish_batch([("run.queued", b"0"), ("run.queued", b"1")])
        second = threading.Thread(target=bus.publish_batch,
                                  args=([("run.failed", b"2"), ("run.failed", b"3")],),
                                  daemon=True)
        second.start()
        second.join(1.0)
        assert second.is_alive(), "a batch that does not fit was not kept waiting"
        assert bus.waits_full == 1
        assert bus._count == 2, "part of a batch was taken while it waited for room"
    finally:
        bus.close()
    second.join(5)
    assert not second.is_alive()
    alone = RabbitEventBus(f"amqp://guest:guest@127.0.0.1:{_closed_port()}/%2F", max_pending=3)
    try:
        alone.publish_batch([("run.queued", b"%d" % i) for i in range(5)])  # nothing pending
        assert alone.waits_full == 0 and alone._count == 5
    finally:
        alone.close()


def test_the_outbox_hands_a_turns_records_to_the_bus_as_one_batch() -> None:
    from coordinator.adapters.events import Done, Event
    from coordinator.core.actions import Changes, Record
    from coordinator.core.run import Run, Trigger
    from coordinator.outbox import Outbox, Turn
    from protocol.catalogue import Catalogue
    from protocol.run_records import records_of
    from protocol.transport import Delivery, make_transport

    class Bus:
        def __init__(self) -> None:
            self.batches: list[list[Event]] = []

        def publish(self, routing_key: str, payload: bytes) -> None:
            self.batches.append([(routing_key, payload)])

        def publish_batch(self, events: list[Event], then: Done | None = None) -> None:
            self.batches.append(list(events))
            self.then = then

        def close(self) -> None:
            pass

    bus = Bus()
    outbox = Outbox(make_transport(None), bus, [], threading.Event())
    acked: list[int] = []
    turn = Turn(actions=[Record(Run(run_id=f"r{i}", service="S", trigger=Trigger.SCHEDULED,
                                    slot=0.0, queued_at=0.0, run_groups=frozenset()))
                         for i in range(50)],
                acks=[Delivery(b"", None, lambda i=i: acked.append(i)) for i in range(3)])
    catalogue = Catalogue(timezone="UTC", roles=("Master",), services={})
    outbox.finish(None, None, Changes(), turn, catalogue, {}, 0.0)  # type: ignore[arg-type]
    # One confirm round, and one message for the 50 records of one state.
    assert len(bus.batches) == 1 and len(bus.batches[0]) == 1
    key, body = bus.batches[0][0]
    assert key == "run.queued"
    assert [r.run_id for r in records_of(body)] == [f"r{i}" for i in range(50)]
    # The reports behind these records are acknowledged once the bus has stored them.
    assert acked == []
    assert bus.then is not None
    bus.then()
    assert acked == [0, 1, 2]
