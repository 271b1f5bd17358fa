"""The worker's timer (workers/timer.py): keys fired at clock instants on one thread."""

from __future__ import annotations

import threading
import time

from protocol.clock import ManualClock, SystemClock
from workers.timer import Timer


def _recorder() -> tuple[list[str], threading.Event, object]:
    fired: list[str] = []
    any_fired = threading.Event()

    def fire(key: str) -> None:
        fired.append(key)
        any_fired.set()

    return fired, any_fired, fire


def test_keys_fire_in_order_of_their_instants_once_the_clock_reaches_them() -> None:
    clock = ManualClock(start=1000.0)
    fired, _, fire = _recorder()
    timer = Timer(clock, fire, "t")  # type: ignore[arg-type]
    try:
        timer.at(1002.0, "b")
        timer.at(1001.0, "a")
        timer.at(1003.0, "c")
        time.sleep(0.05)
        assert fired == []
        clock.advance(2.0)
        deadline = time.monotonic() + 2
        while len(fired) < 2 and time.monotonic() < deadline:
            time.sleep(0.005)
        assert fired == ["a", "b"]
        assert len(timer) == 1
    finally:
        assert timer.stop() == 1


def test_a_cancelled_key_never_fires_and_a_key_given_again_fires_at_its_new_instant() -> None:
    clock = ManualClock(start=0.0)
    fired, _, fire = _recorder()
    timer = Timer(clock, fire, "t")  # type: ignore[arg-type]
    try:
        timer.at(1.0, "gone")
        timer.cancel("gone")
        timer.cancel("never given")  # harmless
        timer.at(1.0, "moved")
        timer.at(5.0, "moved")
        timer.at(2.0, "kept")
        clock.advance(3.0)
        deadline = time.monotonic() + 2
        while not fired and time.monotonic() < deadline:
            time.sleep(0.005)
        time.sleep(0.05)
        assert fired == ["kept"]
        clock.advance(3.0)
        deadline = time.monotonic() + 2
        while len(fired) < 2 and time.monotonic() < deadline:
            time.sleep(0.005)
        assert fired == ["kept", "moved"]
    finally:
        timer.stop()


def test_cancelled_entries_do_not_pile_up() -> None:
    """A deadline per run, cancelled when the run ends: a busy node's heap stays small."""
    fired, _, fire = _recorder()
    timer = Timer(SystemClock(), fire, "t")  # type: ignore[arg-type]
    try:
        far = time.time() + 3600
        for i in range(10_000):
            timer.at(far, f"run-{i}")
            timer.cancel(f"run-{i}")
        assert len(timer) == 0
        assert len(timer._heap) <= 64 + 1
        assert fired == []
    finally:
        timer.stop()
