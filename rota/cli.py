"""The `rota` command line."""

from __future__ import annotations

import argparse
import gc
import logging
import os
import signal
import socket
import sys
import threading
import time
from datetime import datetime
from pathlib import Path

DEFAULT_CATALOGUE = Path(__file__).parent / "catalogues" / "system-services.toml"
EPILOG = """\
examples:
  rota up                                   all-in-one cluster, in memory, real time
  rota up --speed 60 --for 120 --history runs.jsonl
                                            two simulated hours in two minutes
  rota coordinator --zk 127.0.0.1:2181 --amqp amqp://rota-coordinator:PASSWORD@127.0.0.1:5672/
  rota worker --node calc-1 --roles Processing,Calculation --zk ... \\
      --amqp amqp://rota-worker:PASSWORD@127.0.0.1:5672/
                                            each role as its own RabbitMQ user (README)
  rota worker ... --amqp "amqp://u:p@mq-1:5672/;amqp://u:p@mq-2:5672/"
                                            several nodes of one RabbitMQ cluster
  rota check my-catalogue.toml              validate a catalogue file

operators (on a coordinator's HTTP API: --url or ROTA_URL, --token or ROTA_TOKEN):
  rota services                             the service table
  rota show "Cache Manager"                 one service and its recent runs
  rota history "Cache Manager" --since 2h   finished runs (also --node, --outcome)
  rota nodes                                live nodes, their roles, runs and daemons
  rota run "Cache Manager" --wait           run it now; exit 0 only if it succeeded
  rota set "Cache Manager" --period 6 --align 3
  rota disable "Mail Manager"               (and enable; a daemon asks first, or --yes)
  rota changes                              the change log: who changed what, when
"""


def _env(name: str) -> str | None:
    return os.environ.get(name) or None


def _positive_seconds(text: str) -> float:
    """argparse type for durations: a number of seconds above zero."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, not {text}")
    return value


def _lead_time(text: str) -> float:
    """argparse type for the lead time: 0 or more seconds, under the orders' 60 s deadline."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0 <= value < 60:
        raise argparse.ArgumentTypeError(f"must be 0 or more seconds and under 60, not {text}")
    return value


class _CommandParser(argparse.ArgumentParser):
    """A sub-command's parser: it refuses options it does not know itself, so the error comes
    with this command's usage rather than the top-level one."""

    def parse_known_args(  # type: ignore[override]
        self, args: list[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        parsed, extras = super().parse_known_args(args, namespace)
        if extras:
            self.error(f"unrecognized arguments: {' '.join(extras)}")
        return parsed, extras


def _add_servers(p: argparse.ArgumentParser, required: bool) -> None:
    p.add_argument("--zk", default=_env("ROTA_ZK"), required=required and not _env("ROTA_ZK"),
                   metavar="HOSTS", help="ZooKeeper hosts, host:port[,host:port...][/chroot]; "
                   "list every member of the ensemble, so that losing the one a process talks "
                   "to costs a reconnection, not a new term (env ROTA_ZK)")
    p.add_argument("--amqp", default=_env("ROTA_AMQP_URL"),
                   required=required and not _env("ROTA_AMQP_URL"), metavar="URL",
                   help="RabbitMQ URL, amqp://user:pass@host:port/vhost; several nodes of one "
                   "cluster as URLs separated by ';', tried in turn (env ROTA_AMQP_URL)")


def _add_tokens(p: argparse.ArgumentParser, without: str) -> None:
    p.add_argument("--tokens", default=_env("ROTA_OPERATOR_TOKENS_FILE"), metavar="FILE",
                   help="operator tokens, one `name token` per line (env "
                   "ROTA_OPERATOR_TOKENS_FILE; or ROTA_OPERATOR_TOKENS=name=token,...); "
                   f"changes through the API need one; {without}")
    p.add_argument("--protect-reads", action="store_true",
                   help="reads through the API need a token too")


def _add_catalogue(p: argparse.ArgumentParser) -> None:
    p.add_argument("--catalogue", default=str(DEFAULT_CATALOGUE), metavar="FILE",
                   help="service catalogue (TOML); default: the shipped System Services")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rota",
        description="Rota schedules the system services of a multi-node platform: daemons, "
        "periodic, fixed-time and cron utilities, on nodes with allowed roles, honouring "
        "run-group locks.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="more log output (-vv for debug)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                parser_class=_CommandParser)

    up = sub.add_parser("up", help="start a whole cluster in this process",
                        description="Start a coordinator and worker nodes in one process. "
                        "Without --zk/--amqp everything runs in memory.")
    _add_catalogue(up)
    up.add_argument("--nodes", default=None, metavar="SPEC",
                    help="worker nodes as id=Role,Role;id=Role (default: master-1=Master;"
                    "redundancy-1=Redundancy,Reporting;processing-1=Processing,Calculation)")
    up.add_argument("--speed", type=float, default=1.0, metavar="N",
                    help="run the simulated clock N times faster than real time")
    up.add_argument("--for", dest="duration", type=_positive_seconds, default=None,
                    metavar="SECONDS", help="stop by itself after this many real seconds (> 0)")
    up.add_argument("--start", default=None, metavar="ISO-TIME",
                    help="simulated start instant, e.g. 2026-03-08T01:00:00-05:00 "
                    "(default: now)")
    up.add_argument("--history", default=None, metavar="FILE",
                    help="append every finished run to FILE as a JSON line")
    up.add_argument("--http-host", default="127.0.0.1", metavar="ADDR",
                    help="address for --http-port (default 127.0.0.1)")
    up.add_argument("--http-port", type=int, default=None, metavar="PORT",
                    help="serve the service page, the API (/api/v1, /docs) and /metrics")
    _add_tokens(up, "without one, `rota up` makes a token, prints it and writes it to "
                "~/.config/rota/token, where the CLI finds it")
    _add_servers(up, required=False)

    co = sub.add_parser("coordinator", help="run a coordinator (contends for leadership)",
                        description="Run a coordinator. Start two or more: ZooKeeper elects one "
                        "leader, the others stand by. SIGHUP reloads the catalogue (a bad file "
                        "is refused and the last good one kept).")
    _add_catalogue(co)
    co.add_argument("--id", default=None, help="identifier (default: hostname-pid)")
    co.add_argument("--http-host", default="127.0.0.1", metavar="ADDR",
                    help="address for --http-port (default 127.0.0.1)")
    co.add_argument("--http-port", type=int, default=None, metavar="PORT",
                    help="serve the service page, the API (/api/v1, /docs) and /metrics")
    co.add_argument("--public-url", default=None, metavar="URL",
                    help="how operators reach this coordinator's page and API, told to the "
                         "other coordinators so a standby's page links to the leader "
                         "(default: http://HOST:PORT of --http-host and --http-port)")
    _add_tokens(co, "without one, every change through the API is refused (401)")
    co.add_argument("--session-timeout", type=float, default=2.0, metavar="SECONDS",
                    help="ZooKeeper session timeout: how fast a dead leader is replaced")
    co.add_argument("--lead-time", type=_lead_time, default=1.5, metavar="SECONDS",
                    help="send a run's order this long before its slot; the worker starts it "
                    "at the slot (default 1.5; 0 sends orders at the slot)")
    _add_servers(co, required=True)

    wo = sub.add_parser("worker", help="run a worker node",
                        description="Run a worker node: it announces its roles in ZooKeeper, "
                        "takes orders from rota.node.<id> and reports run events. SIGHUP "
                        "reloads its catalogue.")
    wo.add_argument("--node", required=True, help="node id, unique in the cluster")
    wo.add_argument("--roles", required=True, help="comma-separated roles, e.g. Master,Processing")
    wo.add_argument("--capacity", type=int, default=256, help="runs at once (default 256)")
    wo.add_argument("--catalogue", default=str(DEFAULT_CATALOGUE), metavar="FILE",
                    help="the cluster's catalogue: orders for services not in it, or with "
                    "another utility, are refused (default: the shipped catalogue)")
    wo.add_argument("--journal", default=None, metavar="FILE",
                    help="append a JSON line for every run this node starts and ends")
    wo.add_argument("--http-host", default="127.0.0.1", metavar="ADDR",
                    help="address for --http-port (default 127.0.0.1)")
    wo.add_argument("--http-port", type=int, default=None, metavar="PORT",
                    help="serve /metrics on this port")
    wo.add_argument("--session-timeout", type=float, default=2.0, metavar="SECONDS",
                    help="ZooKeeper session timeout")
    _add_servers(wo, required=True)

    env = {"ROTA_URL": _env("ROTA_URL"), "ROTA_TOKEN": _env("ROTA_TOKEN")}
    from rota import operator as op

    sv = sub.add_parser("services", help="the service table",
                        description="The service table of the leading coordinator: status, "
                        "name, schedule, allowed nodes, run groups, last run, in queue.")
    op.add_common(sv, env)
    sh = sub.add_parser("show", help="one service and its recent runs",
                        description="One service's settings and its recent runs (node, "
                        "trigger, start, duration, outcome, who asked for a manual run).")
    sh.add_argument("service", help="service name, as in the catalogue")
    sh.add_argument("--limit", type=int, default=20, help="runs shown (default 20)")
    op.add_common(sh, env)
    hi = sub.add_parser("history", help="finished runs, filtered",
                        description="Finished runs from the cluster's history, newest first.")
    hi.add_argument("service", nargs="?", default=None, help="only this service")
    hi.add_argument("--node", default=None, help="only runs on this node")
    hi.add_argument("--outcome", default=None,
                    help="only this outcome: succeeded, failed, timed_out, lost, expired, "
                    "rejected, skipped, missed")
    hi.add_argument("--since", type=op.parse_since, default=None, metavar="WHEN",
                    help="runs ended since: 30m, 2h, 1d, an ISO 8601 time or epoch seconds "
                    "(default: the last day)")
    hi.add_argument("--until", type=op.parse_since, default=None, metavar="WHEN",
                    help="runs ended until (same forms as --since)")
    hi.add_argument("--limit", type=int, default=50, help="runs shown (default 50)")
    op.add_common(hi, env)
    no = sub.add_parser("nodes", help="live worker nodes",
                        description="Live worker nodes: roles, live since, runs now, daemons.")
    op.add_common(no, env)
    ch = sub.add_parser("changes", help="the change log",
                        description="Every edit made through the API or `rota set`, applied "
                        "or refused: when, by whom, the field, old and new value.")
    ch.add_argument("service", nargs="?", default=None, help="only this service")
    ch.add_argument("--limit", type=int, default=50, help="changes shown (default 50)")
    op.add_common(ch, env)
    rk = sub.add_parser("rankings", help="the rankings and their schedule",
                        description="Every ranking profile: when it was last computed, its "
                        "stats best first, its next computation; the nodes ranking "
                        "thresholds keep out of placement.")
    op.add_common(rk, env)
    ro = sub.add_parser("ranking", help="one ranking: sorted stats and their metrics",
                        description="One ranking (RankingSv1.GetRanking): its stats best "
                        "first with the metrics they were ranked on.")
    ro.add_argument("tenant", help="the ranking's tenant (the catalogue's default: rota)")
    ro.add_argument("id", help="the ranking's id")
    op.add_common(ro, env)
    en = sub.add_parser("enable", help="enable a service",
                        description="Enable a service; it takes effect at its next slot.")
    en.add_argument("service", help="service name, as in the catalogue")
    op.add_common(en, env)
    di = sub.add_parser("disable", help="disable a service",
                        description="Disable a service: it computes no slots. Disabling a "
                        "daemon stops it everywhere, so it asks first unless --yes.")
    di.add_argument("service", help="service name, as in the catalogue")
    di.add_argument("--yes", action="store_true", help="do not ask, even for a daemon")
    op.add_common(di, env)

    run = sub.add_parser("run", help="run a service now",
                         description="Ask the leader to run a service now. It shows In Queue "
                         "until it starts; daemons and unknown services are refused with the "
                         "reason. With --wait, waits for the outcome: exit 0 when every run "
                         "succeeded, 1 when one failed or the request was refused. Through "
                         "the HTTP API (--url); with --amqp instead, the request is published "
                         "on rota.requests and not followed.")
    run.add_argument("service", help="service name, as in the catalogue")
    run.add_argument("--node", default=None, metavar="ID",
                     help="run on this node only (it must be live and hold an allowed role)")
    run.add_argument("--wait", action="store_true",
                     help="wait for the outcome and print it; the exit code tells it")
    run.add_argument("--timeout", type=_positive_seconds, default=3600.0, metavar="SECONDS",
                     help="give up waiting after this long (default 3600)")
    op.add_common(run, env)
    run.add_argument("--by", default=os.environ.get("USER", "operator"),
                     help="who asks (with --amqp; through the API, the token's name)")
    run.add_argument("--amqp", default=None, metavar="URL",
                     help="publish the request to RabbitMQ instead of the API (env "
                     "ROTA_AMQP_URL, used when no --url is given); several nodes' URLs may "
                     "be given, separated by ';'")

    st = sub.add_parser("set", help="edit a service's status or schedule",
                        description="Edit a service. It persists across restarts and "
                        "failover and takes effect at the next slot; exits 1 when the leader "
                        "refuses it, naming the field. Through the HTTP API (--url); with "
                        "--amqp, the edit is published on rota.requests and not followed.")
    st.add_argument("service", help="service name, as in the catalogue")
    g = st.add_mutually_exclusive_group()
    g.add_argument("--enable", dest="enabled", action="store_true", default=None,
                   help="enable the service")
    g.add_argument("--disable", dest="enabled", action="store_false",
                   help="disable the service (it computes no slots)")
    st.add_argument("--period", type=int, help="periodic: minutes, 1..60")
    st.add_argument("--align", type=int, help="periodic: minutes, 0..period-1")
    st.add_argument("--run-at", help="fixed time: comma-separated HH:MM times")
    st.add_argument("--cron", help="cron: a croniter expression (seconds as a sixth field)")
    op.add_common(st, env)
    st.add_argument("--by", default=os.environ.get("USER", "operator"),
                    help="who makes the edit (with --amqp; through the API, the token's name)")
    st.add_argument("--amqp", default=None, metavar="URL",
                    help="publish the edit to RabbitMQ instead of the API (env "
                    "ROTA_AMQP_URL, used when no --url is given); several nodes' URLs may "
                    "be given, separated by ';'")

    ck = sub.add_parser("check", help="validate a catalogue file and list its services",
                        description="Load a catalogue as a coordinator would; list every "
                        "error (file, service, field) or every service.")
    ck.add_argument("file", help="the catalogue (TOML)")
    return parser


def _logging(verbose: int) -> None:
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("pika").setLevel(logging.WARNING)
    logging.getLogger("kazoo").setLevel(logging.WARNING)
    if verbose < 2:
        logging.getLogger("dramatiq").setLevel(logging.ERROR)


def _load(path: str):
    from protocol.catalogue import CatalogueError

    try:
        return _load_long_lived(path)
    except (CatalogueError, OSError) as exc:
        sys.exit(f"rota: cannot load catalogue: {exc}")


def _load_long_lived(path: str):
    """Load a catalogue the process keeps until the next reload, out of the cyclic garbage
    collector's way: parsed with the collector paused, then frozen (`gc.freeze`) with
    whatever else the process holds by then. A catalogue is an object graph per service; at
    100,000 services each full collection otherwise scans millions of objects that never
    become garbage (up to ~0.5 s here: a pause of the leader's turns, and a fifth of the
    parse). The previous catalogue is unfrozen first, so that a reload frees it."""
    from protocol.catalogue import load_catalogue

    gc.unfreeze()
    gc.disable()
    try:
        catalogue = load_catalogue(path)
    finally:
        gc.enable()
        gc.freeze()
    return catalogue


SIGNAL_POLL = 0.2
"""Seconds between two returns of a waiting main thread to Python, to run signal handlers."""


def _install_stop(stop: threading.Event) -> None:
    def handler(signum, frame):
        stop.set()

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)


def _wait_for_signal(stop: threading.Event, duration: float | None) -> None:
    """Wait until SIGINT or SIGTERM (or `duration` seconds). In short waits: Python runs a
    signal handler (SIGHUP's reload too) only when the main thread runs, and a signal the
    kernel hands to another thread does not wake a main thread blocked on a lock."""
    _install_stop(stop)
    deadline = None if duration is None else time.monotonic() + duration
    while not stop.is_set():
        left = SIGNAL_POLL if deadline is None else min(SIGNAL_POLL, deadline - time.monotonic())
        if left <= 0:
            return
        stop.wait(left)


def cmd_up(args: argparse.Namespace) -> int:
    from protocol.clock import SimClock, SystemClock
    from rota.embedded import DEFAULT_NODES, Cluster, parse_nodes
    from rota.table import Display

    catalogue = _load(args.catalogue)
    try:
        nodes = parse_nodes(args.nodes or DEFAULT_NODES)
    except ValueError as exc:
        sys.exit(f"rota up: --nodes: {exc}")
    if args.speed <= 0:
        sys.exit("rota up: --speed must be positive")
    start = time.time()
    if args.start:
        try:
            dt = datetime.fromisoformat(args.start)
        except ValueError:
            sys.exit(f"rota up: --start: {args.start!r} is not an ISO 8601 time")
        if dt.tzinfo is None:
            from protocol.schedule import zone

            dt = dt.replace(tzinfo=zone(catalogue.timezone))
        start = dt.timestamp()
    clock = SimClock(start, args.speed) if (args.speed != 1 or args.start) else SystemClock()
    if (args.zk is None) != (args.amqp is None):
        sys.exit("rota up: give both --zk and --amqp, or neither (in-memory cluster)")
    roles = set(catalogue.roles)
    for spec in nodes:
        unknown = set(spec.roles) - roles
        if unknown:
            sys.exit(f"rota up: node {spec.id}: unknown role(s) {', '.join(sorted(unknown))}; "
                     f"the catalogue defines {', '.join(catalogue.roles)}")
    cluster = Cluster(catalogue, clock, nodes, amqp_url=args.amqp, zk_hosts=args.zk,
                      history=args.history)
    print(f"rota: {len(catalogue.services)} services on {len(nodes)} nodes "
          f"({'RabbitMQ + ZooKeeper' if args.amqp else 'in memory'}), speed x{args.speed:g}"
          + (f", for {args.duration:g}s" if args.duration else "; Ctrl-C stops"), flush=True)
    try:
        cluster.start()
    except KeyboardInterrupt:
        print("rota: interrupted while starting; stopping", flush=True)
        cluster.stop()
        return 130
    except RuntimeError as exc:
        cluster.stop()
        sys.exit(f"rota up: {exc}; run with -v to see why")
    http = None
    if args.http_port:
        from rota.runs import MemoryRuns, RunSource, StreamRuns

        runs: RunSource = MemoryRuns(cluster.finished, cluster.coordinator)
        if args.amqp:
            stream = StreamRuns(args.amqp, cluster.coordinator).start()
            cluster.coordinator.outbox.history_sinks.append(stream.sink)
            runs = stream
        try:
            http = _serve(cluster.coordinator, args, runs, generate=True)
        except OSError as exc:
            cluster.stop()
            sys.exit(f"rota up: {exc}")
        print(f"rota: service page on {http.url}/ (API: {http.url}/docs)", flush=True)
    display = Display(cluster.coordinator, cluster.finished)
    shown = threading.Thread(target=display.run, name="display", daemon=True)
    shown.start()
    stop = threading.Event()
    try:
        _wait_for_signal(stop, args.duration)
    finally:
        display.stop()
        shown.join(5)
        print("rota: stopping daemons and runs…", flush=True)
        cluster.stop()
        if http is not None:
            http.shutdown()
        print(f"rota: stopped; {cluster.finished.total} runs finished"
              + (f", history in {args.history}" if args.history else ""), flush=True)
    return 0


def _serve(coord, args: argparse.Namespace, runs, generate: bool):
    from rota import auth
    from rota.client import token_file
    from rota.http import serve

    try:
        tokens = auth.load(args.tokens)
    except auth.TokenError as exc:
        sys.exit(f"rota {args.command}: {exc}")
    if not tokens and generate:
        path = token_file()
        tokens = auth.generate(path)
        token = next(iter(tokens.by_name.values()))
        print(f"rota: operator token (shown once; saved in {path}, where the CLI finds it): "
              f"{token}", flush=True)
    elif not tokens:
        print(f"rota {args.command}: no operator token configured (--tokens FILE or "
              "ROTA_OPERATOR_TOKENS): changes through the API are refused", flush=True)
    return serve(coord, args.http_port, args.http_host, runs=runs, tokens=tokens,
                 protect_reads=args.protect_reads)


def _own_url(host: str, port: int) -> str:
    """This process's page and API as others may reach them: a wildcard address stands for
    this host's name."""
    if host in ("0.0.0.0", "::", ""):
        host = socket.getfqdn()
    return f"http://{'[' + host + ']' if ':' in host else host}:{port}"


def cmd_coordinator(args: argparse.Namespace) -> int:
    from coordinator.adapters.events import RabbitEventBus
    from coordinator.leader import Coordinator, LeaderOptions, fault_from_spec
    from protocol import transport
    from protocol.clock import SystemClock
    from protocol.zk import ZkCoordination

    catalogue = _load(args.catalogue)
    ident = args.id or f"{os.uname().nodename}-{os.getpid()}"
    # RabbitMQ first: a malformed URL or a queue it refuses ends the command before ZooKeeper.
    leader_transport = transport.make_transport(args.amqp, role="coordinator")
    events = RabbitEventBus(args.amqp)
    coordination = ZkCoordination(args.zk, session_timeout=args.session_timeout,
                                  identifier=ident)
    try:
        fault = fault_from_spec(os.environ.get("ROTA_FAULT"))
    except ValueError as exc:
        sys.exit(f"rota coordinator: ROTA_FAULT: {exc}")
    coord = Coordinator(ident, catalogue, coordination, leader_transport, events, SystemClock(),
                        options=LeaderOptions(fault=fault, lead_time=args.lead_time))

    def reload(signum, frame):
        from protocol.catalogue import CatalogueError

        try:
            fresh = _load_long_lived(args.catalogue)
        except (CatalogueError, OSError) as exc:
            logging.getLogger("rota").error(
                "catalogue reload refused; keeping the last good one:\n%s", exc)
            print(f"rota coordinator {ident}: catalogue reload refused: {exc}", flush=True)
            return
        print(f"rota coordinator {ident}: reloaded {args.catalogue} "
              f"({len(fresh.services)} services)", flush=True)
        coord.reload(fresh)

    signal.signal(signal.SIGHUP, reload)
    http = None
    if args.http_port:
        from rota.runs import StreamRuns

        coordination.advertise(args.public_url or _own_url(args.http_host, args.http_port))
        stream = StreamRuns(args.amqp, coord).start()
        coord.outbox.history_sinks.append(stream.sink)
        try:
            http = _serve(coord, args, stream, generate=False)
        except OSError as exc:
            sys.exit(f"rota coordinator: {exc}")
    runner = threading.Thread(target=coord.run, name="coordinator", daemon=True)
    runner.start()
    print(f"rota coordinator {ident}: contending for leadership", flush=True)
    stop = threading.Event()
    _install_stop(stop)
    while not stop.wait(1.0):
        if not runner.is_alive():
            print(f"rota coordinator {ident}: the leader loop stopped unexpectedly; exiting "
                  "so that a supervisor restarts this process", file=sys.stderr, flush=True)
            coordination.close()
            return 1
    coord.stop()
    runner.join(10)
    coordination.close()
    events.close()
    if http is not None:
        http.shutdown()
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    from protocol import transport
    from protocol.clock import SystemClock
    from protocol.zk import ZkCoordination
    from workers.node import WorkerNode

    roles = [r.strip() for r in args.roles.split(",") if r.strip()]
    if not roles:
        sys.exit("rota worker: --roles needs at least one role")
    worker_transport = transport.make_transport(args.amqp, role="worker")
    coordination = ZkCoordination(args.zk, session_timeout=args.session_timeout,
                                  identifier=args.node)
    metrics_url = None
    if args.http_port:
        from prometheus_client import start_http_server

        start_http_server(args.http_port, addr=args.http_host)
        metrics_url = f"http://{args.http_host}:{args.http_port}/metrics"
    node = WorkerNode(args.node, roles, worker_transport, coordination, SystemClock(),
                      capacity=args.capacity, metrics_url=metrics_url, journal=args.journal,
                      catalogue=_load(args.catalogue))
    def reload(signum, frame):
        from protocol.catalogue import CatalogueError

        try:
            node.catalogue = _load_long_lived(args.catalogue)
        except (CatalogueError, OSError) as exc:
            print(f"rota worker {args.node}: catalogue reload refused: {exc}", flush=True)
            return
        print(f"rota worker {args.node}: reloaded {args.catalogue}", flush=True)

    signal.signal(signal.SIGHUP, reload)
    node.start()
    print(f"rota worker {args.node} ({', '.join(roles)}): consuming "
          f"{transport.node_queue(args.node)}", flush=True)
    stop = threading.Event()
    _wait_for_signal(stop, None)
    node.stop()
    coordination.close()
    return 0


def _publish_request(amqp: str, msg) -> None:
    from protocol import encode, transport
    from protocol.amqp import AmqpUrlError, hosts

    logging.getLogger("pika").setLevel(logging.CRITICAL)
    try:
        requests = transport.make_transport(amqp, role="operator")
        try:
            requests.send(transport.REQUESTS, encode(msg))
        finally:
            requests.close()
    except AmqpUrlError as exc:
        sys.exit(f"rota: --amqp / ROTA_AMQP_URL: {exc}")
    except transport.RefusedByBroker as exc:
        sys.exit(f"rota: {exc}; the operator's RabbitMQ user needs write access to "
                 "rota.x.requests, which exists once a coordinator has started")
    except Exception as exc:
        sys.exit(f"rota: cannot reach RabbitMQ at {hosts(amqp)} ({type(exc).__name__}); "
                 "check --amqp / ROTA_AMQP_URL and that it is running")


def cmd_run(args: argparse.Namespace) -> int:
    if not args.amqp and not args.url:
        args.amqp = _env("ROTA_AMQP_URL")  # the earlier way: a request on rota.requests
    if not args.amqp:
        from rota.operator import cmd_run_http

        return cmd_run_http(args)
    import uuid

    from protocol import ManualRunRequest

    msg = ManualRunRequest(request_id=uuid.uuid4().hex[:16], service=args.service,
                           requested_by=args.by, requested_at=time.time())
    _publish_request(args.amqp, msg)
    run_id = f"manual-{msg.request_id}"
    print(f"requested a manual run of {args.service!r} (request {msg.request_id}); "
          f"watch rota.events for run id {run_id} (one {run_id}@<node> per node for a "
          "service placed on all nodes); `rota run --url ... --wait` follows it for you")
    return 0


def cmd_set(args: argparse.Namespace) -> int:
    if not args.amqp and not args.url:
        args.amqp = _env("ROTA_AMQP_URL")  # the earlier way: a request on rota.requests
    if not args.amqp:
        from rota.operator import cmd_set_http

        return cmd_set_http(args)
    import uuid

    from protocol import ProtocolError, ServiceUpdate

    run_at = [t.strip() for t in args.run_at.split(",")] if args.run_at else None
    try:
        msg = ServiceUpdate(request_id=uuid.uuid4().hex[:16], service=args.service,
                            requested_by=args.by, enabled=args.enabled, period=args.period,
                            align=args.align, run_at=run_at, cron=args.cron)
    except ProtocolError as exc:
        sys.exit(f"rota set: {exc}")
    from coordinator.leader import schedule_of_update
    from protocol.schedule import ScheduleError

    try:
        schedule_of_update(msg)
    except ScheduleError as exc:
        sys.exit(f"rota set: {args.service}: {exc}")
    if msg.enabled is None and not any((msg.period, msg.run_at, msg.cron)):
        sys.exit("rota set: nothing to change: give --enable/--disable, --period, --run-at "
                 "or --cron")
    _publish_request(args.amqp, msg)
    print(f"sent the edit of {args.service!r} (request {msg.request_id})")
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    cat = _load(args.file)
    print(f"{args.file}: {len(cat.services)} services, time zone {cat.timezone}, "
          f"roles {', '.join(cat.roles)}")
    for svc in cat.services.values():
        sched = svc.schedule.describe() if svc.schedule else "daemon"
        print(f"  {svc.kind.value:8} {svc.name:32} {sched:16} "
              f"{','.join(sorted(svc.allowed_roles))}  groups: "
              f"{','.join(sorted(svc.run_groups)) or '-'}")
    return 0


def _operator(name: str):
    def run(args: argparse.Namespace) -> int:
        from rota import operator

        result: int = getattr(operator, f"cmd_{name}")(args)
        return result

    return run


COMMANDS = {
    "up": cmd_up,
    "coordinator": cmd_coordinator,
    "worker": cmd_worker,
    "run": cmd_run,
    "set": cmd_set,
    "check": cmd_check,
    **{name: _operator(name) for name in ("services", "show", "history", "nodes", "changes",
                                          "enable", "disable", "rankings", "ranking")},
}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _logging(args.verbose)
    try:
        return COMMANDS[args.command](args)
    except BrokenPipeError:  # piped into `head`: stop quietly
        sys.stderr.close()
        return 0
    except (ValueError, ConnectionError) as exc:
        # A malformed --amqp, or a queue RabbitMQ holds under other arguments: said plainly.
        from protocol.amqp import AmqpUrlError
        from protocol.transport import QueueMismatch

        if isinstance(exc, AmqpUrlError):
            sys.exit(f"rota {args.command}: --amqp / ROTA_AMQP_URL: {exc}")
        if isinstance(exc, QueueMismatch):
            sys.exit(f"rota {args.command}: {exc}")
        raise


if __name__ == "__main__":
    sys.exit(main())
