"""`rota up` keeps a bounded record of finished runs, however long it runs."""

from __future__ import annotations

import inspect
import time

import pytest

from protocol import RunRecord
from protocol.catalogue import load_catalogue
from protocol.clock import SimClock
from rota.cli import DEFAULT_CATALOGUE
from rota.embedded import Cluster, FinishedRuns, parse_nodes


def _record(i: int, state: str) -> RunRecord:
    return RunRecord(run_id=f"r{i}", service="Summary", trigger="scheduled", state=state,
                     epoch=1, finished_at=1000.0 + i)


def test_finished_runs_keep_the_last_ones_and_count_them_all() -> None:
    finished = FinishedRuns(keep=3)
    for i in range(10):
        finished.append(_record(i, "failed" if i % 5 == 0 else "succeeded"))
    assert finished.total == 10
    assert len(finished) == 3
    assert [r.run_id for r in finished] == ["r7", "r8", "r9"]
    assert finished.by_state() == {"succeeded": 8, "failed": 2}


def test_finished_runs_refuse_to_keep_nothing() -> None:
    with pytest.raises(ValueError):
        FinishedRuns(keep=0)


def test_the_embedded_cluster_keeps_a_thousand_finished_runs_by_default() -> None:
    assert inspect.signature(Cluster).parameters["keep_finished"].default == 1000


def test_a_running_cluster_stays_within_its_bound() -> None:
    cat = load_catalogue(DEFAULT_CATALOGUE)
    cluster = Cluster(cat, SimClock(time.time(), 120.0), parse_nodes(
        "master-1=Master;redundancy-1=Redundancy,Reporting;processing-1=Processing,Calculation"
    ), keep_finished=5).start()
    try:
        deadline = time.monotonic() + 30
        while cluster.finished.total <= 10 and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        cluster.stop()
    assert cluster.finished.total > 10
    assert len(cluster.finished) == 5
    assert len(list(cluster.finished)) == 5
