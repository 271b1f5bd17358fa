"""Rota's RabbitMQ topology: which exchange feeds each queue, and what each role's permission
regexes let it declare, write and read (RabbitMQ searches names with them, as `re.search`)."""

from __future__ import annotations

import re

import pytest

from protocol import topology
from protocol.transport import DEAD, REQUESTS, RESULTS, node_queue

BUILT_IN = ("amq.default", "amq.direct", "amq.topic", "amq.fanout", "amq.headers", "amq.match")


def may(role: str, what: str, name: str) -> bool:
    configure, write, read = topology.PERMISSIONS[role]
    pattern = {"configure": configure, "write": write, "read": read}[what]
    return re.search(pattern, name) is not None


def test_each_queue_is_fed_by_an_exchange_of_its_own() -> None:
    assert topology.exchange_for(node_queue("calc-1")) == topology.ORDERS_EXCHANGE
    assert topology.exchange_for(node_queue("a.b")) == topology.ORDERS_EXCHANGE
    assert topology.exchange_for(RESULTS) == topology.RESULTS_EXCHANGE
    assert topology.exchange_for(REQUESTS) == topology.REQUESTS_EXCHANGE
    assert topology.exchange_for(DEAD) == topology.DEAD_EXCHANGE
    assert topology.exchange_for("batch-test") == ""
    assert len(set(topology.EXCHANGES)) == len(topology.EXCHANGES) == 5
    assert not set(topology.EXCHANGES) & {RESULTS, REQUESTS, DEAD}  # names apart from queues


@pytest.mark.parametrize("role", topology.ROLES)
def test_no_role_writes_to_a_built_in_exchange(role: str) -> None:
    for exchange in BUILT_IN:
        assert not may(role, "write", exchange), (role, exchange)
        assert not may(role, "configure", exchange), (role, exchange)


def test_only_the_coordinator_writes_orders() -> None:
    assert may("coordinator", "write", topology.ORDERS_EXCHANGE)
    assert not may("worker", "write", topology.ORDERS_EXCHANGE)
    assert not may("operator", "write", topology.ORDERS_EXCHANGE)
    # Binding a node queue needs write on it: only the coordinator may route into one.
    for node in ("w-1", "a.b", "x.XQ.y"):
        assert may("coordinator", "write", node_queue(node))
        assert not may("worker", "write", node_queue(node)), node
        assert not may("operator", "write", node_queue(node)), node


def test_only_workers_write_results_and_operators_requests() -> None:
    assert may("worker", "write", topology.RESULTS_EXCHANGE)
    assert not may("coordinator", "write", topology.RESULTS_EXCHANGE)
    assert not may("operator", "write", topology.RESULTS_EXCHANGE)
    assert may("operator", "write", topology.REQUESTS_EXCHANGE)
    assert not may("worker", "write", topology.REQUESTS_EXCHANGE)
    for role in topology.ROLES:  # binding rota.results anywhere: only its declarer
        assert may(role, "write", RESULTS) == (role == "coordinator"), role


def test_each_role_may_declare_and_read_what_it_uses() -> None:
    for queue in (RESULTS, REQUESTS, DEAD):
        for name in (queue, queue + ".DQ", queue + ".XQ"):
            assert may("coordinator", "configure", name), name
            assert may("coordinator", "read", name), name
    for stream in ("rota.history", "rota.changes"):  # bound to rota.events, read by the API
        for what in ("configure", "write", "read"):
            assert may("coordinator", what, stream), (what, stream)
            assert not may("worker", what, stream), (what, stream)
            assert not may("operator", what, stream), (what, stream)
    for exchange in (*topology.EXCHANGES, "rota.events"):
        assert may("coordinator", "configure", exchange), exchange
        assert not may("worker", "configure", exchange), exchange
        assert not may("operator", "configure", exchange), exchange
    for name in (node_queue("w-1"), node_queue("w-1") + ".DQ", node_queue("w-1") + ".XQ"):
        assert may("worker", "configure", name) and may("worker", "read", name), name
    # A worker binds nothing: no write on any queue, no read on any exchange.
    for name in (node_queue("w-1"), node_queue("w-1") + ".XQ", RESULTS):
        assert not may("worker", "write", name), name
    for exchange in topology.EXCHANGES:
        assert not may("worker", "read", exchange), exchange
    assert may("worker", "write", topology.UNREADABLE_EXCHANGE)  # its queue's dead letters
    assert not may("worker", "read", RESULTS) and not may("operator", "read", RESULTS)
    # An operator publishes requests and nothing else: it follows runs through the HTTP API.
    for name in (REQUESTS, RESULTS, "rota.events", "amq.gen-Xa1", *topology.EXCHANGES):
        assert not may("operator", "configure", name), name
        assert not may("operator", "read", name), name
        assert may("operator", "write", name) == (name == topology.REQUESTS_EXCHANGE), name


def test_declaring_is_for_the_coordinator_or_a_process_with_every_right() -> None:
    assert topology.declares_topology(None)
    assert topology.declares_topology("coordinator")
    assert not topology.declares_topology("worker")
    assert not topology.declares_topology("operator")


def test_queues_are_quorum_queues_that_dead_letter_to_their_xq_after_the_limit() -> None:
    arguments = topology.queue_arguments(node_queue("calc-1"))
    assert arguments["x-queue-type"] == "quorum"
    assert arguments["x-dead-letter-exchange"] == topology.UNREADABLE_EXCHANGE
    assert arguments["x-dead-letter-routing-key"] == "rota.node.calc-1.XQ"
    assert arguments["x-delivery-limit"] == topology.DELIVERY_LIMIT > 0
    # at-least-once dead-lettering is only honoured with reject-publish overflow
    assert (arguments["x-dead-letter-strategy"], arguments["x-overflow"]) \
        == ("at-least-once", "reject-publish")
    assert topology.queue_arguments(RESULTS + ".DQ")["x-dead-letter-routing-key"] \
        == "rota.results.XQ"
    dead = topology.dead_queue_arguments()
    assert dead["x-queue-type"] == "quorum" and "x-delivery-limit" not in dead
    assert topology.dead_queue("rota.results.XQ") == "rota.results.XQ"
