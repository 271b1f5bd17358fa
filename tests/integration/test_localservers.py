"""The local RabbitMQ and ZooKeeper servers and the per-test isolation fixtures work end to end."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from urllib.parse import unquote, urlparse

import pika
import pika.exceptions
import pytest
from kazoo.client import KazooClient
from pika.adapters.blocking_connection import BlockingChannel

from ops import localservers


@contextmanager
def _channel(url: str) -> Iterator[BlockingChannel]:
    connection = pika.BlockingConnection(pika.URLParameters(url))
    try:
        yield connection.channel()
    finally:
        if connection.is_open:
            connection.close()


@contextmanager
def _zk(hosts: str) -> Iterator[KazooClient]:
    client = KazooClient(hosts=hosts, timeout=10.0)
    client.start(timeout=30.0)
    try:
        yield client
    finally:
        client.stop()
        client.close()


def _vhost(url: str) -> str:
    return unquote(urlparse(url).path[1:])


def test_amqp_url_is_a_private_vhost(amqp_url: str, servers: localservers.Servers) -> None:
    assert amqp_url.startswith(servers.amqp_url)
    assert _vhost(amqp_url) not in ("", "/")


def test_publish_with_confirms_and_get_back(amqp_url: str) -> None:
    with _channel(amqp_url) as channel:
        channel.confirm_delivery()
        channel.queue_declare("roundtrip", durable=True)
        channel.basic_publish(
            exchange="",
            routing_key="roundtrip",
            body=b"hello rota",
            properties=pika.BasicProperties(delivery_mode=pika.DeliveryMode.Persistent),
            mandatory=True,
        )
        method, _properties, body = channel.basic_get("roundtrip", auto_ack=True)
        assert method is not None
        assert body == b"hello rota"


def test_zk_chroot_and_ephemeral_node(zk_hosts: str, servers: localservers.Servers) -> None:
    chroot = zk_hosts.removeprefix(servers.zk_hosts)
    assert chroot.startswith("/rota-test-")
    with _zk(zk_hosts) as client:
        client.create("/worker-1", b"alive", ephemeral=True)
        data, stat = client.get("/worker-1")
        assert data == b"alive"
        assert stat.ephemeralOwner == client.client_id[0]
        assert client.get_children("/") == ["worker-1"]
        with _zk(servers.zk_hosts) as root:
            assert root.exists(f"{chroot}/worker-1") is not None
    with _zk(servers.zk_hosts) as root:
        assert root.exists(f"{chroot}/worker-1") is None  # gone with its session


def test_vhosts_are_isolated(amqp_url: str, vhost_factory: Callable[[str], str]) -> None:
    other_url = vhost_factory("other")
    assert _vhost(other_url) != _vhost(amqp_url)
    with _channel(amqp_url) as channel:
        channel.queue_declare("only-in-first", durable=True)
        channel.queue_declare("only-in-first", passive=True)
    with _channel(other_url) as channel:
        with pytest.raises(pika.exceptions.ChannelClosedByBroker) as closed:
            channel.queue_declare("only-in-first", passive=True)
        assert closed.value.reply_code == 404


def test_start_again_reuses_running_servers(servers: localservers.Servers) -> None:
    again = localservers.start(
        servers.state_dir, servers.amqp_port, servers.zk_port, servers.epmd_port
    )
    assert not again.started
    assert again.pids == servers.pids
    assert localservers.is_up(servers)


@pytest.mark.slow
def test_restarts_keep_data_and_ports(
    servers: localservers.Servers, amqp_url: str, zk_hosts: str
) -> None:
    with _channel(amqp_url) as channel:
        channel.confirm_delivery()
        channel.queue_declare("survivor", durable=True)
        channel.basic_publish(
            exchange="",
            routing_key="survivor",
            body=b"kept",
            properties=pika.BasicProperties(delivery_mode=pika.DeliveryMode.Persistent),
        )
    with _zk(zk_hosts) as client:
        client.create("/config", b"kept")
    old_broker, old_zk = servers.pids["rabbitmq"], servers.pids["zookeeper"]

    localservers.restart_rabbitmq(servers)
    localservers.restart_zookeeper(servers)

    assert servers.pids["rabbitmq"] != old_broker
    assert servers.pids["zookeeper"] != old_zk
    assert localservers.is_up(servers)
    with _channel(amqp_url) as channel:
        _method, _properties, body = channel.basic_get("survivor", auto_ack=True)
        assert body == b"kept"
    with _zk(zk_hosts) as client:
        assert client.get("/config")[0] == b"kept"
