"""Reusable daemon threads for runs, started ahead of the instant they are needed.

Starting a thread costs more than the run of a no-op utility, and a burst starts hundreds of
runs at one instant: `ThreadPool.reserve(n)`, called when orders are held for a later start,
starts the threads those runs will need before their instant comes. A task submitted when no
thread is idle gets a new one at once (it never waits for another task to end: the leader
keeps a node within its capacity). Threads are daemons, so a utility that never returns
(abandoned after its timeout) cannot keep the process from exiting; its thread is not reused.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable

log = logging.getLogger("rota.worker")


class Task:
    """A task submitted to a `ThreadPool`; `detach` stops counting it as running."""

    __slots__ = ("_pool", "counted", "run")

    def __init__(self, pool: ThreadPool, run: Callable[[], object]) -> None:
        self._pool = pool
        self.run = run
        self.counted = True  # under the pool's lock

    def detach(self) -> None:
        """The task's work is over as far as `shutdown` is concerned, though its thread may
        still be inside it (a utility abandoned after its timeout). Harmless when repeated or
        once the task has returned."""
        self._pool._uncount(self)


class ThreadPool:
    def __init__(self, name: str) -> None:
        self._name = name
        self._tasks: queue.SimpleQueue[Task | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._done = threading.Condition(self._lock)
        self._idle = 0
        self._busy = 0
        self._started = 0
        self._closed = False
        self._local = threading.local()

    @property
    def threads(self) -> int:
        """Threads started so far (idle, busy, or abandoned by a utility that never returned)."""
        return self._started

    def submit(self, run: Callable[[], object]) -> Task:
        task = Task(self, run)
        with self._lock:
            if self._closed:
                raise RuntimeError(f"{self._name}: the pool is shut down")
            self._busy += 1
            spawn = self._idle == 0
            if not spawn:
                self._idle -= 1
        self._tasks.put(task)
        if spawn:
            self._spawn()
        return task

    def current(self) -> Task | None:
        """The task the calling thread is running, if it is one of this pool's."""
        task: Task | None = getattr(self._local, "task", None)
        return task

    def _uncount(self, task: Task) -> None:
        with self._lock:
            self._uncount_locked(task)

    def _uncount_locked(self, task: Task) -> None:
        if task.counted:
            task.counted = False
            self._busy -= 1
            if self._busy == 0:
                self._done.notify_all()

    def reserve(self, idle: int) -> None:
        """Start threads until at least `idle` are idle (each one ready for a task)."""
        with self._lock:
            missing = max(0, idle - self._idle)
            self._idle += missing
        for _ in range(missing):
            self._spawn()

    def shutdown(self, timeout: float | None = None) -> bool:
        """Take no more tasks and wait up to `timeout` for the running ones; whether they all
        ended. Idle threads end."""
        with self._lock:
            self._closed = True
            ended = self._done.wait_for(lambda: self._busy == 0, timeout)
            idle = self._idle
        for _ in range(idle):
            self._tasks.put(None)
        return ended

    def _spawn(self) -> None:
        with self._lock:
            self._started += 1
            number = self._started
        threading.Thread(target=self._work, name=f"{self._name}-{number}", daemon=True).start()

    def _work(self) -> None:
        while True:
            task = self._tasks.get()
            if task is None:
                return
            self._local.task = task
            try:
                task.run()
            except BaseException:
                log.exception("%s: a task failed", self._name)
            with self._lock:
                self._uncount_locked(task)
                if self._closed:
                    return
                self._idle += 1
