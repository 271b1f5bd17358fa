"""RankingS over HTTP: REST routes under `/api/v1` and CGRateS-style JSON-RPC on `/jsonrpc`.

REST:
- `GET /api/v1/rankings`: every ranking profile with its last ranking (sorted stats and
  metrics; `null` before its first computation), its schedule, and the nodes taken out;
- `GET /api/v1/rankings/{tenant}/{id}` (RankingSv1.GetRanking) and
  `GET /api/v1/rankings/{tenant}/{id}/summary` (GetRankingSummary);
- `GET /api/v1/ranking-schedule/{tenant}?prefix=..` (GetSchedule) and
  `POST /api/v1/ranking-schedule/{tenant}` with `{"ranking_ids": [...]}` (ScheduleQueries:
  an operator write, answered once the leader recorded the new schedule).

JSON-RPC, as CGRateS' JSON codec speaks it: `{"method": "RankingSv1.GetRanking",
"params": [{"Tenant": "rota", "ID": "node-health", "APIOpts": {}}], "id": 1}` answered
`{"id": 1, "result": {...}, "error": null}`, or `{"id": 1, "result": null, "error":
"NOT_FOUND"}`. An empty Tenant is the default one. Times in results are RFC 3339 UTC, as Go
encodes them (a ranking never run since it was scheduled has Previous
`0001-01-01T00:00:00Z`). `RankingSv1.ScheduleQueries` needs the operator token, in the
`Authorization` header or as `APIOpts["*apiKey"]`.

Reads take the `RankingsView` the leader published after its last turn, never its lock.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

from fastapi import FastAPI, Query, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from coordinator.core.ranking_schedule import ScheduledRanking
from coordinator.core.rankings import RankingNotFound
from coordinator.inbox import ScheduleOutcome, ScheduleRequest
from coordinator.leader import Coordinator
from coordinator.rankings import RankingsView
from protocol.rankings import DEFAULT_TENANT
from rota.auth import Tokens

Submit = Callable[[ScheduleRequest], Any]
GO_ZERO_TIME = "0001-01-01T00:00:00Z"
METHODS = ("RankingSv1.GetRanking", "RankingSv1.GetRankingSummary",
           "RankingSv1.ScheduleQueries", "RankingSv1.GetSchedule")


class RpcError(Exception):
    """An error answered in the reply's `error` (CGRateS' error strings)."""


def _rfc3339(t: float | None) -> str:
    if t is None:
        return GO_ZERO_TIME
    return datetime.fromtimestamp(t, UTC).isoformat().replace("+00:00", "Z")


def _schedule_json(e: ScheduledRanking) -> dict[str, Any]:
    return {"RankingID": e.id, "Next": e.next, "Previous": e.previous}


def mount(app: FastAPI, coordinator: Coordinator, tokens: Tokens, *,
          reader: Callable[[Request], None], who: Callable[[Request], str],
          not_leading: Callable[[], Exception], submit: Submit,
          body_of: Callable[[Request], Awaitable[dict[str, Any]]],
          error: Callable[..., Exception]) -> None:
    """Add the RankingS routes to the operators' API (`rota.api.make_app`)."""

    def view() -> RankingsView:
        found = coordinator.rankings()
        if found is None:
            raise not_leading()
        return found

    def one(tenant: str, ranking_id: str) -> Any:
        try:
            return view().get_ranking(tenant, ranking_id)
        except RankingNotFound as exc:
            raise error(404, str(exc), "id") from None

    async def schedule(tenant: str, ids: list[str], by: str) -> int:
        outcome = await run_in_threadpool(
            submit, ScheduleRequest(uuid.uuid4().hex[:16], tenant, tuple(ids), by))
        assert isinstance(outcome, ScheduleOutcome)
        if outcome.refused:
            raise error(404, outcome.refused, "ranking_ids")
        return outcome.scheduled

    # -- REST ---------------------------------------------------------------------------
    @app.get("/api/v1/rankings", tags=["rankings"])
    async def get_rankings(request: Request) -> dict[str, Any]:
        """Every ranking profile: its last ranking (null before the first computation) and
        its schedule; the nodes ranking thresholds keep out of placement."""
        reader(request)
        v = view()
        when = {(e.tenant, e.id): e for e in v.schedule}
        out = []
        for tenant, ranking_id in v.profiles:
            ranking = v.rankings.get((tenant, ranking_id))
            entry = when.get((tenant, ranking_id))
            out.append({"tenant": tenant, "id": ranking_id,
                        "ranking": ranking.to_dict() if ranking else None,
                        "next": entry.next if entry else None,
                        "previous": entry.previous if entry else None})
        return {"rankings": out, "nodes_out": sorted(v.nodes_out)}

    @app.get("/api/v1/rankings/{tenant}/{ranking_id}", tags=["rankings"])
    async def get_ranking(tenant: str, ranking_id: str, request: Request) -> dict[str, Any]:
        """RankingSv1.GetRanking: the last computation of a ranking."""
        reader(request)
        result: dict[str, Any] = one(tenant, ranking_id).to_dict()
        return result

    @app.get("/api/v1/rankings/{tenant}/{ranking_id}/summary", tags=["rankings"])
    async def get_summary(tenant: str, ranking_id: str, request: Request) -> dict[str, Any]:
        """RankingSv1.GetRankingSummary: tenant, id, last update and the sorted stat ids."""
        reader(request)
        result: dict[str, Any] = one(tenant, ranking_id).summary().to_dict()
        return result

    @app.get("/api/v1/ranking-schedule/{tenant}", tags=["rankings"])
    async def get_schedule(tenant: str, request: Request,
                           prefix: list[str] = Query(default=[])) -> dict[str, Any]:  # noqa: B008
        """RankingSv1.GetSchedule: the tenant's scheduled rankings (ids starting with one of
        the prefixes, all without), with next and previous times, sorted by next."""
        reader(request)
        return {"schedule": [_schedule_json(e) for e in view().get_schedule(tenant, prefix)]}

    @app.post("/api/v1/ranking-schedule/{tenant}", tags=["rankings"])
    async def post_schedule(tenant: str, request: Request) -> dict[str, Any]:
        """RankingSv1.ScheduleQueries: schedule rankings from now (all of the tenant's with
        no ids); re-scheduling replaces the old schedule. Needs the operator token."""
        by = who(request)
        body = await body_of(request)
        unknown = sorted(set(body) - {"ranking_ids"})
        if unknown:
            raise error(422, f"unknown field {unknown[0]!r}: give ranking_ids", unknown[0])
        ids = body.get("ranking_ids") or []
        if not isinstance(ids, list) or not all(isinstance(i, str) and i for i in ids):
            raise error(422, "ranking_ids must be a list of ranking ids", "ranking_ids")
        view()
        return {"scheduled": await schedule(tenant, ids, by)}

    # -- JSON-RPC -----------------------------------------------------------------------
    @app.post("/jsonrpc", tags=["rankings"])
    async def jsonrpc(request: Request) -> JSONResponse:
        """CGRateS-style JSON-RPC: RankingSv1.GetRanking, GetRankingSummary,
        ScheduleQueries and GetSchedule."""
        try:
            call = await body_of(request)
        except Exception as exc:
            text = getattr(exc, "error", None) or str(exc)
            return JSONResponse({"id": None, "result": None, "error": text}, 400)
        rid = call.get("id")
        try:
            result = await _call(request, call)
        except RpcError as exc:
            return JSONResponse({"id": rid, "result": None, "error": str(exc)})
        return JSONResponse({"id": rid, "result": result, "error": None})

    async def _call(request: Request, call: dict[str, Any]) -> Any:
        method = call.get("method")
        if method not in METHODS:
            raise RpcError(f"rpc: can't find method {method}")
        params = call.get("params")
        if isinstance(params, list):
            params = params[0] if len(params) == 1 else None
        if not isinstance(params, dict):
            raise RpcError("MANDATORY_IE_MISSING: [params]: give one object in a list")
        tenant = params.get("Tenant") or DEFAULT_TENANT
        if not isinstance(tenant, str):
            raise RpcError("INVALID_ARGUMENT: Tenant must be a string")
        try:
            v = view()
        except Exception:
            try:
                leader = coordinator.coordination.leader()
            except Exception:
                leader = None
            raise RpcError("SERVER_ERROR: this coordinator is not the leader"
                           + (f"; {leader} leads" if leader else "")) from None
        if method in ("RankingSv1.GetRanking", "RankingSv1.GetRankingSummary"):
            ranking_id = params.get("ID")
            if not isinstance(ranking_id, str) or not ranking_id:
                raise RpcError("MANDATORY_IE_MISSING: [ID]")
            try:
                ranking = v.get_ranking(tenant, ranking_id)
            except RankingNotFound:
                raise RpcError("NOT_FOUND") from None
            if method == "RankingSv1.GetRankingSummary":
                return ranking.summary().to_dict()
            return ranking.to_dict()
        if method == "RankingSv1.GetSchedule":
            prefixes = params.get("RankingIDPrefixes") or []
            if not isinstance(prefixes, list) or not all(isinstance(p, str) for p in prefixes):
                raise RpcError("INVALID_ARGUMENT: RankingIDPrefixes must be a list of strings")
            rows = v.get_schedule(tenant, prefixes)
            if not rows:
                raise RpcError("NOT_FOUND")
            return [{"RankingID": e.id, "Next": _rfc3339(e.next),
                     "Previous": _rfc3339(e.previous)} for e in rows]
        ids = params.get("RankingIDs") or []
        if not isinstance(ids, list) or not all(isinstance(i, str) and i for i in ids):
            raise RpcError("INVALID_ARGUMENT: RankingIDs must be a list of ranking ids")
        by = _rpc_who(request, params)
        try:
            return await schedule(tenant, ids, by)
        except Exception as exc:
            status = getattr(exc, "status", None)
            if status == 404:
                raise RpcError("NOT_FOUND: " + str(exc)) from None
            raise RpcError(f"SERVER_ERROR: {getattr(exc, 'error', None) or exc}") from None

    def _rpc_who(request: Request, params: dict[str, Any]) -> str:
        opts = params.get("APIOpts") or {}
        key = opts.get("*apiKey") if isinstance(opts, dict) else None
        if isinstance(key, str) and key and tokens:
            name = tokens.who(f"Bearer {key}")
            if name is not None:
                return name
        try:
            return who(request)
        except Exception as exc:
            raise RpcError(f"UNAUTHORIZED_API: {getattr(exc, 'error', None) or exc}") from None
