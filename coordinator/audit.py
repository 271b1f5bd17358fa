"""Audit a run history against the contract: the checks behind the guarantees.

Given finished run records (from `--history`, `rota.events` or a soak run), the catalogue,
the nodes' roles and the observed window, `audit` lists every violation of:
- exactly one record per due slot per placement target (a run, or a slot recorded skipped,
  missed, lost or expired with a reason);
- no overlap in wall-clock time of runs whose services' run groups intersect;
- runs only on nodes holding an allowed role;
- every daemon started on each live node its placement allows.
Pure: it reads records, it touches nothing.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from protocol import RunRecord
from protocol.catalogue import Catalogue
from protocol.schedule import zone
from protocol.service import Placement

RAN = {"succeeded", "failed", "timed_out"}
NOT_RUN = {"skipped", "missed", "lost", "expired", "rejected"}


@dataclass
class Report:
    violations: list[str] = field(default_factory=list)
    slots_due: int = 0
    runs: int = 0
    duplicates: int = 0
    silent_misses: int = 0
    overlaps: int = 0
    wrong_role: int = 0
    stale_epoch: int = 0

    @property
    def ok(self) -> bool:
        return not self.violations

    def line(self) -> str:
        return (f"slots due {self.slots_due}, runs {self.runs}, duplicates {self.duplicates}, "
                f"silent misses {self.silent_misses}, overlaps {self.overlaps}, "
                f"wrong role {self.wrong_role}, stale orders executed {self.stale_epoch}")


def expected_slots(catalogue: Catalogue, start: float, end: float) -> dict[str, list[float]]:
    """Every slot of every scheduled, enabled service with start < slot <= end."""
    tz = zone(catalogue.timezone)
    out: dict[str, list[float]] = {}
    for svc in catalogue.services.values():
        if svc.schedule is None or not svc.enabled:
            continue
        slots = []
        t = svc.schedule.next_after(start, tz)
        while t <= end:
            slots.append(t)
            t = svc.schedule.next_after(t, tz)
        out[svc.name] = slots
    return out


def audit(
    records: Iterable[RunRecord],
    catalogue: Catalogue,
    node_roles: Mapping[str, Iterable[str]],
    *,
    start: float,
    settled: float,
    epochs: Mapping[str, int] | None = None,
    absent: Mapping[str, list[tuple[float, float]]] | None = None,
) -> Report:
    """Check `records` for slots in (start, settled]; later slots may still be in flight.

    `absent` lists, per node, the windows in which it was down (killed, restarting): an
    `all` slot in such a window owes that node no record.
    """
    rep = Report()
    absent = absent or {}

    def away(node: str, t: float) -> bool:
        return any(a <= t <= b for a, b in absent.get(node, ()))

    roles = {n: frozenset(r) for n, r in node_roles.items()}
    recs = list(records)
    by_slot: dict[tuple[str, float], list[RunRecord]] = defaultdict(list)
    for r in recs:
        if r.trigger in ("scheduled", "retry") and r.slot is not None and r.attempt == 1:
            by_slot[(r.service, round(r.slot, 3))].append(r)
    for name, slots in expected_slots(catalogue, start, settled).items():
        svc = catalogue.services[name]
        eligible = sorted(n for n, rs in roles.items() if not rs.isdisjoint(svc.allowed_roles))
        for slot in slots:
            got = by_slot.get((name, round(slot, 3)), [])
            if svc.placement is Placement.ALL:
                targets: list[str | None] = [n for n in eligible if not away(n, slot)]
            else:
                targets = [None]
            rep.slots_due += len(targets)
            for target in targets:
                mine = [g for g in got if target is None or g.node == target]
                if svc.placement is Placement.ALL and not mine:
                    # A slot with no eligible node at all is one record without a node.
                    mine = [g for g in got if g.node is None and g.state in NOT_RUN]
                if not mine:
                    rep.silent_misses += 1
                    rep.violations.append(f"{name} slot {_iso(slot)} on {target or 'any node'}: "
                                          "no record (silently dropped)")
                elif len(mine) > 1:
                    rep.duplicates += len(mine) - 1
                    rep.violations.append(
                        f"{name} slot {_iso(slot)} on {target or 'any node'}: {len(mine)} records "
                        f"({', '.join(f'{m.state}@{m.node}' for m in mine)})")
                elif mine[0].state in NOT_RUN and not mine[0].reason:
                    rep.violations.append(f"{name} slot {_iso(slot)}: {mine[0].state} "
                                          "without a reason")
    intervals = []
    for r in recs:
        if r.state in RAN or (r.trigger == "daemon" and r.started_at is not None):
            rep.runs += r.trigger != "daemon"
            if r.node is not None and r.node in roles:
                ran = catalogue.services.get(r.service)
                if ran is not None and roles[r.node].isdisjoint(ran.allowed_roles):
                    rep.wrong_role += 1
                    rep.violations.append(f"{r.service} ran on {r.node} "
                                          f"(roles {sorted(roles[r.node])}), not an allowed role")
            if epochs is not None and r.run_id in epochs and epochs[r.run_id] < r.epoch:
                rep.stale_epoch += 1
            if r.started_at is not None and r.finished_at is not None and r.run_groups:
                intervals.append(r)
    rep.overlaps = _overlaps(intervals, rep.violations)
    for svc in catalogue.services.values():
        if not svc.is_daemon or not svc.enabled:
            continue
        may_run = {n for n, rs in roles.items() if not rs.isdisjoint(svc.allowed_roles)}
        started = {r.node for r in recs
                   if r.service == svc.name and r.trigger == "daemon" and r.node is not None}
        if svc.placement is Placement.ALL and not may_run <= started:
            rep.violations.append(f"daemon {svc.name} never started on "
                                  f"{', '.join(sorted(may_run - started))}")
        elif svc.placement is Placement.ONE and may_run and not started:
            rep.violations.append(f"daemon {svc.name} never started")
    return rep


def _overlaps(runs: list[RunRecord], out: list[str]) -> int:
    """Pairs of runs of different services with intersecting groups that overlap in time."""
    count = 0
    runs = sorted(runs, key=lambda r: r.started_at or 0.0)
    active: list[RunRecord] = []
    for r in runs:
        assert r.started_at is not None
        active = [a for a in active if (a.finished_at or 0.0) > r.started_at]
        for a in active:
            if a.service != r.service and set(a.run_groups) & set(r.run_groups):
                count += 1
                out.append(f"overlap: {a.service} [{_iso(a.started_at)}–{_iso(a.finished_at)}] "
                           f"and {r.service} [{_iso(r.started_at)}–{_iso(r.finished_at)}] "
                           f"share {sorted(set(a.run_groups) & set(r.run_groups))}")
        active.append(r)
    return count


def _iso(t: float | None) -> str:
    from datetime import UTC, datetime

    return "?" if t is None else datetime.fromtimestamp(t, UTC).strftime("%H:%M:%S.%f")[:-3]


def audit_journal(entries: Iterable[Mapping[str, object]], report: Report | None = None) -> Report:
    """Check the workers' own journals: no run id started twice, no stale order executed,
    no two runs with intersecting run groups overlapping on the workers' own clocks.

    A `worker-killed` entry (written by whoever SIGKILLed the worker) ends every run and
    daemon interval that node's process had open at that instant."""
    entries = list(entries)
    rep = report if report is not None else Report()
    kills: dict[str, list[float]] = defaultdict(list)
    for e in entries:
        if e.get("event") == "worker-killed":
            kills[str(e["node"])].append(_num(e["at"]))
    starts: dict[str, list[Mapping[str, object]]] = defaultdict(list)
    ends: dict[str, Mapping[str, object]] = {}
    for e in entries:
        if e.get("event") == "start":
            starts[str(e["run_id"])].append(e)
        elif e.get("event") == "end":
            ends[str(e["run_id"])] = e
    for run_id, ss in starts.items():
        if len(ss) > 1:
            rep.duplicates += len(ss) - 1
            rep.violations.append(f"run {run_id} started {len(ss)} times on "
                                  f"{', '.join(str(s['node']) for s in ss)}")
        for s in ss:
            if _num(s.get("epoch", 0)) < _num(s.get("seen_epoch", 0)):
                rep.stale_epoch += 1
                rep.violations.append(f"run {run_id} executed from stale epoch {s['epoch']} "
                                      f"(node had seen {s['seen_epoch']})")
    spans = []
    for run_id, ss in starts.items():
        end = ends.get(run_id)
        groups = _strs(ss[0].get("run_groups"))
        began = _num(ss[0]["at"])
        finished = _num(end["at"]) if end is not None else _killed_after(
            kills, str(ss[0]["node"]), began)
        if finished is not None and groups:
            spans.append(RunRecord(
                run_id=run_id, service=str(ss[0]["service"]), node=str(ss[0]["node"]),
                trigger="scheduled", state="succeeded", epoch=0, run_groups=groups,
                started_at=began, finished_at=finished,
            ))
    spans += _daemon_spans(entries)
    rep.overlaps += _overlaps(spans, rep.violations)
    return rep


def _num(value: object) -> float:
    """A number from a journal line (JSON): int or float; anything else is an error."""
    if isinstance(value, int | float | str):
        return float(value)
    raise ValueError(f"not a number in the journal: {value!r}")


def _strs(value: object) -> list[str]:
    """A list of names from a journal line; None or missing is empty."""
    if isinstance(value, list | tuple):
        return [str(v) for v in value]
    return []


def _killed_after(kills: Mapping[str, list[float]], node: str, at: float) -> float | None:
    return min((k for k in kills.get(node, ()) if k >= at), default=None)


def _daemon_spans(entries: list[Mapping[str, object]]) -> list[RunRecord]:
    """Daemon intervals from the journals: started/resumed until paused/stopped/exited.

    A node's journal ends where the node died: an interval still open ends there too.
    """
    last_at: dict[str, float] = {}
    for e in entries:
        node = str(e.get("node"))
        last_at[node] = max(last_at.get(node, 0.0), _num(e.get("at", 0.0)))
    open_: dict[tuple[str, str], tuple[float, list[str]]] = {}
    out: list[RunRecord] = []

    def close(key: tuple[str, str], at: float) -> None:
        begun, groups = open_.pop(key)
        if groups:
            out.append(RunRecord(
                run_id=f"daemon:{key[0]}@{key[1]}#{len(out)}", service=key[0], node=key[1],
                trigger="daemon", state="succeeded", epoch=0, run_groups=groups,
                started_at=begun, finished_at=max(begun, at),
            ))

    daemon_lines = (e for e in entries
                    if str(e.get("event", "")).startswith("daemon-")
                    or e.get("event") == "worker-killed")
    for e in sorted(daemon_lines, key=lambda e: _num(e.get("at", 0.0))):
        at = _num(e["at"])
        if e.get("event") == "worker-killed":
            for key in [k for k in open_ if k[1] == str(e["node"])]:
                close(key, at)
            continue
        key = (str(e["service"]), str(e["node"]))
        state = str(e["event"])[len("daemon-"):]
        if state in ("started", "resumed"):
            if key not in open_:
                open_[key] = (at, _strs(e.get("run_groups")))
        elif state in ("paused", "stopped", "exited") and key in open_:
            close(key, at)
    for key in list(open_):
        close(key, last_at.get(key[1], open_[key][0]))
    return out
