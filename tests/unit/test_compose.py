"""docker-compose.yml and ops/ agree with the CLI, the shipped catalogue and the metrics.

No Docker engine runs here, so the compose file is checked for what it says: every Rota
service's command parses with the real CLI parser in the compose environment, coordinators
are redundant, workers hold every role the catalogue needs, Prometheus scrapes ports that
are served, alert rules use only metrics Rota defines, and each service connects to RabbitMQ
as its role's user, created with the permissions of protocol/topology.py.

The production profile is checked the same way, and for its shape: three ZooKeeper servers
that list each other, three RabbitMQ nodes that share a cookie and discover each other, and
Rota processes given every server and every node.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Any

import pytest

yaml = pytest.importorskip("yaml", reason="PyYAML is needed to read the compose and ops files")

from protocol.catalogue import Catalogue, load_catalogue  # noqa: E402
from protocol.service import Placement  # noqa: E402
from rota.cli import DEFAULT_CATALOGUE, build_parser  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
PROMETHEUS = ROOT / "ops" / "prometheus.yml"
ALERTS = ROOT / "ops" / "alerts.yml"
METRIC_SOURCES = [ROOT / "coordinator" / "metrics.py", ROOT / "workers" / "metrics.py"]


def _load(path: Path) -> Any:
    with path.open(encoding="utf-8") as fh:
        return yaml.safe_load(fh)


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = _load(COMPOSE)
    assert isinstance(data, dict) and isinstance(data.get("services"), dict)
    return data


@pytest.fixture(scope="module")
def catalogue() -> Catalogue:
    return load_catalogue(DEFAULT_CATALOGUE)


PRODUCTION = "production"
STACKS = [None, PRODUCTION]
"""The services without a profile (`docker compose up`), and the production profile's."""


def _in_stack(svc: dict[str, Any], stack: str | None) -> bool:
    profiles = svc.get("profiles") or []
    return stack in profiles if stack else not profiles


def _rota_services(compose: dict[str, Any], stack: str | None = "*") -> dict[str, dict[str, Any]]:
    """The compose services that run the Rota image (their command is a `rota` subcommand),
    of one stack (default: of every stack)."""
    out = {}
    for name, svc in compose["services"].items():
        if stack != "*" and not _in_stack(svc, stack):
            continue
        if svc.get("image", "").startswith("rota") or "build" in svc:
            out[name] = svc
    return out


def _parse(svc: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> argparse.Namespace:
    env = svc.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    for var in ("ROTA_ZK", "ROTA_AMQP_URL"):
        monkeypatch.delenv(var, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, str(value))
    command = svc["command"]
    assert isinstance(command, list) and all(isinstance(a, str) for a in command), command
    try:
        return build_parser().parse_args(command)  # defaults read the environment set above
    except SystemExit as exc:  # argparse has printed the problem on stderr
        pytest.fail(f"`rota {' '.join(command)}` does not parse (exit {exc.code})")


def _parse_stack(compose: dict[str, Any], stack: str | None) -> dict[str, argparse.Namespace]:
    with pytest.MonkeyPatch.context() as mp:
        return {name: _parse(svc, mp) for name, svc in _rota_services(compose, stack).items()}


@pytest.fixture(scope="module", params=STACKS, ids=["default", "production"])
def parsed(
    compose: dict[str, Any], request: pytest.FixtureRequest
) -> dict[str, argparse.Namespace]:
    """Each stack's Rota services, parsed by the CLI: the checks using it apply to both."""
    stack = _parse_stack(compose, request.param)
    assert stack, f"no Rota service in stack {request.param or 'default'}"
    return stack


@pytest.fixture(scope="module")
def default_parsed(compose: dict[str, Any]) -> dict[str, argparse.Namespace]:
    """The services `docker compose up` starts, which ops/prometheus.yml scrapes."""
    return _parse_stack(compose, None)


def _of(parsed: dict[str, argparse.Namespace], command: str) -> dict[str, argparse.Namespace]:
    return {name: args for name, args in parsed.items() if args.command == command}


def _roles(args: argparse.Namespace) -> set[str]:
    return {r.strip() for r in args.roles.split(",") if r.strip()}


# -- the compose file and the CLI ------------------------------------------------------------


def test_compose_runs_rota_image_with_a_parsable_command(
    compose: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    rota = _rota_services(compose)
    assert len(rota) >= 4, sorted(compose["services"])
    for name, svc in rota.items():
        args = _parse(svc, monkeypatch)
        assert args.command in ("coordinator", "worker"), name
        assert args.zk and args.amqp, f"{name}: no ZooKeeper or RabbitMQ address"
        host, port = args.zk.split("/")[0].split(",")[0].rsplit(":", 1)
        assert host in compose["services"], f"{name}: ROTA_ZK names unknown host {host!r}"
        amqp = re.match(r"amqps?://(?:[^@/]*@)?([^:/]+)", args.amqp)
        assert amqp and amqp[1] in compose["services"], f"{name}: ROTA_AMQP_URL {args.amqp!r}"
        needs = set(svc.get("depends_on") or [])
        assert {host, amqp[1]} <= needs, f"{name} does not depend on {host} and {amqp[1]}"


def test_no_unauthenticated_write_surface(compose: dict[str, Any],
                                          parsed: dict[str, argparse.Namespace]) -> None:
    """Ports are published on the host's loopback only; every coordinator serving its API
    takes operator tokens from the environment (never written in the file), and without one
    the API refuses every change."""
    for name, svc in compose["services"].items():
        for port in svc.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} beyond loopback"
    serving = {n: a for n, a in _of(parsed, "coordinator").items() if a.http_port}
    assert serving
    for name, args in serving.items():
        env = compose["services"][name].get("environment") or {}
        tokens = str(env.get("ROTA_OPERATOR_TOKENS", ""))
        assert re.fullmatch(r"\$\{ROTA_OPERATOR_TOKENS(:-)?\}", tokens), (name, tokens)
        assert args.tokens is None or args.tokens.startswith("/run/secrets/"), name


def test_dockerfile_entrypoint_is_the_cli() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert re.search(r'^ENTRYPOINT \["rota"\]', text, re.M), text
    for package in ("coordinator", "workers", "protocol", "rota"):
        assert re.search(rf"^COPY {package}\b", text, re.M), f"Dockerfile lacks {package}/"


def test_at_least_two_coordinators_with_distinct_ids(parsed: dict[str, argparse.Namespace]) -> None:
    coordinators = _of(parsed, "coordinator")
    assert len(coordinators) >= 2, sorted(parsed)
    ids = [args.id for args in coordinators.values()]
    assert None not in ids and len(set(ids)) == len(ids), ids


def test_workers_have_distinct_node_ids(parsed: dict[str, argparse.Namespace]) -> None:
    nodes = [args.node for args in _of(parsed, "worker").values()]
    assert nodes and len(set(nodes)) == len(nodes), nodes


def test_every_catalogue_role_is_held_by_a_worker(
    parsed: dict[str, argparse.Namespace], catalogue: Catalogue
) -> None:
    held = set().union(*(_roles(a) for a in _of(parsed, "worker").values()))
    assert held <= set(catalogue.roles), f"workers hold unknown roles {held - set(catalogue.roles)}"
    used = set().union(*(svc.allowed_roles for svc in catalogue.services.values()))
    assert used <= held, f"no worker holds {sorted(used - held)}"
    for svc in catalogue.services.values():
        assert held & svc.allowed_roles, f"{svc.name} has no worker to run on"


def test_each_daemon_has_a_worker_for_its_roles(
    parsed: dict[str, argparse.Namespace], catalogue: Catalogue
) -> None:
    workers = {a.node: _roles(a) for a in _of(parsed, "worker").values()}
    daemons = [svc for svc in catalogue.services.values() if svc.is_daemon]
    assert daemons
    for svc in daemons:
        for role in svc.allowed_roles:
            assert any(role in roles for roles in workers.values()), \
                f"daemon {svc.name}: no worker holds its allowed role {role}"
        eligible = [n for n, roles in workers.items() if roles & svc.allowed_roles]
        if svc.placement is Placement.ALL:
            assert eligible, svc.name


# -- Prometheus ------------------------------------------------------------------------------


def test_prometheus_scrapes_the_ports_rota_serves(
    compose: dict[str, Any], default_parsed: dict[str, argparse.Namespace]
) -> None:
    parsed = default_parsed
    prom = _load(PROMETHEUS)
    for rule_file in prom.get("rule_files", []):
        assert (PROMETHEUS.parent / rule_file).is_file(), rule_file
    served = {name: args.http_port for name, args in parsed.items() if args.http_port}
    assert set(served) == set(parsed), f"not serving /metrics: {set(parsed) - set(served)}"
    for name, args in parsed.items():
        assert args.http_host == "0.0.0.0", f"{name}: /metrics on {args.http_host} only"
    scraped: dict[str, str] = {}
    for job in prom["scrape_configs"]:
        assert job.get("metrics_path", "/metrics") == "/metrics", job["job_name"]
        for static in job["static_configs"]:
            for target in static["targets"]:
                host, port = target.rsplit(":", 1)
                assert host in compose["services"], f"{job['job_name']}: unknown host {host!r}"
                assert host in served, f"{job['job_name']}: {host} serves no /metrics"
                assert int(port) == served[host], \
                    f"{job['job_name']}: {target}, but {host} serves on {served[host]}"
                scraped[host] = job["job_name"]
    assert set(scraped) == set(served), f"not scraped: {set(served) - set(scraped)}"
    for host, job in scraped.items():
        assert parsed[host].command in job, f"{host} ({parsed[host].command}) is in job {job}"


# -- alert rules -----------------------------------------------------------------------------

_CONSTRUCTOR = re.compile(r'\b(Counter|Gauge|Histogram|Summary)\(\s*"(rota_\w+)"')
_SELECTOR = re.compile(r"\b(rota_\w+)(\{[^}]*\})?")
_LABEL = re.compile(r"(\w+)\s*(?:=~|!~|!=|=)")


def _defined_metrics() -> dict[str, str]:
    """Every sample name the project exposes, mapped to the metric that defines it."""
    out: dict[str, str] = {}
    for source in METRIC_SOURCES:
        for kind, name in _CONSTRUCTOR.findall(source.read_text()):
            if kind == "Counter":
                base = name.removesuffix("_total")
                out.update({f"{base}_total": name, f"{base}_created": name})
            elif kind in ("Histogram", "Summary"):
                out.update({name: name, f"{name}_count": name, f"{name}_sum": name,
                            f"{name}_created": name})
                if kind == "Histogram":
                    out[f"{name}_bucket"] = name
            else:
                out[name] = name
    return out


def _labels() -> dict[str, set[str]]:
    """Label names of every metric, read from the live metric objects."""
    import coordinator.metrics
    import workers.metrics

    out: dict[str, set[str]] = {}
    for module in (coordinator.metrics, workers.metrics):
        for obj in vars(module).values():
            name = getattr(obj, "_name", None)
            if isinstance(name, str) and name.startswith("rota_"):
                labels = set(getattr(obj, "_labelnames", ()))
                full = name + "_total" if type(obj).__name__ == "Counter" else name
                out[full] = labels
    return out


def test_metric_sources_define_what_the_alerts_need() -> None:
    defined = _defined_metrics()
    for name in ("rota_leader", "rota_runs_total", "rota_dead_letters_total",
                 "rota_worker_dead_letters_total", "rota_nodes_live",
                 "rota_run_lateness_seconds_bucket"):
        assert name in defined, name


def test_alert_rules_parse_and_use_only_defined_metrics() -> None:
    rules = _load(ALERTS)
    defined = _defined_metrics()
    labels = _labels()
    alerts = [rule for group in rules["groups"] for rule in group["rules"]]
    assert alerts
    names = [rule["alert"] for rule in alerts]
    assert len(set(names)) == len(names), names
    for rule in alerts:
        name, expr = rule["alert"], rule["expr"]
        assert isinstance(expr, str) and expr.count("(") == expr.count(")"), name
        assert rule.get("annotations", {}).get("summary"), f"{name}: no summary"
        assert rule.get("labels", {}).get("severity") in ("page", "warning", "info"), name
        used = _SELECTOR.findall(expr)
        assert used, f"{name}: uses no Rota metric"
        for metric, selector in used:
            assert metric in defined, f"{name}: {metric} is not a metric Rota defines"
            base = defined[metric]
            family = base if base in labels else base + "_total"
            allowed = labels.get(family, set()) | {"job", "instance"}
            if metric.endswith("_bucket"):
                allowed.add("le")
            for label in _LABEL.findall(selector or ""):
                assert label in allowed, f"{name}: {metric} has no label {label!r}"
        for label in re.findall(r"\$labels\.(\w+)", str(rule.get("annotations"))):
            by = re.search(r"\bby\s*\(([^)]*)\)", expr)
            kept = {x.strip() for x in by[1].split(",")} if by else set()
            assert label in kept or not re.search(r"\b(sum|avg|max|min|count)\b", expr), \
                f"{name}: its annotations use $labels.{label}, which the expression drops"


# -- RabbitMQ users ----------------------------------------------------------------------------

_INTERPOLATION = re.compile(r"\$\$|\$\{(\w+)(?::?[-?][^}]*)?\}")


def _interpolate(text: str, env: dict[str, str]) -> str:
    """What Compose makes of `text`: `$$` is a `$`, `${VAR...}` the variable's value."""
    return _INTERPOLATION.sub(lambda m: "$" if m[0] == "$$" else env[m[1]], text)


def _user_of(url: str) -> tuple[str, str]:
    found = re.match(r"amqps?://([^:@/]+):([^@/]*)@", url)
    assert found, f"{url!r} names no user and password"
    return found[1], found[2]


def test_each_rota_service_connects_as_its_roles_rabbitmq_user(
    compose: dict[str, Any], parsed: dict[str, argparse.Namespace]
) -> None:
    from ops.localservers import ROLE_USERS

    for name, args in parsed.items():
        user, password = _user_of(args.amqp)
        assert user == ROLE_USERS[args.command], f"{name} connects as {user}"
        variable = f"${{ROTA_{args.command.upper()}_PASSWORD"
        assert password.startswith(variable), f"{name}: password {password!r}"
    assert not re.search(r"amqps?://guest\b", COMPOSE.read_text())


def test_rabbitmq_loads_users_with_each_roles_permissions(compose: dict[str, Any]) -> None:
    import json

    from ops.localservers import ROLE_USERS
    from protocol.topology import PERMISSIONS

    rabbit = compose["services"]["rabbitmq"]
    mounted = {c["source"]: c["target"] for c in rabbit["configs"]}
    configs = compose["configs"]
    conf = configs["rabbitmq-conf"]["content"]
    assert mounted["rabbitmq-conf"].startswith("/etc/rabbitmq/conf.d/")
    assert f"load_definitions = {mounted['rabbitmq-definitions']}" in conf
    env = {f"ROTA_{role.upper()}_PASSWORD": f"pw-{role}" for role in PERMISSIONS}
    definitions = json.loads(_interpolate(configs["rabbitmq-definitions"]["content"], env))
    users = {u["name"]: u["password"] for u in definitions["users"]}
    assert users == {ROLE_USERS[role]: f"pw-{role}" for role in PERMISSIONS}
    granted = {p["user"]: (p["configure"], p["write"], p["read"])
               for p in definitions["permissions"] if p["vhost"] == "/"}
    assert granted == {ROLE_USERS[role]: perms for role, perms in PERMISSIONS.items()}


# -- the production profile: a ZooKeeper ensemble and a RabbitMQ cluster -----------------------


def _services_of(compose: dict[str, Any], image: str) -> dict[str, dict[str, Any]]:
    return {name: svc for name, svc in compose["services"].items()
            if _in_stack(svc, PRODUCTION) and str(svc.get("image", "")).startswith(image + ":")}


def _env(svc: dict[str, Any]) -> dict[str, str]:
    env = svc.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {key: str(value) for key, value in env.items()}


def _depends(svc: dict[str, Any]) -> set[str]:
    return set(svc.get("depends_on") or [])


def test_production_zookeeper_servers_form_one_ensemble(compose: dict[str, Any]) -> None:
    servers = _services_of(compose, "zookeeper")
    assert len(servers) == 3, sorted(servers)
    ids = {_env(svc)["ZOO_MY_ID"]: name for name, svc in servers.items()}
    assert sorted(ids) == ["1", "2", "3"], ids
    lists = {_env(svc)["ZOO_SERVERS"] for svc in servers.values()}
    assert len(lists) == 1, "the servers do not list the same ensemble"
    listed = dict(entry.split("=", 1) for entry in lists.pop().split())
    assert set(listed) == {f"server.{n}" for n in ids}
    for n, name in ids.items():
        assert re.fullmatch(rf"{re.escape(name)}:\d+:\d+;2181", listed[f"server.{n}"]), (
            f"server.{n} is {listed[f'server.{n}']}, not service {name}")
    for name, svc in servers.items():
        env = _env(svc)
        assert env["ZOO_TICK_TIME"] == "500", name
        extra = dict(item.split("=", 1) for item in env.get("ZOO_CFG_EXTRA", "").split())
        assert int(extra["minSessionTimeout"]) <= 2000 <= int(extra["maxSessionTimeout"]), name
        assert any(str(v).endswith(":/data") for v in svc.get("volumes", [])), f"{name}: no data"


def test_production_rabbitmq_nodes_share_a_cookie_and_discover_each_other(
    compose: dict[str, Any],
) -> None:
    nodes = _services_of(compose, "rabbitmq")
    assert len(nodes) == 3, sorted(nodes)
    configs = compose["configs"]
    cookies = set()
    confs = set()
    for name, svc in nodes.items():
        assert svc.get("hostname") == name, f"{name}: its node name follows its hostname"
        mounted = {c["target"]: c for c in svc["configs"]}
        cookie = mounted["/var/lib/rabbitmq/.erlang.cookie"]
        assert cookie["mode"] in (0o400, 0o600), f"{name}: the cookie must be private"
        cookies.add(cookie["source"])
        conf = next(c["source"] for target, c in mounted.items()
                    if target.startswith("/etc/rabbitmq/conf.d/"))
        confs.add(conf)
        assert mounted["/etc/rabbitmq/definitions.json"]["source"] == "rabbitmq-definitions"
        assert any(str(v).endswith(":/var/lib/rabbitmq") for v in svc.get("volumes", [])), name
    assert len(cookies) == 1 and len(confs) == 1, (cookies, confs)
    assert re.fullmatch(r"\$\{ROTA_RABBITMQ_COOKIE:\?[^}]*\}", configs[cookies.pop()]["content"])
    conf = dict(line.split(" = ", 1) for line in configs[confs.pop()]["content"].splitlines()
                if " = " in line)
    assert conf["cluster_formation.peer_discovery_backend"] == "classic_config"
    listed = {v for k, v in conf.items() if k.startswith("cluster_formation.classic_config.nodes.")}
    assert listed == {f"rabbit@{name}" for name in nodes}
    assert conf["cluster_partition_handling"] == "pause_minority"
    assert conf["load_definitions"] == "/etc/rabbitmq/definitions.json"


def test_production_rota_services_are_given_every_server_and_node(
    compose: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    zookeepers = _services_of(compose, "zookeeper")
    rabbits = _services_of(compose, "rabbitmq")
    rota = _rota_services(compose, PRODUCTION)
    assert {"coordinator", "worker"} <= {_parse(svc, monkeypatch).command for svc in rota.values()}
    for name, svc in rota.items():
        args = _parse(svc, monkeypatch)
        hosts = [host.split(":")[0] for host in args.zk.split("/")[0].split(",")]
        assert sorted(hosts) == sorted(zookeepers), f"{name}: ROTA_ZK {args.zk!r}"
        urls = args.amqp.split(";")
        found = [re.match(r"amqps?://([^:@/]+):([^@/]*)@([^:/]+):(\d+)/", url) for url in urls]
        assert all(found), f"{name}: ROTA_AMQP_URL {args.amqp!r}"
        assert sorted(m[3] for m in found if m) == sorted(rabbits), f"{name}: {args.amqp!r}"
        assert len({(m[1], m[2]) for m in found if m}) == 1, f"{name}: one user on every node"
        assert _depends(svc) >= set(zookeepers) | set(rabbits), f"{name}: {_depends(svc)}"
    # The production stack never leans on the single servers, nor they on it.
    for name, svc in compose["services"].items():
        production = _in_stack(svc, PRODUCTION)
        for needed in _depends(svc):
            assert _in_stack(compose["services"][needed], PRODUCTION) == production, (
                f"{name} depends on {needed}, of the other stack")


def test_both_stacks_can_run_side_by_side(compose: dict[str, Any]) -> None:
    published = [str(port).rsplit(":", 1)[0] for svc in compose["services"].values()
                 for port in svc.get("ports", [])]
    assert len(published) == len(set(published)), f"host ports used twice: {published}"
    ids = [a.id for a in _parse_stack(compose, None).values() if a.command == "coordinator"]
    ids += [a.id for a in _parse_stack(compose, PRODUCTION).values() if a.command == "coordinator"]
    assert len(ids) == len(set(ids)), ids
