"""ops.localcluster's pure parts: the port layout, the servers' configuration, the URLs."""

from __future__ import annotations

import socket
from pathlib import Path
from urllib.parse import urlparse

import pytest

from ops import localcluster, localservers
from ops.localcluster import LocalCluster

# Ports other local servers on this kind of machine use: localservers' defaults and blocks
# that people run by hand beside them.
TAKEN = (set(range(26672, 26685)) | {22181} | set(range(28672, 28685)) | {23181}
         | set(range(31672, 31685)) | {26181})


def _default(monkeypatch: pytest.MonkeyPatch) -> LocalCluster:
    monkeypatch.delenv(localcluster.AMQP_PORT_ENV, raising=False)
    monkeypatch.delenv(localcluster.ZK_PORT_ENV, raising=False)
    return LocalCluster(Path("/state"), *localcluster.default_ports())


def test_default_ports_are_distinct_below_the_ephemeral_range_and_clear_of_others(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cluster = _default(monkeypatch)
    ports = cluster.ports()
    assert len(set(ports.values())) == len(ports), ports
    assert all(1024 <= port < 32768 for port in ports.values()), ports
    assert not set(ports.values()) & TAKEN
    assert [cluster.zk_client_port(i) for i in cluster.members] == [24181, 24182, 24183]
    assert [cluster.node_amqp_port(i) for i in cluster.members] == [29672, 29692, 29712]
    rabbit = [p for name, p in ports.items() if not name.startswith("ZooKeeper")]
    assert set(rabbit) <= set(range(29672, 29672 + localcluster.AMQP_SPAN))
    zk = [p for name, p in ports.items() if name.startswith("ZooKeeper")]
    assert set(zk) == set(range(24181, 24181 + localcluster.ZK_SPAN))
    # The furthest blocks the test session's search for free ports reaches stay below too.
    far = LocalCluster(Path(), 29672 + 49 * localcluster.AMQP_SPAN,
                       24181 + 49 * localcluster.ZK_SPAN)
    assert max(far.ports().values()) < 32768


def test_the_environment_chooses_the_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(localcluster.AMQP_PORT_ENV, "20000")
    monkeypatch.setenv(localcluster.ZK_PORT_ENV, "21000")
    assert localcluster.default_ports() == (20000, 21000)
    monkeypatch.setenv(localcluster.ZK_PORT_ENV, "many")
    with pytest.raises(localcluster.ServerError, match="ROTA_LOCAL_CLUSTER_ZK_PORT='many'"):
        localcluster.default_ports()


def test_urls_name_every_member(monkeypatch: pytest.MonkeyPatch) -> None:
    cluster = _default(monkeypatch)
    assert cluster.zk_hosts == "127.0.0.1:24181,127.0.0.1:24182,127.0.0.1:24183"
    assert cluster.amqp_urls == ";".join(
        f"amqp://guest:guest@127.0.0.1:{port}/" for port in (29672, 29692, 29712))
    urls = cluster.vhost_urls("test/a b").split(";")
    assert [urlparse(url).path for url in urls] == ["/test%2Fa%20b"] * 3
    role = localcluster.role_urls(cluster, "worker", "p@ss", "v").split(";")
    assert [urlparse(url).port for url in role] == [29672, 29692, 29712]
    assert all(url.startswith("amqp://rota-worker:p%40ss@127.0.0.1:") for url in role)
    assert [cluster.node(i) for i in cluster.members] == [
        "rota-c1@localhost", "rota-c2@localhost", "rota-c3@localhost"]
    with pytest.raises(localcluster.ServerError, match="numbered 1 to 3"):
        cluster.node(4)


def test_zookeeper_configuration_lists_the_ensemble(monkeypatch: pytest.MonkeyPatch) -> None:
    cluster = _default(monkeypatch)
    cfg = dict(
        line.split("=", 1) for line in localcluster.zoo_cfg(cluster, 2).splitlines()
        if "=" in line and not line.startswith("#")
    )
    assert cfg["clientPort"] == "24182" and cfg["clientPortAddress"] == "127.0.0.1"
    assert (cfg["tickTime"], cfg["minSessionTimeout"], cfg["maxSessionTimeout"]) == (
        "200", "1000", "60000")
    assert (cfg["initLimit"], cfg["syncLimit"]) == ("50", "25"), "10 s and 5 s, in ticks"
    assert cfg["4lw.commands.whitelist"] == "ruok,stat,srvr"
    assert cfg["dataDir"] == "/state/zk2/data"
    assert [cfg[f"server.{i}"] for i in (1, 2, 3)] == [
        "127.0.0.1:24184:24185", "127.0.0.1:24186:24187", "127.0.0.1:24188:24189"]


def test_rabbitmq_configuration(monkeypatch: pytest.MonkeyPatch) -> None:
    cluster = _default(monkeypatch)
    conf = localcluster.rabbitmq_conf(cluster, 3)
    assert "listeners.tcp.default = 127.0.0.1:29712\n" in conf
    assert "cluster_partition_handling = pause_minority\n" in conf
    assert "+S 1:1" in localcluster.RABBITMQ_ERL_ARGS
    assert localservers.LOOPBACK_DIST in localcluster.RABBITMQ_ERL_ARGS


def test_a_busy_port_says_how_to_choose_others(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(localservers, "ensure_installed", lambda: None)
    amqp, zk = localcluster.find_free_ports(20000, 21000)
    with socket.socket() as taken:
        taken.bind((localcluster.HOST, zk + 5))  # server 2's quorum port
        taken.listen()
        code = localcluster.main(["start", "--dir", str(tmp_path / "c"), "--amqp-port", str(amqp),
                                  "--zk-port", str(zk)])
    err = capsys.readouterr().err
    assert code == 1
    assert f"ZooKeeper 2 quorum port {zk + 5} already in use" in err
    for how in ("--amqp-port", "--zk-port", localcluster.AMQP_PORT_ENV, localcluster.ZK_PORT_ENV):
        assert how in err, f"{err!r} does not say {how}"
    cluster = localcluster.load(tmp_path / "c")
    assert cluster is not None and not cluster.pids


def test_the_search_for_free_ports_stays_below_the_ephemeral_range() -> None:
    with pytest.raises(localcluster.ServerError, match="no free RabbitMQ ports"):
        localcluster.find_free_ports(32768 - localcluster.AMQP_SPAN + 1, 21000)


def test_member_commands_need_a_member_number(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert localcluster.main(["kill", "zk", "2", "--dir", str(tmp_path)]) == 1
    assert "no cluster in" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        localcluster.main(["start", "rabbit", "--dir", str(tmp_path)])
    assert "which member?" in capsys.readouterr().err
