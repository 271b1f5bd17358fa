"""The one retry policy of the leader: a delay that doubles from `first` up to `ceiling`."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Backoff:
    first: float
    ceiling: float
    failures: int = field(default=0, init=False)

    def next(self) -> float:
        """The delay before the next attempt, counting one more failure."""
        self.failures += 1
        return min(self.first * 2 ** (self.failures - 1), self.ceiling)

    def reset(self) -> None:
        self.failures = 0
