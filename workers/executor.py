"""Run one utility run on this node: a Python callable or a command line.

A callable `module:function` is imported once per process and called with a run context
(`ExecContext`) on the caller's thread; the executor's timers (`workers/timer.py`, one
thread for every run's deadline, one for graces) watch the clock meanwhile. At the timeout
the context's `cancelled()` turns true; a callable that has not returned within a short
real-time grace after that (or after a cancel) is reported `timed_out` (or cancelled) from the
timer's side, and its thread is abandoned to it. Python code cannot be killed from outside:
utilities that need a hard kill should be command lines.

A command line runs in its own process group (a new session) with stdout and stderr merged
into a bounded output tail; a line `ROTA_METRIC name=value` on its output reports a metric.
At the timeout or on `cancel()` the whole group gets SIGTERM, then SIGKILL after a grace.
Processes of the group still alive when the main process exits are terminated the same way,
so a finished run leaves nothing behind. The run's identity and parameters are passed in
the environment: ROTA_RUN_ID, ROTA_SERVICE, ROTA_NODE and ROTA_PARAMS (JSON).
"""

from __future__ import annotations

import importlib
import json
import logging
import math
import os
import signal
import subprocess
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import IO, Literal

from protocol.backoff import Backoff
from protocol.clock import Clock, SystemClock
from protocol.service import Utility
from workers.threads import ThreadPool
from workers.timer import Timer

log = logging.getLogger("rota.worker")

Outcome = Literal["succeeded", "failed", "timed_out"]

ERROR_LIMIT = 4096
TAIL_LIMIT = 8192
METRIC_PREFIX = "ROTA_METRIC "
_POLL_CAP = 0.5  # real seconds: longest wait before the clock is looked at again
_POLL_FLOOR = 0.005  # real seconds: shortest wait (a ManualClock converts everything to 0)
_EXIT_POLL_MAX = 0.05  # real seconds: longest wait between looks at a terminated group
_READ_CHUNK = 65536


@dataclass
class RunOutcome:
    outcome: Outcome
    started_at: float
    finished_at: float
    exit_status: int | None = None
    error: str | None = None
    output_tail: str = ""
    metrics: dict[str, float] = field(default_factory=dict)


class OutputTail:
    """The last `limit` characters written to it (thread-safe)."""

    def __init__(self, limit: int = TAIL_LIMIT) -> None:
        self.limit = limit
        self._parts: deque[str] = deque()
        self._size = 0
        self._lock = threading.Lock()

    def write(self, text: str) -> None:
        if not text:
            return
        if len(text) > self.limit:
            text = text[-self.limit :]
        with self._lock:
            self._parts.append(text)
            self._size += len(text)
            while self._size - len(self._parts[0]) >= self.limit:
                self._size -= len(self._parts.popleft())

    def text(self) -> str:
        with self._lock:
            return "".join(self._parts)[-self.limit :]


class ExecContext:
    """The run context handed to a callable (satisfies `workers.context.RunContext`).

    `stop(reason)` makes `cancelled()` true and `cycle()` return False. For daemons,
    `request_pause()` makes the next `cycle()` park until `request_resume()` or `stop()`;
    `on_park` / `on_unpark` are called from the daemon's thread when it parks and leaves.
    """

    def __init__(
        self,
        *,
        run_id: str,
        service: str,
        node: str,
        clock: Clock,
        params: dict[str, object] | None = None,
    ) -> None:
        self.run_id = run_id
        self.service = service
        self.node = node
        self.clock = clock
        self.params: dict[str, object] = dict(params or {})
        self.metrics: dict[str, float] = {}
        self.tail = OutputTail()
        self.on_park: Callable[[], None] | None = None
        self.on_unpark: Callable[[], None] | None = None
        self._cond = threading.Condition()
        self._stop_reason: str | None = None
        self._pause = False
        self._parked = False

    # -- the RunContext protocol -------------------------------------------------------
    def log(self, line: str) -> None:
        self.tail.write(str(line).rstrip("\n") + "\n")

    def metric(self, name: str, value: float) -> None:
        self.metrics[str(name)] = float(value)

    def cancelled(self) -> bool:
        return self._stop_reason is not None

    def cycle(self) -> bool:
        with self._cond:
            if self._stop_reason is not None:
                return False
            if not self._pause:
                return True
            self._parked = True
        if self.on_park is not None:
            self.on_park()
        with self._cond:
            while self._pause and self._stop_reason is None:
                self._cond.wait()
            self._parked = False
            stopped = self._stop_reason is not None
        if not stopped and self.on_unpark is not None:
            self.on_unpark()
        return not stopped

    # -- control -----------------------------------------------------------------------
    @property
    def stop_reason(self) -> str | None:
        return self._stop_reason

    @property
    def parked(self) -> bool:
        return self._parked

    def stop(self, reason: str) -> None:
        with self._cond:
            if self._stop_reason is None:
                self._stop_reason = reason
            self._cond.notify_all()

    def request_pause(self) -> bool:
        """Park at the next cycle boundary; True if already parked (and it stays so)."""
        with self._cond:
            self._pause = True
            return self._parked

    def request_resume(self) -> None:
        with self._cond:
            self._pause = False
            self._cond.notify_all()


# -- shared helpers (also used by the daemon supervisor) ----------------------------------

_callables: dict[str, Callable[..., object]] = {}
_callables_lock = threading.Lock()


def load_callable(spec: str) -> Callable[..., object]:
    """Import `module:function` (cached per process)."""
    fn = _callables.get(spec)
    if fn is not None:
        return fn
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"callable {spec!r} is not of the form module:function")
    with _callables_lock:
        module = importlib.import_module(module_name)
        obj: object = module
        for part in attr.split("."):
            obj = getattr(obj, part)
        if not callable(obj):
            raise TypeError(f"{spec} is not callable")
        _callables[spec] = obj
        return obj


def describe_exception(exc: BaseException) -> str:
    return clip(f"{type(exc).__name__}: {exc}", ERROR_LIMIT)


def clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def format_traceback(exc: BaseException, skip: int = 0) -> str:
    """The traceback of `exc`, leaving out its first `skip` frames (the caller's own)."""
    tb = exc.__traceback__
    for _ in range(skip):
        if tb is not None and tb.tb_next is not None:
            tb = tb.tb_next
    return "".join(traceback.format_exception(type(exc), exc, tb))


def spawn(
    command: tuple[str, ...], ctx: ExecContext, on_exit: Callable[[], None] | None = None
) -> subprocess.Popen[bytes]:
    """Start `command` in a new session, with a thread pumping its merged output.

    Once the output ends the thread reaps the process and calls `on_exit`.
    """
    env = dict(os.environ)
    env.update(
        ROTA_RUN_ID=ctx.run_id,
        ROTA_SERVICE=ctx.service,
        ROTA_NODE=ctx.node,
        ROTA_PARAMS=json.dumps(ctx.params, default=str),
    )
    proc = subprocess.Popen(
        list(command),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        env=env,
    )
    assert proc.stdout is not None
    reader = threading.Thread(
        target=_pump, args=(proc, ctx, on_exit), name=f"rota-out:{ctx.run_id}", daemon=True
    )
    reader.start()
    proc.rota_reader = reader  # type: ignore[attr-defined]
    return proc


def finish_output(proc: subprocess.Popen[bytes], timeout: float = 5.0) -> None:
    """Wait for the output pump of an exited process to drain."""
    reader: threading.Thread | None = getattr(proc, "rota_reader", None)
    if reader is not None:
        reader.join(timeout)


def _pump(
    proc: subprocess.Popen[bytes], ctx: ExecContext, on_exit: Callable[[], None] | None
) -> None:
    stream: IO[bytes] = proc.stdout  # type: ignore[assignment]
    with stream:
        for raw in iter(lambda: stream.readline(_READ_CHUNK), b""):
            line = raw.decode("utf-8", errors="replace")
            if line.startswith(METRIC_PREFIX):
                _parse_metrics(line[len(METRIC_PREFIX) :], ctx)
            ctx.tail.write(line)
    proc.wait()
    if on_exit is not None:
        on_exit()


def exited(proc: subprocess.Popen[bytes]) -> bool:
    return proc.returncode is not None or proc.poll() is not None


def _parse_metrics(text: str, ctx: ExecContext) -> None:
    for pair in text.split():
        name, sep, value = pair.partition("=")
        try:
            if not sep or not name:
                raise ValueError(pair)
            number = float(value)
            if not math.isfinite(number):
                raise ValueError(pair)
        except ValueError:
            ctx.tail.write(f"rota: ignored bad metric {pair!r}\n")
            continue
        ctx.metrics[name] = number


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def group_alive(pgid: int) -> bool:
    """Whether a process group has a member that is not a zombie."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        pids = [p for p in os.listdir("/proc") if p.isdigit()]
    except OSError:
        return True
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat", "rb") as fh:
                stat = fh.read()
        except OSError:
            continue
        fields = stat[stat.rfind(b")") + 2 :].split()
        if len(fields) > 2 and int(fields[2]) == pgid and fields[0] != b"Z":
            return True
    return False


def terminate_group(proc: subprocess.Popen[bytes], grace: float) -> None:
    """SIGTERM the process group of `proc`, SIGKILL what is left after `grace` real seconds."""
    pgid = proc.pid
    _signal_group(pgid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    polls = Backoff(_POLL_FLOOR, _EXIT_POLL_MAX)
    while time.monotonic() < deadline:
        if exited(proc) and not group_alive(pgid):
            return
        time.sleep(polls.next())
    _signal_group(pgid, signal.SIGKILL)
    proc.wait()


def wait_clock(clock: Clock, seconds: float, wake: threading.Event) -> bool:
    """Wait `seconds` of clock time or until `wake` is set; True if woken."""
    deadline = clock.now() + seconds
    while True:
        remaining = deadline - clock.now()
        if remaining <= 0:
            return wake.is_set()
        if wake.wait(_real_wait(clock, remaining)):
            return True


def _real_wait(clock: Clock, remaining: float) -> float:
    return min(max(clock.to_real(remaining), _POLL_FLOOR), _POLL_CAP)


# -- the executor ----------------------------------------------------------------------------


class _Run:
    def __init__(self, ctx: ExecContext, on_end: Callable[[RunOutcome], None]) -> None:
        self.ctx = ctx
        self.on_end = on_end
        self.wake = threading.Event()
        self.cancel_reason: str | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        # A callable's, under the executor's lock:
        self.is_callable = False
        self.started = 0.0
        self.timeout = 0.0
        self.cause: Literal["timeout", "cancel"] | None = None  # what stopped it first
        self.ended = False  # its outcome was given to `on_end`


class Executor:
    """Runs utilities for this node on the threads of its callers (`start`, or `run` that
    waits for the outcome).

    `grace` is the real time a callable gets to return after its timeout or a cancel before
    it is abandoned; `kill_grace` the real time between SIGTERM and SIGKILL of a command line.
    """

    def __init__(self, clock: Clock, *, grace: float = 2.0, kill_grace: float = 5.0) -> None:
        self.clock = clock
        self.grace = grace
        self.kill_grace = kill_grace
        self._runs: dict[str, _Run] = {}
        self._lock = threading.Lock()
        self.threads = ThreadPool("rota-utility")
        """Threads for `run` and for the outcomes of abandoned callables (`workers/threads.py`)."""
        self._deadlines: Timer | None = None  # started with the first callable
        self._graces: Timer | None = None

    def running(self) -> list[str]:
        with self._lock:
            return list(self._runs)

    def close(self) -> None:
        """Stop the timers (a callable still running is neither timed out nor abandoned)."""
        with self._lock:
            timers, self._deadlines, self._graces = (self._deadlines, self._graces), None, None
        for timer in timers:
            if timer is not None:
                timer.stop()

    def cancel(self, run_id: str, reason: str = "stop requested") -> bool:
        """Stop a running run early; it ends `failed` with "cancelled: <reason>"."""
        with self._lock:
            run = self._runs.get(run_id)
            if run is None:
                return False
            if run.cancel_reason is None:
                run.cancel_reason = reason
            if run.cause is None:
                run.cause = "cancel"
                if run.is_callable:
                    self._timers()[1].at(time.time() + self.grace, run_id)
        run.ctx.stop(f"cancelled: {reason}")
        proc = run.proc
        if proc is not None and proc.returncode is None:
            _signal_group(proc.pid, signal.SIGTERM)
        run.wake.set()
        return True

    def run(
        self,
        utility: Utility,
        *,
        run_id: str,
        service: str,
        node: str,
        timeout: float,
        params: dict[str, object],
        on_start: Callable[[float], None] | None = None,
    ) -> RunOutcome:
        """Run a utility on one of the executor's threads and wait for its outcome (`start`)."""
        outcome: list[RunOutcome] = []
        given = threading.Event()

        def end(out: RunOutcome) -> None:
            outcome.append(out)
            given.set()

        self.threads.submit(partial(
            self.start, utility, run_id=run_id, service=service, node=node, timeout=timeout,
            params=params, on_start=on_start, on_end=end))
        given.wait()
        return outcome[0]

    def start(
        self,
        utility: Utility,
        *,
        run_id: str,
        service: str,
        node: str,
        timeout: float,
        params: dict[str, object],
        on_end: Callable[[RunOutcome], None],
        on_start: Callable[[float], None] | None = None,
    ) -> None:
        """Run a utility on the calling thread and give its outcome to `on_end`, once.

        Usually `on_end` is called on this thread before `start` returns. A callable still
        running `grace` seconds after its timeout or a cancel has its outcome given from
        another thread instead, and `start` returns only when (if ever) the callable does.
        """
        ctx = ExecContext(
            run_id=run_id, service=service, node=node, clock=self.clock, params=params
        )
        run = _Run(ctx, on_end)
        with self._lock:
            self._runs[run_id] = run
        try:
            started = self.clock.now()
            if on_start is not None:
                on_start(started)
            if utility.callable:
                self._run_callable(utility.callable, run, started, timeout)
                return
            if utility.command:
                out = self._run_command(utility.command, run, started, timeout)
            else:
                out = self._outcome(run, "failed", started,
                                    error="utility has no callable or command")
        except BaseException:
            self._forget(run)
            raise
        self._end(run, out)

    def _forget(self, run: _Run) -> bool:
        """Mark `run` ended and drop it; False if it had ended already."""
        with self._lock:
            if run.ended:
                return False
            run.ended = True
            if self._runs.get(run.ctx.run_id) is run:
                del self._runs[run.ctx.run_id]
            timers = (self._deadlines, self._graces) if run.is_callable else ()
        for timer in timers:
            if timer is not None:
                timer.cancel(run.ctx.run_id)
        return True

    def _end(self, run: _Run, out: RunOutcome) -> None:
        if self._forget(run):
            run.on_end(out)

    def _timers(self) -> tuple[Timer, Timer]:
        """The deadline and grace timers, started with the first callable. Called with
        `_lock` held."""
        if self._deadlines is None or self._graces is None:
            self._deadlines = Timer(self.clock, self._deadline_passed, "rota-deadlines")
            self._graces = Timer(SystemClock(), self._grace_over, "rota-graces")
        return self._deadlines, self._graces

    # -- callables -----------------------------------------------------------------------
    def _run_callable(self, spec: str, run: _Run, started: float, timeout: float) -> None:
        ctx = run.ctx
        try:
            fn = load_callable(spec)
        except Exception as exc:
            ctx.tail.write(format_traceback(exc))
            self._end(run, self._outcome(run, "failed", started, error=describe_exception(exc)))
            return
        with self._lock:
            run.is_callable, run.started, run.timeout = True, started, timeout
            deadlines, graces = self._timers()
            deadlines.at(started + timeout, ctx.run_id)
            if run.cause == "cancel":  # cancelled before it was known to be a callable
                graces.at(time.time() + self.grace, ctx.run_id)
        me = threading.current_thread()
        pool_name, me.name = me.name, f"rota-run:{ctx.run_id}"
        value: object = None
        raised: BaseException | None = None
        try:
            value = fn(ctx)
        except BaseException as exc:  # reported as the run's failure
            raised = exc
        finally:
            me.name = pool_name
        with self._lock:
            if run.ended:  # abandoned: its outcome was given already
                return
            cause = run.cause
        if raised is not None:
            ctx.tail.write(format_traceback(raised, skip=1))
        elif isinstance(value, dict):
            self._merge_metrics(ctx, value)
        if cause == "timeout":
            out = self._outcome(run, "timed_out", started, error=f"timed out after {timeout:g}s")
        elif cause == "cancel":
            out = self._outcome(run, "failed", started, error=f"cancelled: {run.cancel_reason}")
        elif raised is not None:
            out = self._outcome(run, "failed", started, error=describe_exception(raised))
        else:
            out = self._outcome(run, "succeeded", started)
        self._end(run, out)

    def _deadline_passed(self, run_id: str) -> None:
        """A callable's timeout came (deadline timer's thread)."""
        with self._lock:
            run = self._runs.get(run_id)
            if run is None or run.ended or run.cause is not None:
                return
            run.cause = "timeout"
            self._timers()[1].at(time.time() + self.grace, run_id)
        run.ctx.stop("timeout")

    def _grace_over(self, run_id: str) -> None:
        """A callable timed out or cancelled has not returned within the grace: give its
        outcome now and abandon its thread (grace timer's thread)."""
        with self._lock:
            run = self._runs.get(run_id)
            if run is None or run.ended or not run.is_callable:
                return
            cause = run.cause
        if cause == "timeout":
            out = self._outcome(run, "timed_out", run.started, error=(
                f"timed out after {run.timeout:g}s; still running {self.grace:g}s later, "
                "abandoned"))
        else:
            out = self._outcome(run, "failed", run.started,
                                error=f"cancelled: {run.cancel_reason}")
        log.warning("run %s of %s abandoned on its thread: %s", run_id, run.ctx.service,
                    out.error)
        # Given on a thread of its own: `on_end` may wait (for room in a full outbox), and
        # this timer keeps every other run's time.
        self.threads.submit(partial(self._end, run, out))

    @staticmethod
    def _merge_metrics(ctx: ExecContext, values: dict[object, object]) -> None:
        for name, value in values.items():
            try:
                number = float(value)  # type: ignore[arg-type]
            except (TypeError, ValueError):
                ctx.tail.write(f"rota: ignored non-numeric metric {name!r}\n")
                continue
            ctx.metrics[str(name)] = number

    # -- command lines ---------------------------------------------------------------------
    def _run_command(
        self, command: tuple[str, ...], run: _Run, started: float, timeout: float
    ) -> RunOutcome:
        ctx = run.ctx
        try:
            proc = spawn(command, ctx, run.wake.set)
        except (OSError, ValueError) as exc:
            return self._outcome(run, "failed", started, error=describe_exception(exc))
        run.proc = proc
        if run.cancel_reason is not None:  # cancelled before the process existed
            _signal_group(proc.pid, signal.SIGTERM)
        ended = self._watch(run, started + timeout, lambda: exited(proc))
        if ended != "done" or group_alive(proc.pid):
            if ended == "done":
                ctx.tail.write("rota: terminating processes left behind by the run\n")
            terminate_group(proc, self.kill_grace)
        finish_output(proc)
        status = proc.returncode
        if ended == "timeout":
            return self._outcome(run, "timed_out", started, status, f"timed out after {timeout:g}s")
        if ended == "cancel":
            return self._outcome(run, "failed", started, status, f"cancelled: {run.cancel_reason}")
        if status == 0:
            return self._outcome(run, "succeeded", started, status)
        return self._outcome(run, "failed", started, status, f"exit status {status}")

    # -- common ------------------------------------------------------------------------------
    def _watch(self, run: _Run, deadline: float, is_done: Callable[[], bool]) -> str:
        """Wait until done, cancelled or past `deadline` (clock time)."""
        while True:
            if run.cancel_reason is not None:  # first: a cancelled process exits on its TERM
                return "cancel"
            if is_done():
                return "done"
            remaining = deadline - self.clock.now()
            if remaining <= 0:
                return "timeout"
            run.wake.wait(_real_wait(self.clock, remaining))
            run.wake.clear()

    def _outcome(
        self,
        run: _Run,
        outcome: Outcome,
        started: float,
        exit_status: int | None = None,
        error: str | None = None,
    ) -> RunOutcome:
        return RunOutcome(
            outcome=outcome,
            started_at=started,
            finished_at=self.clock.now(),
            exit_status=exit_status,
            error=clip(error, ERROR_LIMIT) if error is not None else None,
            output_tail=run.ctx.tail.text(),
            metrics=dict(run.ctx.metrics),
        )
