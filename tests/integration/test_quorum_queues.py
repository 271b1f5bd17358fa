"""Rota's queues on RabbitMQ are quorum queues: their arguments, the delivery limit that sends a
poison message to its `.XQ`, and the clear error a classic queue left by an earlier Rota gives."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import pika
import pika.exceptions
import pytest

from ops import localservers
from protocol import topology
from protocol.transport import (
    DEAD,
    REQUESTS,
    RESULTS,
    Delivery,
    QueueMismatch,
    node_queue,
)
from protocol.transport_rabbitmq import RabbitmqTransport
from tests.harness import poll_until

LIMIT = topology.DELIVERY_LIMIT


def _vhost(url: str) -> str:
    return unquote(urlparse(url).path[1:])


def _queues(servers: localservers.Servers, url: str) -> dict[str, tuple[str, dict[str, Any]]]:
    """name -> (type, arguments) of every queue in `url`'s vhost, as rabbitmqctl lists them."""
    out = localservers.rabbitmqctl(servers, "-q", "list_queues", "-p", _vhost(url), "name",
                                   "type", "arguments", "--formatter", "json").stdout
    return {q["name"]: (q["type"], {k: v for k, _type, v in q["arguments"]})
            for q in json.loads(out)}


def _count(url: str, queue: str) -> int:
    conn = pika.BlockingConnection(pika.URLParameters(url))
    try:
        count: int = conn.channel().queue_declare(queue, passive=True).method.message_count
        return count
    finally:
        conn.close()


def test_every_queue_rota_declares_is_a_quorum_queue_with_the_delivery_limit(
    servers: localservers.Servers, amqp_url: str, role_urls: dict[str, str]
) -> None:
    coordinator = RabbitmqTransport(role_urls["coordinator"], role="coordinator")
    worker = RabbitmqTransport(role_urls["worker"], role="worker")
    try:
        worker.declare(node_queue("w-1"))  # a worker may come first
        coordinator.declare(node_queue("w-1"))
        coordinator.declare(node_queue("w-2"))
    finally:
        coordinator.close()
        worker.close()
    found = _queues(servers, amqp_url)
    expected = [RESULTS, REQUESTS, DEAD, node_queue("w-1"), node_queue("w-2")]
    assert set(found) == {q + suffix for q in expected for suffix in ("", ".DQ", ".XQ")}
    for queue in expected:
        for name in (queue, queue + ".DQ"):
            kind, arguments = found[name]
            assert kind == "quorum", name
            assert arguments == {
                "x-queue-type": "quorum",
                "x-dead-letter-exchange": topology.UNREADABLE_EXCHANGE,
                "x-dead-letter-routing-key": queue + ".XQ",
                "x-dead-letter-strategy": "at-least-once",
                "x-overflow": "reject-publish",
                "x-delivery-limit": LIMIT,
            }, name
        kind, arguments = found[queue + ".XQ"]
        assert kind == "quorum"
        assert arguments == {"x-queue-type": "quorum",
                             "x-message-ttl": topology.DEAD_MESSAGE_TTL}


def test_a_message_given_back_more_than_the_limit_goes_to_its_xq_and_not_before(
    amqp_url: str,
) -> None:
    queue = node_queue("poison")
    transport = RabbitmqTransport(amqp_url)  # binds the .XQ, as the coordinator does
    try:
        transport.publish([(queue, b"poison")])
    finally:
        transport.close()
    conn = pika.BlockingConnection(pika.URLParameters(amqp_url))
    try:
        ch = conn.channel()
        for returned in range(LIMIT + 1):
            method, props, _body = ch.basic_get(queue)
            assert method is not None, f"gone after {returned} returns, before the limit"
            assert (props.headers or {}).get("x-delivery-count", 0) == returned
            assert ch.queue_declare(queue + ".XQ", passive=True).method.message_count == 0
            ch.basic_nack(method.delivery_tag, requeue=True)
        poll_until(f"the message in {queue}.XQ after {LIMIT + 1} returns",
                   lambda: ch.queue_declare(queue + ".XQ", passive=True).method.message_count,
                   timeout=10)
        assert ch.queue_declare(queue, passive=True).method.message_count == 0
        method, props, body = ch.basic_get(queue + ".XQ", auto_ack=True)
        assert props.headers["x-death"][0]["reason"] == "delivery_limit"
        assert props.headers["x-death"][0]["queue"] == queue
        import dramatiq

        from protocol.transport_dramatiq import install_encoder, payload_of
        install_encoder()
        assert payload_of(dramatiq.Message.decode(body)) == b"poison"
    finally:
        conn.close()


def test_a_message_that_breaks_its_consumer_each_time_stops_at_the_limit(
    amqp_url: str,
) -> None:
    """Rota's own consumer: a handler that fails loses the connection, and RabbitMQ gets the
    message back unacknowledged each time, as when the process holding it is killed."""
    transport = RabbitmqTransport(amqp_url)
    seen: list[bytes | None] = []
    lock = threading.Lock()

    def crash(delivery: Delivery) -> None:
        with lock:
            seen.append(delivery.payload)
        raise RuntimeError("the consumer dies on this message")

    try:
        transport.publish([(RESULTS, b"poison report")])
        reader = transport.consume(RESULTS, crash, prefetch=10)
        try:
            poll_until("the report in rota.results.XQ",
                       lambda: _count(amqp_url, RESULTS + ".XQ"), timeout=60)
            time.sleep(1.0)  # and no delivery after it was dead-lettered
        finally:
            reader.stop()
    finally:
        transport.close()
    assert seen == [b"poison report"] * (LIMIT + 1)
    assert _count(amqp_url, RESULTS) == 0


def _classic(url: str, queue: str) -> None:
    """`queue` as an earlier Rota declared it: classic, dead-lettering to its .XQ."""
    conn = pika.BlockingConnection(pika.URLParameters(url))
    try:
        conn.channel().queue_declare(queue, durable=True, arguments={
            "x-dead-letter-exchange": topology.UNREADABLE_EXCHANGE,
            "x-dead-letter-routing-key": queue + ".XQ"})
    finally:
        conn.close()


def _delete(url: str, queue: str) -> None:
    conn = pika.BlockingConnection(pika.URLParameters(url))
    try:
        conn.channel().queue_delete(queue)
    finally:
        conn.close()


def test_a_classic_queue_left_by_an_earlier_rota_is_named_with_what_to_do(
    amqp_url: str, role_urls: dict[str, str]
) -> None:
    vhost = _vhost(amqp_url)
    queue = node_queue("old-1")
    _classic(amqp_url, queue)
    worker = RabbitmqTransport(role_urls["worker"], role="worker")
    try:
        with pytest.raises(QueueMismatch) as refused:
            worker.serve(queue, lambda delivery: None)
        text = str(refused.value)
        assert repr(queue) in text and "quorum" in text and "PRECONDITION_FAILED" in text
        assert f"rabbitmqctl delete_queue -p {vhost} {queue}" in text
        # Once an operator deletes it, the same transport declares it anew.
        _delete(amqp_url, queue)
        worker.serve(queue, lambda delivery: None).stop()
    finally:
        worker.close()

    _classic(amqp_url, RESULTS)
    with pytest.raises(QueueMismatch, match=r"'rota\.results'.*delete_queue"):
        RabbitmqTransport(role_urls["coordinator"], role="coordinator")


def test_the_worker_command_stops_with_the_message_on_a_classic_queue(
    amqp_url: str, role_urls: dict[str, str], zk_hosts: str, tmp_path: Path
) -> None:
    _classic(amqp_url, node_queue("old-2"))
    done = subprocess.run(
        [sys.executable, "-m", "rota.cli", "worker", "--node", "old-2", "--roles", "Master",
         "--zk", zk_hosts, "--amqp", role_urls["worker"]],
        capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert done.returncode == 1, done.stderr
    assert "rota worker: RabbitMQ already has queue 'rota.node.old-2'" in done.stderr
    assert "Traceback" not in done.stderr
    with pytest.raises(pika.exceptions.ChannelClosedByBroker):  # left as it was
        _count(amqp_url, node_queue("old-2") + ".XQ")
