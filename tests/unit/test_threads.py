"""The worker's reusable run threads (workers/threads.py)."""

from __future__ import annotations

import threading
import time

from workers.threads import ThreadPool


def _wait(pred, timeout: float = 5.0) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.005)
    return False


def test_threads_are_reused_and_reserved_ahead() -> None:
    pool = ThreadPool("t")
    done = []
    for i in range(5):
        pool.submit(lambda i=i: done.append(i))
        assert _wait(lambda i=i: len(done) == i + 1)
        time.sleep(0.01)  # the thread is idle again
    assert pool.threads == 1, "one at a time: one thread, reused"
    pool.reserve(4)
    assert pool.threads == 4
    names = []
    gate = threading.Event()
    for _ in range(4):
        pool.submit(lambda: (names.append(threading.current_thread().name), gate.wait(5)))
    assert _wait(lambda: len(names) == 4)
    assert pool.threads == 4, "the reserved threads took the tasks"
    gate.set()
    assert pool.shutdown(5)


def test_a_task_never_waits_for_a_busy_one_and_shutdown_waits_for_the_running() -> None:
    pool = ThreadPool("t")
    gate, ran = threading.Event(), threading.Event()
    pool.submit(lambda: gate.wait(10))
    pool.submit(ran.set)
    assert ran.wait(2), "the second task ran while the first still waits"
    assert not pool.shutdown(0.1), "the first task still runs"
    gate.set()
    assert pool.shutdown(5)


def test_a_task_that_never_returns_does_not_hold_the_process() -> None:
    pool = ThreadPool("t")
    forever = threading.Event()
    pool.submit(lambda: forever.wait())
    assert _wait(lambda: any(t.name.startswith("t-") and t.daemon
                             for t in threading.enumerate()))
    assert not pool.shutdown(0.05)
    forever.set()


def test_a_detached_task_no_longer_holds_up_shutdown_and_its_thread_comes_back() -> None:
    pool = ThreadPool("t")
    gate, inside = threading.Event(), threading.Event()
    seen: list[object] = []

    def stuck() -> None:
        seen.append(pool.current())
        inside.set()
        gate.wait(10)

    task = pool.submit(stuck)
    assert inside.wait(5)
    assert seen == [task], "the task knows itself on its thread"
    assert pool.current() is None, "this thread is not the pool's"
    assert not pool.shutdown(0.1), "the stuck task still counts"
    task.detach()
    task.detach()  # repeated: harmless
    assert pool.shutdown(0.1), "once detached, shutdown no longer waits for it"
    gate.set()
