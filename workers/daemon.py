"""Keep this node's daemons running, each on a thread of its own.

A daemon that exits or raises while not asked to stop is reported `exited` and started
again after an exponential backoff (1 s, 2 s, 4 s ... at most 60 s of clock time; back to
1 s once an instance stayed up 5 minutes). Every (re)start is reported `started`.

Callable daemons loop on `ctx.cycle()`. `pause` makes the next `cycle()` block — the daemon
is parked at a cycle boundary, reported `paused` — until `resume` (reported `resumed`) or
`stop` (then `cycle()` returns False and `cancelled()` turns true).

Command-line daemons cannot be parked from outside, so pausing one sends SIGTERM to its
process group and waits for it to exit (the program is expected to finish its cycle and exit
on TERM; SIGKILL follows after the grace); it is reported `paused` once gone. Resuming starts
it again (`resumed`, then `started`). Stopping is the same SIGTERM, then SIGKILL.

A callable that ignores a stop for longer than the grace is reported `stopped` and its thread
is abandoned: Python code cannot be killed from outside.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from protocol.backoff import Backoff
from protocol.clock import Clock
from protocol.service import Utility
from workers.executor import (
    ExecContext,
    describe_exception,
    exited,
    finish_output,
    format_traceback,
    group_alive,
    load_callable,
    spawn,
    terminate_group,
    wait_clock,
)

log = logging.getLogger("rota.worker.daemon")

EventState = Literal["started", "paused", "resumed", "stopped", "exited"]
DaemonState = Literal["running", "paused", "backoff", "stopped"]

BACKOFF_INITIAL = 1.0
BACKOFF_MAX = 60.0
BACKOFF_RESET_AFTER = 300.0  # clock seconds of uptime that reset the backoff
_WAKE_CAP = 0.5  # real seconds between looks at the flags while waiting


@dataclass
class DaemonEvent:
    service: str
    state: EventState
    at: float
    error: str | None = None
    output_tail: str = ""


def restart_backoff() -> Backoff:
    """The waits between restarts of one daemon: 1 s, 2 s, 4 s ... at most 60 s."""
    return Backoff(BACKOFF_INITIAL, BACKOFF_MAX)


def restart_wait(backoff: Backoff, uptime: float) -> float:
    """Clock seconds to wait before restarting an instance that stayed up `uptime` seconds:
    the next wait of `backoff`, which starts over after a long enough uptime."""
    if uptime >= BACKOFF_RESET_AFTER:
        backoff.reset()
    return backoff.next()


class _Daemon:
    def __init__(
        self, sup: DaemonSupervisor, service: str, utility: Utility, params: dict[str, object]
    ) -> None:
        self.sup = sup
        self.service = service
        self.utility = utility
        self.params = params
        self.state: DaemonState = "running"
        self.stopping = False
        self.pausing = False
        self.stop_reported = False
        self.wake = threading.Event()
        self.lock = threading.Lock()
        self.ctx: ExecContext | None = None
        self.instance = 0
        self.thread = threading.Thread(
            target=self._main, name=f"rota-daemon:{service}", daemon=True
        )

    # -- control (any thread) ------------------------------------------------------------
    def request_stop(self, reason: str) -> None:
        with self.lock:
            self.stopping = True
            if self.ctx is not None:
                self.ctx.stop(reason)
        self.wake.set()

    def request_pause(self) -> None:
        with self.lock:
            self.pausing = True
            parked = self.state == "paused"
            if self.ctx is not None:
                parked = self.ctx.request_pause() or parked
        self.wake.set()
        if parked:
            # No new park will report it: tell again that it is paused, so a leader waiting
            # for this pause (a resume and this pause may have crossed) does not wait forever.
            self.report("paused")

    def request_resume(self) -> None:
        with self.lock:
            self.pausing = False
            if self.ctx is not None:
                self.ctx.request_resume()
        self.wake.set()

    def report(self, state: EventState, error: str | None = None, tail: str = "") -> None:
        if state == "stopped":
            with self.lock:
                if self.stop_reported:
                    return
                self.stop_reported = True
        self.sup._emit(DaemonEvent(self.service, state, self.sup.clock.now(), error, tail))

    # -- the daemon's thread -------------------------------------------------------------
    def _main(self) -> None:
        backoff = restart_backoff()
        clock = self.sup.clock
        try:
            while not self.stopping:
                if self.pausing:
                    self._park()
                    continue
                ctx = self._new_context()
                started = clock.now()
                self.state = "running"
                self.report("started")
                error = self._run_once(ctx)
                if self.stopping:
                    break
                if error is None:  # a command line ended by a pause
                    continue
                self.report("exited", error, ctx.tail.text())
                wait = restart_wait(backoff, clock.now() - started)
                self.state = "backoff"
                self.wake.clear()
                if not (self.stopping or self.pausing):
                    wait_clock(clock, wait, self.wake)
        except Exception as exc:  # the supervisor itself must not die silently
            log.exception("daemon %s supervision failed", self.service)
            self.report("exited", describe_exception(exc))
        finally:
            self.state = "stopped"
            self.report("stopped")

    def _new_context(self) -> ExecContext:
        self.instance += 1
        ctx = ExecContext(
            run_id=f"daemon:{self.service}@{self.sup.node}#{self.instance}",
            service=self.service,
            node=self.sup.node,
            clock=self.sup.clock,
            params=self.params,
        )
        ctx.on_park = self._on_park
        ctx.on_unpark = self._on_unpark
        with self.lock:
            self.ctx = ctx
            if self.pausing:
                ctx.request_pause()
            if self.stopping:
                ctx.stop("stop requested")
        return ctx

    def _on_park(self) -> None:
        self.state = "paused"
        self.report("paused")

    def _on_unpark(self) -> None:
        self.state = "running"
        self.report("resumed")

    def _park(self) -> None:
        self._on_park()
        while self.pausing and not self.stopping:
            self.wake.wait(_WAKE_CAP)
            self.wake.clear()
        if not self.stopping:
            self._on_unpark()

    def _run_once(self, ctx: ExecContext) -> str | None:
        """Run one instance; the reason it ended, or None when it ended on request."""
        if self.utility.callable:
            return self._run_callable(self.utility.callable, ctx)
        if self.utility.command:
            return self._run_command(self.utility.command, ctx)
        return "utility has no callable or command"

    def _run_callable(self, spec: str, ctx: ExecContext) -> str | None:
        try:
            load_callable(spec)(ctx)
        except (Exception, SystemExit) as exc:
            ctx.tail.write(format_traceback(exc, skip=1))
            return None if self.stopping else describe_exception(exc)
        return None if self.stopping else "returned"

    def _run_command(self, command: tuple[str, ...], ctx: ExecContext) -> str | None:
        try:
            proc = spawn(command, ctx, self.wake.set)
        except (OSError, ValueError) as exc:
            return describe_exception(exc)
        asked = False
        while not exited(proc):
            if self.stopping or self.pausing:
                asked = True
                terminate_group(proc, self.sup.grace)
                break
            self.wake.wait(_WAKE_CAP)
            self.wake.clear()
        if not asked and group_alive(proc.pid):
            terminate_group(proc, self.sup.grace)
        finish_output(proc)
        if asked:
            return None
        return f"exit status {proc.returncode}"


class DaemonSupervisor:
    """Starts, pauses, resumes and stops this node's daemons; `report` gets every event.

    `grace` is the real time a daemon gets to stop (or, for command lines, to exit on
    SIGTERM) before it is killed or abandoned.
    """

    def __init__(
        self,
        clock: Clock,
        report: Callable[[DaemonEvent], None],
        *,
        node: str = "",
        grace: float = 5.0,
    ) -> None:
        self.clock = clock
        self.node = node
        self.grace = grace
        self._report = report
        self._daemons: dict[str, _Daemon] = {}
        self._lock = threading.Lock()

    def _emit(self, event: DaemonEvent) -> None:
        try:
            self._report(event)
        except Exception:
            log.exception("reporting %s %s failed", event.service, event.state)

    def start(self, service: str, utility: Utility, params: dict[str, object]) -> bool:
        """Start a daemon; False if it is already kept running here."""
        with self._lock:
            old = self._daemons.get(service)
            if old is not None and old.thread.is_alive() and not old.stopping:
                return False
            d = _Daemon(self, service, utility, dict(params))
            self._daemons[service] = d
        d.thread.start()
        return True

    def stop(self, service: str, wait: bool = True) -> bool:
        """Stop a daemon for good; False if it is not running here."""
        d = self._live(service)
        if d is None:
            return False
        d.request_stop("stop requested")
        if wait:
            self._join(d)
        return True

    def stop_all(self) -> None:
        with self._lock:
            live = [d for d in self._daemons.values() if d.thread.is_alive()]
        for d in live:
            d.request_stop("stop requested")
        for d in live:
            self._join(d)

    def pause(self, service: str) -> bool:
        """Park the daemon at its next cycle boundary; `paused` is reported once parked."""
        d = self._live(service)
        if d is None:
            return False
        d.request_pause()
        return True

    def resume(self, service: str) -> bool:
        d = self._live(service)
        if d is None:
            return False
        d.request_resume()
        return True

    def status(self) -> dict[str, str]:
        with self._lock:
            return {name: d.state for name, d in self._daemons.items()}

    def metrics(self, service: str) -> dict[str, float]:
        """Metrics reported by the daemon's current instance."""
        with self._lock:
            d = self._daemons.get(service)
        ctx = d.ctx if d is not None else None
        return dict(ctx.metrics) if ctx is not None else {}

    def _live(self, service: str) -> _Daemon | None:
        with self._lock:
            d = self._daemons.get(service)
        if d is None or d.stopping or not d.thread.is_alive():
            return None
        return d

    def _join(self, d: _Daemon) -> None:
        d.thread.join(self.grace + 1.0)
        if d.thread.is_alive():
            log.warning("daemon %s did not stop within %.1fs; abandoned", d.service, self.grace)
            d.state = "stopped"
            d.report("stopped", f"did not stop within {self.grace:g}s; abandoned")
