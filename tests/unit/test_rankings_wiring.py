"""RankingS driven by the leader, on an embedded in-memory cluster: three nodes probed every
second by a utility that behaves per node as a file says (tests/integration/catalogues/
rankings.toml). The ranking follows the nodes' behaviour, each change is a RankingUpdate on
`rota.events`, a `one` service with rank_by follows the best node and says so in its run
record, a failing node is taken out and comes back once it recovers; the REST routes and
CGRateS-shaped JSON-RPC answer from what the leader published. Also: what the leader writes
to the ledger lets a successor continue the stats, the schedule and the stored rankings.
"""

from __future__ import annotations

import json
import random
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from coordinator.adapters.events import MemoryEventBus
from coordinator.core.run import Run, RunState, Trigger
from coordinator.rankings import STATE, STORED, LeaderRankings
from protocol import RankingAlert, RankingUpdate, decode
from protocol.catalogue import load_catalogue
from protocol.clock import SystemClock
from protocol.schedule import zone
from rota.api import make_app
from rota.auth import Tokens
from rota.embedded import Cluster, parse_nodes
from rota.runs import MemoryRuns

CATALOGUE = Path(__file__).parents[1] / "integration" / "catalogues" / "rankings.toml"
TOKEN = "alice-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def wait_for(what: Callable[[], Any], timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = what()
        if found:
            return found
        time.sleep(0.05)
    raise AssertionError(f"not reached in {timeout} s: {what.__doc__ or what}")


def behave(path: Path, plan: dict[str, dict[str, Any]]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(plan))
    tmp.replace(path)


def catalogue_at(tmp: Path) -> tuple[Path, Path]:
    behaviour = tmp / "behaviour.json"
    text = CATALOGUE.read_text().replace("BEHAVIOUR", str(behaviour))
    path = tmp / "rankings.toml"
    path.write_text(text)
    return path, behaviour


@pytest.fixture
def world(tmp_path: Path) -> Iterator[tuple[Cluster, Path, list[tuple[str, Any]]]]:
    path, behaviour = catalogue_at(tmp_path)
    behave(behaviour, {"node-a": {"seconds": 0.05, "acc": 2.0}, "node-b": {"seconds": 0.4},
                       "node-c": {"fail": True}})
    cluster = Cluster(load_catalogue(path), SystemClock(),
                      parse_nodes("node-a=Worker;node-b=Worker;node-c=Worker"))
    events: list[tuple[str, Any]] = []
    lock = threading.Lock()
    assert isinstance(cluster.events, MemoryEventBus)

    def keep(key: str, body: bytes) -> None:
        with lock:
            events.append((key, decode(body)))

    cluster.events.subscribe("ranking.*", keep)
    cluster.start()
    try:
        yield cluster, behaviour, events
    finally:
        cluster.stop()


def order(cluster: Cluster) -> tuple[str, ...]:
    view = cluster.coordinator.rankings()
    ranking = view.rankings.get(("rota", "node-health")) if view else None
    return ranking.sorted_stat_ids if ranking else ()


def picks(cluster: Cluster, since: float) -> list[Any]:
    return [r for r in cluster.finished if r.service == "Pick" and r.state == "succeeded"
            and (r.queued_at or 0) > since]


def test_the_leader_ranks_exports_places_and_takes_out(
        world: tuple[Cluster, Path, list[tuple[str, Any]]]) -> None:
    cluster, behaviour, events = world
    coord = cluster.coordinator

    def ranked_a_b_c() -> bool:
        """node-a (fast) before node-b (slow) before node-c (failing)"""
        return order(cluster) == ("node-a", "node-b", "node-c")

    wait_for(ranked_a_b_c)
    ranking = coord.rankings().get_ranking("rota", "node-health")  # type: ignore[union-attr]
    assert ranking.metrics["node-c"]["*asr"] == 0.0
    assert ranking.metrics["node-a"]["*asr"] == 100.0
    assert set(ranking.metrics["node-a"]) == {"*asr", "*acd", "*runs"}  # metric_ids limit
    updates = [m for k, m in events if k == "ranking.update"]
    assert updates and all(isinstance(m, RankingUpdate) for m in updates)
    assert any(u.sorted_stat_ids == ["node-a", "node-b", "node-c"] for u in updates)

    def c_out() -> bool:
        """node-c out of placement, on the nodes view"""
        snap = coord.snapshot()
        return bool(snap) and any(n.id == "node-c" and n.out_of_placement for n in snap.nodes)

    wait_for(c_out)
    alerts = [m for k, m in events if k == "ranking.alert"]
    assert isinstance(alerts[0], RankingAlert)
    assert (alerts[0].threshold_id, alerts[0].state, alerts[0].node_out) == (
        "node-c-failing", "firing", "node-c")

    # A `one` service with rank_by goes to the best node and says why.
    since = time.time()
    first = wait_for(lambda: picks(cluster, since)[:3])
    assert {r.node for r in first} == {"node-a"}
    assert all(r.placement and r.placement.startswith("ranking node-health: best-ranked")
               for r in first)

    # node-a starts failing: node-b leads, and Pick follows it.
    behave(behaviour, {"node-a": {"fail": True}, "node-b": {"seconds": 0.4},
                       "node-c": {"fail": True}})

    def b_first() -> bool:
        """node-b first once node-a fails"""
        return order(cluster)[:1] == ("node-b",)

    wait_for(b_first)
    since = time.time() + 1.0
    later = wait_for(lambda: picks(cluster, since)[:2])
    assert {r.node for r in later} == {"node-b"}
    assert any(u.moved and u.sorted_stat_ids[0] == "node-b"
               for k, u in events if k == "ranking.update")

    # node-c recovers: it is placed on again, and the alert says so.
    behave(behaviour, {"node-a": {"fail": True}, "node-b": {"seconds": 0.4}, "node-c": {}})

    def c_back() -> bool:
        """node-c back in placement"""
        snap = coord.snapshot()
        return bool(snap) and any(n.id == "node-c" and not n.out_of_placement
                                  for n in snap.nodes)

    wait_for(c_back)
    recovered = [m for k, m in events if k == "ranking.alert" and m.state == "recovered"]
    assert recovered and recovered[0].node_out == "node-c"
    assert coord.rankings().nodes_out == frozenset()  # type: ignore[union-attr]


def test_rest_and_json_rpc_answer_cgrates_shaped_requests(
        world: tuple[Cluster, Path, list[tuple[str, Any]]]) -> None:
    cluster, _, _ = world
    wait_for(lambda: order(cluster) == ("node-a", "node-b", "node-c"))
    app = make_app(cluster.coordinator, MemoryRuns(cluster.finished, cluster.coordinator),
                   Tokens({"alice": TOKEN}))
    with TestClient(app) as client:
        listed = client.get("/api/v1/rankings").json()
        assert [r["id"] for r in listed["rankings"]] == ["node-health", "node-health-slow"]
        assert listed["rankings"][0]["ranking"]["SortedStatIDs"][2] == "node-c"
        one = client.get("/api/v1/rankings/rota/node-health").json()
        assert set(one) == {"Tenant", "ID", "LastUpdate", "Metrics", "Sorting",
                            "SortingParameters", "SortedStatIDs"}
        summary = client.get("/api/v1/rankings/rota/node-health/summary").json()
        assert set(summary) == {"Tenant", "ID", "LastUpdate", "SortedStatIDs"}
        missing = client.get("/api/v1/rankings/rota/nope")
        assert missing.status_code == 404 and "nope" in missing.json()["error"]
        sched = client.get("/api/v1/ranking-schedule/rota", params={"prefix": "node"}).json()
        assert [e["RankingID"] for e in sched["schedule"]] == ["node-health",
                                                                "node-health-slow"]
        sched = client.get("/api/v1/ranking-schedule/rota",
                           params={"prefix": "node-health-s"}).json()
        assert [e["RankingID"] for e in sched["schedule"]] == ["node-health-slow"]
        refused = client.post("/api/v1/ranking-schedule/rota", json={"ranking_ids": []})
        assert refused.status_code == 401
        done = client.post("/api/v1/ranking-schedule/rota", json={"ranking_ids":
                                                                  ["node-health"]},
                           headers=AUTH)
        assert done.json() == {"scheduled": 1}

        def rpc(body: str, headers: dict[str, str] | None = None) -> Any:
            reply = client.post("/jsonrpc", content=body,
                                headers={"Content-Type": "application/json", **(headers or {})})
            assert reply.status_code == 200
            return reply.json()

        got = rpc('{"method":"RankingSv1.GetRanking","params":[{"Tenant":"rota",'
                  '"ID":"node-health","APIOpts":{}}],"id":1}')
        assert got["id"] == 1 and got["error"] is None
        assert got["result"]["ID"] == "node-health"
        assert got["result"]["SortedStatIDs"][2] == "node-c"
        got = rpc('{"method":"RankingSv1.GetRankingSummary","params":[{"Tenant":"",'
                  '"ID":"node-health"}],"id":2}')
        assert got["error"] is None and got["result"]["Tenant"] == "rota"
        assert set(got["result"]) == {"Tenant", "ID", "LastUpdate", "SortedStatIDs"}
        got = rpc('{"method":"RankingSv1.GetRanking","params":[{"Tenant":"rota",'
                  '"ID":"nope","APIOpts":{}}],"id":3}')
        assert got == {"id": 3, "result": None, "error": "NOT_FOUND"}
        got = rpc('{"method":"RankingSv1.GetRanking","params":[{"Tenant":"rota"}],"id":4}')
        assert got == {"id": 4, "result": None, "error": "MANDATORY_IE_MISSING: [ID]"}
        got = rpc('{"method":"RankingSv1.GetSchedule","params":[{"Tenant":"rota",'
                  '"RankingIDPrefixes":["node-"],"APIOpts":{}}],"id":5}')
        assert got["error"] is None and got["result"][0]["RankingID"] == "node-health"
        assert got["result"][0]["Next"].endswith("Z")
        got = rpc('{"method":"RankingSv1.GetSchedule","params":[{"Tenant":"rota",'
                  '"RankingIDPrefixes":["other"]}],"id":6}')
        assert got == {"id": 6, "result": None, "error": "NOT_FOUND"}
        got = rpc('{"method":"RankingSv1.ScheduleQueries","params":[{"Tenant":"rota",'
                  '"RankingIDs":["node-health"],"APIOpts":{}}],"id":7}')
        assert got["result"] is None and got["error"].startswith("UNAUTHORIZED_API")
        got = rpc('{"method":"RankingSv1.ScheduleQueries","params":[{"Tenant":"rota",'
                  '"RankingIDs":["node-health"],"APIOpts":{}}],"id":8}', AUTH)
        assert got == {"id": 8, "result": 1, "error": None}
        got = rpc('{"method":"RankingSv1.ScheduleQueries","params":[{"Tenant":"rota",'
                  f'"RankingIDs":[],"APIOpts":{{"*apiKey":"{TOKEN}"}}}}],"id":9}}')
        assert got == {"id": 9, "result": 2, "error": None}  # all of the tenant's
        got = rpc('{"method":"RankingSv1.ScheduleQueries","params":[{"Tenant":"rota",'
                  '"RankingIDs":["nope"]}],"id":10}', AUTH)
        assert got["result"] is None and got["error"].startswith("NOT_FOUND")
        got = rpc('{"method":"RankingSv1.Nope","params":[{}],"id":11}')
        assert got == {"id": 11, "result": None,
                       "error": "rpc: can't find method RankingSv1.Nope"}
        nodes = client.get("/api/v1/nodes").json()["nodes"]
        assert all("out_of_placement" in n for n in nodes)


def ended(run_id: str, node: str, ok: bool, at: float) -> Run:
    run = Run(run_id, "Probe", Trigger.SCHEDULED, at - 1, at - 1, frozenset(), node=node,
              target=node, state=RunState.SUCCEEDED if ok else RunState.FAILED,
              dispatched_at=at - 1, started_at=at - 1, finished_at=at)
    run.metrics = {"acc": 1.0}
    return run


def test_a_successor_continues_stats_schedule_and_stored_rankings(tmp_path: Path) -> None:
    path, _ = catalogue_at(tmp_path)
    config = load_catalogue(path).rankings
    ledger: dict[str, bytes] = {}

    def commit(writes: dict[str, bytes | None]) -> None:
        for key, value in writes.items():
            if value is None:
                ledger.pop(key, None)
            else:
                ledger[key] = value

    t0 = 1_700_000_000.0
    first = LeaderRankings(config, zone("UTC"), random.Random(1))
    first.start({}, [], t0)
    commit(first.turn(t0, 1).writes)
    runs = [ended(f"r{i}", node, ok, t0 + 0.1 * i)
            for i, (node, ok) in enumerate([("node-a", True), ("node-b", False),
                                            ("node-c", True), ("node-a", True)])]
    first.feed(runs[:3], t0 + 0.5)
    out = first.turn(t0 + 1.0, 1)  # computed: stored synchronously (store_interval -1)
    commit(out.writes)
    assert _stored(ledger) == ["rankings/stored/rota/node-health"]
    assert any(k.startswith(STATE) for k in ledger)
    # A run the state has not taken yet: in the ledger's ended runs only.
    first.feed(runs[3:], t0 + 1.2)
    before = first.core.stats.metrics("rota", "node-a", t0 + 1.2)

    second = LeaderRankings(config, zone("UTC"), random.Random(2))
    second.start(ledger, runs, t0 + 1.5)
    assert second.core.stats.metrics("rota", "node-a", t0 + 1.5) == before
    assert second.view.get_ranking("rota", "node-health").sorted_stat_ids == \
        first.view.get_ranking("rota", "node-health").sorted_stat_ids
    assert second.core.scheduler.entries == first.core.scheduler.entries
    assert second.core.stats.metrics("rota", "node-b", t0 + 1.5)["*asr"] == 0.0


def test_state_parts_stay_bounded_and_shrink(tmp_path: Path) -> None:
    path, _ = catalogue_at(tmp_path)
    config = load_catalogue(path).rankings
    r = LeaderRankings(config, zone("UTC"), random.Random(1))
    r.start({}, [], 0.0)
    writes = r.flush(1.0)
    assert [k for k in writes if k.startswith(STATE)] == [f"{STATE}0"]
    r._parts = 3  # as if a larger state had been written before
    writes = r.flush(2.0)
    assert writes[f"{STATE}1"] is None and writes[f"{STATE}2"] is None


def _stored(ledger: dict[str, bytes]) -> list[str]:
    return sorted(k for k in ledger if k.startswith(STORED))


def test_a_clean_shutdown_stores_what_the_interval_had_not(tmp_path: Path) -> None:
    path, behaviour = catalogue_at(tmp_path)
    path.write_text(path.read_text().replace("store_interval = -1", "store_interval = 3600"))
    behave(behaviour, {"node-c": {"fail": True}})
    cluster = Cluster(load_catalogue(path), SystemClock(),
                      parse_nodes("node-a=Worker;node-b=Worker;node-c=Worker"))
    cluster.start()
    ledger = cluster._memory.store.ledger
    try:
        # Ranked with the failing node last (until its failures are in, it may rank anywhere).
        wait_for(lambda: len(order(cluster)) == 3 and order(cluster)[2] == "node-c")
        assert _stored(ledger) == []  # an hour's interval: not stored yet
        stored_view = cluster.coordinator.rankings()
    finally:
        cluster.stop()
    assert _stored(ledger) == ["rankings/stored/rota/node-health"]
    assert stored_view is not None
    successor = LeaderRankings(load_catalogue(path).rankings, zone("UTC"))
    successor.start(dict(ledger), [], time.time())
    kept = successor.view.get_ranking("rota", "node-health")
    assert kept.sorted_stat_ids[2] == "node-c"
    # stored as RFC 3339 with microseconds
    assert kept.last_update >= stored_view.get_ranking("rota", "node-health").last_update - 1e-6


def test_with_every_computation_the_state_is_written_on_computations_only(
        tmp_path: Path) -> None:
    path, _ = catalogue_at(tmp_path)
    r = LeaderRankings(load_catalogue(path).rankings, zone("UTC"), random.Random(1))
    t0 = 1_700_000_000.0
    r.start({}, [], t0)
    assert any(k.startswith(STATE) for k in r.turn(t0, 1).writes)  # the first turn
    r.feed([ended("x1", "node-a", True, t0 + 0.1)], t0 + 0.1)
    assert r.turn(t0 + 0.2, 1).writes == {}  # a run alone writes nothing
    out = r.turn(t0 + 1.0, 1)  # node-health is due: computed, stored, state written
    assert sorted(k for k in out.writes if not k.startswith(STATE)) == [
        "rankings/stored/rota/node-health"]
    assert any(k.startswith(STATE) for k in out.writes)
