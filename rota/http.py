"""HTTP adapter: Prometheus `/metrics`, the service table as JSON, and operator actions.

Routes (served on loopback by `serve`):
- `GET /metrics` — Prometheus exposition (prometheus_client's WSGI app);
- `GET /api/services` — the service table rows as JSON (503 while not leading);
- `POST /api/services/<name>/run` — ask for a manual run (202 with the request id);
- `GET /` — a plain page with the table.
"""

from __future__ import annotations

import html
import json
import threading
from datetime import datetime
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import make_wsgi_app

from coordinator import view
from coordinator.leader import Coordinator
from protocol.schedule import zone


class _Quiet(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        pass


class _ThreadingServer(WSGIServer):
    daemon_threads = True

    def process_request(self, request, client_address):
        t = threading.Thread(target=self._handle, args=(request, client_address), daemon=True)
        t.start()

    def _handle(self, request, client_address):
        try:
            self.finish_request(request, client_address)
        except Exception:
            self.handle_error(request, client_address)
        finally:
            self.shutdown_request(request)


def _json(start_response, status: str, body: object):
    data = json.dumps(body).encode()
    start_response(status, [("Content-Type", "application/json"),
                            ("Content-Length", str(len(data)))])
    return [data]


def make_app(coordinator: Coordinator):
    metrics_app = make_wsgi_app()

    def rows_json() -> list[dict[str, object]] | None:
        snap = coordinator.snapshot()
        if snap is None:
            return None
        return [r.__dict__ for r in snap.rows]

    def app(environ, start_response):
        path = environ.get("PATH_INFO", "/")
        method = environ.get("REQUEST_METHOD", "GET")
        if path == "/metrics":
            return metrics_app(environ, start_response)
        if path == "/api/services" and method == "GET":
            rows = rows_json()
            if rows is None:
                return _json(start_response, "503 Service Unavailable",
                             {"error": "this coordinator is not the leader"})
            return _json(start_response, "200 OK", {"services": rows,
                                                     "now": coordinator.clock.now()})
        if path.startswith("/api/services/") and path.endswith("/run"):
            if method != "POST":
                return _json(start_response, "405 Method Not Allowed",
                             {"error": "use POST to run a service"})
            # wsgiref already percent-decoded PATH_INFO, as latin-1: undo that, as UTF-8.
            name = path[len("/api/services/"):-len("/run")].encode("latin-1").decode(
                "utf-8", "replace")
            if name not in coordinator.catalogue.services:
                return _json(start_response, "404 Not Found",
                             {"error": f"unknown service {name!r}"})
            if coordinator.catalogue.services[name].is_daemon:
                return _json(start_response, "409 Conflict",
                             {"error": f"{name!r} is a daemon: daemons cannot be run manually"})
            request_id = coordinator.request_manual_run(name, "web")
            return _json(start_response, "202 Accepted", {"request_id": request_id})
        if path == "/" and method == "GET":
            body = page(coordinator).encode()
            start_response("200 OK", [("Content-Type", "text/html; charset=utf-8"),
                                      ("Content-Length", str(len(body)))])
            return [body]
        return _json(start_response, "404 Not Found", {"error": f"no route {method} {path}"})

    return app


def page(coordinator: Coordinator) -> str:
    tz = zone(coordinator.catalogue.timezone)
    now = coordinator.clock.now()
    snap = coordinator.snapshot()
    rows = snap.rows if snap is not None else ()
    out = ["<!doctype html><meta charset=utf-8><title>System Services</title>",
           "<style>body{font-family:sans-serif}td,th{padding:2px 8px;text-align:left}"
           "tr.group td{font-weight:bold;background:#eef}</style>",
           f"<h1>System Services</h1><p>{datetime.fromtimestamp(now, tz):%Y-%m-%d %H:%M:%S}</p>",
           "<table><tr><th>Status</th><th>Name</th><th>Schedule</th><th>Allowed Nodes</th>"
           "<th>Run Groups</th><th>Last Run</th><th>In Queue</th></tr>"]
    current = None
    for r in rows:
        if r.kind != current:
            current = r.kind
            out.append(f"<tr class=group><td colspan=7>{view.GROUP_TITLES[view.Kind(r.kind)]}"
                       "</td></tr>")
        last = view.ago(now - r.last_run) + " ago" if r.last_run else "—"
        queued = view.ago(now - r.in_queue) if r.in_queue else "—"
        out.append(
            f"<tr><td>{'enabled' if r.enabled else 'disabled'}</td><td>{html.escape(r.name)}"
            f"</td><td>{html.escape(r.schedule)}</td><td>{' '.join(r.allowed_nodes)}</td>"
            f"<td>{', '.join(r.run_groups) or '—'}</td><td>{last}</td><td>{queued}</td></tr>"
        )
    out.append("</table>")
    return "".join(out)


def serve(coordinator: Coordinator, port: int, host: str = "127.0.0.1") -> WSGIServer:
    """Serve in a background thread; call `.shutdown()` on the result to stop."""
    server = make_server(host, port, make_app(coordinator), server_class=_ThreadingServer,
                         handler_class=_Quiet)
    threading.Thread(target=server.serve_forever, name=f"http:{port}", daemon=True).start()
    return server
