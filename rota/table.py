"""The service table in a terminal: a live rich table, or plain summary lines when piped."""

from __future__ import annotations

import sys
import threading
from collections import Counter
from datetime import datetime
from typing import TextIO

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from coordinator import view
from coordinator.leader import Coordinator
from coordinator.view import GROUP_TITLES, Kind
from protocol.schedule import zone


def _roles_in_order(roles: list[str], order: tuple[str, ...]) -> str:
    index = {r: i for i, r in enumerate(order)}
    return " ".join(sorted(roles, key=lambda r: (index.get(r, len(order)), r)))


def render(coordinator: Coordinator, now: float) -> Group:
    cat = coordinator.catalogue
    tz = zone(cat.timezone)
    with coordinator.lock:
        engine = coordinator.engine
        rows = view.rows(engine) if engine is not None else []
    clock_text = datetime.fromtimestamp(now, tz).strftime("%Y-%m-%d %H:%M:%S %Z")
    table = Table(title=f"System Services — {clock_text}", expand=False, show_lines=False)
    for col in ("Status", "Name", "Schedule", "Allowed Nodes", "Run Groups", "Last Run",
                "In Queue"):
        table.add_column(col, no_wrap=col in ("Status", "Last Run", "In Queue"))
    current: str | None = None
    for row in rows:
        if row.kind != current:
            current = row.kind
            table.add_row("", Text(GROUP_TITLES[Kind(row.kind)], style="bold cyan"),
                          "", "", "", "", "")
        status = Text("● on", style="green") if row.enabled else Text("○ off", style="red")
        name = Text(row.name, style="bold" if row.running else "")
        if row.running:
            name.append(f"  ▶ {row.running}", style="yellow")
        last = view.ago(now - row.last_run) + " ago" if row.last_run else "—"
        queued = (
            datetime.fromtimestamp(row.in_queue, tz).strftime("%H:%M:%S")
            + f" ({view.ago(now - row.in_queue)})"
            if row.in_queue
            else "—"
        )
        table.add_row(
            status, name, row.schedule, _roles_in_order(row.allowed_nodes, cat.roles),
            ", ".join(row.run_groups) or "—", last, queued,
        )
    return Group(table)


def summary_line(coordinator: Coordinator, now: float, finished: list) -> str:  # type: ignore[type-arg]
    tz = zone(coordinator.catalogue.timezone)
    outcomes = Counter(r.state for r in finished)
    with coordinator.lock:
        engine = coordinator.engine
        active = len(engine.runs) if engine else 0
        daemons = sum(1 for d in engine.daemons.values() if d.state == "running") if engine else 0
        waiting = len(engine.locks.waiting()) if engine else 0
    parts = ", ".join(f"{k} {v}" for k, v in sorted(outcomes.items()))
    return (
        f"{datetime.fromtimestamp(now, tz).isoformat(timespec='seconds')}  "
        f"finished {len(finished)} ({parts or 'none yet'})  active {active}  "
        f"waiting for run groups {waiting}  daemons running {daemons}"
    )


class Display:
    """Refreshes the table (terminal) or prints a summary line every few seconds (pipe)."""

    def __init__(self, coordinator: Coordinator, finished: list, out: TextIO | None = None,  # type: ignore[type-arg]
                 every: float = 5.0) -> None:
        self.coordinator = coordinator
        self.finished = finished
        self.out = out or sys.stdout
        self.every = every
        self._stop = threading.Event()
        self.tty = self.out.isatty()

    def run(self) -> None:
        clock = self.coordinator.clock
        if self.tty:
            console = Console(file=self.out)
            with Live(render(self.coordinator, clock.now()), console=console,
                      refresh_per_second=2, screen=False) as live:
                while not self._stop.wait(0.5):
                    live.update(render(self.coordinator, clock.now()))
        else:
            while not self._stop.wait(self.every):
                print(summary_line(self.coordinator, clock.now(), self.finished),
                      file=self.out, flush=True)
            print(summary_line(self.coordinator, clock.now(), self.finished),
                  file=self.out, flush=True)

    def stop(self) -> None:
        self._stop.set()
