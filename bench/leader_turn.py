"""CPU of one leader turn that dispatches many runs at once, and where it goes.

    python -m bench.leader_turn [--runs 1000] [--rounds 3] [--top 15]

Builds an engine with `--runs` services due at the same instant on three nodes, then times
(process CPU) the turn that fires them: `Engine.tick`, `Outbox.finish` (ledger writes into an
in-memory term, orders published on the in-memory transport, records on an in-memory event
bus) and the page's snapshot. Prints the best of `--rounds` rounds per 1,000 orders, the part
spent encoding and publishing the orders alone, and cProfile's top lines of one more turn. No
servers are needed.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime

from coordinator import view
from coordinator.adapters.events import MemoryEventBus
from coordinator.core.actions import State
from coordinator.core.engine import Engine
from coordinator.core.node import Node
from coordinator.ledger import Ledger
from coordinator.outbox import Outbox, Turn
from protocol.catalogue import Catalogue
from protocol.schedule import Periodic
from protocol.service import Kind, Service, Utility
from protocol.transport import make_transport

DUE = datetime(2030, 1, 7, 12, 0, tzinfo=UTC).timestamp()


class _Term:
    epoch = 1

    def __init__(self) -> None:
        self.store: dict[str, bytes] = {}

    def lost(self) -> bool:
        return False

    def wait_lost(self, timeout: float) -> bool:
        return False

    def load(self) -> dict[str, bytes]:
        return dict(self.store)

    def nodes(self) -> dict[str, bytes]:
        return {}

    def commit(self, writes: Mapping[str, bytes | None]) -> None:
        for key, value in writes.items():
            if value is None:
                self.store.pop(key, None)
            else:
                self.store[key] = value


def catalogue(n: int) -> Catalogue:
    services = {
        f"svc-{i:05d}": Service(
            name=f"svc-{i:05d}", kind=Kind.PERIODIC, schedule=Periodic(1),
            allowed_roles=frozenset({"Master"}), utility=Utility(callable="workers.demo:noop"),
            timeout=60.0,
        )
        for i in range(n)
    }
    return Catalogue(timezone="UTC", roles=("Master",), services=services)


def one_turn(n: int, profile: cProfile.Profile | None = None
             ) -> tuple[float, float]:
    """(CPU s of the whole turn, CPU s of encoding and publishing its orders)."""
    cat = catalogue(n)
    engine = Engine(cat.services.values(), cat.timezone, order_ttl=60.0)
    nodes = {f"n{i}": Node(f"n{i}", frozenset({"Master"}), 10 * n, incarnation=f"s{i}")
             for i in range(3)}
    term = _Term()
    ledger = Ledger()
    transport = make_transport(None)
    outbox = Outbox(transport, MemoryEventBus(), [], threading.Event())
    before = DUE - 0.5
    turn = Turn(actions=engine.set_nodes(nodes, before))
    turn.actions += engine.start(before, State(), 1)
    outbox.finish(term, ledger, engine.drain_changes(), turn, cat, engine.nodes,  # type: ignore[arg-type]
                  before)
    sending = [0.0]
    real_send = outbox.send

    def send(items, t):  # type: ignore[no-untyped-def]
        began = time.process_time()
        real_send(items, t)
        sending[0] += time.process_time() - began

    outbox.send = send  # type: ignore[method-assign]
    if profile is not None:
        profile.enable()
    began = time.process_time()
    turn = Turn(actions=engine.tick(DUE))
    outbox.finish(term, ledger, engine.drain_changes(), turn, cat, engine.nodes,  # type: ignore[arg-type]
                  DUE)
    view.snapshot(engine)
    total = time.process_time() - began
    if profile is not None:
        profile.disable()
    dispatched = transport.pending("rota.node.n0") + transport.pending("rota.node.n1") + \
        transport.pending("rota.node.n2")
    if dispatched != n:
        raise SystemExit(f"expected {n} orders, {dispatched} were published")
    return total, sending[0]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.leader_turn",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--top", type=int, default=15)
    args = parser.parse_args(argv)
    results = [one_turn(args.runs) for _ in range(args.rounds)]
    total = min(r[0] for r in results)
    sending = min(r[1] for r in results)
    per = 1000 / args.runs
    print(f"leader turn dispatching {args.runs} runs: {total * per * 1000:.1f} ms CPU per "
          f"1,000 orders (best of {args.rounds}); encoding + publishing the orders: "
          f"{sending * per * 1000:.1f} ms")
    if args.top:
        profile = cProfile.Profile()
        one_turn(args.runs, profile)
        out = io.StringIO()
        pstats.Stats(profile, stream=out).sort_stats("tottime").print_stats(args.top)
        lines = out.getvalue().splitlines()
        start = next(i for i, line in enumerate(lines) if "ncalls" in line)
        print("\n".join(lines[start - 2:]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
