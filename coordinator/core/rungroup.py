"""The run-group lock book: services whose run groups intersect never run together.

Holders are keyed (a run id, or a daemon instance); a holder's service never conflicts with
itself, so the instances of one service on several nodes share their groups. Requests that
conflict wait in one FIFO queue; a waiter is granted only when it conflicts neither with a
holder nor with an earlier waiter, so a stream of short runs can never starve a long one.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(slots=True)
class Claim:
    key: str
    service: str
    groups: frozenset[str]
    since: float  # when the claim was requested (the "In Queue" time while waiting)

    def conflicts(self, other: Claim) -> bool:
        return self.service != other.service and not self.groups.isdisjoint(other.groups)


class LockBook:
    def __init__(self) -> None:
        self._held: dict[str, Claim] = {}
        self._by_group: dict[str, dict[str, Claim]] = {}
        self._waiting: dict[str, Claim] = {}  # insertion order is FIFO order

    # -- queries -------------------------------------------------------------
    def holders(self) -> list[Claim]:
        return list(self._held.values())

    def waiting(self) -> list[Claim]:
        return list(self._waiting.values())

    def is_held(self, key: str) -> bool:
        return key in self._held

    def is_waiting(self, key: str) -> bool:
        return key in self._waiting

    def blockers(self, claim: Claim) -> list[Claim]:
        """Holders that keep `claim` from being granted."""
        seen: dict[str, Claim] = {}
        for g in claim.groups:
            for h in self._by_group.get(g, {}).values():
                if h.service != claim.service:
                    seen[h.key] = h
        return list(seen.values())

    # -- changes -------------------------------------------------------------
    def request(self, claim: Claim) -> bool:
        """Ask for the claim's groups. True: granted now. False: queued (FIFO)."""
        if claim.key in self._held:
            return True
        if not claim.groups:
            self._hold(claim)
            return True
        if claim.key not in self._waiting and self._grantable(claim, self._waiting.values()):
            self._hold(claim)
            return True
        self._waiting.setdefault(claim.key, claim)
        return False

    def release(self, key: str) -> list[Claim]:
        """Release a holder (or withdraw a waiter); returns the waiters granted as a result."""
        if self._waiting.pop(key, None) is not None:
            return self._grant_waiting()
        claim = self._held.pop(key, None)
        if claim is None:
            return []
        for g in claim.groups:
            bucket = self._by_group.get(g)
            if bucket is not None:
                bucket.pop(key, None)
                if not bucket:
                    del self._by_group[g]
        return self._grant_waiting()

    def hold(self, claim: Claim) -> None:
        """Record a holder unconditionally (rebuilding state from a ledger)."""
        self._hold(claim)

    # -- internals -----------------------------------------------------------
    def _hold(self, claim: Claim) -> None:
        self._held[claim.key] = claim
        for g in claim.groups:
            self._by_group.setdefault(g, {})[claim.key] = claim

    def _grantable(self, claim: Claim, earlier: Iterable[Claim]) -> bool:
        if self.blockers(claim):
            return False
        for w in earlier:
            if w.key == claim.key:
                break
            if w.conflicts(claim):
                return False
        return True

    def _grant_waiting(self) -> list[Claim]:
        granted: list[Claim] = []
        passed: list[Claim] = []
        for w in list(self._waiting.values()):
            if not self.blockers(w) and not any(p.conflicts(w) for p in passed):
                del self._waiting[w.key]
                self._hold(w)
                granted.append(w)
            else:
                passed.append(w)
        return granted
