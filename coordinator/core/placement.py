"""Placement: on which live nodes a service's slot runs.

`all` runs on every live node holding an allowed role. `one` picks a single such node: the
first by a ranking when the service names one (`rank_by`, "best node first"), otherwise the
node with the fewest active runs (ties broken by node id, so placement is deterministic).
A `one` run never goes to a node taken out of placement (`out`, by a ranking threshold)
while another eligible node is live; `all` services and daemons still run there, so the
node's stats can show it recovered. `choose_one` also says why it chose that node.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Mapping

from coordinator.core.node import Node
from protocol.service import Placement, Service

Rank = Callable[[str], list[str]]
"""A ranking's node order, best first; empty when the ranking is empty or stale."""


def eligible(service: Service, nodes: Iterable[Node],
             out: Collection[str] = ()) -> list[Node]:
    """The live nodes holding an allowed role and not in `out`, by node id."""
    roles = service.allowed_roles
    return sorted((n for n in nodes if n.allows(roles) and n.id not in out),
                  key=_node_id)


def any_eligible(service: Service, nodes: Iterable[Node]) -> bool:
    """Whether `eligible` would name any node (without building the list)."""
    roles = service.allowed_roles
    return any(n.allows(roles) for n in nodes)


def _node_id(node: Node) -> str:
    return node.id


def targets(service: Service, nodes: Iterable[Node]) -> list[str] | None:
    """Node ids for `all`; None for `one` (the node is chosen when the run is dispatched)."""
    if service.placement is Placement.ALL:
        return [n.id for n in eligible(service, nodes)]
    return None


def choose_one(
    service: Service,
    nodes: Iterable[Node],
    load: Mapping[str, int],
    rank: Rank | None = None,
    out: Collection[str] = (),
) -> tuple[str | None, str]:
    """The node for a `one` run (None when no live node with an allowed role has room),
    and why: which ranking it followed, or the fallback and why it was taken."""
    nodes = list(nodes)
    allowed = eligible(service, nodes, out)
    skipped = f"; {', '.join(sorted(out))} out of placement" if out else ""
    if not allowed and out:  # every eligible node is out: better there than nowhere
        allowed = eligible(service, nodes)
        skipped = "; every eligible node is out of placement"
    candidates = [n for n in allowed if load.get(n.id, 0) < n.capacity]
    if not candidates:
        return None, "no eligible node with room" + skipped
    fewest = min(candidates, key=lambda n: (load.get(n.id, 0), n.id))
    if service.rank_by and rank is not None:
        order = rank(service.rank_by)
        position = {node_id: i for i, node_id in enumerate(order)}
        ranked = [n for n in candidates if n.id in position]
        if ranked:
            best = min(ranked, key=lambda n: (position[n.id], load.get(n.id, 0), n.id))
            return best.id, (f"ranking {service.rank_by}: best-ranked eligible node "
                             f"#{position[best.id] + 1} of {', '.join(order)}{skipped}")
        why = ("no ranked node is eligible" if order else "the ranking is empty or stale")
        return fewest.id, (f"ranking {service.rank_by}: {why}; fewest active runs "
                           f"({load.get(fewest.id, 0)}){skipped}")
    return fewest.id, f"fewest active runs ({load.get(fewest.id, 0)}){skipped}"
