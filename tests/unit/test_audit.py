"""The journal audit: what workers wrote about their own runs, and where a SIGKILL cut them."""

from __future__ import annotations

from coordinator.audit import audit_journal

G = ["stats_processing"]


def daemon(event: str, node: str, at: float) -> dict[str, object]:
    return {"event": f"daemon-{event}", "service": "Calculator", "node": node, "at": at,
            "run_id": f"daemon:Calculator@{node}", "run_groups": G}


def run(event: str, run_id: str, node: str, at: float, service: str = "Stats A"
        ) -> dict[str, object]:
    return {"event": event, "run_id": run_id, "service": service, "node": node, "at": at,
            "epoch": 1, "seen_epoch": 1, "outcome": None, "run_groups": G}


def test_a_killed_workers_daemon_interval_ends_at_the_kill() -> None:
    entries = [
        daemon("started", "w-proc", 0.0),
        {"event": "worker-killed", "node": "w-proc", "at": 5.0},
        run("start", "a1", "w-master", 6.0), run("end", "a1", "w-master", 7.0),
        daemon("started", "w-proc", 10.0), daemon("paused", "w-proc", 12.0),
    ]
    assert audit_journal(entries).violations == []
    # Without the kill line the old process's interval would run on into the new one's.
    cut = [e for e in entries if e["event"] != "worker-killed"]
    [overlap] = audit_journal(cut).violations
    assert "Calculator" in overlap and "Stats A" in overlap


def test_a_run_cut_by_a_kill_still_counts_until_the_kill() -> None:
    entries = [
        run("start", "a1", "w-master", 1.0),
        {"event": "worker-killed", "node": "w-master", "at": 3.0},
        run("start", "b1", "w-proc", 2.0, "Stats B"), run("end", "b1", "w-proc", 2.5, "Stats B"),
        run("start", "b2", "w-proc", 3.5, "Stats B"), run("end", "b2", "w-proc", 4.0, "Stats B"),
    ]
    # a1 never ended: it ran until the kill, so b1 overlaps it and b2 does not.
    [overlap] = audit_journal(entries).violations
    assert "Stats A [00:00:01.000–00:00:03.000] and Stats B [00:00:02.000" in overlap
