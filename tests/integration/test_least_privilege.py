"""Each role's RabbitMQ user can do what the role must, and nothing that forges another's word.

The coordinator, the workers and the operator connect as `rota-coordinator`, `rota-worker` and
`rota-operator` with the permissions of `protocol.topology.PERMISSIONS` (set by
ops/localservers.py on the test's virtual host). A worker's credentials cannot put an order or a
daemon control on a node queue by any route; an operator's cannot put a run event on
`rota.results` (nor an order anywhere); RabbitMQ closes the channel with ACCESS_REFUSED or the
message finds no queue, and nothing reaches the target queue. A real cluster on the coordinator
and worker users runs its schedule, and an operator's manual-run request runs end to end.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote, urlparse

import pika
import pika.exceptions
import pytest

from ops import localservers
from ops.localservers import ROLE_USERS
from protocol import DaemonControl, RunEvent, RunOrder, encode
from protocol.topology import (
    DEAD_EXCHANGE,
    ORDERS_EXCHANGE,
    PERMISSIONS,
    REQUESTS_EXCHANGE,
    RESULTS_EXCHANGE,
    UNREADABLE_EXCHANGE,
)
from protocol.transport import RESULTS, RefusedByBroker, node_queue
from protocol.transport_dramatiq import wire
from protocol.transport_rabbitmq import RabbitmqTransport
from tests.harness import SECONDS_CATALOGUE, THREE_NODES, running_cluster

ACCESS_REFUSED = 403
NODE = "w-master"
BUILT_IN = ("", "amq.direct", "amq.topic", "amq.fanout", "amq.headers", "amq.match")


def _order(epoch: int = 10**6) -> bytes:
    now = time.time()
    return encode(RunOrder(
        run_id=f"forged-{uuid.uuid4().hex[:8]}", service="Tick", node=NODE, trigger="manual",
        slot=None, epoch=epoch, issued_at=now, deadline=now + 60, timeout=5,
        callable="workers.demo:noop", allowed_roles=["Master"],
    ))


def _control() -> bytes:
    return encode(DaemonControl(
        control_id=f"forged-{uuid.uuid4().hex[:8]}", service="Calculator", node=NODE,
        action="stop", epoch=10**6, issued_at=time.time(), allowed_roles=["Master"],
    ))


def _result() -> bytes:
    return encode(RunEvent(run_id=f"forged-{uuid.uuid4().hex[:8]}", service="Tick", node=NODE,
                           state="succeeded", at=time.time(), epoch=1))


def _attempt(url: str, action: Callable[[Any], object]) -> int | str:
    """Run `action` on a fresh confirm-mode channel: "ok", "unroutable", or the reply code
    with which RabbitMQ closed the channel."""
    conn = pika.BlockingConnection(pika.URLParameters(url))
    try:
        ch = conn.channel()
        ch.confirm_delivery()
        try:
            action(ch)
        except pika.exceptions.UnroutableError:
            return "unroutable"
        except pika.exceptions.ChannelClosedByBroker as exc:
            return int(exc.reply_code)
        return "ok"
    finally:
        if conn.is_open:
            conn.close()


def _publish(exchange: str, key: str, body: bytes) -> Callable[[Any], object]:
    return lambda ch: ch.basic_publish(exchange, key, body, mandatory=True)


def _ready(amqp_url: str, queue: str) -> int:
    conn = pika.BlockingConnection(pika.URLParameters(amqp_url))
    try:
        count: int = conn.channel().queue_declare(queue, passive=True).method.message_count
        return count
    finally:
        conn.close()


@pytest.fixture
def topology(amqp_url: str, role_urls: dict[str, str]) -> dict[str, str]:
    """What a coordinator and a worker declare when they start, each as its own user."""
    coordinator = RabbitmqTransport(role_urls["coordinator"], role="coordinator")
    worker = RabbitmqTransport(role_urls["worker"], role="worker")
    try:
        coordinator.declare(node_queue(NODE))
        worker.declare(node_queue(NODE))
    finally:
        coordinator.close()
        worker.close()
    return role_urls


def test_a_workers_credentials_cannot_forge_an_order_or_a_control(
    amqp_url: str, topology: dict[str, str]
) -> None:
    url = topology["worker"]
    queue = node_queue(NODE)
    forged = [wire(queue, _order()), wire(queue, _control())]

    # Straight routes to the node queue: the default exchange, the orders exchange, the
    # built-in exchanges. RabbitMQ closes the channel with ACCESS_REFUSED.
    for body in forged:
        for exchange in (*BUILT_IN, ORDERS_EXCHANGE, REQUESTS_EXCHANGE):
            assert _attempt(url, _publish(exchange, queue, body)) == ACCESS_REFUSED, exchange

    # Exchanges a worker may write to feed no node queue: the message is returned.
    for exchange in (RESULTS_EXCHANGE, DEAD_EXCHANGE, UNREADABLE_EXCHANGE):
        assert _attempt(url, _publish(exchange, queue, forged[0])) == "unroutable", exchange

    # Nor can it make a route: bind the node queue to an exchange it writes to, bind the orders
    # exchange behind one, or name the orders exchange as a dead-letter exchange.
    assert _attempt(url, lambda ch: ch.queue_bind(queue, UNREADABLE_EXCHANGE, "forge")) \
        == ACCESS_REFUSED
    assert _attempt(url, lambda ch: ch.queue_bind(queue, RESULTS_EXCHANGE, queue)) \
        == ACCESS_REFUSED
    assert _attempt(url, lambda ch: ch.exchange_bind(ORDERS_EXCHANGE, RESULTS_EXCHANGE, queue)) \
        == ACCESS_REFUSED
    assert _attempt(url, lambda ch: ch.queue_declare(
        "rota.node.relay", arguments={"x-dead-letter-exchange": ORDERS_EXCHANGE,
                                      "x-dead-letter-routing-key": queue})) == ACCESS_REFUSED
    assert _attempt(url, _publish(UNREADABLE_EXCHANGE, "forge", forged[0])) == "unroutable"

    # Through Rota's own transport, as a worker process would send it.
    worker = RabbitmqTransport(url, role="worker")
    try:
        with pytest.raises(RefusedByBroker, match="ACCESS_REFUSED"):
            worker.send(queue, _order())
    finally:
        worker.close()

    assert _ready(amqp_url, queue) == 0

    # What the worker may do, it can: report a run event (it reaches rota.results).
    assert _attempt(url, _publish(RESULTS_EXCHANGE, RESULTS, wire(RESULTS, _result()))) == "ok"
    assert _ready(amqp_url, RESULTS) == 1
    # And the coordinator's order does reach the node.
    coordinator = RabbitmqTransport(topology["coordinator"], role="coordinator")
    try:
        coordinator.publish([(queue, _order(epoch=1))])
    finally:
        coordinator.close()
    assert _ready(amqp_url, queue) == 1


def test_an_operators_credentials_cannot_forge_a_result_or_an_order(
    amqp_url: str, topology: dict[str, str]
) -> None:
    url = topology["operator"]
    result = wire(RESULTS, _result())
    for exchange in (*BUILT_IN, RESULTS_EXCHANGE, ORDERS_EXCHANGE, DEAD_EXCHANGE,
                     UNREADABLE_EXCHANGE):
        assert _attempt(url, _publish(exchange, RESULTS, result)) == ACCESS_REFUSED, exchange
        assert _attempt(url, _publish(exchange, node_queue(NODE),
                                      wire(node_queue(NODE), _order()))) == ACCESS_REFUSED
    # The requests exchange feeds rota.requests only.
    assert _attempt(url, _publish(REQUESTS_EXCHANGE, RESULTS, result)) == "unroutable"
    assert _attempt(url, lambda ch: ch.queue_bind(RESULTS, REQUESTS_EXCHANGE, "forge")) \
        == ACCESS_REFUSED
    operator = RabbitmqTransport(url, role="operator")
    try:
        with pytest.raises(RefusedByBroker, match="ACCESS_REFUSED"):
            operator.send(RESULTS, _result())
    finally:
        operator.close()
    assert _ready(amqp_url, RESULTS) == 0
    assert _ready(amqp_url, node_queue(NODE)) == 0


def _rota(args: list[str], amqp: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "ROTA_AMQP_URL"}
    return subprocess.run([sys.executable, "-m", "rota.cli", *args, "--amqp", amqp],
                          capture_output=True, text=True, env=env, cwd=cwd, timeout=60)


def test_a_cluster_on_its_role_users_runs_its_schedule_and_an_operators_manual_run(
    amqp_url: str, role_urls: dict[str, str], zk_hosts: str, tmp_path: Path
) -> None:
    with running_cluster(amqp_url, zk_hosts, SECONDS_CATALOGUE, tmp_path) as (c, rec):
        c.role_urls.update(coordinator=role_urls["coordinator"], worker=role_urls["worker"])
        # Workers first: they consume at once, though no exchange exists yet.
        for node, roles in THREE_NODES.items():
            c.worker(node, roles)
        time.sleep(2.0)
        c.coordinator("coord-a")
        c.coordinator("coord-b")

        # Scheduled runs go out and come back: orders reach the workers, results the leader.
        for node in THREE_NODES:
            ran = rec.wait_for(lambda r, n=node: r.service == "Everywhere" and r.node == n
                               and r.state == "succeeded", 30)
            assert ran is not None, f"no run succeeded on {node}\n{c.logs()}"

        # An operator's manual run, sent with the operator's credentials, runs once.
        sent = _rota(["run", "Stats A", "--by", "ops-alice"], role_urls["operator"], tmp_path)
        assert sent.returncode == 0, sent.stderr
        request = sent.stdout.split("(request ")[1].split(")")[0]
        run_id = f"manual-{request}"
        done = rec.wait_for(lambda r: r.run_id == run_id and r.state == "succeeded", 30)
        assert done is not None, f"manual run {run_id} did not succeed\n{c.logs()}"
        assert done.node == "w-master" and done.trigger == "manual"
        time.sleep(1.0)
        runs = [r for r in rec.snapshot() if r.run_id == run_id and r.state == "succeeded"]
        assert len(runs) == 1

        logs = "\n".join(p.log.read_text(errors="replace") for p in c.procs.values())
        assert "ACCESS_REFUSED" not in logs, logs[-4000:]


def test_an_operators_request_fails_saying_why_until_a_coordinator_has_started(
    role_urls: dict[str, str], tmp_path: Path
) -> None:
    sent = _rota(["run", "Stats A"], role_urls["operator"], tmp_path)
    assert sent.returncode != 0
    assert "NOT_FOUND" in sent.stderr and "rota.x.requests" in sent.stderr
    assert "once a coordinator has started" in sent.stderr
    coordinator = RabbitmqTransport(role_urls["coordinator"], role="coordinator")
    coordinator.close()
    sent = _rota(["run", "Stats A"], role_urls["operator"], tmp_path)
    assert sent.returncode == 0, sent.stderr


def test_the_compose_definitions_load_into_rabbitmq_with_each_roles_permissions(
    servers: localservers.Servers, amqp_url: str, tmp_path: Path
) -> None:
    """docker-compose.yml's definitions, imported as RabbitMQ imports them at boot (under
    names of this test's own, so that the shared broker's users stay as they are)."""
    yaml = pytest.importorskip("yaml")
    from tests.unit.test_compose import COMPOSE, _interpolate

    vhost = unquote(urlparse(amqp_url).path[1:])
    tag = uuid.uuid4().hex[:8]
    content = yaml.safe_load(COMPOSE.read_text())["configs"]["rabbitmq-definitions"]["content"]
    passwords = {role: uuid.uuid4().hex for role in ROLE_USERS}
    definitions = json.loads(_interpolate(
        content, {f"ROTA_{role.upper()}_PASSWORD": pw for role, pw in passwords.items()}))
    renamed = {user["name"]: f"{user['name']}-{tag}" for user in definitions["users"]}
    definitions = {
        "vhosts": [{"name": vhost}],
        "users": [{**u, "name": renamed[u["name"]]} for u in definitions["users"]],
        "permissions": [{**p, "user": renamed[p["user"]], "vhost": vhost}
                        for p in definitions["permissions"]],
    }
    path = tmp_path / "definitions.json"
    path.write_text(json.dumps(definitions))
    try:
        localservers.rabbitmqctl(servers, "-q", "import_definitions", str(path))
        want = {renamed[ROLE_USERS[role]]: perms for role, perms in PERMISSIONS.items()}
        listed: dict[str, tuple[str, ...]] = {}
        deadline = time.monotonic() + 30
        while listed != want and time.monotonic() < deadline:  # the import is asynchronous
            out = localservers.rabbitmqctl(servers, "-q", "list_permissions", "-p", vhost).stdout
            listed = {row[0]: tuple(row[1:]) for row in
                      (line.split("\t") for line in out.splitlines()[1:]) if row[0] in want}
            time.sleep(0.2)
        assert listed == want
        # Each user logs in with the password Compose gave it, and is held to its role.
        port = servers.amqp_port
        worker = f"amqp://{renamed['rota-worker']}:{passwords['worker']}@127.0.0.1:{port}/" \
            + quote(vhost, safe="")
        assert _attempt(worker, _publish("", RESULTS, b"x")) == ACCESS_REFUSED
    finally:
        for user in renamed.values():
            localservers.rabbitmqctl(servers, "-q", "delete_user", user, check=False)
