"""Placement: on which live nodes a service's slot runs.

`all` runs on every live node holding an allowed role. `one` picks a single such node: the
first by a ranking when the service names one ("best node first"), otherwise the node with
the fewest active runs (ties broken by node id, so placement is deterministic).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

from coordinator.core.node import Node
from protocol.service import Placement, Service


def eligible(service: Service, nodes: Iterable[Node]) -> list[Node]:
    return sorted((n for n in nodes if n.allows(service.allowed_roles)), key=lambda n: n.id)


def targets(service: Service, nodes: Iterable[Node]) -> list[str] | None:
    """Node ids for `all`; None for `one` (the node is chosen when the run is dispatched)."""
    if service.placement is Placement.ALL:
        return [n.id for n in eligible(service, nodes)]
    return None


def choose_one(
    service: Service,
    nodes: Iterable[Node],
    load: Mapping[str, int],
    rank: Callable[[str], list[str]] | None = None,
) -> str | None:
    """The node for a `one` run, or None when no live node holds an allowed role."""
    candidates = [n for n in eligible(service, nodes) if load.get(n.id, 0) < n.capacity]
    if not candidates:
        return None
    if service.rank_by and rank is not None:
        order = rank(service.rank_by)
        position = {node_id: i for i, node_id in enumerate(order)}
        candidates.sort(key=lambda n: (position.get(n.id, len(order)), load.get(n.id, 0), n.id))
        return candidates[0].id
    return min(candidates, key=lambda n: (load.get(n.id, 0), n.id)).id
