"""Ctrl-C stops `rota up` cleanly: daemons stopped and recorded, nothing left running."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path


def _children(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(entry.name))
    return out


def test_ctrl_c_stops_daemons_and_leaves_nothing_running(tmp_path: Path) -> None:
    history = tmp_path / "h.jsonl"
    proc = subprocess.Popen(
        [sys.executable, "-m", "rota.cli", "up", "--speed", "30",
         "--history", str(history)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    time.sleep(6)
    os.kill(proc.pid, signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err[-2000:]
    assert "stopping daemons and runs" in out and "stopped;" in out
    assert _children(proc.pid) == []
    records = [json.loads(line) for line in history.read_text().splitlines()]
    daemons = {(r["service"], r["node"]) for r in records
               if r["trigger"] == "daemon" and r["reason"] == "stopped"}
    assert ("RADIUS Server", "master-1") in daemons
    assert ("RADIUS Server", "processing-1") in daemons
    assert ("Calculator", "processing-1") in daemons or ("Calculator", "master-1") in daemons
