"""Demo utilities: they finish inside their period, report, fail rarely, honour cancel;
daemons pause at a cycle boundary, resume and stop."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from protocol.catalogue import Catalogue, load_catalogue
from protocol.clock import SimClock
from protocol.schedule import Periodic
from protocol.service import Kind, Service
from workers import demo
from workers.context import LocalContext

START = 1_643_027_842.0  # 2022-01-24 12:37:22 UTC
CATALOGUE = Path(__file__).resolve().parents[2] / "rota" / "catalogues" / \
    "system-services.toml"


class SteppingClock:
    """Time that passes only by sleeping: each sleep adds its seconds at once."""

    def __init__(self, start: float = START) -> None:
        self.t = start

    def now(self) -> float:
        return self.t

    def sleep(self, seconds: float) -> None:
        self.t += max(0.0, seconds)

    def to_real(self, seconds: float) -> float:
        return 0.0


class LimitedContext(LocalContext):
    """A daemon context that stops by itself after `limit` cycles."""

    limit = 50

    def cycle(self) -> bool:
        return self.cycles < self.limit and super().cycle()


CAT: Catalogue = load_catalogue(CATALOGUE)
RUNS = [s for s in CAT.services.values() if s.kind is not Kind.DAEMON]
DAEMONS = [s for s in CAT.services.values() if s.kind is Kind.DAEMON]


def _fn(svc: Service):  # type: ignore[no-untyped-def]
    assert svc.utility.callable is not None
    return getattr(demo, svc.utility.callable.split(":")[1])


def _run(svc: Service, run_id: str, **params: object) -> tuple[LocalContext, float]:
    clock = SteppingClock()
    ctx = LocalContext(run_id=run_id, service=svc.name, node="master-1", clock=clock,
                       params={"failure_rate": 0.0, **params})
    _fn(svc)(ctx)
    return ctx, clock.now() - START


@pytest.mark.parametrize("svc", RUNS, ids=[s.name for s in RUNS])
def test_run_finishes_inside_its_period_and_reports(svc: Service) -> None:
    longest = 0.0
    for i in range(30):
        ctx, took = _run(svc, f"{svc.name}-{i}")
        assert ctx.metrics, svc.name
        assert all(isinstance(v, float) for v in ctx.metrics.values())
        assert ctx.lines, svc.name
        assert took > 0
        longest = max(longest, took)
    assert longest < svc.timeout
    if isinstance(svc.schedule, Periodic):
        period = svc.schedule.period * 60
        assert longest <= period / 2, (svc.name, longest)
        if period == 60:
            assert longest <= 8
    if svc.name == "Backup Manager":
        assert longest >= 180  # several minutes


def test_durations_match_the_period_scale() -> None:
    backup = CAT.services["Backup Manager"]
    stats = CAT.services["Statistics Manager"]
    aaa = CAT.services["AAA Manager"]
    took = {s.name: [_run(s, f"r{i}")[1] for i in range(20)] for s in (backup, stats, aaa)}
    assert min(took["Backup Manager"]) >= 180
    assert 60 <= min(took["Statistics Manager"]) and max(took["Statistics Manager"]) <= 300
    assert 1 <= min(took["AAA Manager"]) and max(took["AAA Manager"]) <= 8


def test_same_run_id_behaves_the_same() -> None:
    svc = CAT.services["Files Collector"]
    a, ta = _run(svc, "run-42", failure_rate=0.03)
    b, tb = _run(svc, "run-42", failure_rate=0.03)
    assert (a.metrics, list(a.lines), ta) == (b.metrics, list(b.lines), tb)
    c, _ = _run(svc, "run-43", failure_rate=0.03)
    assert c.metrics != a.metrics


@pytest.mark.parametrize("svc", RUNS, ids=[s.name for s in RUNS])
def test_fails_about_three_percent_of_runs(svc: Service) -> None:
    failures: list[str] = []
    runs = 600
    for i in range(runs):
        ctx = LocalContext(run_id=f"{svc.name}#{i}", service=svc.name, clock=SteppingClock())
        try:
            _fn(svc)(ctx)
        except Exception as exc:  # the simulated failure
            failures.append(f"{type(exc).__name__}: {exc}")
    assert 3 <= len(failures) <= 45, len(failures)  # 3% of 600 = 18
    assert all(len(f) > 20 for f in failures)


def test_failure_rate_one_always_fails_with_a_plausible_message() -> None:
    svc = CAT.services["Mail Manager"]
    with pytest.raises(ConnectionError, match="SMTP"):
        _run(svc, "x", failure_rate=1.0)


def test_cancel_ends_a_long_run_quickly() -> None:
    clock = SimClock(START, speed=100)  # the backup would take 2 to 5.4 real seconds
    ctx = LocalContext(run_id="b1", service="Backup Manager", clock=clock,
                       params={"failure_rate": 0.0})
    thread = threading.Thread(target=demo.backup_manager, args=(ctx,))
    thread.start()
    time.sleep(0.1)
    assert thread.is_alive()
    began = time.monotonic()
    ctx.stop()
    thread.join(2)
    assert not thread.is_alive()
    assert time.monotonic() - began < 0.5
    assert ctx.lines[-1] == "cancelled: stopped early"
    assert ctx.cancelled()


def test_deadline_cancels_in_clock_time() -> None:
    clock = SteppingClock()
    ctx = LocalContext(run_id="b2", clock=clock, deadline=START + 30,
                       params={"failure_rate": 0.0})
    demo.backup_manager(ctx)
    assert START + 30 <= clock.now() <= START + 31
    assert ctx.lines[-1] == "cancelled: stopped early"


def test_fast_sim_clock_runs_a_backup_in_milliseconds() -> None:
    clock = SimClock(START, speed=10000)
    ctx = LocalContext(run_id="b3", clock=clock, params={"failure_rate": 0.0})
    began = time.monotonic()
    demo.backup_manager(ctx)
    assert time.monotonic() - began < 2
    assert {"tables", "size_mb"} <= set(ctx.metrics)
    assert ctx.lines[-1] == "backup complete"


def test_noop_sleep_fail() -> None:
    clock = SteppingClock()
    ctx = LocalContext(clock=clock, params={"seconds": 7.5})
    assert demo.noop(ctx) is None
    assert clock.now() == START
    demo.sleep(ctx)
    assert clock.now() == START + 7.5
    ctx = LocalContext(clock=clock, params={"message": "disk on fire"})
    with pytest.raises(RuntimeError, match="disk on fire"):
        demo.fail(ctx)


def test_sleep_honours_cancel() -> None:
    clock = SimClock(START, speed=1)
    ctx = LocalContext(clock=clock, params={"seconds": 60})
    thread = threading.Thread(target=demo.sleep, args=(ctx,))
    thread.start()
    time.sleep(0.05)
    ctx.stop()
    thread.join(1.5)
    assert not thread.is_alive()


@pytest.mark.parametrize("svc", DAEMONS, ids=[s.name for s in DAEMONS])
def test_daemon_cycles_report_and_stop(svc: Service) -> None:
    clock = SteppingClock()
    ctx = LimitedContext(run_id=f"daemon:{svc.name}", service=svc.name, clock=clock,
                         params={"failure_rate": 0.0})
    _fn(svc)(ctx)  # returns once cycle() says stop
    assert ctx.cycles == ctx.limit
    assert ctx.metrics
    assert clock.now() - START >= ctx.limit  # each cycle takes clock time


def test_daemon_crash_rate_is_per_clock_hour() -> None:
    crashes = 0
    for i in range(40):  # 40 RADIUS instances, 1000 one-second cycles each: 11 clock hours
        ctx = LimitedContext(run_id=f"daemon:RADIUS Server#{i}", clock=SteppingClock())
        ctx.limit = 1000
        try:
            demo.radius_server(ctx)
        except ConnectionResetError:
            crashes += 1
    assert crashes <= 5  # about 0.1 an hour
    ctx = LimitedContext(run_id="daemon:RADIUS Server#x", clock=SteppingClock(),
                         params={"failure_rate": 3600.0})  # 3600 an hour: one a second
    with pytest.raises(ConnectionResetError, match="RADIUS server"):
        demo.radius_server(ctx)
    assert ctx.cycles <= 5


def test_daemon_pauses_at_a_cycle_boundary_resumes_and_stops() -> None:
    clock = SimClock(START, speed=1000)  # a Calculator cycle takes 2 to 10 ms
    ctx = LocalContext(run_id="daemon:Calculator@master-1#1", service="Calculator",
                       clock=clock, params={"failure_rate": 0.0})
    thread = threading.Thread(target=demo.calculator, args=(ctx,))
    thread.start()
    _wait(lambda: ctx.cycles >= 3)
    ctx.pause()
    assert ctx.wait_parked(2)
    parked_at = ctx.cycles
    time.sleep(0.1)
    assert ctx.parked and ctx.cycles == parked_at and thread.is_alive()
    ctx.resume()
    _wait(lambda: ctx.cycles >= parked_at + 3)
    assert not ctx.parked
    ctx.stop()
    thread.join(2)
    assert not thread.is_alive()
    assert ctx.metrics["files"] >= 0


def test_daemon_stopped_while_parked_exits() -> None:
    ctx = LocalContext(run_id="daemon:Quotas Updater#1", clock=SimClock(START, speed=1000),
                       params={"failure_rate": 0.0})
    thread = threading.Thread(target=demo.quotas_updater, args=(ctx,))
    thread.start()
    ctx.pause()
    assert ctx.wait_parked(2)
    ctx.stop()
    thread.join(2)
    assert not thread.is_alive()
    assert ctx.stopped and not ctx.cycle()


def test_local_context_basics() -> None:
    ctx = LocalContext(max_lines=3)
    for i in range(5):
        ctx.log(f"line {i}\n")
    assert list(ctx.lines) == ["line 2", "line 3", "line 4"]
    assert ctx.output() == "line 2\nline 3\nline 4"
    ctx.metric("rows", 3)
    assert ctx.metrics == {"rows": 3.0}
    assert not ctx.cancelled() and ctx.cycle() and ctx.cycles == 1
    ctx.stop()
    ctx.pause()  # a stop is final: pausing afterwards does not block cycle()
    assert ctx.cancelled() and not ctx.cycle()


def _wait(cond, timeout: float = 3.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.002)
