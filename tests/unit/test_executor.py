"""The worker's executor with real threads and real subprocesses."""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor

import pytest

from protocol.clock import ManualClock, SimClock, SystemClock
from protocol.service import Utility
from workers.executor import ERROR_LIMIT, TAIL_LIMIT, Executor, OutputTail, RunOutcome

MOD = "tests.unit.utilities_for_tests"


def fn(name: str) -> Utility:
    return Utility(callable=f"{MOD}:{name}")


def sh(script: str) -> Utility:
    return Utility(command=("sh", "-c", script))


def run(
    ex: Executor, utility: Utility, timeout: float = 30.0, run_id: str = "r1", **params: object
) -> RunOutcome:
    return ex.run(
        utility, run_id=run_id, service="svc", node="n1", timeout=timeout, params=dict(params)
    )


def in_background(ex: Executor, utility: Utility, **kw: object) -> Future[RunOutcome]:
    pool = ThreadPoolExecutor(1)
    fut = pool.submit(run, ex, utility, **kw)  # type: ignore[arg-type]
    pool.shutdown(wait=False)
    return fut


def gone(pid: int) -> bool:
    """No such process, or only a zombie waiting to be reaped."""
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


@pytest.fixture
def ex() -> Executor:
    return Executor(SystemClock(), grace=0.3, kill_grace=1.0)


# -- callables ----------------------------------------------------------------------------


def test_callable_success_merges_metrics_and_reports_start(ex: Executor) -> None:
    starts: list[float] = []
    before = time.time()
    out = ex.run(
        fn("succeed"),
        run_id="r1",
        service="svc",
        node="n1",
        timeout=10,
        params={},
        on_start=starts.append,
    )
    assert out.outcome == "succeeded"
    assert out.error is None and out.exit_status is None
    assert out.metrics == {"rows": 3.0, "seconds": 0.25}
    assert "hello from svc on n1" in out.output_tail
    assert "ignored non-numeric metric 'label'" in out.output_tail
    assert starts == [out.started_at]
    assert before <= out.started_at <= out.finished_at <= time.time()
    assert ex.running() == []


def test_callable_exception_fails_with_type_message_and_traceback(ex: Executor) -> None:
    out = run(ex, fn("fail"), why="the ledger is gone")
    assert out.outcome == "failed"
    assert out.error == "ValueError: the ledger is gone"
    assert "about to fail" in out.output_tail
    assert "Traceback (most recent call last)" in out.output_tail
    assert "_deep_failure" in out.output_tail
    assert "ValueError: the ledger is gone" in out.output_tail


def test_error_is_bounded(ex: Executor) -> None:
    out = run(ex, fn("fail"), why="y" * 10_000)
    assert out.error is not None and len(out.error) <= ERROR_LIMIT
    assert out.error.startswith("ValueError: yyy")


def test_bad_callable_specs_fail_clearly(ex: Executor) -> None:
    out = run(ex, Utility(callable="no_such_module_xyz:main"))
    assert out.outcome == "failed"
    assert out.error is not None and out.error.startswith("ModuleNotFoundError")
    out = run(ex, Utility(callable=f"{MOD}:no_such_function"))
    assert out.outcome == "failed" and out.error is not None
    assert out.error.startswith("AttributeError")
    out = run(ex, Utility(callable="missing_colon"))
    assert out.error is not None and "module:function" in out.error
    out = run(ex, Utility())
    assert out.outcome == "failed" and out.error == "utility has no callable or command"


def test_callable_output_tail_is_bounded(ex: Executor) -> None:
    out = run(ex, fn("chatty"), lines=2000)
    assert out.outcome == "succeeded"
    assert len(out.output_tail) <= TAIL_LIMIT
    assert out.output_tail.endswith("line 01999 " + "x" * 40 + "\n")


def test_callable_timeout_sets_cancelled_and_reports_timed_out(ex: Executor) -> None:
    t0 = time.monotonic()
    out = run(ex, fn("until_cancelled"), timeout=0.2)
    assert 0.2 <= time.monotonic() - t0 < 1.0
    assert out.outcome == "timed_out"
    assert out.error == "timed out after 0.2s"
    assert "noticed cancellation" in out.output_tail


def test_callable_that_ignores_timeout_is_abandoned_after_grace(ex: Executor) -> None:
    release = threading.Event()
    t0 = time.monotonic()
    try:
        out = run(ex, fn("stubborn"), timeout=0.1, release=release)
    finally:
        release.set()
    elapsed = time.monotonic() - t0
    assert 0.4 <= elapsed < 1.5  # timeout + grace (0.3 s)
    assert out.outcome == "timed_out"
    assert out.error is not None and "abandoned" in out.error


def test_timeout_is_in_clock_seconds() -> None:
    ex = Executor(SimClock(start=1_000_000.0, speed=100.0), grace=0.3)
    t0 = time.monotonic()
    out = run(ex, fn("until_cancelled"), timeout=10.0)  # 0.1 s of real time
    assert out.outcome == "timed_out"
    assert time.monotonic() - t0 < 1.0
    assert out.finished_at - out.started_at >= 10.0


def test_manual_clock_times_out_only_when_moved() -> None:
    clock = ManualClock(start=500.0)
    ex = Executor(clock, grace=0.3)
    started = threading.Event()
    fut = in_background(ex, fn("until_cancelled"), timeout=60.0, started=started)
    assert started.wait(5)
    time.sleep(0.1)
    assert not fut.done()
    clock.advance(61.0)
    out = fut.result(5)
    assert out.outcome == "timed_out"


def test_cancel_a_callable(ex: Executor) -> None:
    started = threading.Event()
    fut = in_background(ex, fn("until_cancelled"), run_id="c1", started=started)
    assert started.wait(5)
    assert ex.running() == ["c1"]
    assert ex.cancel("c1", "session lost")
    out = fut.result(5)
    assert out.outcome == "failed"
    assert out.error == "cancelled: session lost"
    assert "noticed cancellation" in out.output_tail
    assert not ex.cancel("c1", "again")


# -- command lines ------------------------------------------------------------------------


def test_command_success_and_metric_lines(ex: Executor) -> None:
    out = run(
        ex,
        sh(
            'echo "run $ROTA_RUN_ID of $ROTA_SERVICE on $ROTA_NODE"; '
            'echo "ROTA_METRIC rows=42"; echo "ROTA_METRIC lag=1.5 x=abc"; '
            'echo "params $ROTA_PARAMS"; echo oops >&2'
        ),
        k="v",
    )
    assert out.outcome == "succeeded"
    assert out.exit_status == 0 and out.error is None
    assert out.metrics == {"rows": 42.0, "lag": 1.5}
    assert "run r1 of svc on n1" in out.output_tail
    assert 'params {"k": "v"}' in out.output_tail
    assert "oops" in out.output_tail  # stderr is merged
    assert "ignored bad metric 'x=abc'" in out.output_tail


def test_command_exit_status(ex: Executor) -> None:
    out = run(ex, sh("echo partial work; exit 3"))
    assert out.outcome == "failed"
    assert out.exit_status == 3
    assert out.error == "exit status 3"
    assert "partial work" in out.output_tail


def test_missing_program_fails(ex: Executor) -> None:
    out = run(ex, Utility(command=("/nonexistent/rota-utility",)))
    assert out.outcome == "failed"
    assert out.error is not None and out.error.startswith("FileNotFoundError")


def test_command_output_tail_is_bounded(ex: Executor) -> None:
    out = run(
        ex,
        sh(
            'i=0; while [ $i -lt 3000 ]; do echo "line $i ........................"; '
            "i=$((i+1)); done; echo last-line"
        ),
    )
    assert out.outcome == "succeeded"
    assert len(out.output_tail) <= TAIL_LIMIT
    assert out.output_tail.endswith("last-line\n")
    assert "line 2999 " in out.output_tail and "line 0 " not in out.output_tail


def test_long_line_without_newline_is_bounded(ex: Executor) -> None:
    out = run(ex, Utility(command=("python3", "-c", "print('z' * 200_000, end='')")))
    assert out.outcome == "succeeded"
    assert out.output_tail == "z" * TAIL_LIMIT


def _pids(tail: str) -> list[int]:
    return [int(w[4:]) for w in tail.split() if w.startswith("pid=")]


def test_command_timeout_kills_the_whole_process_group(ex: Executor) -> None:
    t0 = time.monotonic()
    out = run(
        ex, sh("echo pid=$$; sleep 60 & echo pid=$!; sleep 60 & echo pid=$!; wait"), timeout=0.3
    )
    assert time.monotonic() - t0 < 3.0
    assert out.outcome == "timed_out"
    assert out.error == "timed out after 0.3s"
    pids = _pids(out.output_tail)
    assert len(pids) == 3
    wait_until(lambda: all(gone(p) for p in pids), 2.0)


def test_term_is_followed_by_kill_after_the_grace(ex: Executor) -> None:
    t0 = time.monotonic()
    out = run(ex, sh("trap '' TERM; echo pid=$$; sleep 60 & echo pid=$!; wait"), timeout=0.2)
    elapsed = time.monotonic() - t0
    assert out.outcome == "timed_out"
    assert 1.1 <= elapsed < 3.0  # 0.2 s timeout + 1 s kill grace
    # Killed, but the orphaned `sleep` is reaped by init, which may take a moment.
    wait_until(lambda: all(gone(p) for p in _pids(out.output_tail)), 2.0)


def test_processes_left_behind_by_a_finished_run_are_terminated(ex: Executor) -> None:
    out = run(ex, sh("sleep 60 & echo pid=$!; exit 0"))
    assert out.outcome == "succeeded"
    assert "terminating processes left behind" in out.output_tail
    wait_until(lambda: all(gone(p) for p in _pids(out.output_tail)), 2.0)


def test_cancel_a_command_kills_its_group(ex: Executor) -> None:
    fut = in_background(ex, sh("echo pid=$$; sleep 60 & echo pid=$!; wait"), run_id="c2")
    wait_until(lambda: ex.running() == ["c2"])
    time.sleep(0.1)
    t0 = time.monotonic()
    assert ex.cancel("c2", "node lost its session")
    out = fut.result(5)
    assert time.monotonic() - t0 < 1.0
    assert out.outcome == "failed"
    assert out.error == "cancelled: node lost its session"
    assert out.exit_status is not None and out.exit_status != 0
    pids = _pids(out.output_tail)
    assert len(pids) == 2
    wait_until(lambda: all(gone(p) for p in pids), 2.0)


def test_command_with_sim_clock_times_out_in_clock_seconds() -> None:
    ex = Executor(SimClock(start=0.0, speed=50.0), kill_grace=1.0)
    t0 = time.monotonic()
    out = run(ex, sh("sleep 30"), timeout=10.0)  # 0.2 s of real time
    assert out.outcome == "timed_out"
    assert time.monotonic() - t0 < 2.0


def test_concurrent_runs_are_independent(ex: Executor) -> None:
    with ThreadPoolExecutor(8) as pool:
        futs = [
            pool.submit(run, ex, fn("succeed") if i % 2 else sh(f"exit {i % 3}"), 30.0, f"r{i}")
            for i in range(16)
        ]
        outs = [f.result(10) for f in futs]
    for i, out in enumerate(outs):
        if i % 2:
            assert out.outcome == "succeeded"
        else:
            assert out.exit_status == i % 3
    assert ex.running() == []


def test_output_tail_keeps_the_end() -> None:
    tail = OutputTail(limit=10)
    for part in ["abc", "defgh", "ijklmnop", "q"]:
        tail.write(part)
    assert tail.text() == "hijklmnopq"
    tail.write("0123456789ABCDEF")
    assert tail.text() == "6789ABCDEF"


def test_no_threads_left_after_runs(ex: Executor) -> None:
    run(ex, sh("echo done"))
    run(ex, fn("succeed"))
    wait_until(
        lambda: (
            not [t for t in threading.enumerate() if t.name.startswith(("rota-run:", "rota-out:"))]
        ),
        2.0,
    )


def test_an_abandoned_callable_gets_its_outcome_from_elsewhere_once(ex: Executor) -> None:
    """`start` runs the callable on the calling thread; a callable that ignores its timeout
    has its outcome given from another thread after the grace, and only that one, even when
    it returns later."""
    release = threading.Event()
    outcomes: list[tuple[RunOutcome, str]] = []
    given = threading.Event()

    def end(out: RunOutcome) -> None:
        outcomes.append((out, threading.current_thread().name))
        given.set()

    caller = threading.Thread(target=lambda: ex.start(
        fn("stubborn"), run_id="a1", service="svc", node="n1", timeout=0.1,
        params={"release": release}, on_end=end), name="the-caller")
    t0 = time.monotonic()
    caller.start()
    assert given.wait(5)
    assert 0.4 <= time.monotonic() - t0 < 1.5  # timeout + grace (0.3 s)
    assert caller.is_alive(), "the caller's thread is still inside the callable"
    ((out, where),) = outcomes
    assert out.outcome == "timed_out" and "abandoned" in (out.error or "")
    assert where != "the-caller"
    assert ex.running() == []
    release.set()
    caller.join(5)
    assert not caller.is_alive()
    assert len(outcomes) == 1, "the late return gave no second outcome"


def test_a_callable_that_returns_is_ended_on_the_calling_thread(ex: Executor) -> None:
    outcomes: list[tuple[RunOutcome, str]] = []
    ex.start(fn("succeed"), run_id="b1", service="svc", node="n1", timeout=30.0, params={},
             on_end=lambda out: outcomes.append((out, threading.current_thread().name)))
    ((out, where),) = outcomes
    assert out.outcome == "succeeded"
    assert where == threading.current_thread().name
    assert ex.running() == []


def test_a_cancel_before_the_grace_ends_the_callable_cancelled_not_timed_out(
        ex: Executor) -> None:
    started = threading.Event()
    fut = in_background(ex, fn("until_cancelled"), run_id="c2", timeout=0.3, started=started)
    assert started.wait(5)
    assert ex.cancel("c2", "run group lost")
    out = fut.result(5)
    assert (out.outcome, out.error) == ("failed", "cancelled: run group lost")
