"""The live service table of `rota up` fits the terminal and explains its marks."""

from __future__ import annotations

import io
import re
from types import SimpleNamespace

import pytest
from rich.console import Console

from coordinator import view
from protocol.catalogue import Catalogue, load_catalogue
from rota import table
from rota.cli import DEFAULT_CATALOGUE

NOW = 1_790_000_000.0


@pytest.fixture(scope="module")
def catalogue() -> Catalogue:
    return load_catalogue(DEFAULT_CATALOGUE)


def _rows(cat: Catalogue, running: set[str] = frozenset(), queued: set[str] = frozenset()  # type: ignore[assignment]
          ) -> list[view.Row]:
    rows = [
        view.Row(name=svc.name, kind=svc.kind.value, enabled=True,
                 schedule=view.schedule_text(svc), allowed_nodes=sorted(svc.allowed_roles),
                 run_groups=sorted(svc.run_groups), last_run=NOW - 60,
                 in_queue=NOW - 5 if svc.name in queued else None,
                 running=1 if svc.name in running else 0, description=svc.description)
        for kind in view.GROUP_ORDER for svc in cat.services.values() if svc.kind is kind
    ]
    assert len(rows) == len(cat.services)
    return rows


def _show(cat: Catalogue, rows: list[view.Row], height: int, width: int = 160) -> list[str]:
    console = Console(file=io.StringIO(), width=width, height=height, force_terminal=True,
                      color_system=None)
    coordinator = SimpleNamespace(catalogue=cat, snapshot=lambda: SimpleNamespace(rows=rows))
    console.print(table.render(coordinator, NOW, console))  # type: ignore[arg-type]
    text = console.file.getvalue()  # type: ignore[attr-defined]
    return str(text).splitlines()


def _names_shown(lines: list[str], rows: list[view.Row]) -> set[str]:
    return {row.name for row in rows if any(f" {row.name} " in line for line in lines)}


def test_on_a_45_row_terminal_the_table_fits_and_says_what_it_leaves_out(
    catalogue: Catalogue
) -> None:
    last = [row.name for row in _rows(catalogue)][-3:]  # at the bottom: the first to go
    rows = _rows(catalogue, running={last[0]}, queued={last[1]})
    lines = _show(catalogue, rows, height=45)
    assert len(lines) <= 44, f"{len(lines)} lines on a 45-row terminal"
    shown = _names_shown(lines, rows)
    assert {last[0], last[1]} <= shown, "running and waiting services must stay in view"
    notice = [line for line in lines if "more services not shown" in line]
    assert len(notice) == 1, lines[-5:]
    hidden = int(re.search(r"(\d+) more services not shown", notice[0])[1])  # type: ignore[index]
    assert hidden > 0 and hidden + len(shown) == len(rows)
    assert "--http-port" in notice[0] and "enlarge the terminal" in notice[0]


def test_when_even_the_active_services_do_not_fit_the_count_says_so(
    catalogue: Catalogue
) -> None:
    rows = _rows(catalogue, running={row.name for row in _rows(catalogue)})
    lines = _show(catalogue, rows, height=20)
    assert len(lines) <= 19
    notice = [line for line in lines if "more services not shown" in line]
    assert len(notice) == 1 and "running or in queue" in notice[0], lines


def test_a_tall_terminal_shows_every_service_and_no_notice(catalogue: Catalogue) -> None:
    rows = _rows(catalogue)
    lines = _show(catalogue, rows, height=200)
    assert _names_shown(lines, rows) == {row.name for row in rows}
    assert not any("not shown" in line for line in lines)


def test_a_legend_explains_the_marks(catalogue: Catalogue) -> None:
    rows = _rows(catalogue, running={"Cache Manager"})
    lines = _show(catalogue, rows, height=200, width=240)
    assert any("Cache Manager  ▶ 1" in line for line in lines)
    legend = [line for line in lines if "▶ N:" in line]
    assert legend and "running now" in legend[0], lines[-3:]
    assert "○ off" in legend[0] and "In Queue:" in legend[0]
