"""Fixtures for tests against a 3-server ZooKeeper ensemble and a 3-node RabbitMQ cluster.

The session starts them with ``ops.localcluster`` in a temporary directory, on the first free
port blocks at or above the defaults (ROTA_LOCAL_CLUSTER_AMQP_PORT and
ROTA_LOCAL_CLUSTER_ZK_PORT choose others), and stops them at the end. To reuse a cluster that
is already running instead, set ROTA_CLUSTER_DIR to the directory it was started with
(``python -m ops.localcluster env`` prints it).

Every test here is marked ``cluster``. Tests may kill members: before each test, and before a
test's virtual host and chroot are removed, every member that is down is started again.

Each test gets its own RabbitMQ virtual host (``amqp_url``: guest's URLs of it on the three
nodes, joined by ";"; ``role_urls``: the same for each Rota role's user; ``vhost``: its name)
and its own ZooKeeper chroot appended to the three servers' connection string (``zk_hosts``),
both removed afterwards.
"""

from __future__ import annotations

import itertools
import os
import re
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from kazoo.client import KazooClient
from kazoo.exceptions import NoNodeError

from ops import localcluster

_HERE = Path(__file__).resolve().parent
_SESSION = uuid.uuid4().hex[:6]
_counter = itertools.count(1)
_OWNER = "owner.pid"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if _HERE in Path(item.path).resolve().parents:
            item.add_marker(pytest.mark.cluster)


def _reuse_running(state_dir: str) -> localcluster.LocalCluster:
    cluster = localcluster.load(state_dir)
    if cluster is None or not localcluster.is_up(cluster):
        raise pytest.UsageError(
            f"ROTA_CLUSTER_DIR={state_dir} holds no running cluster; start one with "
            f"`python -m ops.localcluster start --dir {state_dir}` or unset ROTA_CLUSTER_DIR"
        )
    return cluster


@pytest.fixture(scope="session")
def local_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[localcluster.LocalCluster]:
    """The running ensemble and cluster, for the whole session."""
    reuse = os.environ.get("ROTA_CLUSTER_DIR")
    if reuse:
        yield _reuse_running(reuse)
        return
    _stop_orphans(tmp_path_factory.getbasetemp().parent)
    state_dir = tmp_path_factory.mktemp("cluster")
    (state_dir / _OWNER).write_text(f"{os.getpid()}\n")
    attempt = 0
    while True:
        try:
            amqp_base, zk_base = localcluster.default_ports()
            amqp_port, zk_port = localcluster.find_free_ports(
                amqp_base + localcluster.AMQP_SPAN * attempt,
                zk_base + localcluster.ZK_SPAN * attempt,
            )
            started = localcluster.start(state_dir, amqp_port, zk_port)
            break
        except localcluster.ServerError as error:
            attempt += 1
            if attempt < 3 and "already in use" in str(error):
                continue  # another session took the ports while ours started: move on
            raise pytest.UsageError(
                f"could not start the ZooKeeper ensemble and RabbitMQ cluster: {error}\n"
                "To reuse a cluster that is already running, set ROTA_CLUSTER_DIR to its "
                "directory."
            ) from error
    try:
        yield started
    finally:
        localcluster.stop(started.state_dir)


def _stop_orphans(temp_root: Path) -> None:
    """Stop clusters left running by earlier test sessions that were killed before teardown."""
    owner_files = {path.resolve() for path in temp_root.glob(f"pytest-*/cluster*/{_OWNER}")}
    for owner_file in sorted(owner_files):
        try:
            os.kill(int(owner_file.read_text()), 0)
            continue
        except ProcessLookupError:
            pass
        except (OSError, ValueError):
            continue
        localcluster.stop(owner_file.parent)
        owner_file.unlink(missing_ok=True)


def heal(cluster: localcluster.LocalCluster) -> None:
    """Start again every member an earlier step killed and did not start."""
    if not localcluster.is_up(cluster):
        localcluster.start(cluster.state_dir, cluster.amqp_port, cluster.zk_port)
        localcluster.refresh_pids(cluster)


@pytest.fixture
def cluster(local_cluster: localcluster.LocalCluster) -> localcluster.LocalCluster:
    """The session's cluster with every member running when the test starts."""
    heal(local_cluster)
    return local_cluster


def _slug(request: pytest.FixtureRequest) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", request.node.name).strip("-")[:60]


@pytest.fixture
def vhost(cluster: localcluster.LocalCluster, request: pytest.FixtureRequest) -> Iterator[str]:
    """The name of a fresh virtual host that only this test uses."""
    name = f"{_slug(request)}-{next(_counter)}-{_SESSION}"
    localcluster.add_vhost(cluster, name)
    yield name
    heal(cluster)
    localcluster.delete_vhost(cluster, name)


@pytest.fixture
def amqp_url(cluster: localcluster.LocalCluster, vhost: str) -> str:
    """guest's URLs of this test's virtual host on the three nodes, joined by ";"."""
    return cluster.vhost_urls(vhost)


@pytest.fixture
def role_urls(cluster: localcluster.LocalCluster, vhost: str) -> dict[str, str]:
    """Each Rota role's URLs of this test's virtual host on the three nodes, joined by ";"."""
    return {role: cluster.role_url(role, vhost) for role in localcluster.ROLES}


@pytest.fixture
def zk_hosts(cluster: localcluster.LocalCluster) -> Iterator[str]:
    """The three servers' connection string chrooted to a node that only this test uses."""
    chroot = f"/rota-test-{uuid.uuid4().hex[:12]}"
    _run_zk(cluster.zk_hosts, lambda client: client.ensure_path(chroot))
    yield cluster.zk_hosts + chroot
    heal(cluster)

    def cleanup(client: KazooClient) -> None:
        try:
            client.delete(chroot, recursive=True)
        except NoNodeError:
            pass

    _run_zk(cluster.zk_hosts, cleanup)


def _run_zk(hosts: str, action: Callable[[KazooClient], object]) -> None:
    client = KazooClient(hosts=hosts, timeout=10.0)
    client.start(timeout=30.0)
    try:
        action(client)
    finally:
        client.stop()
        client.close()
