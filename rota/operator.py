"""The operator commands of the `rota` CLI, on the HTTP API: services, show, history, nodes,
changes, rankings, ranking, enable, disable, run and set. Each prints a table, or JSON with
`--json`.

Exit codes: 0 done (a waited run succeeded); 1 refused, or a waited run failed; 2 usage;
3 no coordinator could be reached.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
import uuid
from datetime import datetime
from typing import Any
from urllib.parse import quote

from rota.client import Api, ClientError, saved_token

REFUSED, UNREACHABLE = 1, 3
FAILOVER = 30.0
"""Seconds a write keeps trying while no coordinator leads (a failover takes a few)."""
FINAL = ("succeeded", "failed", "refused")


def add_common(p: argparse.ArgumentParser, env: dict[str, str | None]) -> None:
    p.add_argument("--url", default=env.get("ROTA_URL"), metavar="URL[,URL]",
                   help="a coordinator's HTTP API, or several comma-separated (the leader is "
                   "found among them) (env ROTA_URL)")
    p.add_argument("--token", default=env.get("ROTA_TOKEN"), metavar="TOKEN",
                   help="operator token for changes (env ROTA_TOKEN; default: the token file "
                   "`rota up` writes)")
    p.add_argument("--json", action="store_true", help="print the API's JSON answer")


def api_of(args: argparse.Namespace) -> Api:
    if not args.url:
        also = " (or --amqp to publish the request to RabbitMQ)" if args.command in (
            "run", "set") else ""
        print(f"rota {args.command}: give --url (env ROTA_URL): the HTTP API of a "
              f"coordinator or of `rota up --http-port`{also}", file=sys.stderr)
        sys.exit(2)
    return Api.of(args.url, args.token or saved_token())


def _ago(now: float, t: float | None) -> str:
    if t is None:
        return "—"
    s = max(0, int(now - t))
    return f"{s // 3600:02d}:{s % 3600 // 60:02d}:{s % 60:02d} ago"


def _time(t: float | None) -> str:
    return "—" if t is None else datetime.fromtimestamp(t).strftime("%Y-%m-%d %H:%M:%S")


def _print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, sort_keys=True))


def _fail(args: argparse.Namespace, exc: ClientError) -> int:
    if args.json and exc.body:
        _print_json(exc.body)
    where = f" ({exc.body['field']})" if exc.body.get("field") else ""
    print(f"rota {args.command}: {exc}{where}", file=sys.stderr)
    return UNREACHABLE if exc.status == 0 else REFUSED


def parse_since(text: str) -> float:
    """`30m`, `2h`, `1d` (that long ago), an ISO 8601 time, or epoch seconds."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd])\s*", text)
    if m:
        unit = {"s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]
        return time.time() - float(m.group(1)) * unit
    try:
        return float(text)
    except ValueError:
        pass
    try:
        return datetime.fromisoformat(text).timestamp()
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected 30m, 2h, 1d, an ISO 8601 time or epoch seconds") from None


def cmd_services(args: argparse.Namespace) -> int:
    try:
        _, body = api_of(args).call("GET", "/api/v1/services")
    except ClientError as exc:
        return _fail(args, exc)
    if args.json:
        _print_json(body)
        return 0
    now = body["now"]
    print(f"leader {body['leader']} epoch {body['epoch']}")
    print(f"{'status':8} {'name':34} {'schedule':18} {'allowed nodes':30} {'run groups':24} "
          f"{'last run':14} in queue")
    for r in body["services"]:
        print(f"{r['status']:8} {r['name'][:34]:34} {r['schedule'][:18]:18} "
              f"{','.join(r['allowed_nodes'])[:30]:30} {','.join(r['run_groups'])[:24] or '—':24} "
              f"{_ago(now, r['last_run']):14} {_ago(now, r['in_queue'])}")
    return 0


def _print_runs(runs: list[dict[str, Any]]) -> None:
    print(f"{'started':19} {'service':28} {'node':14} {'trigger':9} {'outcome':10} "
          f"{'duration':>9}  by / reason")
    for r in runs:
        dur = "" if r["duration"] is None else f"{r['duration']:.1f}s"
        note = r.get("requested_by") or r.get("reason") or r.get("error") or ""
        print(f"{_time(r['started_at'] or r['queued_at']):19} {r['service'][:28]:28} "
              f"{(r['node'] or '—')[:14]:14} {r['trigger']:9} "
              f"{(r['outcome'] or r['state']):10} {dur:>9}  {note}")


def cmd_show(args: argparse.Namespace) -> int:
    api = api_of(args)
    try:
        _, body = api.call("GET", api.service_path(args.service), query={"limit": args.limit})
    except ClientError as exc:
        return _fail(args, exc)
    if args.json:
        _print_json(body)
        return 0
    s = body["service"]
    d = s["definition"]
    print(f"{s['name']}  ({s['group']}, {s['status']})")
    print(f"  schedule      {s['schedule']}  (kind {d['kind']})")
    print(f"  allowed nodes {', '.join(s['allowed_nodes'])}   placement {s['placement']}")
    print(f"  run groups    {', '.join(s['run_groups']) or '—'}")
    print(f"  last run      {_time(s['last_run'])}   in queue since {_time(s['in_queue'])}")
    if s.get("description"):
        print(f"  {s['description']}")
    print()
    _print_runs(body["runs"])
    return 0


def cmd_history(args: argparse.Namespace) -> int:
    query = {"service": args.service, "node": args.node, "outcome": args.outcome,
             "since": args.since, "until": args.until, "limit": args.limit}
    try:
        _, body = api_of(args).call("GET", "/api/v1/runs", query=query)
    except ClientError as exc:
        return _fail(args, exc)
    if args.json:
        _print_json(body)
    else:
        _print_runs(body["runs"])
    return 0


def cmd_nodes(args: argparse.Namespace) -> int:
    try:
        _, body = api_of(args).call("GET", "/api/v1/nodes")
    except ClientError as exc:
        return _fail(args, exc)
    if args.json:
        _print_json(body)
        return 0
    print(f"{'node':18} {'roles':32} {'live since':19} {'runs now':>8}  daemons")
    for n in body["nodes"]:
        print(f"{n['id'][:18]:18} {','.join(n['roles'])[:32]:32} {_time(n['live_since']):19} "
              f"{n['runs_now']:>8}  {', '.join(n['daemons']) or '—'}")
    return 0


def _metric(value: float) -> str:
    return "N/A" if value == -1 else f"{value:g}"


def cmd_rankings(args: argparse.Namespace) -> int:
    try:
        _, body = api_of(args).call("GET", "/api/v1/rankings")
    except ClientError as exc:
        return _fail(args, exc)
    if args.json:
        _print_json(body)
        return 0
    print(f"{'tenant':10} {'ranking':24} {'last update':19} {'next':19}  stats, best first")
    for r in body["rankings"]:
        ranking = r["ranking"]
        last = ranking["LastUpdate"][:19].replace("T", " ") if ranking else "—"
        stats = ", ".join(ranking["SortedStatIDs"]) if ranking else "(not computed yet)"
        print(f"{r['tenant'][:10]:10} {r['id'][:24]:24} {last:19} {_time(r['next']):19}  "
              f"{stats or '—'}")
    if body["nodes_out"]:
        print(f"out of placement: {', '.join(body['nodes_out'])}")
    return 0


def cmd_ranking(args: argparse.Namespace) -> int:
    api = api_of(args)
    path = f"/api/v1/rankings/{quote(args.tenant, safe='')}/{quote(args.id, safe='')}"
    try:
        _, body = api.call("GET", path)
    except ClientError as exc:
        return _fail(args, exc)
    if args.json:
        _print_json(body)
        return 0
    print(f"{body['Tenant']}/{body['ID']}  last update {body['LastUpdate']}  "
          f"{body['Sorting']} by {', '.join(body['SortingParameters'])}")
    names = sorted({m for values in body["Metrics"].values() for m in values})
    print(f"{'#':>3} {'stat':24} " + " ".join(f"{m[:14]:>14}" for m in names))
    for i, stat in enumerate(body["SortedStatIDs"], 1):
        values = body["Metrics"].get(stat, {})
        cells = " ".join(f"{_metric(values[m]) if m in values else '—':>14}" for m in names)
        print(f"{i:>3} {stat[:24]:24} {cells}")
    return 0


def cmd_changes(args: argparse.Namespace) -> int:
    try:
        _, body = api_of(args).call("GET", "/api/v1/changes",
                                    query={"service": args.service, "limit": args.limit})
    except ClientError as exc:
        return _fail(args, exc)
    if args.json:
        _print_json(body)
        return 0
    for c in body["changes"]:
        what = f"{c['old']} -> {c['new']}"
        why = f"  ({c['reason']})" if c["reason"] else ""
        print(f"{_time(c['at'])}  {c['by']:12} {c['service'][:28]:28} {c['field']:9} "
              f"{c['outcome']:8} {what}{why}")
    return 0


def _edit(args: argparse.Namespace, body: dict[str, Any]) -> int:
    api = api_of(args)
    try:
        _, answer = api.call("PATCH", api.service_path(args.service), body,
                             retry_for=FAILOVER)
    except ClientError as exc:
        return _fail(args, exc)
    if args.json:
        _print_json(answer)
        return 0
    if not answer["changes"]:
        print(f"{args.service}: nothing changed (already so)")
    for c in answer["changes"]:
        print(f"{args.service}: {c['field']} {c['old']} -> {c['new']} (by {c['by']})")
    return 0


def cmd_enable(args: argparse.Namespace) -> int:
    return _edit(args, {"enabled": True})


def cmd_disable(args: argparse.Namespace) -> int:
    if not args.yes:
        api = api_of(args)
        try:
            _, body = api.call("GET", api.service_path(args.service), query={"limit": 1})
        except ClientError as exc:
            return _fail(args, exc)
        if body["service"]["kind"] == "daemon":
            question = (f"{args.service} is a daemon: disabling it stops it on every node. "
                        "Disable it? [y/N] ")
            if not sys.stdin.isatty():
                print(f"rota disable: {args.service} is a daemon: confirm with --yes",
                      file=sys.stderr)
                return 2
            if input(question).strip().lower() not in ("y", "yes"):
                print("not disabled")
                return REFUSED
    return _edit(args, {"enabled": False})


def cmd_set_http(args: argparse.Namespace) -> int:
    body: dict[str, Any] = {}
    if args.enabled is not None:
        body["enabled"] = args.enabled
    for name in ("period", "align", "cron"):
        if getattr(args, name) is not None:
            body[name] = getattr(args, name)
    if args.run_at is not None:
        body["run_at"] = [t.strip() for t in args.run_at.split(",")]
    if not body:
        sys.exit("rota set: nothing to change: give --enable/--disable, --period, --align, "
                 "--run-at or --cron")
    return _edit(args, body)


def cmd_run_http(args: argparse.Namespace) -> int:
    api = api_of(args)
    # Our own request id: a repeat after a failover is the same request, run once.
    body: dict[str, Any] = {"request_id": uuid.uuid4().hex[:16]}
    if args.node is not None:
        body["node"] = args.node
    try:
        _, answer = api.call("POST", api.service_path(args.service, "/run"), body,
                             retry_for=FAILOVER)
    except ClientError as exc:
        return _fail(args, exc)
    request_id = answer["request_id"]
    if not args.wait:
        if args.json:
            _print_json(answer)
        else:
            print(f"requested a manual run of {args.service!r} (request {request_id}); runs: "
                  f"{', '.join(answer['run_ids'])}")
        return 0
    if not args.json:
        print(f"running {args.service!r}: {', '.join(answer['run_ids'])}", flush=True)
    deadline = time.monotonic() + args.timeout
    state: dict[str, Any] = {}
    while time.monotonic() < deadline:
        try:
            _, state = api.call("GET", f"/api/v1/requests/{request_id}")
        except ClientError as exc:  # 404: a new leader that has not seen it end yet
            if exc.status not in (0, 404, 503, 504):
                return _fail(args, exc)
        if state.get("state") in FINAL:
            break
        time.sleep(0.25)
    if args.json:
        _print_json(state)
    if state.get("state") not in FINAL:
        print(f"rota run: no outcome within {args.timeout:g} s; follow it with "
              f"rota show {args.service!r}", file=sys.stderr)
        return REFUSED
    if not args.json:
        for r in state["runs"]:
            dur = "" if r["duration"] is None else f" in {r['duration']:.1f}s"
            print(f"{r['run_id']} on {r['node'] or '—'}: {r['outcome'] or r['state']}{dur}")
            if r["output_tail"]:
                print("  " + r["output_tail"].rstrip().replace("\n", "\n  "))
    if state["state"] == "succeeded":
        return 0
    print(f"rota run: {args.service}: {state['state']}: {state.get('reason')}", file=sys.stderr)
    return REFUSED
