"""The run ledger: what a leader persists so that the next one resumes exactly.

Keys in the fenced key/value store of the coordination adapter (which packs them into a
bounded number of ZooKeeper znodes, see `protocol/zk.py`):
- `run/<run id>`: an active run (queued, dispatched or running), a `protocol.LedgerRun`;
- `cursor/<service>`: the last slot of the service that was handled (ran, skipped, missed);
- `override/<service>`: operator edits (status, schedule), msgpack map;
- `lastrun/<service>`: when its last run was initiated;
- `log/ended/<ms>-<id>`: the runs one turn ended (finished, missed, skipped, refused), a
  msgpack list of `LedgerRun`s, written once. A successor publishes again those of the last
  `REPUBLISH_WINDOW` seconds (their events may never have gone out) and ignores late
  reports of them. Trimmed by age, and to at most `ENDED_MAX_RUNS` runs and
  `ENDED_MAX_BYTES`: the full history of runs lives on `rota.events` and in history files.
Service names are percent-encoded in keys. The format-1 key `history/<service>` (the last 20
runs of a service, rewritten whole at each finish) is read once and then deleted.
"""

from __future__ import annotations

import itertools
import uuid
from collections import deque
from dataclasses import dataclass
from urllib.parse import quote, unquote

import msgpack

from coordinator.core.actions import Changes, State
from coordinator.core.run import Run
from coordinator.forms import run_from_message, run_to_message
from protocol import LedgerRun, decode_as, encode

REPUBLISH_WINDOW = 300.0  # seconds of ended runs a new leader publishes again
ENDED = "log/ended/"
ENDED_MAX_RUNS = 10_000
ENDED_MAX_BYTES = 4_000_000
ENDED_KEY_BYTES = 200_000  # one turn's ended runs are split into values of about this size


def _k(prefix: str, name: str) -> str:
    return f"{prefix}/{quote(name, safe='')}"


def _name(raw: str) -> str:
    """`unquote`, fast for the usual service names (plain, or with spaces only)."""
    if "%" not in raw:
        return raw
    spaced = raw.replace("%20", " ")
    return spaced if "%" not in spaced else unquote(raw)


def _moment(run: Run | LedgerRun) -> float:
    """When a run ended; missed and skipped ones never started: when they were recorded."""
    return run.finished_at if run.finished_at is not None else run.queued_at


class LedgerError(ValueError):
    """A ledger value that cannot be decoded; `key` names it."""

    def __init__(self, key: str, cause: Exception) -> None:
        super().__init__(f"ledger key {key!r} cannot be decoded: {cause}")
        self.key = key


@dataclass
class _Ended:
    key: str
    newest: float
    entries: list[bytes]
    size: int


class Ledger:
    """Turns engine changes into store writes, and a store snapshot back into engine state."""

    def __init__(self) -> None:
        self._ended: deque[_Ended] = deque()
        self._ended_runs = 0
        self._ended_bytes = 0
        self._newest = float("-inf")
        self._legacy: list[str] = []  # format-1 keys to delete with the next writes
        self._legacy_ended: list[bytes] = []
        # Ended-run keys are unique per leader term without a random draw per key.
        self._tag = uuid.uuid4().hex[:8]
        self._count = itertools.count()

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
        for key in self._legacy:
            out[key] = None
        self._legacy.clear()
        if changes.finished:
            group: list[bytes] = []
            size = 0
            newest = max(_moment(r) for r in changes.finished)
            for run in changes.finished:
                entry = encode(run_to_message(run))
                if group and size + len(entry) > ENDED_KEY_BYTES:
                    out.update(self._keep(group, size, newest))
                    group, size = [], 0
                group.append(entry)
                size += len(entry)
            out.update(self._keep(group, size, newest))
        for gone in self._trim():
            out[gone] = None
        return out

    def _keep(self, entries: list[bytes], size: int, newest: float) -> dict[str, bytes]:
        key = f"{ENDED}{max(0, int(newest * 1000)):015d}-{self._tag}{next(self._count):x}"
        self._add(_Ended(key, newest, entries, size))
        return {key: msgpack.packb(entries)}

    def _add(self, ended: _Ended) -> None:
        self._ended.append(ended)
        self._ended_runs += len(ended.entries)
        self._ended_bytes += ended.size
        self._newest = max(self._newest, ended.newest)

    def _trim(self) -> list[str]:
        """Keys of ended runs past the window or over the bounds, oldest first."""
        gone = []
        while len(self._ended) > 1 and (
            self._ended[0].newest < self._newest - REPUBLISH_WINDOW
            or self._ended_runs > ENDED_MAX_RUNS
            or self._ended_bytes > ENDED_MAX_BYTES
        ):
            old = self._ended.popleft()
            self._ended_runs -= len(old.entries)
            self._ended_bytes -= old.size
            gone.append(old.key)
        return gone

    def restore(self, snapshot: dict[str, bytes]) -> State:
        state = State()
        cursors, last_runs, unpack = state.cursors, state.last_runs, msgpack.unpackb
        for key, value in snapshot.items():
            try:
                # Cursors and last-run times, one or two per service, are most of a large
                # ledger: read here rather than through `_restore_one`.
                if key.startswith("cursor/"):
                    cursors[_name(key[7:])] = float(unpack(value))
                elif key.startswith("lastrun/"):
                    last_runs[_name(key[8:])] = float(unpack(value))
                else:
                    self._restore_one(state, key, value)
            except Exception as exc:
                raise LedgerError(key, exc) from exc
        self._ended = deque(sorted(self._ended, key=lambda e: e.key))  # oldest first
        return state

    def _restore_one(self, state: State, key: str, value: bytes) -> None:
        if key.startswith(ENDED):
            entries = [bytes(e) for e in msgpack.unpackb(value)]
            # decoded now, so that a bad one is named by its key
            runs = [decode_as(e, LedgerRun) for e in entries]
            newest = max((_moment(r) for r in runs), default=float("-inf"))
            self._add(_Ended(key, newest, entries, sum(map(len, entries))))
            return
        prefix, _, raw = key.partition("/")
        name = _name(raw)
        if prefix == "run":
            state.runs.append(run_from_message(decode_as(value, LedgerRun)))
        elif prefix == "override":
            state.overrides[name] = dict(msgpack.unpackb(value))
        elif prefix == "history":  # format 1: read once, deleted by the next writes
            entries = [bytes(e) for e in msgpack.unpackb(value)]
            for entry in entries:
                decode_as(entry, LedgerRun)
            self._legacy_ended += entries
            self._legacy.append(key)

    def recent_all(self, since: float) -> list[Run]:
        """Ended runs kept in the ledger that ended at `since` or later, oldest first.

        Missed and skipped records never started, so their moment is when they were recorded.
        """
        entries = [*self._legacy_ended, *(e for ended in self._ended for e in ended.entries)]
        runs = [run_from_message(decode_as(e, LedgerRun)) for e in entries]
        return [r for r in runs if _moment(r) >= since]
