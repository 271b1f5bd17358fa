"""RankingS on a real cluster: two coordinators and three workers as processes on real
RabbitMQ and ZooKeeper, every node probed each second by a utility that behaves per node as
a file says (tests/integration/catalogues/rankings.toml).

Observed from the outside (the HTTP API and `rota.events`): the nodes are ranked by success
and speed; the ranking follows when a node starts failing; each change is a RankingUpdate
event; a `one` service with rank_by runs on the best node and its run record says why; a
failing node is taken out of placement and comes back after it recovers; a ranking stored
by a leader killed with SIGKILL is what its successor serves, with its schedule.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from protocol import RankingAlert, RankingUpdate, RunRecord
from tests.harness import Cluster, EventRecorder, free_port, poll_until, running_cluster

CATALOGUE = Path(__file__).parent / "catalogues" / "rankings.toml"
NODES = ("node-a", "node-b", "node-c")


def _get(port: int, path: str) -> Any:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as resp:
        return json.loads(resp.read())


def _behave(path: Path, plan: dict[str, dict[str, Any]]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(plan))
    tmp.replace(path)


def test_rankings_follow_the_nodes_place_take_out_and_survive_a_sigkill(
        amqp_url: str, zk_hosts: str, tmp_path: Path) -> None:
    behaviour = tmp_path / "behaviour.json"
    _behave(behaviour, {"node-a": {"seconds": 0.05}, "node-b": {"seconds": 0.5},
                        "node-c": {"fail": True}})
    catalogue = tmp_path / "rankings.toml"
    catalogue.write_text(CATALOGUE.read_text().replace("BEHAVIOUR", str(behaviour)))
    with running_cluster(amqp_url, zk_hosts, catalogue, tmp_path) as (c, rec):
        _run(c, rec, behaviour)


def _run(c: Cluster, rec: EventRecorder, behaviour: Path) -> None:
    for node in NODES:
        c.worker(node, "Worker")
    ports = {"coord-a": free_port(), "coord-b": free_port()}
    c.coordinator("coord-a", http_port=ports["coord-a"])
    leader = poll_until("coord-a leads", lambda: c.leader() == "coord-a" and "coord-a",
                        context=c.logs)
    c.coordinator("coord-b", http_port=ports["coord-b"])
    port = ports[leader]

    def health() -> dict[str, Any]:
        body: dict[str, Any] = _get(port, "/api/v1/rankings/rota/node-health")
        return body

    # Ranked by success, then speed: fast node-a, slow node-b, failing node-c.
    poll_until("ranked a, b, c",
               lambda: health()["SortedStatIDs"] == ["node-a", "node-b", "node-c"], context=c.logs)
    ranking = health()
    assert ranking["Metrics"]["node-c"]["*asr"] == 0.0
    assert ranking["Metrics"]["node-a"]["*acd"] < ranking["Metrics"]["node-b"]["*acd"]
    poll_until("the update on rota.events", lambda: any(
        isinstance(u, RankingUpdate) and u.id == "node-health"
        and u.sorted_stat_ids == ["node-a", "node-b", "node-c"] for u in list(rec.rankings)),
        context=c.logs)

    # node-c is taken out of placement: on the nodes view and as an alert.
    def out_nodes() -> set[str]:
        return {n["id"] for n in _get(port, "/api/v1/nodes")["nodes"] if n["out_of_placement"]}

    poll_until("node-c out", lambda: out_nodes() == {"node-c"}, context=c.logs)
    # The page shows the turn's state at once; its events reach `rota.events` after the
    # turn's ledger commit, so the alert may arrive a moment later.
    fired = poll_until("the alert on rota.events", lambda: [
        m for m in list(rec.rankings) if isinstance(m, RankingAlert)], context=c.logs)
    assert (fired[0].threshold_id, fired[0].state, fired[0].node_out) == (
        "node-c-failing", "firing", "node-c")

    # A `one` service with rank_by runs on the best node and says so.
    def picks(after: float) -> list[RunRecord]:
        return [r for r in rec.finals() if r.service == "Pick" and r.state == "succeeded"
                and (r.queued_at or 0) > after]

    since = time.time()
    first = poll_until("Pick ran", lambda: picks(since)[:3], context=c.logs)
    assert {r.node for r in first} == {"node-a"}, [(r.node, r.placement) for r in first]
    assert all((r.placement or "").startswith("ranking node-health: best-ranked")
               for r in first)

    # node-a starts failing: node-b is first, and Pick follows it.
    _behave(behaviour, {"node-a": {"fail": True}, "node-b": {"seconds": 0.5},
                        "node-c": {"fail": True}})
    poll_until("node-b first", lambda: health()["SortedStatIDs"][0] == "node-b", context=c.logs)
    since = time.time() + 1.0
    later = poll_until("Pick ran again", lambda: picks(since)[:3], context=c.logs)
    assert {r.node for r in later} == {"node-b"}, [(r.node, r.placement) for r in later]
    moved = poll_until("the move on rota.events", lambda: [
        m for m in list(rec.rankings) if isinstance(m, RankingUpdate)
        and m.id == "node-health" and m.sorted_stat_ids[:1] == ["node-b"]], context=c.logs)
    assert any(mv["stat_id"] == "node-b" and mv["after"] == 0
                         for mv in moved[0].moved)

    # node-c recovers and comes back.
    _behave(behaviour, {"node-a": {"fail": True}, "node-b": {"seconds": 0.5}, "node-c": {}})
    poll_until("node-c back", lambda: out_nodes() == set(), context=c.logs)
    back = poll_until("the recovery on rota.events", lambda: [
        m for m in list(rec.rankings) if isinstance(m, RankingAlert) and m.state == "recovered"],
        context=c.logs)
    assert back[0].node_out == "node-c"

    # A stored ranking survives a SIGKILL of the leader: the successor serves the last one
    # computed (every 20 s) before its next computation is due, and keeps its schedule.
    def slow() -> dict[str, Any]:
        body: dict[str, Any] = _get(port, "/api/v1/rankings/rota/node-health-slow")
        return body

    seen = poll_until("node-health-slow computed", lambda: slow()["LastUpdate"],
                      context=c.logs, timeout=40)
    last = poll_until("node-health-slow computed again",
                      lambda: slow()["LastUpdate"] != seen and slow(), context=c.logs, timeout=40)
    c.procs[leader].kill()
    successor = poll_until("coord-b leads", lambda: c.leader() == "coord-b" and "coord-b",
                           context=c.logs)
    port = ports[successor]
    served = poll_until("the successor serves node-health-slow", slow, context=c.logs)
    assert served == last
    (entry,) = _get(port, "/api/v1/ranking-schedule/rota?prefix=node-health-slow")["schedule"]
    assert entry["Next"] > time.time() - 1
    # node-health goes on being computed by the successor from the stats it took over.
    poll_until("the successor computes node-health",
               lambda: health()["Metrics"]["node-b"]["*runs"] == 4.0, context=c.logs)
