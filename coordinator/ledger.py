"""The run ledger: what a leader persists so that the next one resumes exactly.

Keys in the fenced key/value store of the coordination adapter:
- `run/<run id>`: an active run (queued, dispatched or running), a `protocol.LedgerRun`;
- `cursor/<service>`: the last slot of the service that was handled (ran, skipped, missed);
- `override/<service>`: operator edits (status, schedule), msgpack map;
- `lastrun/<service>`: when its last run was initiated;
- `history/<service>`: its most recent finished runs, newest last.
Service names are percent-encoded in keys.
"""

from __future__ import annotations

from collections import defaultdict, deque
from urllib.parse import quote, unquote

import msgpack

from coordinator.core.actions import Changes, State
from coordinator.core.run import Run
from coordinator.forms import run_from_message, run_to_message
from protocol import LedgerRun, decode_as, encode

HISTORY_PER_SERVICE = 20


def _k(prefix: str, name: str) -> str:
    return f"{prefix}/{quote(name, safe='')}"


class LedgerError(ValueError):
    """A ledger value that cannot be decoded; `key` names it."""

    def __init__(self, key: str, cause: Exception) -> None:
        super().__init__(f"ledger key {key!r} cannot be decoded: {cause}")
        self.key = key


class Ledger:
    """Turns engine changes into store writes, and a store snapshot back into engine state."""

    def __init__(self) -> None:
        self.history: dict[str, deque[bytes]] = defaultdict(
            lambda: deque(maxlen=HISTORY_PER_SERVICE)
        )

    def writes(self, changes: Changes) -> dict[str, bytes | None]:
        out: dict[str, bytes | None] = {}
        for run_id, run in changes.runs.items():
            key = "run/" + quote(run_id, safe="")
            out[key] = None if run is None else encode(run_to_message(run))
        for name, slot in changes.cursors.items():
            out[_k("cursor", name)] = msgpack.packb(slot)
        for name, ov in changes.overrides.items():
            out[_k("override", name)] = msgpack.packb(ov)
        for name, at in changes.last_runs.items():
            out[_k("lastrun", name)] = msgpack.packb(at)
        touched: set[str] = set()
        for run in changes.finished:
            self.history[run.service].append(encode(run_to_message(run)))
            touched.add(run.service)
        for name in touched:
            out[_k("history", name)] = msgpack.packb(list(self.history[name]))
        return out

    def restore(self, snapshot: dict[str, bytes]) -> State:
        state = State()
        for key, value in snapshot.items():
            try:
                self._restore_one(state, key, value)
            except Exception as exc:
                raise LedgerError(key, exc) from exc
        return state

    def _restore_one(self, state: State, key: str, value: bytes) -> None:
        prefix, _, raw = key.partition("/")
        name = unquote(raw)
        if prefix == "run":
            state.runs.append(run_from_message(decode_as(value, LedgerRun)))
        elif prefix == "cursor":
            state.cursors[name] = float(msgpack.unpackb(value))
        elif prefix == "override":
            state.overrides[name] = dict(msgpack.unpackb(value))
        elif prefix == "lastrun":
            state.last_runs[name] = float(msgpack.unpackb(value))
        elif prefix == "history":
            entries = list(msgpack.unpackb(value))
            for entry in entries:  # decoded now, so that a bad one is named by its key
                decode_as(entry, LedgerRun)
            self.history[name] = deque(entries, maxlen=HISTORY_PER_SERVICE)

    def recent_all(self, since: float) -> list[Run]:
        """Finished runs of every service kept in the ledger that ended at `since` or later.

        Missed and skipped records never started, so their moment is when they were recorded.
        """
        out = []
        for name in list(self.history):
            out += [r for r in self.recent(name) if (r.finished_at or r.queued_at) >= since]
        return out

    def recent(self, service: str) -> list[Run]:
        return [run_from_message(decode_as(b, LedgerRun)) for b in self.history.get(service, ())]
