"""The run context a utility callable receives, and a simple local implementation.

A utility is `def utility(ctx: RunContext) -> object`. It reads its parameters from
`ctx.params`, waits with `ctx.clock.sleep` (clock time, so simulated clocks speed it up),
reports through `ctx.log` and `ctx.metric`, and finishes quickly once `ctx.cancelled()`
turns true (timeout or stop). A daemon loops `while ctx.cycle(): ...one cycle...`:
`cycle()` returns False when the daemon must stop and blocks while it is paused, so a
pause always lands on a cycle boundary.
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Protocol

from protocol.clock import Clock, SystemClock


class RunContext(Protocol):
    run_id: str
    service: str
    node: str
    clock: Clock
    params: dict[str, object]

    def log(self, line: str) -> None:
        """Append a line to the run's output."""

    def metric(self, name: str, value: float) -> None:
        """Report a metric of this run (the last value reported under a name wins)."""

    def cancelled(self) -> bool:
        """True once the run timed out or was asked to stop: finish quickly."""

    def cycle(self) -> bool:
        """Daemons only: False when the daemon must stop; blocks while paused."""


@dataclass
class LocalContext:
    """A RunContext kept in memory: for tests, benchmarks and in-process execution.

    `stop()` makes `cancelled()` true and `cycle()` return False; `pause()` makes the next
    `cycle()` block until `resume()` or `stop()`. With a `deadline` (a clock instant),
    `cancelled()` also turns true once the clock reaches it.
    """

    run_id: str = "local"
    service: str = "local"
    node: str = "local"
    clock: Clock = field(default_factory=SystemClock)
    params: dict[str, object] = field(default_factory=dict)
    deadline: float | None = None
    max_lines: int = 1000
    lines: deque[str] = field(init=False, repr=False)
    metrics: dict[str, float] = field(init=False, default_factory=dict)
    cycles: int = field(init=False, default=0)
    _stop: threading.Event = field(init=False, repr=False, default_factory=threading.Event)
    _running: threading.Event = field(init=False, repr=False, default_factory=threading.Event)
    _parked: threading.Event = field(init=False, repr=False, default_factory=threading.Event)
    _lock: threading.Lock = field(init=False, repr=False, default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self.lines = deque(maxlen=self.max_lines)
        self._running.set()

    # -- the RunContext protocol -----------------------------------------------------------
    def log(self, line: str) -> None:
        self.lines.append(str(line).rstrip("\n"))

    def metric(self, name: str, value: float) -> None:
        self.metrics[str(name)] = float(value)

    def cancelled(self) -> bool:
        if self._stop.is_set():
            return True
        return self.deadline is not None and self.clock.now() >= self.deadline

    def cycle(self) -> bool:
        if self._stop.is_set():
            return False
        if not self._running.is_set():
            self._parked.set()
            self._running.wait()
            self._parked.clear()
        if self._stop.is_set():
            return False
        self.cycles += 1
        return True

    # -- control ----------------------------------------------------------------------------
    def stop(self) -> None:
        with self._lock:
            self._stop.set()
            self._running.set()  # wakes a parked daemon so that it sees the stop

    def pause(self) -> None:
        with self._lock:
            if not self._stop.is_set():
                self._running.clear()

    def resume(self) -> None:
        with self._lock:
            self._running.set()

    @property
    def stopped(self) -> bool:
        return self._stop.is_set()

    @property
    def parked(self) -> bool:
        """True while a daemon is blocked in `cycle()` by a pause."""
        return self._parked.is_set()

    def wait_parked(self, timeout: float | None = None) -> bool:
        """Block until a daemon parks (real seconds); False on timeout."""
        return self._parked.wait(timeout)

    def output(self) -> str:
        return "\n".join(self.lines)
