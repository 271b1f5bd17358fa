"""Node membership: the live nodes (`Engine.nodes`, the one record of them), and what a node
that dies or restarts takes with it.
"""

from __future__ import annotations

from collections.abc import Mapping

from coordinator.core.actions import Action
from coordinator.core.base import EngineBase
from coordinator.core.node import Node
from coordinator.core.run import RunState


class Membership(EngineBase):
    def set_nodes(self, fresh: Mapping[str, Node], now: float) -> list[Action]:
        """The live nodes are now `fresh` (a full view of membership): nodes missing from it
        are down, new ones and new sessions of known ones are up."""
        actions: list[Action] = []
        for node_id in sorted(set(self.nodes) - set(fresh)):
            actions += self.node_down(node_id, now)
        for node_id, node in fresh.items():
            if self.nodes.get(node_id) != node:
                actions += self.node_up(node, now)
        return actions

    def node_up(self, node: Node, now: float) -> list[Action]:
        """A node announced itself. An announcement from a new session of a known node
        means the old session ended (the process restarted, or its session expired): what
        ran there is lost, as if the node had gone and come back."""
        old = self.nodes.get(node.id)
        self.nodes[node.id] = node
        if not self._started:
            return []
        actions: list[Action] = []
        if old is not None and old.incarnation != node.incarnation:
            actions += self._lose_work(node.id, now, "restarted")
        return (actions + self._reconcile_daemons(now)
                + (self._place_waiting(now) if self._full else [])
                + (self._ahead_for_new_node(now) if self._ahead_all else []))

    def node_down(self, node_id: str, now: float) -> list[Action]:
        """The node is certainly fenced off (its session expired): its runs are lost."""
        self.nodes.pop(node_id, None)
        actions = self._lose_work(node_id, now, "died")
        self._load.pop(node_id, None)
        return actions + self._reconcile_daemons(now)

    def _lose_work(self, node_id: str, now: float, why: str) -> list[Action]:
        """End what a node's ended session ran: its runs are lost, its daemons forgotten,
        their run groups freed. Runs waiting to go to a node that merely restarted stay."""
        actions: list[Action] = []
        reason = f"node {node_id} {why}"
        for run in [r for r in self.runs.values() if r.node == node_id]:
            if run.state in (RunState.DISPATCHED, RunState.RUNNING):
                actions += self._end(run, RunState.LOST, now, reason=reason)
            elif run.state is RunState.QUEUED and run.target and node_id not in self.nodes:
                actions += self._end(run, RunState.LOST, now, reason=reason)
        for inst in [d for d in self.daemons.values() if d.node == node_id]:
            del self.daemons[inst.key]
            for claim in self.locks.release(inst.key):
                actions += self._granted(claim, now)
        return actions + self._close_intervals(node_id, now, reason)
