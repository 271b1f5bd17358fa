"""The daemon supervisor with real threads and real subprocesses."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from protocol.clock import SimClock, SystemClock
from protocol.service import Utility
from workers.daemon import (
    BACKOFF_INITIAL,
    BACKOFF_MAX,
    BACKOFF_RESET_AFTER,
    DaemonEvent,
    DaemonSupervisor,
    restart_backoff,
    restart_wait,
)

MOD = "tests.unit.utilities_for_tests"


def fn(name: str) -> Utility:
    return Utility(callable=f"{MOD}:{name}")


def sh(script: str) -> Utility:
    return Utility(command=("sh", "-c", script))


class Recorder:
    def __init__(self) -> None:
        self.events: list[DaemonEvent] = []
        self._cond = threading.Condition()

    def __call__(self, ev: DaemonEvent) -> None:
        with self._cond:
            self.events.append(ev)
            self._cond.notify_all()

    def states(self, service: str) -> list[str]:
        with self._cond:
            return [e.state for e in self.events if e.service == service]

    def of(self, service: str, state: str) -> list[DaemonEvent]:
        with self._cond:
            return [e for e in self.events if e.service == service and e.state == state]

    def wait_for(self, service: str, state: str, count: int = 1, timeout: float = 5.0) -> None:
        with self._cond:
            ok = self._cond.wait_for(lambda: len(self.of(service, state)) >= count, timeout)
        assert ok, f"{service}: no {count} x {state!r} in {self.states(service)}"


def gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            stat = fh.read()
    except FileNotFoundError:
        return True
    return stat[stat.rfind(b")") + 2 :].split()[0] == b"Z"


def wait_until(cond: object, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():  # type: ignore[operator]
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.005)


def pids_in(path: Path) -> list[int]:
    return [int(p) for p in path.read_text().split()] if path.exists() else []


def our_threads() -> list[str]:
    return [
        t.name for t in threading.enumerate() if t.name.startswith(("rota-daemon:", "rota-out:"))
    ]


@pytest.fixture
def rec() -> Recorder:
    return Recorder()


@pytest.fixture
def sup(rec: Recorder) -> Iterator[DaemonSupervisor]:
    s = DaemonSupervisor(SystemClock(), rec, node="n1", grace=1.0)
    yield s
    s.stop_all()


def test_backoff_doubles_caps_and_resets() -> None:
    backoff = restart_backoff()
    waits = [restart_wait(backoff, uptime=0.5) for _ in range(9)]
    assert waits == [1, 2, 4, 8, 16, 32, 60, 60, 60]
    assert BACKOFF_INITIAL == 1 and BACKOFF_MAX == 60
    assert restart_wait(backoff, uptime=BACKOFF_RESET_AFTER) == 1.0
    assert restart_wait(backoff, uptime=BACKOFF_RESET_AFTER - 1) == 2.0


def test_callable_daemon_start_pause_resume_stop(sup: DaemonSupervisor, rec: Recorder) -> None:
    cycles: list[float] = []
    assert sup.start("calc", fn("counting_daemon"), {"cycles": cycles})
    assert not sup.start("calc", fn("counting_daemon"), {"cycles": cycles})
    rec.wait_for("calc", "started")
    wait_until(lambda: len(cycles) >= 5)
    assert sup.status() == {"calc": "running"}

    assert sup.pause("calc")
    rec.wait_for("calc", "paused")
    assert sup.status() == {"calc": "paused"}
    parked_at = len(cycles)
    time.sleep(0.2)
    assert len(cycles) == parked_at  # no cycle runs while paused

    assert sup.resume("calc")
    rec.wait_for("calc", "resumed")
    wait_until(lambda: len(cycles) >= parked_at + 5)
    assert sup.status() == {"calc": "running"}

    assert sup.stop("calc")
    assert sup.status() == {"calc": "stopped"}
    assert rec.states("calc") == ["started", "paused", "resumed", "stopped"]
    assert not sup.stop("calc") and not sup.pause("calc") and not sup.resume("calc")
    assert our_threads() == []


def test_a_pause_of_a_parked_daemon_is_acknowledged_and_it_stays_parked(
    sup: DaemonSupervisor, rec: Recorder,
) -> None:
    """A resume and a pause that cross (the pause applied while the daemon is still parked)
    leave it parked, and the pause is answered: a leader waiting for it never waits forever."""
    cycles: list[float] = []
    sup.start("calc", fn("counting_daemon"), {"cycles": cycles})
    rec.wait_for("calc", "started")
    sup.pause("calc")
    rec.wait_for("calc", "paused")
    parked_at = len(cycles)
    assert sup.pause("calc")  # parked already: reported again, stays parked
    rec.wait_for("calc", "paused", count=2)
    time.sleep(0.2)
    assert len(cycles) == parked_at
    assert rec.states("calc") == ["started", "paused", "paused"]
    assert sup.resume("calc")
    rec.wait_for("calc", "resumed")
    wait_until(lambda: len(cycles) > parked_at)


def test_stop_while_paused(sup: DaemonSupervisor, rec: Recorder) -> None:
    cycles: list[float] = []
    sup.start("calc", fn("counting_daemon"), {"cycles": cycles})
    sup.pause("calc")
    rec.wait_for("calc", "paused")
    sup.stop("calc")
    assert rec.states("calc") == ["started", "paused", "stopped"]
    assert our_threads() == []


def test_resume_before_parking_reports_nothing(sup: DaemonSupervisor, rec: Recorder) -> None:
    release = threading.Event()
    sup.start("deaf", fn("deaf_daemon"), {"release": release})
    rec.wait_for("deaf", "started")
    sup.pause("deaf")
    time.sleep(0.05)
    assert sup.status() == {"deaf": "running"}  # not parked: it never reached a boundary
    sup.resume("deaf")
    release.set()
    rec.wait_for("deaf", "exited")
    assert "paused" not in rec.states("deaf")


def test_crash_is_reported_and_restarted_with_backoff(rec: Recorder) -> None:
    clock = SimClock(start=1_000_000.0, speed=50.0)
    sup = DaemonSupervisor(clock, rec, node="n1", grace=1.0)
    starts: list[float] = []
    try:
        sup.start("crashy", fn("crashing_daemon"), {"starts": starts})
        rec.wait_for("crashy", "started", count=4, timeout=5)
    finally:
        sup.stop_all()
    gaps = [b - a for a, b in zip(starts, starts[1:], strict=False)][:3]
    for gap, expected in zip(gaps, [1.0, 2.0, 4.0], strict=True):
        assert expected <= gap < expected + 1.0, gaps
    exited = rec.of("crashy", "exited")
    assert len(exited) >= 3
    first = exited[0]
    assert first.error == "RuntimeError: boom"
    assert "start 1" in first.output_tail and "Traceback" in first.output_tail
    states = rec.states("crashy")
    assert states[:4] == ["started", "exited", "started", "exited"]
    assert states[-1] == "stopped" and states.count("stopped") == 1
    assert our_threads() == []


def test_pause_during_backoff_parks_at_once(rec: Recorder) -> None:
    clock = SimClock(start=0.0, speed=1.0)
    sup = DaemonSupervisor(clock, rec, node="n1", grace=1.0)
    starts: list[float] = []
    try:
        sup.start("crashy", fn("crashing_daemon"), {"starts": starts})
        rec.wait_for("crashy", "exited")
        wait_until(lambda: sup.status()["crashy"] == "backoff")
        sup.pause("crashy")
        rec.wait_for("crashy", "paused", timeout=1.0)
        assert sup.status()["crashy"] == "paused"
        sup.resume("crashy")
        rec.wait_for("crashy", "started", count=2, timeout=1.0)  # no leftover backoff
    finally:
        sup.stop_all()
    assert rec.states("crashy")[:5] == ["started", "exited", "paused", "resumed", "started"]


def test_command_daemon_pause_terminates_and_resume_restarts(
    sup: DaemonSupervisor, rec: Recorder, tmp_path: Path
) -> None:
    pidfile = tmp_path / "pids"
    script = (
        f"trap 'echo stopping; exit 0' TERM; echo $$ >> {pidfile}; "
        "while :; do echo ROTA_METRIC ticks=1; sleep 0.05; done"
    )
    sup.start("poller", sh(script), {})
    rec.wait_for("poller", "started")
    wait_until(lambda: len(pids_in(pidfile)) == 1)
    first = pids_in(pidfile)[0]
    wait_until(lambda: sup.metrics("poller") == {"ticks": 1.0})

    sup.pause("poller")
    rec.wait_for("poller", "paused")
    assert gone(first)
    assert sup.status() == {"poller": "paused"}
    time.sleep(0.1)
    assert len(pids_in(pidfile)) == 1  # not restarted while paused

    sup.resume("poller")
    rec.wait_for("poller", "started", count=2)
    wait_until(lambda: len(pids_in(pidfile)) == 2)
    second = pids_in(pidfile)[1]
    assert not gone(second)

    sup.stop("poller")
    assert gone(second)
    assert rec.states("poller") == ["started", "paused", "resumed", "started", "stopped"]
    assert not rec.of("poller", "exited")


def test_command_daemon_exit_is_reported_and_restarted(rec: Recorder) -> None:
    sup = DaemonSupervisor(SimClock(start=0.0, speed=100.0), rec, node="n1", grace=1.0)
    try:
        sup.start("flaky", sh("echo crashing now; exit 2"), {})
        rec.wait_for("flaky", "started", count=3)
    finally:
        sup.stop_all()
    ev = rec.of("flaky", "exited")[0]
    assert ev.error == "exit status 2"
    assert "crashing now" in ev.output_tail
    assert our_threads() == []


def test_command_daemon_ignoring_term_is_killed(rec: Recorder, tmp_path: Path) -> None:
    sup = DaemonSupervisor(SystemClock(), rec, node="n1", grace=0.3)
    pidfile = tmp_path / "pids"
    sup.start(
        "deaf", sh(f"trap '' TERM; sleep 60 & echo $! >> {pidfile}; echo $$ >> {pidfile}; wait"), {}
    )
    wait_until(lambda: len(pids_in(pidfile)) == 2)
    t0 = time.monotonic()
    sup.stop("deaf")
    assert 0.3 <= time.monotonic() - t0 < 2.0
    assert all(gone(p) for p in pids_in(pidfile))
    assert rec.states("deaf") == ["started", "stopped"]


def test_callable_ignoring_stop_is_abandoned(rec: Recorder) -> None:
    sup = DaemonSupervisor(SystemClock(), rec, node="n1", grace=0.1)
    release = threading.Event()
    try:
        sup.start("deaf", fn("deaf_daemon"), {"release": release})
        rec.wait_for("deaf", "started")
        sup.stop("deaf")
        assert sup.status() == {"deaf": "stopped"}
        stopped = rec.of("deaf", "stopped")
        assert len(stopped) == 1 and stopped[0].error is not None
        assert "abandoned" in stopped[0].error
    finally:
        release.set()
    wait_until(lambda: our_threads() == [])
    assert len(rec.of("deaf", "stopped")) == 1


def test_bad_utility_is_reported(rec: Recorder) -> None:
    sup = DaemonSupervisor(SimClock(start=0.0, speed=100.0), rec, node="n1")
    try:
        sup.start("nomod", Utility(callable="no_such_module_xyz:main"), {})
        sup.start("empty", Utility(), {})
        rec.wait_for("nomod", "exited", count=2)
        rec.wait_for("empty", "exited")
    finally:
        sup.stop_all()
    err = rec.of("nomod", "exited")[0].error
    assert err is not None and err.startswith("ModuleNotFoundError")
    assert rec.of("empty", "exited")[0].error == "utility has no callable or command"


def test_stop_all_leaves_no_thread_or_process(
    sup: DaemonSupervisor, rec: Recorder, tmp_path: Path
) -> None:
    pidfile = tmp_path / "pids"
    cycles: list[float] = []
    sup.start("calc", fn("counting_daemon"), {"cycles": cycles})
    sup.start("poller", sh(f"sleep 60 & echo $! >> {pidfile}; echo $$ >> {pidfile}; wait"), {})
    sup.start("crashy", fn("crashing_daemon"), {"starts": []})
    sup.start("paused", fn("counting_daemon"), {"cycles": []})
    sup.pause("paused")
    rec.wait_for("paused", "paused")
    rec.wait_for("crashy", "exited")
    wait_until(lambda: len(pids_in(pidfile)) == 2)
    wait_until(lambda: len(cycles) > 0)

    sup.stop_all()
    assert set(sup.status().values()) == {"stopped"}
    for name in ("calc", "poller", "crashy", "paused"):
        assert rec.states(name).count("stopped") == 1
    assert our_threads() == []
    assert all(gone(p) for p in pids_in(pidfile))
    # a stopped daemon can be started again
    assert sup.start("calc", fn("counting_daemon"), {"cycles": cycles})
    rec.wait_for("calc", "started", count=2)
