"""One backoff policy for every retry loop: wait, double, up to a ceiling; start over on success.

`RECONNECT_*` name the policy of the loops that wait for RabbitMQ to come back (queue readers,
the worker's reporter, the event publisher); daemons restart on a slower policy of their own
(workers/daemon.py), built from the same helper.
"""

from __future__ import annotations

RECONNECT_INITIAL = 0.2
"""Seconds before the first retry after RabbitMQ could not be reached."""
RECONNECT_MAX = 5.0
"""Longest wait between two retries of a connection."""


class Backoff:
    """Successive waits `initial`, `initial * factor`, ... capped at `maximum`.

    `next()` gives the wait before the coming retry; `reset()` after a success starts over.
    Not thread-safe: each retry loop keeps its own.
    """

    def __init__(
        self,
        initial: float = RECONNECT_INITIAL,
        maximum: float = RECONNECT_MAX,
        factor: float = 2.0,
    ) -> None:
        if initial <= 0 or maximum < initial or factor < 1:
            raise ValueError("need 0 < initial <= maximum and factor >= 1")
        self.initial = initial
        self.maximum = maximum
        self.factor = factor
        self._next = initial

    def next(self) -> float:
        wait = self._next
        self._next = min(wait * self.factor, self.maximum)
        return wait

    def peek(self) -> float:
        """The wait `next()` would give, without advancing."""
        return self._next

    def reset(self) -> None:
        self._next = self.initial
