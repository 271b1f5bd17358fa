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


class ThreadPool:
    def __init__(self, name: str) -> None:
        self._name = name
        self._tasks: queue.SimpleQueue[Callable[[], object] | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._done = threading.Condition(self._lock)
        self._idle = 0
        self._busy = 0
        self._started = 0
        self._closed = False

    @property
    def threads(self) -> int:
        """Threads started so far (idle, busy, or abandoned by a utility that never returned)."""
        return self._started

    def submit(self, task: Callable[[], object]) -> None:
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
            try:
                task()
            except BaseException:
                log.exception("%s: a task failed", self._name)
            with self._lock:
                self._busy -= 1
                if self._busy == 0:
                    self._done.notify_all()
                if self._closed:
                    return
                self._idle += 1
