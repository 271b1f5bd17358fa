"""Placement: one vs all, allowed roles only, least-loaded choice, no eligible node."""

from __future__ import annotations

from coordinator.core import placement
from coordinator.core.node import Node
from protocol.schedule import Periodic
from protocol.service import Kind, Placement, Service

NODES = [
    Node("n3-proc", frozenset({"Processing"})),
    Node("n1-master", frozenset({"Master"})),
    Node("n2-master-calc", frozenset({"Master", "Calculation"})),
    Node("n4-calc", frozenset({"Calculation"}), capacity=1),
]


def svc(*roles: str, where: Placement = Placement.ONE, rank_by: str | None = None) -> Service:
    return Service(
        name="S", kind=Kind.PERIODIC, schedule=Periodic(5), allowed_roles=frozenset(roles),
        placement=where, rank_by=rank_by,
    )


def test_eligible_holds_an_allowed_role_sorted_by_id() -> None:
    assert [n.id for n in placement.eligible(svc("Master"), NODES)] == [
        "n1-master", "n2-master-calc",
    ]
    assert [n.id for n in placement.eligible(svc("Calculation", "Processing"), NODES)] == [
        "n2-master-calc", "n3-proc", "n4-calc",
    ]
    assert placement.eligible(svc("Reporting"), NODES) == []


def test_all_targets_every_eligible_node() -> None:
    assert placement.targets(svc("Master", where=Placement.ALL), NODES) == [
        "n1-master", "n2-master-calc",
    ]
    assert placement.targets(svc("Reporting", where=Placement.ALL), NODES) == []


def test_one_is_chosen_at_dispatch() -> None:
    assert placement.targets(svc("Master"), NODES) is None


def test_one_picks_the_least_loaded_node_ties_by_id() -> None:
    s = svc("Master", "Processing")
    assert placement.choose_one(s, NODES, {})[0] == "n1-master"
    assert placement.choose_one(s, NODES, {"n1-master": 2, "n2-master-calc": 1})[0] == "n3-proc"
    assert placement.choose_one(s, NODES, {"n1-master": 1, "n3-proc": 1})[0] == "n2-master-calc"


def test_one_never_picks_a_node_without_an_allowed_role() -> None:
    s = svc("Processing")
    assert placement.choose_one(s, NODES, {"n3-proc": 50})[0] == "n3-proc"


def test_no_eligible_node() -> None:
    assert placement.choose_one(svc("Reporting"), NODES, {})[0] is None
    assert placement.choose_one(svc("Master"), [], {})[0] is None


def test_a_node_at_capacity_is_not_chosen() -> None:
    s = svc("Calculation")
    assert placement.choose_one(s, NODES, {"n2-master-calc": 5})[0] == "n4-calc"
    assert placement.choose_one(s, NODES, {"n2-master-calc": 64, "n4-calc": 1})[0] is None


def test_rank_orders_candidates_best_first() -> None:
    s = svc("Master", "Processing", rank_by="fastest")
    seen = []

    def rank(ranking_id: str) -> list[str]:
        seen.append(ranking_id)
        return ["n3-proc", "n9-gone", "n2-master-calc"]

    assert placement.choose_one(s, NODES, {}, rank)[0] == "n3-proc"
    assert seen == ["fastest"]
    # A node missing from the ranking comes after the ranked ones.
    assert placement.choose_one(s, NODES, {"n3-proc": 64}, rank)[0] == "n2-master-calc"
    # Without rank_by the ranking is not consulted.
    assert placement.choose_one(svc("Master"), NODES, {}, rank)[0] == "n1-master"
    assert seen == ["fastest", "fastest"]


def test_rank_by_explains_the_choice_and_its_fallbacks() -> None:
    s = svc("Master", "Processing", rank_by="fastest")
    node, why = placement.choose_one(s, NODES, {}, lambda _: ["n3-proc", "n1-master"])
    assert node == "n3-proc"
    assert why == "ranking fastest: best-ranked eligible node #1 of n3-proc, n1-master"
    # An empty (or stale) ranking: the normal choice, and why.
    node, why = placement.choose_one(s, NODES, {"n1-master": 1}, lambda _: [])
    assert node == "n2-master-calc"
    assert why == "ranking fastest: the ranking is empty or stale; fewest active runs (0)"
    # Ranked nodes none of which may take it: the normal choice.
    node, why = placement.choose_one(s, NODES, {}, lambda _: ["n4-calc"])
    assert node == "n1-master" and why.startswith("ranking fastest: no ranked node is eligible")
    assert placement.choose_one(svc("Master"), NODES, {}) == ("n1-master",
                                                              "fewest active runs (0)")


def test_a_node_out_of_placement_is_never_chosen() -> None:
    s = svc("Master", "Processing", rank_by="fastest")
    node, why = placement.choose_one(s, NODES, {}, lambda _: ["n3-proc", "n1-master"],
                                     out={"n3-proc"})
    assert node == "n1-master" and why.endswith("; n3-proc out of placement")
    # Every eligible node out: better there than nowhere.
    node, why = placement.choose_one(svc("Processing"), NODES, {}, out={"n3-proc"})
    assert node == "n3-proc" and why.endswith("; every eligible node is out of placement")
    assert [n.id for n in placement.eligible(svc("Master"), NODES, {"n1-master"})] == [
        "n2-master-calc"]
