"""Fixtures for integration tests against real RabbitMQ and ZooKeeper servers.

The session starts private servers with ``ops.localservers`` in a temporary directory, on the
first free ports at or above the defaults (ROTA_LOCAL_AMQP_PORT and ROTA_LOCAL_ZK_PORT choose
others), and stops them at the end. To reuse servers that are
already running instead, export the lines printed by ``python -m ops.localservers env``
(ROTA_AMQP_URL, ROTA_ZK and optionally ROTA_SERVERS_DIR).

Each test gets its own RabbitMQ virtual host (``amqp_url``, as guest; ``role_urls`` for the
coordinator, worker and operator users) and its own ZooKeeper chroot (``zk_hosts``), both
removed afterwards.
"""

from __future__ import annotations

import itertools
import os
import re
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest
from kazoo.client import KazooClient
from kazoo.exceptions import NoNodeError

from ops import localservers
from tests.harness import SECONDS_CATALOGUE, Cluster, EventRecorder, running_cluster

_HERE = Path(__file__).resolve().parent
_SESSION = uuid.uuid4().hex[:6]
_counter = itertools.count(1)
_OWNER = "owner.pid"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if _HERE in Path(item.path).resolve().parents:
            item.add_marker(pytest.mark.integration)


def _reuse_running(config: pytest.Config, amqp_url: str, zk: str) -> localservers.Servers:
    state_dir = Path(os.environ.get("ROTA_SERVERS_DIR") or config.rootpath / ".rota-servers")
    servers = localservers.load(state_dir)
    if servers is None or not localservers.is_up(servers):
        raise pytest.UsageError(
            f"ROTA_AMQP_URL and ROTA_ZK are set but no running servers were found in "
            f"{state_dir}; start them with `python -m ops.localservers start` or set "
            "ROTA_SERVERS_DIR to the --dir they were started with"
        )
    url = urlparse(amqp_url)
    if (url.port, zk.split("/")[0]) != (servers.amqp_port, servers.zk_hosts):
        raise pytest.UsageError(
            f"ROTA_AMQP_URL={amqp_url} and ROTA_ZK={zk} do not match the servers in {state_dir} "
            f"({servers.amqp_url}, {servers.zk_hosts})"
        )
    return servers


@pytest.fixture(scope="session")
def servers(
    pytestconfig: pytest.Config, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[localservers.Servers]:
    """Running RabbitMQ and ZooKeeper for the whole session."""
    amqp_url, zk = os.environ.get("ROTA_AMQP_URL"), os.environ.get("ROTA_ZK")
    if amqp_url and zk:
        yield _reuse_running(pytestconfig, amqp_url, zk)
        return
    _stop_orphans(tmp_path_factory.getbasetemp().parent)
    state_dir = tmp_path_factory.mktemp("servers")
    (state_dir / _OWNER).write_text(f"{os.getpid()}\n")
    attempt = 0
    while True:
        try:
            amqp_base, zk_base = localservers.default_ports()
            amqp_port, zk_port = localservers.find_free_ports(
                amqp_base + localservers.RABBITMQ_PORT_SPAN * attempt, zk_base + 10 * attempt
            )
            started = localservers.start(state_dir, amqp_port, zk_port)
            break
        except localservers.ServerError as error:
            attempt += 1
            if attempt < 3 and "already in use" in str(error):
                continue  # another session took the ports while ours started: move on
            raise pytest.UsageError(
                f"could not start RabbitMQ and ZooKeeper: {error}\n"
                "To reuse servers that are already running, export the output of "
                "`python -m ops.localservers env`."
            ) from error
    try:
        yield started
    finally:
        localservers.stop(started.state_dir)


def _stop_orphans(temp_root: Path) -> None:
    """Stop servers left running by earlier test sessions that were killed before teardown."""
    owner_files = {path.resolve() for path in temp_root.glob(f"pytest-*/servers*/{_OWNER}")}
    for owner_file in sorted(owner_files):
        try:
            os.kill(int(owner_file.read_text()), 0)
            continue
        except ProcessLookupError:
            pass
        except (OSError, ValueError):
            continue
        localservers.stop(owner_file.parent)
        owner_file.unlink(missing_ok=True)


def _ensure_up(servers: localservers.Servers) -> None:
    """Bring back a server that an earlier test stopped and did not restart."""
    if not localservers.is_up(servers):
        localservers.start(servers.state_dir, servers.amqp_port, servers.zk_port, servers.epmd_port)


def _slug(request: pytest.FixtureRequest) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", request.node.name).strip("-")[:60]


@pytest.fixture
def vhost_factory(
    servers: localservers.Servers, request: pytest.FixtureRequest
) -> Iterator[Callable[[str], str]]:
    """Create extra virtual hosts for this test: ``vhost_factory(label) -> amqp_url``."""
    _ensure_up(servers)
    created: list[str] = []

    def make(label: str = "") -> str:
        parts = [_slug(request), label, str(next(_counter)), _SESSION]
        name = "-".join(part for part in parts if part)
        url = localservers.add_vhost(servers, name)
        created.append(name)
        return url

    yield make
    for name in created:
        localservers.delete_vhost(servers, name)


@pytest.fixture
def amqp_url(vhost_factory: Callable[[str], str]) -> str:
    """AMQP URL of a fresh virtual host that only this test uses."""
    return vhost_factory("")


@pytest.fixture
def role_urls(servers: localservers.Servers, amqp_url: str) -> dict[str, str]:
    """AMQP URLs of this test's virtual host for each Rota role's own RabbitMQ user."""
    vhost = unquote(urlparse(amqp_url).path[1:]) or "/"
    return {role: servers.role_url(role, vhost) for role in localservers.ROLES}


@pytest.fixture
def zk_hosts(servers: localservers.Servers) -> Iterator[str]:
    """ZooKeeper connection string chrooted to a fresh node that only this test uses."""
    _ensure_up(servers)
    chroot = f"/rota-test-{uuid.uuid4().hex[:12]}"
    _run_zk(servers.zk_hosts, lambda client: client.ensure_path(chroot))
    yield servers.zk_hosts + chroot

    def cleanup(client: KazooClient) -> None:
        try:
            client.delete(chroot, recursive=True)
        except NoNodeError:
            pass

    _run_zk(servers.zk_hosts, cleanup)


def _run_zk(hosts: str, action: Callable[[KazooClient], object]) -> None:
    client = KazooClient(hosts=hosts, timeout=10.0)
    client.start(timeout=30.0)
    try:
        action(client)
    finally:
        client.stop()
        client.close()


@pytest.fixture
def cluster(
    amqp_url: str, zk_hosts: str, tmp_path: Path
) -> Iterator[tuple[Cluster, EventRecorder]]:
    """Processes on the second-level catalogue, and a recorder of `rota.events`."""
    with running_cluster(amqp_url, zk_hosts, SECONDS_CATALOGUE, tmp_path) as pair:
        yield pair
