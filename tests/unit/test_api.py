"""The operators' HTTP API against an embedded in-memory cluster (the shipped catalogue).

Every bad call gets a 4xx naming the field and changes nothing; a refused edit is in the
change log as a refusal, an applied one with who, the old and the new value; a manual run is
followed to its outcome; a coordinator that does not lead says so.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import pytest
from fastapi.testclient import TestClient

from protocol.catalogue import load_catalogue
from protocol.clock import SimClock
from rota.api import MAX_BODY, make_app
from rota.auth import Tokens
from rota.cli import DEFAULT_CATALOGUE
from rota.embedded import DEFAULT_NODES, Cluster, parse_nodes
from rota.runs import MemoryRuns

ALICE = "alice-token-0123456789"
BOB = "bob-token-0123456789ab"
AUTH = {"Authorization": f"Bearer {ALICE}"}


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    c = Cluster(load_catalogue(DEFAULT_CATALOGUE), SimClock(time.time(), 60.0),
                parse_nodes(DEFAULT_NODES))
    c.start()
    try:
        yield c
    finally:
        c.stop()


@pytest.fixture(scope="module")
def client(cluster: Cluster) -> Iterator[TestClient]:
    app = make_app(cluster.coordinator, MemoryRuns(cluster.finished, cluster.coordinator),
                   Tokens({"alice": ALICE, "bob": BOB}))
    with TestClient(app) as c:
        yield c


def definition(client: TestClient, name: str) -> dict[str, Any]:
    reply = client.get(f"/api/v1/services/{name}")
    assert reply.status_code == 200, reply.text
    return dict(reply.json()["service"]["definition"])


def changes(client: TestClient, service: str) -> list[dict[str, Any]]:
    reply = client.get("/api/v1/changes", params={"service": service})
    assert reply.status_code == 200
    return list(reply.json()["changes"])


# -- reads -----------------------------------------------------------------------------------


def test_leader_names_this_coordinator_and_its_epoch(client: TestClient) -> None:
    body = client.get("/api/v1/leader").json()
    assert body["this"] == "embedded" and body["leader"] == "embedded"
    assert body["is_leader"] is True and body["epoch"] >= 1
    assert isinstance(body["now"], float)


def test_services_carry_the_seed_columns_and_the_definition(client: TestClient) -> None:
    body = client.get("/api/v1/services").json()
    catalogue = load_catalogue(DEFAULT_CATALOGUE)
    rows = {r["name"]: r for r in body["services"]}
    assert set(rows) == set(catalogue.services)
    cache = rows["Cache Manager"]
    assert cache["schedule"] == "6 min +3" and cache["kind"] == "periodic"
    assert cache["definition"] == {"kind": "periodic", "enabled": True, "period": 6,
                                   "align": 3, "run_at": [], "cron": None}
    backup = rows["Backup Manager"]
    assert backup["definition"]["run_at"] == ["05:30"]
    assert backup["run_groups"] == ["factors", "stats_processing"]
    for row in rows.values():
        assert {"status", "allowed_nodes", "last_run", "in_queue", "group"} <= set(row)
    assert body["leader"] == "embedded" and body["epoch"] >= 1


def test_nodes_list_roles_and_the_daemons_running_there(client: TestClient) -> None:
    deadline = time.monotonic() + 10
    while True:
        nodes = {n["id"]: n for n in client.get("/api/v1/nodes").json()["nodes"]}
        if "Calculator" in nodes.get("processing-1", {}).get("daemons", []) or \
                time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert set(nodes) == {"master-1", "redundancy-1", "processing-1"}
    assert nodes["processing-1"]["roles"] == ["Calculation", "Processing"]
    assert "Calculator" in nodes["processing-1"]["daemons"]
    assert "Calculator" not in nodes["redundancy-1"]["daemons"]
    assert all(n["live_since"] is not None for n in nodes.values())


def test_openapi_and_the_page_are_served(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    assert {"/api/v1/services", "/api/v1/services/{name}", "/api/v1/services/{name}/run",
            "/api/v1/runs", "/api/v1/requests/{request_id}", "/api/v1/nodes",
            "/api/v1/changes", "/api/v1/leader"} <= set(spec["paths"])
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    metrics = client.get("/metrics")
    assert "rota_leader 1.0" in metrics.text


def test_a_name_with_a_slash_is_one_service(client: TestClient) -> None:
    name = quote("Statistics Manager / Meta Info", safe="")
    reply = client.get(f"/api/v1/services/{name}")
    assert reply.status_code == 200, reply.text
    assert reply.json()["service"]["name"] == "Statistics Manager / Meta Info"
    reply = client.post(f"/api/v1/services/{name}/run", json={}, headers=AUTH)
    assert reply.status_code == 202, reply.text
    reply = client.get(f"/api/v1/services/{quote('50% off', safe='')}")
    assert reply.json() == {"error": "unknown service '50% off'", "field": "service"}


def test_an_unknown_route_names_itself(client: TestClient) -> None:
    reply = client.get("/api/v1/nothing-here")
    assert reply.status_code == 404
    assert reply.json()["error"] == "no route GET /api/v1/nothing-here"


# -- bad edits: a 4xx naming the field, nothing changed, the refusal recorded -------------


@pytest.mark.parametrize("body, field, says", [
    ({"period": "5"}, "period", "expected an integer, got '5'"),
    ({"enabled": "yes"}, "enabled", "expected true or false, got 'yes'"),
    ({"align": 1.5}, "align", "expected an integer, got 1.5"),
    ({"period": 61}, "period", "period 61 is over 60 minutes: use fixed time instead"),
    ({"period": 0}, "period", "period 0 is below 1 minute"),
    ({"period": 5, "align": 5}, "align", "align 5 must be between 0 and period-1 (4)"),
    ({"align": 6}, "align", "align 6 must be between 0 and period-1 (5)"),
    ({"run_at": ["05:30", "25:00"]}, "run_at",
     "bad run time '25:00': expected HH:MM, 00:00 to 23:59"),
    ({"run_at": []}, "run_at", "must not be empty"),
    ({"cron": "61 * * * *"}, "cron", "bad cron expression '61 * * * *'"),
    ({"period": 5, "cron": "* * * * *"}, "cron", "give one of period, run_at or cron"),
])
def test_a_bad_edit_is_refused_naming_the_field_and_recorded(
    client: TestClient, body: dict[str, Any], field: str, says: str
) -> None:
    before = definition(client, "Cache Manager")
    reply = client.patch("/api/v1/services/Cache Manager", json=body, headers=AUTH)
    assert reply.status_code == 422, reply.text
    answer = reply.json()
    assert answer["field"] == field
    assert says in answer["error"]
    assert definition(client, "Cache Manager") == before
    last = changes(client, "Cache Manager")[0]
    assert (last["outcome"], last["field"], last["by"]) == ("refused", field, "alice")
    assert says in last["reason"]
    assert last["old"] == (True if field == "enabled" else "6 min +3")


def test_the_schedule_of_a_daemon_cannot_be_edited(client: TestClient) -> None:
    reply = client.patch("/api/v1/services/Calculator", json={"period": 5}, headers=AUTH)
    assert reply.status_code == 422
    assert reply.json() == {
        "error": "'Calculator' is a daemon: it has no schedule to edit", "field": "period",
        "change": reply.json()["change"]}


def test_an_unknown_service_is_404_naming_it(client: TestClient) -> None:
    for method, path in (("PATCH", "/api/v1/services/No Such"),
                         ("POST", "/api/v1/services/No Such/run"),
                         ("GET", "/api/v1/services/No Such")):
        reply = client.request(method, path, json={"enabled": False}
                               if method == "PATCH" else {}, headers=AUTH)
        assert reply.status_code == 404, (method, reply.text)
        assert reply.json() == {"error": "unknown service 'No Such'", "field": "service"}


@pytest.mark.parametrize("body, field", [
    ({"priority": 3}, "priority"),
    ([1, 2], "body"),
    ({}, "body"),
])
def test_a_body_that_is_not_an_edit_is_422(client: TestClient, body: Any, field: str) -> None:
    before = definition(client, "Cache Manager")
    reply = client.patch("/api/v1/services/Cache Manager", json=body, headers=AUTH)
    assert reply.status_code == 422 and reply.json()["field"] == field
    assert definition(client, "Cache Manager") == before


def test_an_oversize_body_is_413_and_changes_nothing(client: TestClient) -> None:
    before = definition(client, "Cache Manager")
    recorded = len(changes(client, "Cache Manager"))
    big = '{"enabled": false, "pad": "' + "x" * MAX_BODY + '"}'
    for path, method in (("/api/v1/services/Cache Manager", "PATCH"),
                         ("/api/v1/services/Cache Manager/run", "POST")):
        reply = client.request(method, path, content=big, headers=AUTH)
        assert reply.status_code == 413
        assert reply.json()["field"] == "body"
    assert definition(client, "Cache Manager") == before
    assert len(changes(client, "Cache Manager")) == recorded


@pytest.mark.parametrize("headers", [
    {}, {"Authorization": "Bearer not-the-token-at-all"}, {"Authorization": ALICE},
    {"Authorization": f"Basic {ALICE}"},
])
def test_writes_without_the_right_token_are_401_and_change_nothing(
    client: TestClient, cluster: Cluster, headers: dict[str, str]
) -> None:
    before = definition(client, "Mail Manager")
    recorded = len(changes(client, "Mail Manager"))
    runs_before = {r.run_id for r in cluster.finished}
    reply = client.patch("/api/v1/services/Mail Manager", json={"enabled": False},
                         headers=headers)
    assert reply.status_code == 401
    assert reply.headers["www-authenticate"] == "Bearer"
    assert "token" in reply.json()["error"]
    reply = client.post("/api/v1/services/Mail Manager/run", json={}, headers=headers)
    assert reply.status_code == 401
    time.sleep(0.5)
    assert definition(client, "Mail Manager") == before
    assert len(changes(client, "Mail Manager")) == recorded
    snap = cluster.coordinator.snapshot()
    assert snap is not None and not [r for r in snap.runs if r.service == "Mail Manager"
                                     and r.trigger == "manual"]
    assert not [r for r in cluster.finished if r.run_id not in runs_before
                and r.service == "Mail Manager" and r.trigger == "manual"]


# -- good edits and runs ----------------------------------------------------------------------


def test_an_edit_applies_and_the_change_log_says_who_and_what(client: TestClient) -> None:
    reply = client.patch("/api/v1/services/Email Rates Manager",
                         json={"period": 5, "align": 2}, headers={"Authorization": f"Bearer {BOB}"})
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body["service"]["schedule"] == "5 min +2"
    assert body["service"]["definition"]["period"] == 5
    change = body["change"]
    assert (change["by"], change["field"], change["new"], change["outcome"]) == (
        "bob", "schedule", "5 min +2", "applied")
    assert change["old"] != "5 min +2" and change["reason"] is None
    assert changes(client, "Email Rates Manager")[0] == change
    # the same edit again changes nothing and records nothing
    again = client.patch("/api/v1/services/Email Rates Manager",
                         json={"period": 5, "align": 2}, headers=AUTH).json()
    assert again["changes"] == [] and again["change"] is None
    assert len(changes(client, "Email Rates Manager")) == 1


def test_disable_then_enable_is_two_changes_newest_first(client: TestClient) -> None:
    assert client.patch("/api/v1/services/Mail Manager", json={"enabled": False},
                        headers=AUTH).json()["service"]["status"] == "disabled"
    assert client.patch("/api/v1/services/Mail Manager", json={"enabled": True},
                        headers=AUTH).json()["service"]["enabled"] is True
    log = changes(client, "Mail Manager")
    assert [(c["field"], c["old"], c["new"]) for c in log[:2]] == [
        ("enabled", False, True), ("enabled", True, False)]
    assert log[0]["at"] >= log[1]["at"]


def _outcome(client: TestClient, request_id: str) -> dict[str, Any]:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        body = client.get(f"/api/v1/requests/{request_id}").json()
        if body["state"] in ("succeeded", "failed", "refused"):
            return dict(body)
        time.sleep(0.05)
    raise AssertionError(f"request {request_id} has no outcome: {body}")


def test_a_manual_run_is_followed_to_its_outcome(client: TestClient) -> None:
    reply = client.post("/api/v1/services/Summary/run", json={}, headers=AUTH)
    assert reply.status_code == 202, reply.text
    request_id = reply.json()["request_id"]
    assert reply.json()["run_ids"] == [f"manual-{request_id}"]
    body = _outcome(client, request_id)
    assert body["state"] in ("succeeded", "failed")
    (run,) = body["runs"]
    assert run["service"] == "Summary" and run["trigger"] == "manual"
    assert run["requested_by"] == "alice" and run["node"] is not None
    assert run["started_at"] is not None and run["duration"] is not None
    history = client.get("/api/v1/runs", params={"service": "Summary", "limit": 5}).json()
    assert run["run_id"] in [r["run_id"] for r in history["runs"]]
    shown = client.get("/api/v1/services/Summary").json()["runs"]
    assert run["run_id"] in [r["run_id"] for r in shown]


def test_a_run_on_a_named_node_runs_there_only(client: TestClient) -> None:
    reply = client.post("/api/v1/services/Cache Manager/run", json={"node": "redundancy-1"},
                        headers=AUTH)
    assert reply.status_code == 202, reply.text
    request_id = reply.json()["request_id"]
    assert reply.json()["run_ids"] == [f"manual-{request_id}@redundancy-1"]
    body = _outcome(client, request_id)
    assert [r["node"] for r in body["runs"]] == ["redundancy-1"]


@pytest.mark.parametrize("service, body, field, says", [
    ("Calculator", {}, "service", "'Calculator' is a daemon: daemons cannot be run manually"),
    ("Summary", {"node": "nowhere-1"}, "node", "node 'nowhere-1' is not live"),
    ("Summary", {"node": "redundancy-1"}, "node", "holds no role"),
])
def test_a_refused_run_is_409_with_the_reason(
    client: TestClient, service: str, body: dict[str, Any], field: str, says: str
) -> None:
    reply = client.post(f"/api/v1/services/{service}/run", json=body, headers=AUTH)
    assert reply.status_code == 409, reply.text
    answer = reply.json()
    assert answer["field"] == field and says in answer["error"]
    assert _outcome(client, answer["request_id"])["state"] == "refused"


def test_history_filters_by_service_node_outcome_and_limit(client: TestClient) -> None:
    runs = client.get("/api/v1/runs", params={"node": "redundancy-1", "limit": 3}).json()
    assert 0 < len(runs["runs"]) <= 3
    assert {r["node"] for r in runs["runs"]} == {"redundancy-1"}
    ok = client.get("/api/v1/runs", params={"outcome": "succeeded"}).json()["runs"]
    assert ok and {r["outcome"] for r in ok} == {"succeeded"}
    ends = [r["finished_at"] for r in ok]
    assert ends == sorted(ends, reverse=True)
    assert client.get("/api/v1/runs", params={"limit": 0}).json()["field"] == "limit"
    assert client.get("/api/v1/runs", params={"since": "soon"}).status_code == 422


# -- configuration ------------------------------------------------------------------------------


def test_reads_need_a_token_when_protected(cluster: Cluster) -> None:
    app = make_app(cluster.coordinator, MemoryRuns(cluster.finished, cluster.coordinator),
                   Tokens({"alice": ALICE}), protect_reads=True)
    with TestClient(app) as c:
        assert c.get("/api/v1/services").status_code == 401
        assert c.get("/api/v1/services", headers=AUTH).status_code == 200


def test_without_tokens_every_write_is_refused(cluster: Cluster) -> None:
    app = make_app(cluster.coordinator, MemoryRuns(cluster.finished, cluster.coordinator),
                   Tokens())
    with TestClient(app) as c:
        reply = c.patch("/api/v1/services/Summary", json={"enabled": False}, headers=AUTH)
        assert reply.status_code == 401 and "no operator token" in reply.json()["error"]
        assert c.get("/api/v1/services").status_code == 200


def test_a_standby_answers_who_leads_and_refuses_the_rest() -> None:
    idle = Cluster(load_catalogue(DEFAULT_CATALOGUE), SimClock(time.time(), 1.0),
                   parse_nodes("n=Master"))
    try:
        app = make_app(idle.coordinator, MemoryRuns(idle.finished, idle.coordinator),
                       Tokens({"alice": ALICE}))
        with TestClient(app) as c:
            body = c.get("/api/v1/leader").json()
            assert body["is_leader"] is False and body["this"] == "embedded"
            for method, path in (("GET", "/api/v1/services"), ("GET", "/api/v1/nodes"),
                                 ("PATCH", "/api/v1/services/Summary")):
                reply = c.request(method, path, json={"enabled": False}, headers=AUTH)
                assert reply.status_code == 503, (path, reply.text)
                assert "not the leader" in reply.json()["error"]
                assert "leader" in reply.json()
    finally:
        idle.transport.close()
