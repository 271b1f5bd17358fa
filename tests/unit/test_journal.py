"""A worker's journal: whole JSON lines, on disk as soon as written, from any thread."""

from __future__ import annotations

import json
import threading
from pathlib import Path

from workers.journal import Journal


def test_lines_from_many_threads_are_whole_and_readable_at_once(tmp_path: Path) -> None:
    path = tmp_path / "w.journal"
    path.write_text('{"event": "earlier"}\n')  # appended to, never truncated
    journal = Journal(str(path))
    payload = "x" * 3_000  # lines longer than a pipe's atomic size

    def write(t: int) -> None:
        for i in range(200):
            journal.write({"event": "start", "run_id": f"{t}-{i}", "pad": payload})

    threads = [threading.Thread(target=write, args=(t,)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # read while still open: nothing waits in a buffer of this process
    lines = path.read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert records[0] == {"event": "earlier"}
    assert sorted(r["run_id"] for r in records[1:]) == sorted(
        f"{t}-{i}" for t in range(8) for i in range(200))
    journal.close()
    journal.write({"event": "after close"})  # ignored, not an error
    assert len(path.read_text().splitlines()) == 1 + 8 * 200
