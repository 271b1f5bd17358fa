"""Small utilities the executor and daemon tests run as `tests.unit.utilities_for_tests:f`."""

from __future__ import annotations

import threading
import time

from workers.executor import ExecContext


def succeed(ctx: ExecContext) -> dict[str, object]:
    ctx.log(f"hello from {ctx.service} on {ctx.node}")
    ctx.metric("rows", 3)
    return {"seconds": 0.25, "label": "not a number"}


def fail(ctx: ExecContext) -> None:
    ctx.log("about to fail")
    _deep_failure(ctx.params.get("why", "bad input"))


def _deep_failure(why: object) -> None:
    raise ValueError(f"{why}")


def chatty(ctx: ExecContext) -> None:
    for i in range(int(ctx.params.get("lines", 2000))):  # type: ignore[call-overload]
        ctx.log(f"line {i:05d} " + "x" * 40)


def until_cancelled(ctx: ExecContext) -> None:
    """Loops until cancelled, then returns promptly."""
    started = ctx.params.get("started")
    if isinstance(started, threading.Event):
        started.set()
    while not ctx.cancelled():
        time.sleep(0.005)
    ctx.log("noticed cancellation")


def stubborn(ctx: ExecContext) -> None:
    """Ignores cancellation until the test releases it."""
    release = ctx.params["release"]
    assert isinstance(release, threading.Event)
    release.wait(10)


def counting_daemon(ctx: ExecContext) -> None:
    """Appends to params["cycles"] once per cycle."""
    cycles = ctx.params["cycles"]
    assert isinstance(cycles, list)
    while ctx.cycle():
        cycles.append(ctx.clock.now())
        time.sleep(0.002)


def crashing_daemon(ctx: ExecContext) -> None:
    """Records its start time in params["starts"] and raises at once."""
    starts = ctx.params["starts"]
    assert isinstance(starts, list)
    starts.append(ctx.clock.now())
    ctx.log(f"start {len(starts)}")
    raise RuntimeError("boom")


def deaf_daemon(ctx: ExecContext) -> None:
    """Never looks at its context: only abandonment stops it."""
    release = ctx.params["release"]
    assert isinstance(release, threading.Event)
    release.wait(10)
