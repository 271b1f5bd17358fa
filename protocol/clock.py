"""Clocks: the only source of "now" for the core, so tests and demos can bend time.

All instants are floats: seconds since the Unix epoch (UTC). The core converts to local
wall time only where a schedule needs it.
"""

from __future__ import annotations

import threading
import time
from typing import Protocol


class Clock(Protocol):
    """What the core needs from time."""

    def now(self) -> float:
        """Current instant, seconds since the epoch."""

    def sleep(self, seconds: float) -> None:
        """Block for `seconds` of this clock's time."""

    def to_real(self, seconds: float) -> float:
        """How many real seconds `seconds` of this clock's time take."""


class SystemClock:
    """Wall-clock time."""

    def now(self) -> float:
        return time.time()

    def sleep(self, seconds: float) -> None:
        if seconds > 0:
            time.sleep(seconds)

    def to_real(self, seconds: float) -> float:
        return seconds


class SimClock:
    """Simulated time: starts at `start` and runs `speed` times faster than real time."""

    def __init__(self, start: float, speed: float = 1.0) -> None:
        if speed <= 0:
            raise ValueError("speed must be positive")
        self.speed = speed
        self._start = start
        self._t0 = time.monotonic()

    def now(self) -> float:
        return self._start + (time.monotonic() - self._t0) * self.speed

    def sleep(self, seconds: float) -> None:
        if seconds > 0:
            time.sleep(seconds / self.speed)

    def to_real(self, seconds: float) -> float:
        return seconds / self.speed


class ManualClock:
    """A clock that moves only when told to: for deterministic tests."""

    def __init__(self, start: float = 0.0) -> None:
        self._now = start
        self._cond = threading.Condition()

    def now(self) -> float:
        return self._now

    def set(self, instant: float) -> None:
        with self._cond:
            self._now = instant
            self._cond.notify_all()

    def advance(self, seconds: float) -> None:
        self.set(self._now + seconds)

    def sleep(self, seconds: float) -> None:
        deadline = self._now + seconds
        with self._cond:
            while self._now < deadline:
                self._cond.wait(0.05)

    def to_real(self, seconds: float) -> float:
        return 0.0
