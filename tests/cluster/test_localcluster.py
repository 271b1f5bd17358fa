"""The local ensemble and cluster survive the loss of one member, as Rota's fault tests need.

ZooKeeper: one leader and two followers; the leader's loss leaves a quorum that elects another
while a client given every server keeps its session; two losses stop writes until one member
returns. RabbitMQ: three running nodes; a quorum queue keeps a confirmed message when the node
holding its leader is SIGKILLed, consumed through another node; a killed node restarted rejoins.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

import pika
import pika.exceptions
import pytest
from kazoo.client import KazooClient, KazooState
from kazoo.exceptions import KazooException
from kazoo.handlers.threading import KazooTimeoutError

from ops import localcluster
from ops.localcluster import LocalCluster

pytestmark = pytest.mark.cluster

SESSION_TIMEOUT = 2.0
"""Rota's ZooKeeper session timeout."""
T = TypeVar("T")


def _eventually(probe: Callable[[], T | None], timeout: float, what: str) -> T:
    deadline = time.monotonic() + timeout
    last: BaseException | None = None
    while time.monotonic() < deadline:
        try:
            value = probe()
            if value:
                return value
        except Exception as error:  # noqa: BLE001 - retried until the deadline
            last = error
        time.sleep(0.2)
    raise AssertionError(f"{what} not within {timeout:.0f} s (last error: {last!r})")


@contextmanager
def _zk(hosts: str) -> Iterator[KazooClient]:
    client = KazooClient(hosts=hosts, timeout=SESSION_TIMEOUT)
    client.start(timeout=30.0)
    try:
        yield client
    finally:
        client.stop()
        client.close()


# -- ZooKeeper ---------------------------------------------------------------------------------


def test_the_ensemble_has_one_leader_and_two_followers(cluster: LocalCluster) -> None:
    modes = sorted(localcluster.zk_mode(cluster, i) or "none" for i in cluster.members)
    assert modes == ["follower", "follower", "leader"]
    assert localcluster.zk_leader(cluster) in cluster.members
    assert cluster.zk_hosts.count(",") == 2


def test_losing_the_leader_keeps_a_quorum_and_the_clients_session(
    cluster: LocalCluster, zk_hosts: str
) -> None:
    with _zk(zk_hosts) as client:
        session = client.client_id[0]
        client.create("/alive", b"1", ephemeral=True)
        leader = localcluster.zk_leader(cluster)
        assert leader is not None

        localcluster.kill_zk(cluster, leader)

        began = time.monotonic()
        successor = _eventually(
            lambda: next((i for i in localcluster.zk_serving(cluster)
                          if localcluster.zk_mode(cluster, i) == "leader"), None),
            30, "a new leader",
        )
        elected = time.monotonic() - began
        assert successor != leader
        assert sorted(localcluster.zk_serving(cluster)) == sorted(
            i for i in cluster.members if i != leader)
        client.set_async("/alive", b"2").get(timeout=15)
        assert client.client_id[0] == session, "the session was not kept"
        assert client.state == KazooState.CONNECTED
        assert client.get("/alive")[0] == b"2"
        assert client.get("/alive")[1].ephemeralOwner == session

        localcluster.start_zk(cluster, leader)
        assert localcluster.zk_mode(cluster, leader) == "follower"
    print(f"new leader {successor} after {elected:.1f} s")


def test_two_losses_stop_writes_until_one_member_returns(
    cluster: LocalCluster, zk_hosts: str
) -> None:
    with _zk(zk_hosts) as client:
        client.create("/value", b"0")
        survivor, *lost = cluster.members
        for i in lost:
            localcluster.kill_zk(cluster, i)
        _eventually(lambda: localcluster.zk_mode(cluster, survivor) is None, 15,
                    "the survivor to stop serving")
        assert localcluster.zk_leader(cluster) is None
        with pytest.raises((KazooTimeoutError, KazooException)):
            client.set_async("/value", b"lost").get(timeout=3)

        localcluster.start_zk(cluster, lost[0])

        assert sorted(localcluster.zk_serving(cluster)) == [survivor, lost[0]]
        _eventually(lambda: client.set_async("/value", b"1").get(timeout=5), 30,
                    "a write after a member returned")
        assert client.get("/value")[0] == b"1"


# -- RabbitMQ ----------------------------------------------------------------------------------


def test_the_cluster_runs_three_nodes(cluster: LocalCluster, amqp_url: str) -> None:
    assert localcluster.running_nodes(cluster) == [1, 2, 3]
    urls = amqp_url.split(";")
    assert [pika.URLParameters(url).port for url in urls] == [
        cluster.node_amqp_port(i) for i in cluster.members]
    for url in urls:
        connection = pika.BlockingConnection(pika.URLParameters(url))
        connection.close()


def _get(url: str, queue: str) -> bytes | None:
    connection = pika.BlockingConnection(pika.URLParameters(url))
    try:
        _method, _properties, body = connection.channel().basic_get(queue, auto_ack=True)
        return body
    finally:
        if connection.is_open:
            connection.close()


def test_a_quorum_queue_keeps_a_confirmed_message_when_its_leaders_node_dies(
    cluster: LocalCluster, amqp_url: str, vhost: str
) -> None:
    urls = [pika.URLParameters(url) for url in amqp_url.split(";")]
    connection = pika.BlockingConnection(urls)
    try:
        channel = connection.channel()
        channel.confirm_delivery()
        channel.queue_declare("kept", durable=True, arguments={"x-queue-type": "quorum"})
        channel.basic_publish(
            exchange="", routing_key="kept", body=b"confirmed", mandatory=True,
            properties=pika.BasicProperties(delivery_mode=pika.DeliveryMode.Persistent),
        )  # confirmed: raises unless a majority of the queue's members stored it
    finally:
        connection.close()
    leader = localcluster.queue_leaders(cluster, vhost)["kept"]

    localcluster.kill_rabbit(cluster, leader)

    other = next(i for i in cluster.members if i != leader)
    successor = _eventually(lambda: localcluster.queue_leaders(cluster, vhost).get("kept"), 30,
                            "a new queue leader")
    assert successor != leader
    body = _eventually(lambda: _get(cluster.amqp_url(other, vhost), "kept"), 30,
                       "the message through another node")
    assert body == b"confirmed"

    localcluster.start_rabbit(cluster, leader)
    assert localcluster.running_nodes(cluster) == [1, 2, 3]


def test_a_killed_node_started_again_rejoins(
    cluster: LocalCluster, role_urls: dict[str, str]
) -> None:
    victim = 3
    localcluster.kill_rabbit(cluster, victim)
    assert localcluster.running_nodes(cluster, node=1) == [1, 2]
    worker = [pika.URLParameters(url) for url in role_urls["worker"].split(";")]
    pika.BlockingConnection(worker).close()  # the role's users live on the surviving nodes

    began = time.monotonic()
    localcluster.start_rabbit(cluster, victim)

    assert localcluster.running_nodes(cluster, node=1) == [1, 2, 3]
    assert localcluster.running_nodes(cluster, node=victim) == [1, 2, 3]
    pika.BlockingConnection(worker[victim - 1]).close()
    print(f"node {victim} back in {time.monotonic() - began:.1f} s")
