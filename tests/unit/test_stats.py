"""StatS over runs: filters, every metric, min items (N/A), windows by count and time,
snapshot and restore."""

from __future__ import annotations

import msgpack
import pytest

from coordinator.core.stats import FinishedRun, StatS
from protocol.rankings import NA, RUN_METRICS, StatQueueProfile

T0 = 1_750_000_000.0


def run(outcome: str = "succeeded", *, service: str = "S", node: str | None = "n1",
        trigger: str = "scheduled", slot: float | None = T0, queued: float | None = T0,
        dispatched: float | None = T0 + 1, started: float | None = T0 + 2,
        duration: float | None = 10.0, metrics: dict[str, float] | None = None) -> FinishedRun:
    finished = None if started is None or duration is None else started + duration
    return FinishedRun(service=service, node=node, trigger=trigger, outcome=outcome,
                       slot=slot, queued_at=queued, dispatched_at=dispatched,
                       started_at=started, finished_at=finished, metrics=metrics or {})


def queue(**kw: object) -> StatS:
    base: dict[str, object] = dict(tenant="rota", id="q")
    base.update(kw)
    return StatS([StatQueueProfile(**base)])  # type: ignore[arg-type]


def metrics(stats: StatS, now: float = T0 + 100, stat_id: str = "q") -> dict[str, float]:
    got = stats.metrics("rota", stat_id, now)
    assert got is not None
    return got


def test_run_metrics() -> None:
    stats = queue()
    # durations 10, 20, 30, 40 (the 40 s one failed); lateness 2, 2, 5, 2; waits 1, 1, 3, 1
    stats.process_run(run(duration=10.0), T0)
    stats.process_run(run(duration=20.0), T0)
    stats.process_run(run(duration=30.0, dispatched=T0 + 3, started=T0 + 5), T0)
    stats.process_run(run("failed", duration=40.0), T0)
    assert metrics(stats) == {
        "*runs": 4.0, "*failures": 1.0, "*asr": 75.0, "*acd": 25.0, "*tcd": 100.0,
        "*pdd": 2.75, "*queue": 1.5, "*max_duration": 40.0, "*p95_duration": 40.0,
    }


def test_p95_is_the_nearest_rank() -> None:
    stats = queue(metric_ids=("*p95_duration", "*max_duration"))
    for d in range(1, 101):  # durations 1..100 in a shuffled-ish order
        stats.process_run(run(duration=float((d * 37) % 100 + 1)), T0)
    assert metrics(stats) == {"*p95_duration": 95.0, "*max_duration": 100.0}


def test_runs_without_times_count_for_ratios_not_durations() -> None:
    stats = queue()
    stats.process_run(run("lost", started=None, dispatched=None), T0)
    stats.process_run(run(duration=6.0), T0)
    got = metrics(stats)
    assert (got["*runs"], got["*failures"], got["*asr"]) == (2.0, 1.0, 50.0)
    assert (got["*acd"], got["*tcd"], got["*queue"]) == (6.0, 6.0, 1.0)


def test_manual_run_lateness_is_from_its_request() -> None:
    stats = queue(metric_ids=("*pdd",))
    stats.process_run(run(trigger="manual", slot=None, queued=T0, started=T0 + 4), T0)
    assert metrics(stats) == {"*pdd": 4.0}


def test_reported_metrics() -> None:
    stats = queue(metric_ids=("*sum#acc", "*average#acc", "*highest#acc", "*lowest#acc",
                              "*sum#tcc", "*sum#absent"))
    stats.process_run(run(metrics={"acc": 2.0, "tcc": 10.0}), T0)
    stats.process_run(run(metrics={"acc": 6.0}), T0)
    stats.process_run(run(metrics={"acc": -1.5}), T0)
    stats.process_run(run(), T0)  # reported nothing: counts for no reported metric
    assert metrics(stats) == {"*sum#acc": 6.5, "*average#acc": 6.5 / 3, "*highest#acc": 6.0,
                              "*lowest#acc": -1.5, "*sum#tcc": 10.0, "*sum#absent": NA}


def test_fewer_than_min_items_is_na() -> None:
    stats = queue(min_items=3, metric_ids=("*runs", "*asr", "*acd", "*sum#acc"))
    stats.process_run(run(metrics={"acc": 1.0}), T0)
    stats.process_run(run(started=None), T0)
    assert metrics(stats) == {"*runs": NA, "*asr": NA, "*acd": NA, "*sum#acc": NA}
    stats.process_run(run(metrics={"acc": 1.0}), T0)
    # three runs now; only two have a duration and two reported acc
    assert metrics(stats) == {"*runs": 3.0, "*asr": 100.0, "*acd": NA, "*sum#acc": NA}
    stats.process_run(run(metrics={"acc": 1.0}), T0)
    assert metrics(stats) == {"*runs": 4.0, "*asr": 100.0, "*acd": 10.0, "*sum#acc": 3.0}


def test_an_empty_queue_is_na_even_with_min_items_zero() -> None:
    stats = queue(min_items=0)
    assert set(metrics(stats).values()) == {NA}
    assert list(metrics(stats)) == list(RUN_METRICS)


def test_filters_choose_the_runs() -> None:
    stats = StatS([
        StatQueueProfile("rota", "n1", nodes=frozenset({"n1"})),
        StatQueueProfile("rota", "svc", services=frozenset({"B"})),
        StatQueueProfile("rota", "bad", outcomes=frozenset({"failed", "timed_out"})),
        StatQueueProfile("rota", "manual", triggers=frozenset({"manual"})),
        StatQueueProfile("other", "all"),
    ])
    assert stats.process_run(run(node="n1", service="A"), T0) == [("rota", "n1"),
                                                                   ("other", "all")]
    assert stats.process_run(run("failed", node="n2", service="B"), T0) == [
        ("rota", "svc"), ("rota", "bad"), ("other", "all")]
    assert stats.process_run(run("timed_out", node=None, trigger="manual"), T0) == [
        ("rota", "bad"), ("rota", "manual"), ("other", "all")]
    assert metrics(stats, stat_id="n1")["*runs"] == 1.0
    assert metrics(stats, stat_id="bad")["*asr"] == 0.0
    assert stats.metrics("rota", "all", T0) is None  # tenants are separate
    assert stats.metrics("other", "all", T0 + 100)["*runs"] == 3.0  # type: ignore[index]


def test_window_by_count_keeps_the_latest_runs() -> None:
    stats = queue(queue_length=3, metric_ids=("*runs", "*acd", "*max_duration"))
    for d in (50.0, 10.0, 20.0, 30.0):
        stats.process_run(run(duration=d), T0)
    assert metrics(stats) == {"*runs": 3.0, "*acd": 20.0, "*max_duration": 30.0}


def test_window_by_time_drops_runs_ttl_after_they_came() -> None:
    stats = queue(ttl=60.0, metric_ids=("*runs", "*sum#acc"))
    stats.process_run(run(metrics={"acc": 1.0}), T0)
    stats.process_run(run(metrics={"acc": 2.0}), T0 + 30)
    assert metrics(stats, now=T0 + 59) == {"*runs": 2.0, "*sum#acc": 3.0}
    assert metrics(stats, now=T0 + 60) == {"*runs": 1.0, "*sum#acc": 2.0}
    assert metrics(stats, now=T0 + 90) == {"*runs": NA, "*sum#acc": NA}


def test_window_by_time_and_count_whichever_is_stricter() -> None:
    stats = queue(ttl=60.0, queue_length=2, metric_ids=("*runs",))
    for t in (0, 10, 20):
        stats.process_run(run(), T0 + t)
    assert metrics(stats, now=T0 + 20) == {"*runs": 2.0}  # the count drops the first
    assert metrics(stats, now=T0 + 75) == {"*runs": 1.0}  # time drops the second


def test_metric_ids_limit_what_is_answered() -> None:
    stats = queue()
    stats.process_run(run(), T0)
    assert stats.metrics("rota", "q", T0, ["*asr", "*nope"]) == {"*asr": 100.0}


def busy_stats() -> tuple[list[StatQueueProfile], StatS]:
    profiles = [
        StatQueueProfile("rota", "a", ttl=500.0, queue_length=50, min_items=2,
                         metric_ids=(*RUN_METRICS, "*sum#acc", "*average#acc",
                                     "*highest#acc", "*lowest#acc")),
        StatQueueProfile("rota", "b", nodes=frozenset({"n2"})),
    ]
    stats = StatS(profiles)
    for i in range(120):
        stats.process_run(run("failed" if i % 7 == 0 else "succeeded",
                              node=f"n{i % 3}", duration=0.1 * (i % 13) + 0.3,
                              started=T0 + i * 0.7, metrics={"acc": 0.1 * i} if i % 2 else {}),
                          T0 + i * 5)
    return profiles, stats


def test_restore_of_a_snapshot_answers_the_same_metrics() -> None:
    profiles, stats = busy_stats()
    now = T0 + 600
    before = {sid: stats.metrics("rota", sid, now) for sid in ("a", "b")}
    snap = msgpack.unpackb(msgpack.packb(stats.snapshot()), strict_map_key=False)
    restored = StatS.restore(profiles, snap)
    assert {sid: restored.metrics("rota", sid, now) for sid in ("a", "b")} == before
    # ... and goes on the same way: the same next run, the same expiries.
    for s in (stats, restored):
        s.process_run(run(duration=99.0, metrics={"acc": 5.0}), now + 1)
    later = now + 400
    assert ({sid: restored.metrics("rota", sid, later) for sid in ("a", "b")}
            == {sid: stats.metrics("rota", sid, later) for sid in ("a", "b")})


def test_restore_drops_unconfigured_queues_and_applies_a_shorter_length() -> None:
    profiles, stats = busy_stats()
    snap = stats.snapshot()
    shorter = [StatQueueProfile("rota", "b", nodes=frozenset({"n2"}), queue_length=5,
                                metric_ids=("*runs",))]
    restored = StatS.restore(shorter, snap)
    assert restored.metrics("rota", "a", T0) is None
    assert restored.metrics("rota", "b", T0 + 600) == {"*runs": 5.0}


def test_restore_refuses_an_unknown_version() -> None:
    with pytest.raises(ValueError, match="version"):
        StatS.restore([], {"v": 99, "queues": {}})
