"""The coordinator's metrics: what a turn's records count, and the state gauges."""

from __future__ import annotations

from prometheus_client import REGISTRY

from coordinator import metrics
from coordinator.core.run import Run, RunState, Trigger


def _value(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def _run(run_id: str, state: RunState, **kw: object) -> Run:
    base: dict[str, object] = dict(run_id=run_id, service="Metrics Svc", trigger=Trigger.SCHEDULED,
                                   slot=100.0, queued_at=100.0, run_groups=frozenset(), node="w1")
    base.update(kw)
    return Run(state=state, **base)  # type: ignore[arg-type]


def test_a_run_that_ended_is_counted_once_with_its_lateness_duration_and_wait() -> None:
    before = _value("rota_runs_total", service="Metrics Svc", node="w1", outcome="failed")
    lateness = _value("rota_service_lateness_seconds_sum", service="Metrics Svc")
    duration = _value("rota_service_duration_seconds_sum", service="Metrics Svc")
    late_all = _value("rota_run_lateness_seconds_count")
    took_all = _value("rota_run_duration_seconds_sum")
    waits = _value("rota_run_queue_wait_seconds_count")
    ended = _run("r1", RunState.FAILED, dispatched_at=100.5, started_at=100.75,
                 finished_at=103.75)
    # Recorded twice in one turn (queued, then ended: the same run), and one still running.
    metrics.count_ended([ended, ended, _run("r2", RunState.RUNNING, started_at=101.0)])
    assert _value("rota_runs_total", service="Metrics Svc", node="w1",
                  outcome="failed") == before + 1
    assert _value("rota_service_lateness_seconds_sum", service="Metrics Svc") == lateness + 0.75
    assert _value("rota_service_duration_seconds_sum", service="Metrics Svc") == duration + 3.0
    assert _value("rota_service_lateness_seconds_count", service="Metrics Svc") >= 1
    # And in the cluster-wide histograms, which carry no service label.
    assert _value("rota_run_lateness_seconds_count") == late_all + 1
    assert _value("rota_run_duration_seconds_sum") == took_all + 3.0
    assert _value("rota_run_lateness_seconds_bucket", le="1.0") >= 1
    assert _value("rota_run_queue_wait_seconds_count") == waits + 1


def test_state_gauges_show_the_leaders_state_and_a_standby_drops_them() -> None:
    metrics.show_state(
        roles=["Master", "Processing"], groups=["stats", "factors"],
        live_roles=[frozenset({"Master"}), frozenset({"Master", "Processing"})],
        held={"stats"}, waiting_for_groups=2, waiting_for_capacity=1, oldest_wait=42.0,
    )
    assert _value("rota_nodes_live_by_role", role="Master") == 2
    assert _value("rota_nodes_live_by_role", role="Processing") == 1
    assert _value("rota_run_group_held", group="stats") == 1
    assert _value("rota_run_group_held", group="factors") == 0
    assert _value("rota_runs_waiting", reason="run_groups") == 2
    assert _value("rota_runs_waiting", reason="capacity") == 1
    assert _value("rota_run_oldest_waiting_seconds") == 42
    metrics.forget_state()
    assert REGISTRY.get_sample_value("rota_nodes_live_by_role", {"role": "Master"}) is None
    assert REGISTRY.get_sample_value("rota_run_group_held", {"group": "stats"}) is None
    assert _value("rota_run_oldest_waiting_seconds") == 0
