"""The service table in a terminal: a live rich table, or plain summary lines when piped.

The live table fits the terminal's height. When not every service fits, the rows of idle
services (nothing running, nothing in queue) are left out first, from the bottom, and a line
says how many are not shown; running and waiting services stay in view. The whole table is
always on the service page (`--http-port`). A legend under the table explains the marks.
"""

from __future__ import annotations

import sys
import threading
from datetime import datetime
from typing import TextIO

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

from coordinator import view
from coordinator.leader import Coordinator
from coordinator.view import GROUP_TITLES, Kind
from protocol.catalogue import Catalogue
from protocol.schedule import zone
from rota.embedded import FinishedRuns

LEGEND = (
    "● on / ○ off: the service is enabled / disabled   ▶ N: N runs or daemon instances of it "
    "running now   Last Run: when its last run was dispatched   In Queue: since when a run "
    "of it waits for its run groups or a free node"
)


def _roles_in_order(roles: list[str], order: tuple[str, ...]) -> str:
    index = {r: i for i, r in enumerate(order)}
    return " ".join(sorted(roles, key=lambda r: (index.get(r, len(order)), r)))


def render(coordinator: Coordinator, now: float, console: Console | None = None) -> Group:
    """The service table; fitted to ``console``'s height when one is given."""
    cat = coordinator.catalogue
    snap = coordinator.snapshot()
    rows = list(snap.rows) if snap is not None else []
    return fitted(rows, cat, now, console)


def _active(row: view.Row) -> bool:
    return bool(row.running or row.in_queue)


def _lines(console: Console, renderable: RenderableType) -> int:
    return len(console.render_lines(renderable, console.options, pad=False))


def fitted(rows: list[view.Row], cat: Catalogue, now: float,
           console: Console | None = None) -> Group:
    """The table of ``rows``, with as many rows as fit ``console``'s height (all without one).

    Idle rows are left out first, the lowest first; active rows (running or in queue) only
    when even they do not all fit.
    """
    whole = table_of(rows, cat, now, hidden=[])
    if console is None:
        return whole
    budget = console.size.height - 1  # the live display keeps the cursor on a line of its own
    if _lines(console, whole) <= budget:
        return whole
    active = [i for i, row in enumerate(rows) if _active(row)]
    idle = [i for i, row in enumerate(rows) if not _active(row)]

    def keeping(kept: list[int]) -> Group:
        chosen = set(kept)
        return table_of([rows[i] for i in sorted(chosen)], cat, now,
                        hidden=[row for i, row in enumerate(rows) if i not in chosen])

    # The most rows that fit: first all active rows and a prefix of the idle ones, and when
    # not even the active rows fit, a prefix of those.
    pools = [(active, idle)] if active else []
    pools.append(([], active or idle))
    for fixed, extra in pools:
        low, high = -1, len(extra)  # keeping fixed + extra[:low] fits (low = -1: unknown)
        while high - low > 1:
            mid = (low + high) // 2
            if _lines(console, keeping(fixed + extra[:mid])) <= budget:
                low = mid
            else:
                high = mid
        if low >= 0:
            return keeping(fixed + extra[:low])
    return keeping([])


def table_of(rows: list[view.Row], cat: Catalogue, now: float,
             hidden: list[view.Row]) -> Group:
    """The table of ``rows``, the legend and, when some are ``hidden``, a line saying so."""
    tz = zone(cat.timezone)
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
    parts: list[RenderableType] = [table]
    if hidden:
        busy = sum(1 for row in hidden if _active(row))
        parts.append(Text(
            f"… {len(hidden)} more services not shown"
            + (f" ({busy} of them running or in queue)" if busy else " (all idle)")
            + ": enlarge the terminal, or see them all on the service page (rota up "
            "--http-port PORT)", style="bold yellow"))
    parts.append(Text(LEGEND, style="dim"))
    return Group(*parts)


def summary_line(coordinator: Coordinator, now: float, finished: FinishedRuns) -> str:
    tz = zone(coordinator.catalogue.timezone)
    with finished.lock:
        outcomes, total = finished.by_state(), finished.total
    snap = coordinator.snapshot()
    active = snap.active if snap else 0
    daemons = snap.daemons_running if snap else 0
    waiting = snap.waiting if snap else 0
    parts = ", ".join(f"{k} {v}" for k, v in sorted(outcomes.items()))
    return (
        f"{datetime.fromtimestamp(now, tz).isoformat(timespec='seconds')}  "
        f"finished {total} ({parts or 'none yet'})  active {active}  "
        f"waiting for run groups {waiting}  daemons running {daemons}"
    )


class Display:
    """Refreshes the table (terminal) or prints a summary line every few seconds (pipe)."""

    def __init__(self, coordinator: Coordinator, finished: FinishedRuns,
                 out: TextIO | None = None, every: float = 5.0) -> None:
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
            with Live(render(self.coordinator, clock.now(), console), console=console,
                      refresh_per_second=2, screen=False) as live:
                while not self._stop.wait(0.5):
                    live.update(render(self.coordinator, clock.now(), console))
        else:
            while not self._stop.wait(self.every):
                print(summary_line(self.coordinator, clock.now(), self.finished),
                      file=self.out, flush=True)
            print(summary_line(self.coordinator, clock.now(), self.finished),
                  file=self.out, flush=True)

    def stop(self) -> None:
        self._stop.set()
