"""The operators' HTTP API (FastAPI): the service table, runs, nodes, edits and manual runs;
the rankings and CGRateS-style JSON-RPC on `/jsonrpc` (`rota/api_rankings.py`).

Everything is under `/api/v1`, described at `/openapi.json` and `/docs`; `/metrics` is the
Prometheus exposition; `/` is the System Services page (`rota/static/`).

Reads come from the leader's immutable snapshot (`Coordinator.snapshot()`), never from its
lock; writes are handed to the leader's next turn (`Coordinator.submit`) and answered once that
turn's ledger write is done. Writes need `Authorization: Bearer <token>` (`rota.auth`); reads
too with `protect_reads`. A coordinator that does not lead answers `/api/v1/leader` and says
who leads (503 with `leader`) for the rest. Errors are `{"error": ..., "field": ...}`.
"""

from __future__ import annotations

import json
import math
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from coordinator import view
from coordinator.core.edits import Edit
from coordinator.inbox import (
    EditOutcome,
    EditRequest,
    Outcome,
    RunOutcome,
    RunRequest,
    ScheduleRequest,
)
from coordinator.leader import Coordinator, NotLeading
from protocol import RunRecord, ServiceChange
from rota import api_rankings
from rota.auth import Tokens
from rota.runs import RunQuery, RunSource

STATIC = Path(__file__).parent / "static"
MAX_BODY = 64 * 1024
"""Largest request body taken (bytes); larger ones get 413."""
EDIT_FIELDS = ("enabled", "period", "align", "run_at", "cron")
SUBMIT_TIMEOUT = 10.0
KEEP_REQUESTS = 10_000
FALLBACK_PAGE = """<!doctype html><meta charset=utf-8><title>System Services</title>
<h1>System Services</h1><p>The page's files are not installed. The API is at
<a href="/docs">/docs</a>; the service table as JSON at
<a href="/api/v1/services">/api/v1/services</a>.</p>"""


class ApiError(Exception):
    def __init__(self, status: int, error: str, field: str | None = None,
                 **extra: Any) -> None:
        super().__init__(error)
        self.status, self.error, self.field, self.extra = status, error, field, extra


@dataclass
class Requests:
    """Manual runs asked through this API: who asked, and what the leader answered."""

    by: OrderedDict[str, str] = field(default_factory=OrderedDict)
    outcomes: OrderedDict[str, RunOutcome] = field(default_factory=OrderedDict)

    def note(self, request_id: str, who: str, outcome: RunOutcome | None = None) -> None:
        self.by[request_id] = who
        if outcome is not None:
            self.outcomes[request_id] = outcome
        for table in (self.by, self.outcomes):
            while len(table) > KEEP_REQUESTS:
                table.popitem(last=False)


def _duration(start: float | None, end: float | None) -> float | None:
    return None if start is None or end is None else round(max(0.0, end - start), 3)


def request_of(run_id: str) -> str | None:
    if not run_id.startswith("manual-"):
        return None
    return run_id[len("manual-"):].split("@", 1)[0]


def run_json(rec: RunRecord | view.ActiveRun, requests: Requests) -> dict[str, Any]:
    """A run record as the API gives it (times as epoch seconds)."""
    if isinstance(rec, view.ActiveRun):
        out: dict[str, Any] = {
            "run_id": rec.run_id, "service": rec.service, "node": rec.node,
            "trigger": rec.trigger, "slot": rec.slot, "queued_at": rec.queued_at,
            "started_at": rec.started_at, "finished_at": None, "duration": None,
            "state": rec.state, "outcome": None, "output_tail": "", "error": None,
            "reason": None, "attempt": rec.attempt,
        }
    else:
        out = {
            "run_id": rec.run_id, "service": rec.service, "node": rec.node,
            "trigger": rec.trigger, "slot": rec.slot, "queued_at": rec.queued_at,
            "started_at": rec.started_at, "finished_at": rec.finished_at,
            "duration": _duration(rec.started_at, rec.finished_at), "state": rec.state,
            "outcome": rec.outcome or rec.state, "output_tail": rec.output_tail,
            "error": rec.error, "reason": rec.reason, "attempt": rec.attempt,
        }
    request_id = request_of(rec.run_id)
    out["request_id"] = request_id
    out["requested_by"] = requests.by.get(request_id) if request_id else None
    return out


def change_json(c: ServiceChange) -> dict[str, Any]:
    return {"at": c.at, "by": c.by, "service": c.service, "field": c.field, "old": c.old,
            "new": c.new, "outcome": c.outcome, "reason": c.reason,
            "request_id": c.request_id, "epoch": c.epoch}


def row_json(row: view.Row, now: float) -> dict[str, Any]:
    out = dict(row.__dict__)
    out["status"] = ("disabled" if not row.enabled else "running" if row.running
                     else "queued" if row.in_queue else "enabled")
    out["last_run_ago"] = view.ago(now - row.last_run) if row.last_run else None
    out["in_queue_since"] = row.in_queue
    return out


def make_app(coordinator: Coordinator, runs: RunSource, tokens: Tokens, *,
             protect_reads: bool = False, static: Path = STATIC) -> FastAPI:
    app = FastAPI(
        title="Rota operators' API",
        version="1",
        description="The service table, run history, nodes, edits and manual runs of a Rota "
        "cluster. Writes need `Authorization: Bearer <token>`.",
    )
    requests = Requests()
    clock = coordinator.clock

    # -- errors -------------------------------------------------------------------------
    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        body: dict[str, Any] = {"error": exc.error}
        if exc.field is not None:
            body["field"] = exc.field
        body.update(exc.extra)
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        return JSONResponse(body, exc.status, headers=headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 404:
            text = f"no route {request.method} {request.url.path}"
        elif exc.status_code == 405:
            text = f"{request.method} is not allowed on {request.url.path}"
        else:
            text = str(exc.detail)
        return JSONResponse({"error": text}, exc.status_code)

    # -- helpers --------------------------------------------------------------------------
    def who(request: Request) -> str:
        if not tokens:
            raise ApiError(401, "no operator token is configured on this coordinator: writes "
                           "are refused (start it with --tokens FILE or ROTA_OPERATOR_TOKENS)")
        name = tokens.who(request.headers.get("authorization"))
        if name is None:
            given = request.headers.get("authorization")
            raise ApiError(401, "a wrong operator token" if given else
                           "an operator token is needed: Authorization: Bearer <token>")
        return name

    def reader(request: Request) -> None:
        if protect_reads:
            who(request)

    def leader_info() -> tuple[str | None, int | None]:
        snap = coordinator.snapshot()
        if snap is not None:
            return coordinator.identifier, snap.epoch
        try:
            leader = coordinator.coordination.leader()
        except Exception:
            leader = None
        try:
            epoch: int | None = coordinator.coordination.current_epoch()
        except Exception:
            epoch = None
        return leader, epoch

    def leader_url() -> str | None:
        """Where the leader serves its page and API, as it advertised (None: unknown)."""
        try:
            return coordinator.coordination.leader_url()
        except Exception:
            return None

    def snapshot() -> view.Snapshot:
        snap = coordinator.snapshot()
        if snap is None:
            leader, _ = leader_info()
            raise ApiError(503, "this coordinator is not the leader"
                           + (f"; {leader} leads" if leader else "; no leader right now"),
                           leader=leader, leader_url=leader_url())
        return snap

    def service_row(snap: view.Snapshot, name: str) -> view.Row:
        row = snap.row(name)
        if row is None:
            raise ApiError(404, f"unknown service {name!r}", "service")
        return row

    async def body_of(request: Request) -> dict[str, Any]:
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > MAX_BODY:
            raise ApiError(413, f"the body is over {MAX_BODY} bytes", "body")
        data = bytearray()
        async for chunk in request.stream():
            data += chunk
            if len(data) > MAX_BODY:
                raise ApiError(413, f"the body is over {MAX_BODY} bytes", "body")
        if not data.strip():
            return {}
        try:
            parsed = json.loads(data)
        except (ValueError, UnicodeDecodeError):
            raise ApiError(400, "the body is not JSON", "body") from None
        if not isinstance(parsed, dict):
            raise ApiError(422, f"the body must be a JSON object, got {type(parsed).__name__}",
                           "body")
        return parsed

    def submit(req: RunRequest | EditRequest | ScheduleRequest) -> Outcome:
        try:
            return coordinator.submit(req, SUBMIT_TIMEOUT)
        except NotLeading as exc:
            leader, _ = leader_info()
            raise ApiError(503, str(exc), leader=leader, request_id=req.request_id) from None
        except TimeoutError as exc:
            raise ApiError(504, str(exc), request_id=req.request_id) from None

    def finished_of(request_id: str) -> list[RunRecord]:
        prefix = f"manual-{request_id}"
        return [r for r in runs.recent()
                if r.run_id == prefix or r.run_id.startswith(prefix + "@")]

    # -- reads ----------------------------------------------------------------------------
    @app.get("/api/v1/leader", tags=["cluster"])
    def get_leader(request: Request) -> dict[str, Any]:
        """Which coordinator leads, with its fencing epoch; answered by every coordinator."""
        reader(request)
        leader, epoch = leader_info()
        return {"this": coordinator.identifier, "leader": leader, "epoch": epoch,
                "leader_url": leader_url(),
                "is_leader": coordinator.snapshot() is not None, "now": clock.now()}

    @app.get("/api/v1/services", tags=["services"])
    def get_services(request: Request) -> dict[str, Any]:
        """The service table: one row per service, in the page's order, with its definition
        (what the edit dialog fills in)."""
        reader(request)
        snap = snapshot()
        now = clock.now()
        return {"now": now, "leader": snap.leader, "epoch": snap.epoch,
                "services": [row_json(r, now) for r in snap.rows]}

    @app.get("/api/v1/services/{name:path}", tags=["services"])
    def get_service(name: str, request: Request, limit: int = 50) -> dict[str, Any]:
        """One service's row and its recent runs, newest first (active ones included)."""
        reader(request)
        snap = snapshot()
        row = service_row(snap, name)
        limit = _limit(limit)
        active = [run_json(r, requests) for r in snap.runs if r.service == name]
        active.sort(key=lambda r: r["queued_at"] or 0.0, reverse=True)
        done = [run_json(r, requests)
                for r in _newest_of(runs.recent(), name, limit)]
        ids = {r["run_id"] for r in active}
        merged = active + [r for r in done if r["run_id"] not in ids]
        return {"service": row_json(row, clock.now()), "runs": merged[:limit]}

    @app.get("/api/v1/runs", tags=["runs"])
    def get_runs(request: Request, service: str | None = None, node: str | None = None,
                 outcome: str | None = None, since: float | None = None,
                 until: float | None = None, limit: int = 100) -> dict[str, Any]:
        """Finished runs from the history, newest first, filtered by service, node, outcome
        (succeeded, failed, timed_out, lost, expired, rejected, skipped, missed) and time
        (epoch seconds, on the run's end)."""
        reader(request)
        snapshot()
        for label, value in (("since", since), ("until", until)):
            if value is not None and not math.isfinite(value):
                raise ApiError(422, f"{label} must be a finite number of epoch seconds", label)
        q = RunQuery(service, node, outcome, since, until, _limit(limit))
        return {"runs": [run_json(r, requests) for r in runs.query(q)]}

    @app.get("/api/v1/requests/{request_id}", tags=["runs"])
    def get_request(request_id: str, request: Request) -> dict[str, Any]:
        """What became of a manual run request: pending, running, succeeded, failed or
        refused, with its runs and the reason."""
        reader(request)
        snap = snapshot()
        known = requests.outcomes.get(request_id)
        prefix = f"manual-{request_id}"
        active = [r for r in snap.runs
                  if r.run_id == prefix or r.run_id.startswith(prefix + "@")]
        done = finished_of(request_id)
        if known is None and not active and not done:
            raise ApiError(404, f"unknown request {request_id!r}", "request_id")
        reason = known.refused if known else None
        if known is not None and known.refused:
            state = "refused"
        elif len(done) == 1 and done[0].node is None and done[0].state == "rejected":
            state, reason = "refused", done[0].reason
        elif active or (known is not None and len(done) < len(known.run_ids)):
            started = any(r.state in ("dispatched", "running") for r in active)
            state = "running" if started else "pending"
        elif all(r.state == "succeeded" for r in done):
            state = "succeeded"
        else:
            state = "failed"
            bad = next(r for r in done if r.state != "succeeded")
            reason = bad.error or bad.reason or bad.state
        records = [run_json(r, requests) for r in active] + [run_json(r, requests)
                                                              for r in done]
        return {"request_id": request_id, "state": state, "runs": records, "reason": reason,
                "run_ids": known.run_ids if known else [r["run_id"] for r in records]}

    @app.get("/api/v1/nodes", tags=["cluster"])
    def get_nodes(request: Request) -> dict[str, Any]:
        """Live worker nodes: roles, live since, runs now, daemons running there."""
        reader(request)
        snap = snapshot()
        return {"nodes": [{"id": n.id, "roles": list(n.roles), "live_since": n.live_since,
                           "runs_now": n.runs_now, "daemons": list(n.daemons),
                           "capacity": n.capacity, "out_of_placement": n.out_of_placement}
                          for n in snap.nodes]}

    @app.get("/api/v1/changes", tags=["services"])
    def get_changes(request: Request, service: str | None = None,
                    limit: int = 100) -> dict[str, Any]:
        """The change log: every operator edit, applied or refused, newest first."""
        reader(request)
        snapshot()
        return {"changes": [change_json(c) for c in runs.changes(service, _limit(limit))]}

    # -- writes ---------------------------------------------------------------------------
    @app.patch("/api/v1/services/{name:path}", tags=["services"], openapi_extra=_EDIT_BODY)
    async def patch_service(name: str, request: Request) -> JSONResponse:
        """Edit status and schedule (any of enabled, period, align, run_at, cron). Refused
        with 4xx naming the field, and recorded in the change log either way."""
        by = who(request)
        body = await body_of(request)
        unknown = sorted(set(body) - set(EDIT_FIELDS))
        if unknown:
            raise ApiError(422, f"unknown field {unknown[0]!r}: give any of "
                           f"{', '.join(EDIT_FIELDS)}", unknown[0])
        if not body:
            raise ApiError(422, f"nothing to change: give any of {', '.join(EDIT_FIELDS)}",
                           "body")
        snap = snapshot()
        service_row(snap, name)
        edit = Edit(**{k: body.get(k) for k in EDIT_FIELDS})
        # The wait for the leader's turn blocks: off the event loop, so reads go on meanwhile.
        outcome = await run_in_threadpool(
            submit, EditRequest(uuid.uuid4().hex[:16], name, by, edit))
        assert isinstance(outcome, EditOutcome)
        refused = outcome.refused
        if refused is not None:
            status = 404 if refused.field == "service" and "unknown" in (refused.reason or "") \
                else 422
            raise ApiError(status, refused.reason or "refused", refused.field,
                           change=change_json(refused))
        fresh = coordinator.snapshot() or snap
        row = fresh.row(name) or service_row(snap, name)
        changes = [change_json(c) for c in outcome.changes]
        return JSONResponse({"service": row_json(row, clock.now()),
                             "change": changes[-1] if changes else None, "changes": changes})

    @app.post("/api/v1/services/{name:path}/run", tags=["runs"], status_code=202,
              openapi_extra=_RUN_BODY)
    async def post_run(name: str, request: Request) -> JSONResponse:
        """Run a service now (on `node` when given). 202 once the leader recorded it; follow
        it at /api/v1/requests/{request_id}."""
        by = who(request)
        body = await body_of(request)
        unknown = sorted(set(body) - {"node", "request_id"})
        if unknown:
            raise ApiError(422, f"unknown field {unknown[0]!r}: give node", unknown[0])
        node = body.get("node")
        if node is not None and (not isinstance(node, str) or not node):
            raise ApiError(422, f"node must be a node id, got {node!r}", "node")
        request_id = body.get("request_id") or uuid.uuid4().hex[:16]
        if not isinstance(request_id, str) or not request_id.replace("-", "").isalnum() \
                or len(request_id) > 64:
            raise ApiError(422, "request_id must be letters, digits and dashes (at most 64)",
                           "request_id")
        snap = snapshot()
        service_row(snap, name)
        requests.note(request_id, by)
        outcome = await run_in_threadpool(submit, RunRequest(request_id, name, by, node))
        assert isinstance(outcome, RunOutcome)
        requests.note(request_id, by, outcome)
        if outcome.refused:
            status = 409
            where = "node" if node is not None and "node" in outcome.refused else "service"
            raise ApiError(status, outcome.refused, where, request_id=request_id)
        return JSONResponse({"request_id": request_id, "run_ids": outcome.run_ids}, 202)

    # -- RankingS: REST and JSON-RPC (rota/api_rankings.py) --------------------------------
    def not_leading() -> ApiError:
        leader, _ = leader_info()
        return ApiError(503, "this coordinator is not the leader"
                        + (f"; {leader} leads" if leader else "; no leader right now"),
                        leader=leader, leader_url=leader_url())

    api_rankings.mount(app, coordinator, tokens, reader=reader, who=who,
                       not_leading=not_leading, submit=submit, body_of=body_of,
                       error=ApiError)

    # -- page and metrics -----------------------------------------------------------------
    @app.get("/metrics", include_in_schema=False)
    def metrics() -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/", include_in_schema=False, response_model=None)
    def page() -> FileResponse | HTMLResponse:
        found = static / "page.html"
        if found.is_file():
            return FileResponse(found, media_type="text/html; charset=utf-8")
        return HTMLResponse(FALLBACK_PAGE)

    app.mount("/static", StaticFiles(directory=static, check_dir=False), name="static")
    return app


def _limit(limit: int) -> int:
    if limit < 1 or limit > 10_000:
        raise ApiError(422, f"limit must be between 1 and 10000, got {limit}", "limit")
    return limit


def _newest_of(records: Any, service: str, limit: int) -> list[RunRecord]:
    kept = [r for r in records if r.service == service]
    kept.sort(key=lambda r: r.finished_at or r.queued_at or 0.0, reverse=True)
    return kept[:limit]


def _schema(properties: dict[str, Any]) -> dict[str, Any]:
    return {"requestBody": {"required": False, "content": {"application/json": {"schema": {
        "type": "object", "additionalProperties": False, "properties": properties}}}}}


_EDIT_BODY = _schema({
    "enabled": {"type": "boolean"},
    "period": {"type": "integer", "minimum": 1, "maximum": 60, "description": "minutes"},
    "align": {"type": "integer", "minimum": 0, "description": "minutes, 0..period-1"},
    "run_at": {"type": "array", "items": {"type": "string", "pattern": "^[0-2][0-9]:[0-5][0-9]$"}},
    "cron": {"type": "string"},
})
_RUN_BODY = _schema({
    "node": {"type": "string", "description": "run on this node only"},
    "request_id": {"type": "string", "description": "your own id, so that a retry after a "
                   "failover does not run it twice"},
})

__all__ = ["MAX_BODY", "ApiError", "make_app"]
