"""The spread benchmark's breakdown of start lateness by position in a node's batch."""

from __future__ import annotations

from typing import Any

import pytest

from bench.cluster import by_position, slow_instants


def start(node: str, slot: float, late: float) -> dict[str, Any]:
    return {"event": "start", "node": node, "slot": slot, "at": slot + late}


def test_positions_rank_each_nodes_starts_of_one_slot() -> None:
    entries = [
        start("a", 10.0, 0.003), start("a", 10.0, 0.001), start("b", 10.0, 0.002),
        start("a", 11.0, 0.004), start("a", 11.0, 0.006),
        start("a", 12.0, 0.050),  # outside the window
        {"event": "end", "node": "a", "slot": 10.0, "at": 10.5},
        {"event": "start", "node": "a", "slot": None, "at": 3.0},  # a manual run
    ]
    pos = by_position(entries, 10.0, 12.0)
    assert {k: sorted(v) for k, v in pos.items()} == {
        0: pytest.approx([0.001, 0.002, 0.004]), 1: pytest.approx([0.003, 0.006])}
    assert slow_instants(entries, 10.0, 12.0, 0.005) == (1, 2)
    assert slow_instants(entries, 10.0, 13.0, 0.005) == (2, 3)
