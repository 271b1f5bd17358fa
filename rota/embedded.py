"""The all-in-one cluster: a coordinator and worker nodes in one process.

With no server addresses it runs on the in-memory adapters (the in-memory transport, in-memory
coordination and events), so a newcomer sees Rota work with nothing installed. Given
`--zk` and `--amqp` it runs the very same parts on real ZooKeeper and RabbitMQ.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import warnings
from collections import Counter, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from coordinator.adapters.events import EventBus, MemoryEventBus, RabbitEventBus
from coordinator.leader import Coordinator, LeaderOptions
from protocol import RunRecord, transport
from protocol.catalogue import Catalogue
from protocol.clock import Clock
from protocol.coordination import MemoryCoordination
from protocol.schedule import zone
from workers.node import WorkerNode

log = logging.getLogger("rota.embedded")
# Several worker nodes share one broker object in this process, by design.
warnings.filterwarnings("ignore", message="You're adding a middleware of the same type twice")

DEFAULT_NODES = (
    "master-1=Master;redundancy-1=Redundancy,Reporting;processing-1=Processing,Calculation"
)


@dataclass(frozen=True)
class NodeSpec:
    id: str
    roles: tuple[str, ...]


def parse_nodes(text: str) -> list[NodeSpec]:
    """`id=Role,Role;id=Role` → node specs. Raises ValueError naming the bad part."""
    specs: list[NodeSpec] = []
    for part in filter(None, (p.strip() for p in text.split(";"))):
        node_id, sep, roles = part.partition("=")
        role_list = tuple(r.strip() for r in roles.split(",") if r.strip())
        if not sep or not node_id.strip() or not role_list:
            raise ValueError(f"bad node spec {part!r}: expected id=Role[,Role…]")
        specs.append(NodeSpec(node_id.strip(), role_list))
    if not specs:
        raise ValueError("no nodes given")
    ids = [s.id for s in specs]
    if len(set(ids)) != len(ids):
        raise ValueError(f"duplicate node id in {text!r}")
    return specs


class HistoryFile:
    """Appends every finished run to a JSON-lines file, times in ISO 8601 with offset."""

    def __init__(self, path: str | Path, tz_name: str) -> None:
        self.tz = zone(tz_name)
        self._fh: IO[str] = open(path, "a", encoding="utf-8")  # noqa: SIM115
        self._lock = threading.Lock()

    def __call__(self, rec: RunRecord) -> None:
        line = json.dumps(rec.to_json_dict(self.tz), sort_keys=True)
        with self._lock:
            self._fh.write(line + "\n")
            self._fh.flush()

    def close(self) -> None:
        with self._lock:
            self._fh.close()


class FinishedRuns:
    """The runs finished so far: every one counted, the last `keep` kept.

    `rota up` may run for weeks; what it keeps stays bounded. The counts (in total and by
    final state) cover every run; iterating gives the kept ones, oldest first. The whole
    history goes to `--history` files, which this bound does not touch.
    """

    def __init__(self, keep: int = 1000) -> None:
        if keep < 1:
            raise ValueError("keep must be at least 1")
        self.keep = keep
        self._recent: deque[RunRecord] = deque(maxlen=keep)
        self._states: Counter[str] = Counter()
        self._total = 0
        self.lock = threading.RLock()
        """Held while a record is added; hold it to read several figures consistently."""

    def append(self, rec: RunRecord) -> None:
        with self.lock:
            self._recent.append(rec)
            self._states[rec.state] += 1
            self._total += 1

    @property
    def total(self) -> int:
        """How many runs finished, kept or not."""
        with self.lock:
            return self._total

    def by_state(self) -> dict[str, int]:
        """How many runs finished in each final state, kept or not."""
        with self.lock:
            return dict(self._states)

    def __len__(self) -> int:
        with self.lock:
            return len(self._recent)

    def __iter__(self) -> Iterator[RunRecord]:
        with self.lock:
            return iter(list(self._recent))


class Cluster:
    def __init__(
        self,
        catalogue: Catalogue,
        clock: Clock,
        nodes: list[NodeSpec],
        *,
        amqp_url: str | None = None,
        zk_hosts: str | None = None,
        history: str | Path | None = None,
        options: LeaderOptions | None = None,
        keep_finished: int = 1000,
    ) -> None:
        self.catalogue = catalogue
        self.clock = clock
        self.specs = nodes
        self.amqp_url = amqp_url
        self.zk_hosts = zk_hosts
        self.transport = transport.make_transport(amqp_url)
        self.broker = transport.broker_of(self.transport)  # for callers that hold a broker
        self.events: EventBus = RabbitEventBus(amqp_url) if amqp_url else MemoryEventBus()
        self.history = HistoryFile(history, catalogue.timezone) if history else None
        self.finished = FinishedRuns(keep_finished)
        sinks: list[Callable[[RunRecord], None]] = [self._keep]
        if self.history:
            sinks.append(self.history)
        self._coord_root = self._coordination("coordinator")
        self.coordinator = Coordinator(
            "embedded", catalogue, self._coord_root, self.transport, self.events, clock,
            options=options, history_sinks=sinks,
        )
        self.workers = [
            WorkerNode(s.id, list(s.roles), self.transport, self._coordination(s.id), clock,
                       catalogue=catalogue)
            for s in nodes
        ]
        self._thread = threading.Thread(target=self.coordinator.run, name="coordinator",
                                        daemon=True)

    def _coordination(self, identifier: str):
        if self.zk_hosts:
            from protocol.zk import ZkCoordination

            return ZkCoordination(self.zk_hosts, identifier=identifier)
        if not hasattr(self, "_memory"):
            self._memory = MemoryCoordination()
            return self._memory
        return self._memory.handle()

    def _keep(self, rec: RunRecord) -> None:
        self.finished.append(rec)

    @property
    def _finished_lock(self) -> threading.RLock:
        # Callers that held this lock around reading `finished` keep working; reading it is
        # safe without it now.
        return self.finished.lock

    def start(self, wait: float = 10.0) -> Cluster:
        for w in self.workers:
            w.start()
        self._thread.start()
        if not self.coordinator.leading.wait(wait):
            raise RuntimeError("the coordinator did not become leader in time")
        return self

    def stop(self) -> None:
        """Stop daemons and runs, let the leader record what they report, then stop it."""
        for w in self.workers:
            w.stop_lock_holders("cluster stopping")
            for run_id in list(w._running):
                w.executor.cancel(run_id, "cluster stopping")
        for w in self.workers:
            w.stop()
        self._drain_results()
        self.coordinator.stop()
        self._thread.join(10)
        for w in self.workers:
            w.coordination.close()
        self._coord_root.close()
        self.events.close()
        self.transport.close()
        if self.history:
            self.history.close()

    def _drain_results(self, timeout: float = 5.0) -> None:
        """Wait until the leader has taken every run event reported so far."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pending = 0
            try:
                pending = self.transport.pending(transport.RESULTS)
            except Exception:
                pending = 0
            if pending == 0 and self.coordinator._inbox.empty():
                time.sleep(0.3)
                return
            time.sleep(0.05)
