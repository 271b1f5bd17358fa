"""The timeline: which service is due next, in O(log n) per slot.

A binary heap of (due instant, sequence, service name, generation). Editing a service's
schedule bumps its generation; stale heap entries are dropped lazily when they surface,
so nothing ever scans the catalogue.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Iterator
from contextlib import contextmanager


class Timeline:
    def __init__(self) -> None:
        self._heap: list[tuple[float, int, str, int]] = []
        self._gen: dict[str, int] = {}
        self._due: dict[str, float] = {}
        self._seq = itertools.count()
        self._loading = False

    @contextmanager
    def loading(self) -> Iterator[None]:
        """Set many slots at once (a new leader's whole catalogue): the heap is built once at
        the end instead of kept in order after each."""
        self._loading = True
        try:
            yield
        finally:
            self._loading = False
            heapq.heapify(self._heap)

    def __len__(self) -> int:
        return len(self._due)

    def set(self, name: str, due: float | None) -> None:
        """Schedule `name`'s next slot at `due` (None removes it), replacing any earlier entry."""
        gen = self._gen.get(name, 0) + 1
        self._gen[name] = gen
        if due is None:
            self._due.pop(name, None)
            return
        self._due[name] = due
        if self._loading:
            self._heap.append((due, next(self._seq), name, gen))
            return
        heapq.heappush(self._heap, (due, next(self._seq), name, gen))
        if len(self._heap) > 4 * len(self._due) + 64:
            self._compact()

    def remove(self, name: str) -> None:
        self.set(name, None)

    def due_of(self, name: str) -> float | None:
        return self._due.get(name)

    def peek(self) -> float | None:
        """The earliest due instant, or None when nothing is scheduled."""
        self._drop_stale()
        return self._heap[0][0] if self._heap else None

    def pop_due(self, now: float) -> Iterator[tuple[str, float]]:
        """Yield (name, due) for every entry due at or before `now`, earliest first.

        A popped entry is removed; the caller sets the service's next slot.
        """
        while True:
            self._drop_stale()
            if not self._heap or self._heap[0][0] > now:
                return
            due, _, name, _ = heapq.heappop(self._heap)
            self._due.pop(name, None)
            self._gen[name] = self._gen.get(name, 0) + 1
            yield name, due

    def _drop_stale(self) -> None:
        heap = self._heap
        while heap and self._gen.get(heap[0][2]) != heap[0][3]:
            heapq.heappop(heap)

    def _compact(self) -> None:
        self._heap = [e for e in self._heap if self._gen.get(e[2]) == e[3]]
        heapq.heapify(self._heap)
