"""The HTTP API of a coordinator, called the way an operator's tools call it.

Served by `rota.http.serve` for an embedded in-memory cluster running the shipped
System Services catalogue on a fast simulated clock. Bad calls get a JSON error naming what
is wrong; a good manual-run call leads to a manual run.
"""

from __future__ import annotations

import json
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import pytest

from protocol.catalogue import load_catalogue
from protocol.clock import SimClock
from rota.cli import DEFAULT_CATALOGUE
from rota.embedded import DEFAULT_NODES, Cluster, parse_nodes
from rota.http import serve

SEED_COLUMNS = {"name", "enabled", "schedule", "allowed_nodes", "run_groups", "last_run",
                "in_queue"}


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        assert self.headers.get("content-type", "").startswith("application/json"), self.headers
        return json.loads(self.body)


class Api:
    def __init__(self, port: int) -> None:
        self.base = f"http://127.0.0.1:{port}"

    def call(self, method: str, path: str) -> Reply:
        req = urllib.request.Request(self.base + path, method=method,
                                     data=b"" if method == "POST" else None)
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                return Reply(resp.status, {k.lower(): v for k, v in resp.headers.items()},
                             resp.read())
        except urllib.error.HTTPError as err:
            with err:
                return Reply(err.code, {k.lower(): v for k, v in err.headers.items()},
                             err.read())

    def run(self, service: str) -> Reply:
        return self.call("POST", f"/api/services/{quote(service, safe='')}/run")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    catalogue = load_catalogue(DEFAULT_CATALOGUE)
    c = Cluster(catalogue, SimClock(time.time(), 60.0), parse_nodes(DEFAULT_NODES))
    c.start()
    try:
        yield c
    finally:
        c.stop()


@pytest.fixture(scope="module")
def api(cluster: Cluster) -> Iterator[Api]:
    port = _free_port()
    server = serve(cluster.coordinator, port)
    try:
        yield Api(port)
    finally:
        server.shutdown()
        server.server_close()


def test_unknown_route_is_404_naming_it(api: Api) -> None:
    for method, path in (("GET", "/api/nothing-here"), ("POST", "/api/services"),
                         ("GET", "/api/services/Summary"), ("DELETE", "/")):
        reply = api.call(method, path)
        assert reply.status == 404, (method, path)
        error = reply.json()["error"]
        assert path in error and method in error, error


def test_get_on_the_run_endpoint_is_405(api: Api) -> None:
    reply = api.call("GET", "/api/services/Summary/run")
    assert reply.status == 405
    assert "POST" in reply.json()["error"]


def test_run_of_an_unknown_service_is_404_naming_it(api: Api) -> None:
    reply = api.run("No Such Service")
    assert reply.status == 404
    assert "No Such Service" in reply.json()["error"]


def test_run_of_a_daemon_is_409_saying_why(api: Api) -> None:
    for daemon in ("Calculator", "RADIUS Server"):
        reply = api.run(daemon)
        assert reply.status == 409
        error = reply.json()["error"]
        assert daemon in error and "daemon" in error and "manually" in error, error


@pytest.mark.parametrize("service", ["Email Rates Manager", "Statistics Manager / Meta Info"])
def test_run_of_a_periodic_service_is_202_and_it_runs(
    api: Api, cluster: Cluster, service: str
) -> None:
    reply = api.run(service)
    assert reply.status == 202, reply.body
    request_id = reply.json()["request_id"]
    assert isinstance(request_id, str) and request_id
    deadline = time.monotonic() + 20
    done = []
    while not done and time.monotonic() < deadline:
        done = [r for r in list(cluster.finished) if r.run_id == f"manual-{request_id}"]
        time.sleep(0.05)
    assert done, f"no manual run of {service!r} finished"
    rec = done[0]
    assert rec.service == service
    assert rec.trigger == "manual"
    assert rec.state in ("succeeded", "failed"), rec
    assert rec.started_at is not None and rec.node is not None
    assert rec.slot is None


def test_metrics_are_prometheus_text(api: Api) -> None:
    reply = api.call("GET", "/metrics")
    assert reply.status == 200
    assert reply.headers["content-type"].startswith("text/plain")
    text = reply.body.decode()
    assert "# TYPE rota_leader gauge" in text
    assert "\nrota_leader 1.0" in text
    assert "# TYPE rota_runs_total counter" in text
    assert "rota_nodes_live 3.0" in text


def test_services_list_the_seeds_services_and_columns(api: Api) -> None:
    reply = api.call("GET", "/api/services")
    assert reply.status == 200
    body = reply.json()
    rows = body["services"]
    catalogue = load_catalogue(DEFAULT_CATALOGUE)
    assert sorted(r["name"] for r in rows) == sorted(catalogue.services)
    for row in rows:
        assert SEED_COLUMNS <= set(row), row
        svc = catalogue.services[row["name"]]
        assert row["allowed_nodes"] == sorted(svc.allowed_roles)
        assert row["run_groups"] == sorted(svc.run_groups)
        assert row["enabled"] is svc.enabled
    by_name = {r["name"]: r for r in rows}
    assert by_name["Cache Manager"]["schedule"] == "6 min +3"
    assert by_name["Backup Manager"]["schedule"] == "05:30"
    assert by_name["Backup Manager"]["run_groups"] == ["factors", "stats_processing"]
    kinds = [r["kind"] for r in rows]
    assert kinds == sorted(kinds, key=["daemon", "fixed", "periodic", "cron"].index)
    assert isinstance(body["now"], float)


def test_services_are_503_while_not_leading() -> None:
    catalogue = load_catalogue(DEFAULT_CATALOGUE)
    idle = Cluster(catalogue, SimClock(time.time(), 1.0), parse_nodes("n=Master"))
    port = _free_port()
    server = serve(idle.coordinator, port)  # never started: it does not lead
    try:
        reply = Api(port).call("GET", "/api/services")
        assert reply.status == 503
        assert "not the leader" in reply.json()["error"]
    finally:
        server.shutdown()
        server.server_close()
        idle.broker.close()


@pytest.mark.parametrize("name", ["50%25 off", "Café Reports"])
def test_unknown_service_error_names_it_exactly(api: Api, name: str) -> None:
    reply = api.run(name)
    assert reply.status == 404
    assert reply.json()["error"] == f"unknown service {name!r}"
