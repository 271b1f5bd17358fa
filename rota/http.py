"""The HTTP server of a coordinator: the operators' API (`rota.api`) on uvicorn, in a thread.

`serve(coordinator, port, host, runs=..., tokens=...)` starts it and returns once it listens
(raising `OSError` when it cannot); `.shutdown()` stops it. The app reads the leader's
immutable snapshot, never its lock, so serving never holds up a leader's turn.
"""

from __future__ import annotations

import threading
import time

import uvicorn

from coordinator.leader import Coordinator
from rota.api import make_app
from rota.auth import Tokens
from rota.runs import RunSource


class Server:
    def __init__(self, server: uvicorn.Server, thread: threading.Thread, host: str,
                 port: int) -> None:
        self._server = server
        self._thread = thread
        self.host = host
        self.port = port

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host
        return f"http://{host}:{self.port}"

    def shutdown(self) -> None:
        self._server.should_exit = True
        self._thread.join(10)

    def server_close(self) -> None:
        """Kept for callers of the earlier server; `shutdown` already closed it."""


def serve(coordinator: Coordinator, port: int, host: str = "127.0.0.1", *,
          runs: RunSource | None = None, tokens: Tokens | None = None,
          protect_reads: bool = False, timeout: float = 10.0) -> Server:
    """Serve the API in a background thread; returns once it listens."""
    if runs is None:
        from rota.embedded import FinishedRuns
        from rota.runs import MemoryRuns

        runs = MemoryRuns(FinishedRuns(), coordinator)
    app = make_app(coordinator, runs, tokens or Tokens(), protect_reads=protect_reads)
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False,
                            lifespan="off", server_header=False)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name=f"http:{port}", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            raise OSError(f"cannot serve HTTP on {host}:{port} (is the port taken?)")
        time.sleep(0.01)
    return Server(server, thread, host, port)
