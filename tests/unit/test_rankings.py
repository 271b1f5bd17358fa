"""RankingS as the leader drives it: runs in, scheduled computations, RankingUpdates,
store_interval, thresholds and their node actions, GetRanking, failover state."""

from __future__ import annotations

import random

import msgpack
import pytest

from coordinator.core.ranking import Moved, Ranking
from coordinator.core.ranking_thresholds import ReturnNode, TakeNodeOut, ThresholdAlert
from coordinator.core.rankings import RankingNotFound, RankingS
from coordinator.core.stats import FinishedRun
from protocol.rankings import (
    RankingProfile,
    RankingsConfig,
    RankingsSettings,
    StatQueueProfile,
    ThresholdProfile,
)
from protocol.schedule import zone

T0 = 1_750_000_000.0
NODES = ("n1", "n2", "n3")


def config(store_interval: float = 0.0, thresholds: tuple[ThresholdProfile, ...] = (),
           stored: bool = True, threshold_ids: tuple[str, ...] = ()) -> RankingsConfig:
    stats = [StatQueueProfile("rota", f"node-{n}", nodes=frozenset({n}), queue_length=4,
                              metric_ids=("*asr", "*acd")) for n in NODES]
    profiles = [
        RankingProfile("rota", "health", "@every 1m", tuple(s.id for s in stats),
                       sorting="*desc", sorting_parameters=("*asr", "*acd:false"),
                       stored=stored, threshold_ids=threshold_ids),
        RankingProfile("rota", "speed", "@every 10m", tuple(s.id for s in stats),
                       metric_ids=("*acd",), sorting="*asc", sorting_parameters=("*acd",)),
    ]
    return RankingsConfig(
        settings=RankingsSettings(store_interval=store_interval),
        stats={(s.tenant, s.id): s for s in stats},
        rankings={(p.tenant, p.id): p for p in profiles},
        thresholds={(t.tenant, t.id): t for t in thresholds},
    )


def rankings(cfg: RankingsConfig | None = None) -> RankingS:
    r = RankingS(cfg or config(), zone("UTC"), random.Random(5))
    assert r.start(T0) == 2
    return r


def feed(r: RankingS, node: str, outcome: str, duration: float, now: float) -> None:
    r.run_finished(FinishedRun("S", node, "scheduled", outcome, slot=now - duration,
                               queued_at=now - duration, dispatched_at=now - duration,
                               started_at=now - duration, finished_at=now), now)


def healthy_world(r: RankingS, now: float) -> None:
    """n1 fast and reliable, n2 reliable but slow, n3 failing half its runs."""
    for i in range(4):
        feed(r, "n1", "succeeded", 1.0, now)
        feed(r, "n2", "succeeded", 5.0, now)
        feed(r, "n3", "failed" if i % 2 else "succeeded", 1.0, now)


def test_scheduled_computation_ranks_and_exports_an_update() -> None:
    r = rankings()
    healthy_world(r, T0 + 1)
    assert r.next_wakeup() == T0 + 60
    assert r.tick(T0 + 59).computed == []
    turn = r.tick(T0 + 60)
    assert turn.computed == [("rota", "health")]
    ranking = r.get_ranking("rota", "health")
    assert ranking.sorted_stat_ids == ("node-n1", "node-n2", "node-n3")
    assert ranking.metrics["node-n3"] == {"*asr": 50.0, "*acd": 1.0}
    assert [u.sorted_stat_ids for u in turn.updates] == [("node-n1", "node-n2", "node-n3")]
    assert r.get_ranking_summary("rota", "health").sorted_stat_ids == ranking.sorted_stat_ids
    assert r.node_order("health") == ["n1", "n2", "n3"]


def test_the_ranking_follows_behaviour_and_says_what_moved() -> None:
    r = rankings()
    healthy_world(r, T0 + 1)
    r.tick(T0 + 60)
    for _ in range(4):  # n1 starts failing every run
        feed(r, "n1", "failed", 1.0, T0 + 70)
    turn = r.tick(T0 + 120)
    (update,) = turn.updates
    assert update.sorted_stat_ids == ("node-n2", "node-n3", "node-n1")
    assert set(update.moved) == {Moved("node-n2", 1, 0), Moved("node-n3", 2, 1),
                                 Moved("node-n1", 0, 2)}
    # Nothing changed: computed, but no update.
    turn = r.tick(T0 + 180)
    assert turn.computed == [("rota", "health")] and turn.updates == []


def test_get_ranking_of_an_unknown_or_uncomputed_ranking() -> None:
    r = rankings()
    with pytest.raises(RankingNotFound, match="no ranking profile 'nope'"):
        r.get_ranking("rota", "nope")
    with pytest.raises(RankingNotFound, match="not computed yet"):
        r.get_ranking_summary("rota", "health")
    with pytest.raises(RankingNotFound):
        r.compute("other", "health", T0)


def test_store_interval_zero_never_stores() -> None:
    r = rankings(config(store_interval=0))
    healthy_world(r, T0)
    assert r.tick(T0 + 60).store == []
    assert r.flush() == []


def test_store_interval_minus_one_stores_every_computation_of_stored_profiles() -> None:
    r = rankings(config(store_interval=-1))
    healthy_world(r, T0)
    turn = r.tick(T0 + 60)
    assert [k.id for k in turn.store] == ["health"]
    assert [k.id for k in r.tick(T0 + 120).store] == ["health"]  # unchanged, stored again
    turn = r.tick(T0 + 600)  # "speed" is computed too, but it is not Stored
    assert [k.id for k in turn.store] == ["health"]
    assert ("rota", "speed") in turn.computed


def test_store_interval_positive_stores_changed_rankings_at_the_interval() -> None:
    r = rankings(config(store_interval=150))
    healthy_world(r, T0)
    assert r.tick(T0 + 60).store == []  # changed, waits for the interval
    assert r.next_wakeup() == T0 + 120  # the next computation comes before the store
    assert r.tick(T0 + 120).store == []
    turn = r.tick(T0 + 150)
    assert [k.id for k in turn.store] == ["health"]
    assert turn.store[0].last_update == T0 + 120
    assert r.tick(T0 + 300).store == []  # nothing changed since: nothing stored


def test_flush_at_clean_shutdown_stores_what_changed() -> None:
    r = rankings(config(store_interval=3600))
    healthy_world(r, T0)
    r.tick(T0 + 60)
    assert [k.id for k in r.flush()] == ["health"]
    assert r.flush() == []


def test_stored_rankings_are_loaded_for_stored_profiles_only() -> None:
    stored = [Ranking("rota", "health", T0, {"node-n2": {"*asr": 1.0}}, "*desc", ("*asr",),
                      ("node-n2",)),
              Ranking("rota", "speed", T0, {}, "*asc", ("*acd",), ())]
    r = RankingS(config(), zone("UTC"), random.Random(1))
    r.start(T0, stored=stored)
    assert r.get_ranking("rota", "health") == stored[0]
    with pytest.raises(RankingNotFound):
        r.get_ranking("rota", "speed")
    assert r.node_order("health") == ["n2"]


def last_threshold(**kw: object) -> ThresholdProfile:
    base: dict[str, object] = dict(tenant="rota", id="n3-last", stat_id="node-n3",
                                   kind="last", ranking_ids=("health",), updates=2,
                                   take_out_node="n3")
    base.update(kw)
    return ThresholdProfile(**base)  # type: ignore[arg-type]


def test_last_for_n_updates_takes_the_node_out_until_it_recovers() -> None:
    r = rankings(config(thresholds=(last_threshold(),)))
    healthy_world(r, T0)
    assert r.tick(T0 + 60).actions == []  # last once
    actions = r.tick(T0 + 120).actions  # last twice: fires
    assert [type(a) for a in actions] == [ThresholdAlert, TakeNodeOut]
    alert = actions[0]
    assert isinstance(alert, ThresholdAlert)
    assert (alert.threshold_id, alert.ranking_id, alert.stat_id, alert.state, alert.at) == (
        "n3-last", "health", "node-n3", "firing", T0 + 120)
    assert actions[1] == TakeNodeOut("n3", "rota", "n3-last", alert.message)
    assert r.nodes_out() == {"n3"}
    assert r.node_order("health") == ["n1", "n2"]
    assert r.tick(T0 + 180).actions == []  # fires once
    for _ in range(4):
        feed(r, "n3", "succeeded", 0.5, T0 + 200)  # n3 recovers: best now
    actions = r.tick(T0 + 240).actions
    assert [(type(a), getattr(a, "state", None)) for a in actions] == [
        (ThresholdAlert, "recovered"), (ReturnNode, None)]
    assert actions[1] == ReturnNode("n3", "rota", "n3-last")
    assert r.nodes_out() == frozenset()
    assert r.node_order("health")[0] == "n3"


def test_metric_crossing_a_value() -> None:
    below = ThresholdProfile("rota", "asr-low", "node-n3", "below", metric="*asr", value=60.0)
    above = ThresholdProfile("rota", "slow", "node-n2", "above", metric="*acd", value=4.0,
                             ranking_ids=("health",))
    r = rankings(config(thresholds=(below, above)))
    healthy_world(r, T0)
    actions = r.tick(T0 + 60).actions
    assert sorted((a.threshold_id, a.state) for a in actions
                  if isinstance(a, ThresholdAlert)) == [("asr-low", "firing"), ("slow", "firing")]
    assert r.nodes_out() == frozenset()  # no take_out_node: alerts only


def test_na_crosses_nothing() -> None:
    below = ThresholdProfile("rota", "asr-low", "node-n1", "below", metric="*asr", value=60.0)
    cfg = config(thresholds=(below,))
    short = {k: StatQueueProfile(s.tenant, s.id, nodes=s.nodes, min_items=10,
                                 metric_ids=s.metric_ids) for k, s in cfg.stats.items()}
    r = rankings(RankingsConfig(cfg.settings, short, cfg.rankings, cfg.thresholds))
    healthy_world(r, T0)
    turn = r.tick(T0 + 60)
    assert r.get_ranking("rota", "health").metrics["node-n1"]["*asr"] == -1.0
    assert turn.actions == []


def test_threshold_ids_limit_and_none_disables() -> None:
    t = last_threshold(updates=1)
    other = last_threshold(id="other", updates=1, take_out_node=None)
    fired = rankings(config(thresholds=(t, other), threshold_ids=("other",)))
    healthy_world(fired, T0)
    assert {a.threshold_id for a in fired.tick(T0 + 60).actions} == {"other"}
    quiet = rankings(config(thresholds=(t, other), threshold_ids=("*none",)))
    healthy_world(quiet, T0)
    assert quiet.tick(T0 + 60).actions == []


def test_a_node_held_out_by_two_thresholds_returns_when_both_recover() -> None:
    a = last_threshold(id="a", updates=1)
    b = ThresholdProfile("rota", "b", "node-n3", "below", metric="*asr", value=60.0,
                         take_out_node="n3")
    r = rankings(config(thresholds=(a, b)))
    healthy_world(r, T0)
    actions = r.tick(T0 + 60).actions
    assert [a for a in actions if isinstance(a, TakeNodeOut)] == [
        TakeNodeOut("n3", "rota", "a", actions[0].message)]  # type: ignore[union-attr]
    for _ in range(2):
        feed(r, "n3", "succeeded", 9.0, T0 + 70)  # asr 75, slowest: still last
    actions = r.tick(T0 + 120).actions
    assert [x.state for x in actions if isinstance(x, ThresholdAlert)] == ["recovered"]
    assert not any(isinstance(x, ReturnNode) for x in actions)
    assert r.nodes_out() == {"n3"}
    for _ in range(4):
        feed(r, "n3", "succeeded", 0.1, T0 + 130)
    actions = r.tick(T0 + 180).actions
    assert [x for x in actions if isinstance(x, ReturnNode)] == [ReturnNode("n3", "rota", "a")]
    assert r.nodes_out() == frozenset()


def test_a_successor_continues_stats_schedule_and_threshold_streaks() -> None:
    cfg = config(thresholds=(last_threshold(updates=3),))
    leader = rankings(cfg)
    healthy_world(leader, T0)
    leader.tick(T0 + 60)
    leader.tick(T0 + 120)  # n3 last twice
    state = msgpack.unpackb(msgpack.packb(leader.snapshot()), strict_map_key=False)
    successor = RankingS(cfg, zone("UTC"), random.Random(5))
    assert successor.start(T0 + 130, state=state) == 2
    assert successor.get_schedule("rota") == leader.get_schedule("rota")
    turn = successor.tick(T0 + 180)
    assert successor.get_ranking("rota", "health").metrics == \
        leader.get_ranking("rota", "health").metrics
    assert any(isinstance(a, TakeNodeOut) for a in turn.actions)  # third time last


def test_schedule_queries_and_get_schedule_through_rankings() -> None:
    r = RankingS(config(), zone("UTC"), random.Random(1))
    r.start(T0)
    assert r.schedule_queries("rota", ["speed"], T0 + 30) == 1
    rows = r.get_schedule("rota")
    assert [(x.id, x.next) for x in rows] == [("health", T0 + 60), ("speed", T0 + 630)]
    assert [x.to_dict() for x in r.get_schedule("rota", ["sp"])] == [
        {"RankingID": "speed", "Next": T0 + 630, "Previous": None}]


def test_a_successor_schedules_profiles_its_predecessor_did_not_have() -> None:
    cfg = config()
    only_health = RankingsConfig(cfg.settings, cfg.stats,
                                 {("rota", "health"): cfg.rankings[("rota", "health")]})
    leader = RankingS(only_health, zone("UTC"), random.Random(1))
    assert leader.start(T0) == 1
    leader.tick(T0 + 60)
    successor = RankingS(cfg, zone("UTC"), random.Random(1))
    assert successor.start(T0 + 70, state=leader.snapshot()) == 2
    assert [(x.id, x.next, x.previous) for x in successor.get_schedule("rota")] == [
        ("health", T0 + 120, T0 + 60), ("speed", T0 + 670, None)]
