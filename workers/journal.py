"""A worker's journal (`rota worker --journal FILE`): one JSON line per run start and end (and
per daemon event), this node's own account of what it ran.

Each line goes to the file with a single `write(2)` on a descriptor opened for appending, before
the utility it records starts: a process killed right after keeps it (the kernel has it), and
lines written by several threads never interleave. No buffer sits in between, so writing a line
costs one system call and no flush, on the path that starts runs.
"""

from __future__ import annotations

import json
import os
import threading
from typing import Any


class Journal:
    def __init__(self, path: str) -> None:
        self._fd: int | None = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self._lock = threading.Lock()  # a line is never written to a closed (reused) fd

    def write(self, record: dict[str, Any]) -> None:
        line = (json.dumps(record) + "\n").encode("utf-8")
        with self._lock:
            while self._fd is not None and line:  # all of it, unless the disk is full
                line = line[os.write(self._fd, line):]

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
