"""Ctrl-C stops `rota up` cleanly: daemons stopped and recorded, nothing left running."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from rota.cli import DEFAULT_CATALOGUE

# A daemon that is a command line, so that `rota up` has child processes to leave behind.
COMMAND_DAEMON = """
[[service]]
name = "Sleeper"
kind = "daemon"
allowed_roles = ["Master"]
run_groups = []
placement = "all"
command = ["sleep", "600"]
"""


def _process_table() -> dict[int, tuple[int, str]]:
    """pid → (parent pid, start time in clock ticks) of every process, from /proc."""
    table = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        table[int(entry.name)] = (int(fields[1]), fields[19])
    return table


def descendants(pid: int) -> dict[int, str]:
    """The processes under ``pid`` (children, theirs, …), each with its start time."""
    table = _process_table()
    found: dict[int, str] = {}
    frontier = [pid]
    while frontier:
        parent = frontier.pop()
        for child, (ppid, started) in table.items():
            if ppid == parent and child not in found:
                found[child] = started
                frontier.append(child)
    return found


def still_running(processes: dict[int, str], grace: float = 5.0) -> dict[int, str]:
    """Those of ``processes`` still alive after ``grace`` seconds (a zombie counts as gone;
    init reaps orphans a moment after their parent exits)."""
    deadline = time.monotonic() + grace
    while True:
        table = _process_table()
        alive = {}
        for pid, started in processes.items():
            if pid in table and table[pid][1] == started:
                try:
                    state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
                except OSError:
                    continue
                if state not in ("Z", "X"):
                    alive[pid] = Path(f"/proc/{pid}/cmdline").read_bytes().decode(
                        errors="replace").replace("\0", " ")
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.1)


def test_ctrl_c_stops_daemons_and_leaves_nothing_running(tmp_path: Path) -> None:
    history = tmp_path / "h.jsonl"
    catalogue = tmp_path / "catalogue.toml"
    catalogue.write_text(DEFAULT_CATALOGUE.read_text() + COMMAND_DAEMON)
    proc = subprocess.Popen(
        [sys.executable, "-m", "rota.cli", "up", "--speed", "30", "--catalogue", str(catalogue),
         "--history", str(history)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        # Recorded while `rota up` is alive: once it exits, its children are no longer its.
        deadline = time.monotonic() + 30
        children: dict[int, str] = {}
        while time.monotonic() < deadline and proc.poll() is None:
            children = descendants(proc.pid)
            if any(b"sleep" in Path(f"/proc/{p}/cmdline").read_bytes() for p in children
                   if Path(f"/proc/{p}/cmdline").exists()):
                break
            time.sleep(0.2)
        assert children, "the Sleeper daemon never started as a child process"
        time.sleep(3)
        children.update(descendants(proc.pid))
        os.kill(proc.pid, signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err[-2000:]
    assert "stopping daemons and runs" in out and "stopped;" in out
    left = still_running(children)
    assert not left, f"left running after Ctrl-C: {left}"
    records = [json.loads(line) for line in history.read_text().splitlines()]
    daemons = {(r["service"], r["node"]) for r in records
               if r["trigger"] == "daemon" and r["reason"] == "stopped"}
    assert ("RADIUS Server", "master-1") in daemons
    assert ("RADIUS Server", "processing-1") in daemons
    assert ("Calculator", "processing-1") in daemons or ("Calculator", "master-1") in daemons
    assert ("Sleeper", "master-1") in daemons
