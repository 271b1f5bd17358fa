"""Orders held until their start instant: one timer thread over a heap of instants.

An order sent ahead of its slot (`RunOrder.start_at`) waits here, however many there are,
without a thread of its own; at its instant the timer hands its key to the node, which checks
the order again and starts it. The timer knows keys and instants only: what is held, and
whether it still holds, is the node's to decide under its own lock.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
from collections.abc import Callable

from protocol.clock import Clock

log = logging.getLogger("rota.worker")

_LONGEST_WAIT = 0.5  # real seconds: the clock is looked at again at least this often
_SHORTEST_WAIT = 0.005  # real seconds: a clock that converts every span to 0 (ManualClock)


class StartTimer:
    """Calls `fire(key)` at each instant given to `at`, earliest first, on one thread."""

    def __init__(self, clock: Clock, fire: Callable[[str], None], name: str) -> None:
        self._clock = clock
        self._fire = fire
        self._heap: list[tuple[float, int, str]] = []
        self._seq = itertools.count()
        self._cond = threading.Condition()
        self._stopped = False
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def __len__(self) -> int:
        with self._cond:
            return len(self._heap)

    def at(self, when: float, key: str) -> None:
        with self._cond:
            heapq.heappush(self._heap, (when, next(self._seq), key))
            if self._heap[0][2] == key:
                self._cond.notify()

    def stop(self, timeout: float = 5.0) -> int:
        """Stop firing; how many instants were still to come."""
        with self._cond:
            self._stopped = True
            left = len(self._heap)
            self._heap.clear()
            self._cond.notify()
        self._thread.join(timeout)
        return left

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._stopped:
                    if not self._heap:
                        self._cond.wait()
                        continue
                    wait = self._heap[0][0] - self._clock.now()
                    if wait <= 0:
                        break
                    real = self._clock.to_real(wait)
                    self._cond.wait(min(real, _LONGEST_WAIT) if real > 0 else _SHORTEST_WAIT)
                if self._stopped:
                    return
                now = self._clock.now()
                due: list[str] = []
                while self._heap and self._heap[0][0] <= now:
                    due.append(heapq.heappop(self._heap)[2])
            for key in due:
                try:
                    self._fire(key)
                except Exception:
                    log.exception("starting held order %s failed", key)
