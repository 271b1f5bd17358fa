"""The local RabbitMQ and ZooKeeper servers and the per-test isolation fixtures work end to end."""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
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


# -- ports: none where the kernel picks outgoing connections' local ports -----------------------


def _below_ephemeral(port: int) -> bool:
    low, _high = localservers.ephemeral_port_range()
    # Linux's default range starts at 32768; a host configured lower still gets the check.
    return 1024 <= port < min(low, 32768)


def test_every_default_port_lies_below_the_ephemeral_range(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(localservers.AMQP_PORT_ENV, raising=False)
    monkeypatch.delenv(localservers.ZK_PORT_ENV, raising=False)
    amqp, zk = localservers.default_ports()
    # The ports new servers may end up on: the defaults, and the furthest the search for free
    # ones (find_free_ports, 100 steps) reaches from where the test session and ops/soak start.
    for amqp_from, zk_from in ((amqp, zk), (amqp + 2 * localservers.RABBITMQ_PORT_SPAN, zk + 20),
                               (amqp + 4 * localservers.RABBITMQ_PORT_SPAN, zk + 40)):
        for step in (0, 99):
            servers = localservers.Servers(
                Path(), amqp_from + step * localservers.RABBITMQ_PORT_SPAN, zk_from + step
            )
            outside = {n: p for n, p in servers.ports().items() if not _below_ephemeral(p)}
            assert not outside, f"in the ephemeral port range: {outside}"
    servers = localservers.Servers(Path(), amqp, zk)
    broker = [p for name, p in servers.ports().items() if name != "ZooKeeper"]
    assert len(set(broker)) == len(broker) == localservers.RABBITMQ_PORT_SPAN, servers.ports()
    assert set(broker) == set(range(amqp, amqp + localservers.RABBITMQ_PORT_SPAN))
    assert zk not in broker


def test_the_environment_chooses_the_default_ports(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(localservers.AMQP_PORT_ENV, "27000")
    monkeypatch.setenv(localservers.ZK_PORT_ENV, "23000")
    assert localservers.default_ports() == (27000, 23000)
    monkeypatch.setenv(localservers.AMQP_PORT_ENV, "many")
    with pytest.raises(localservers.ServerError, match="ROTA_LOCAL_AMQP_PORT='many'"):
        localservers.default_ports()


def test_a_busy_port_says_how_to_choose_others(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    amqp, zk = localservers.find_free_ports()
    with socket.socket() as taken:
        taken.bind((localservers.HOST, amqp))
        taken.listen()
        code = localservers.main(
            ["start", "--dir", str(tmp_path / "servers"), "--amqp-port", str(amqp),
             "--zk-port", str(zk)]
        )
    err = capsys.readouterr().err
    assert code == 1
    assert f"AMQP port {amqp} already in use" in err
    for how in ("--amqp-port", "--zk-port", "ROTA_LOCAL_AMQP_PORT", "ROTA_LOCAL_ZK_PORT"):
        assert how in err, f"{err!r} does not say {how}"
    assert localservers.load(tmp_path / "servers") is not None
    assert not localservers.load(tmp_path / "servers").pids  # type: ignore[union-attr]
