"""Keys fired at clock instants: one timer thread over a heap of instants.

The node holds orders sent ahead of their slot (`RunOrder.start_at`) here until their
instant, however many there are, without a thread each; the executor keeps the deadlines and
graces of its running callables here. The timer knows keys and instants only: at an instant it
hands the key to its owner, who decides under its own lock whether it still matters. A key
given again replaces its earlier instant; `cancel` forgets it.
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


class Timer:
    """Calls `fire(key)` at each instant given to `at`, earliest first, on one thread."""

    def __init__(self, clock: Clock, fire: Callable[[str], None], name: str) -> None:
        self._clock = clock
        self._fire = fire
        self._heap: list[tuple[float, int, str]] = []
        self._live: dict[str, int] = {}  # key -> the sequence number of its current entry
        self._seq = itertools.count()
        self._cond = threading.Condition()
        self._stopped = False
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def __len__(self) -> int:
        with self._cond:
            return len(self._live)

    def at(self, when: float, key: str) -> None:
        with self._cond:
            seq = next(self._seq)
            self._live[key] = seq
            heapq.heappush(self._heap, (when, seq, key))
            if self._heap[0][1] == seq:
                self._cond.notify()

    def cancel(self, key: str) -> None:
        """Forget `key`'s instant (its heap entry is dropped lazily)."""
        with self._cond:
            if self._live.pop(key, None) is not None and (
                    len(self._heap) > 4 * len(self._live) + 64):
                self._heap = [e for e in self._heap if self._live.get(e[2]) == e[1]]
                heapq.heapify(self._heap)

    def stop(self, timeout: float = 5.0) -> int:
        """Stop firing; how many instants were still to come."""
        with self._cond:
            self._stopped = True
            left = len(self._live)
            self._heap.clear()
            self._live.clear()
            self._cond.notify()
        self._thread.join(timeout)
        return left

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._stopped:
                    heap = self._heap
                    while heap and self._live.get(heap[0][2]) != heap[0][1]:
                        heapq.heappop(heap)  # cancelled or given again
                    if not heap:
                        self._cond.wait()
                        continue
                    wait = heap[0][0] - self._clock.now()
                    if wait <= 0:
                        break
                    real = self._clock.to_real(wait)
                    self._cond.wait(min(real, _LONGEST_WAIT) if real > 0 else _SHORTEST_WAIT)
                if self._stopped:
                    return
                now = self._clock.now()
                due: list[str] = []
                while self._heap and self._heap[0][0] <= now:
                    _, seq, key = heapq.heappop(self._heap)
                    if self._live.get(key) == seq:
                        del self._live[key]
                        due.append(key)
            for key in due:
                try:
                    self._fire(key)
                except Exception:
                    log.exception("timer %s: firing %s failed", self._thread.name, key)
