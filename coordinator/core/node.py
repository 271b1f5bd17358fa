"""Worker nodes as the coordinator sees them: id, roles, capacity, liveness."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Node:
    id: str
    roles: frozenset[str]
    capacity: int = 64
    version: str = ""
    incarnation: str | None = None
    """Names the node's current session; a new one means the node it replaces is gone."""
    started_at: float | None = None
    """When the node announced itself (its live-since time)."""

    def allows(self, allowed_roles: frozenset[str]) -> bool:
        """True when this node holds at least one of the service's allowed roles."""
        return not self.roles.isdisjoint(allowed_roles)
