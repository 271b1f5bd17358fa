"""A private 3-server ZooKeeper ensemble and 3-node RabbitMQ cluster on loopback, for fault tests.

Owns the cluster's port layout, configuration, start and stop, and the control of single
members (SIGKILL one, start it again on its data) that tests use to take a server away. The
processes, files and users are those of `ops.localservers` (one server of each), whose helpers
this module reuses: everything runs as the current user from Debian's packages, listens on
127.0.0.1 only and keeps its state in one directory (default `.rota-cluster`).

Members are numbered 1 to 3 everywhere: ZooKeeper's `myid`, the RabbitMQ node `rota-cN@localhost`
and the CLI's `N`.

Ports (all below the kernel's ephemeral range, 32768 and up):

- ZooKeeper: clients on 24181, 24182, 24183; server N's quorum and election ports are
  24184 + 2(N-1) and the one above it (24184-24189).
- RabbitMQ: node N's AMQP port is 29672 + 20(N-1) (29672, 29692, 29712) and its Erlang
  distribution port the one above it; the shared private epmd listens on 29674 and
  rabbitmqctl takes its distribution port from 29675-29684.

`--amqp-port` and `--zk-port`, or ROTA_LOCAL_CLUSTER_AMQP_PORT and ROTA_LOCAL_CLUSTER_ZK_PORT,
move each block (the first AMQP and the first ZooKeeper client port).

    python -m ops.localcluster start          # idempotent; reuses members already up
    python -m ops.localcluster status
    set -a; eval "$(python -m ops.localcluster env)"; set +a
    python -m ops.localcluster kill zk 2      # SIGKILL ZooKeeper server 2
    python -m ops.localcluster start zk 2     # start it again on its data
    python -m ops.localcluster stop

`env` prints ROTA_ZK (the three servers) and ROTA_AMQP_URL (the three nodes' URLs joined by
";", dramatiq's convention for several brokers), and each role's ROTA_AMQP_URL_<ROLE>.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import secrets
import shutil
import signal
import socket
import string
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

from ops import localservers as ls
from ops.localservers import HOST, ROLE_USERS, ROLES, ServerError, say

DEFAULT_DIR = Path(".rota-cluster")
DEFAULT_AMQP_PORT = 29672
DEFAULT_ZK_PORT = 24181
AMQP_PORT_ENV = "ROTA_LOCAL_CLUSTER_AMQP_PORT"
ZK_PORT_ENV = "ROTA_LOCAL_CLUSTER_ZK_PORT"
SIZE = 3
"""Members of the ensemble and of the cluster."""
NODE_STEP = 20
"""Distance between two RabbitMQ nodes' AMQP ports."""
AMQP_SPAN = SIZE * NODE_STEP
"""Ports reserved from the first AMQP port up (the nodes' AMQP and distribution ports, epmd and
rabbitmqctl's range lie in it)."""
ZK_SPAN = 3 * SIZE
"""Ports used from the first ZooKeeper client port up: clients, then quorum and election pairs."""
NODE_PREFIX = "rota-c"
ZK_HEAP = "256m"
RABBITMQ_ERL_ARGS = f"{ls.LOOPBACK_DIST} +S 1:1 +sbwt none +sbwtdcpu none +sbwtdio none"
"""One scheduler thread per node and no busy waiting: three nodes share two cores quietly."""

START_TIMEOUT = 180.0
STOP_TIMEOUT = 30.0
CONFIG = "cluster.json"


@dataclass
class LocalCluster:
    """A running (or recorded) ensemble and cluster, and how to reach them."""

    state_dir: Path
    amqp_port: int = DEFAULT_AMQP_PORT
    """Node 1's AMQP port; every RabbitMQ port follows from it."""
    zk_port: int = DEFAULT_ZK_PORT
    """Server 1's client port; every ZooKeeper port follows from it."""
    pids: dict[str, int] = field(default_factory=dict)
    """Live processes: `epmd`, `rabbitN` (the Erlang VM), `rabbitN-server` (its start script),
    `zkN`."""
    started: bool = False
    """True when the call that returned this object launched at least one process."""

    @property
    def members(self) -> range:
        return range(1, SIZE + 1)

    def node(self, i: int) -> str:
        """RabbitMQ node name of member ``i``."""
        return f"{NODE_PREFIX}{_check(i)}@localhost"

    def node_amqp_port(self, i: int) -> int:
        return self.amqp_port + NODE_STEP * (_check(i) - 1)

    def dist_port(self, i: int) -> int:
        """Erlang distribution port of node ``i``."""
        return self.node_amqp_port(i) + 1

    @property
    def epmd_port(self) -> int:
        return self.amqp_port + 2

    @property
    def cli_dist_ports(self) -> tuple[int, int]:
        low = self.amqp_port + 3
        return low, low + ls.CTL_PORTS - 1

    def zk_client_port(self, i: int) -> int:
        return self.zk_port + _check(i) - 1

    def zk_quorum_port(self, i: int) -> int:
        return self.zk_port + SIZE + 2 * (_check(i) - 1)

    def zk_election_port(self, i: int) -> int:
        return self.zk_quorum_port(i) + 1

    @property
    def zk_hosts(self) -> str:
        """The ensemble's connection string: every server, comma-separated."""
        return ",".join(f"{HOST}:{self.zk_client_port(i)}" for i in self.members)

    def amqp_url(self, i: int, vhost: str = "/") -> str:
        """guest's AMQP URL of ``vhost`` on node ``i`` alone."""
        path = "" if vhost == "/" else quote(vhost, safe="")
        return f"amqp://guest:guest@{HOST}:{self.node_amqp_port(i)}/{path}"

    @property
    def amqp_urls(self) -> str:
        """guest's URLs of the three nodes joined by ";" (dramatiq's list of brokers)."""
        return self.vhost_urls("/")

    def vhost_urls(self, vhost: str) -> str:
        """guest's URLs of ``vhost`` on the three nodes, joined by ";"."""
        return ";".join(self.amqp_url(i, vhost) for i in self.members)

    def role_url(self, role: str, vhost: str = "/") -> str:
        """The URLs of ``vhost`` on the three nodes for Rota role ``role``'s user, joined by ";"."""
        return role_urls(self, role, role_passwords(self)[role], vhost)

    def ports(self) -> dict[str, int]:
        """Every port the cluster listens on, by what listens there."""
        named: dict[str, int] = {}
        for i in self.members:
            named[f"ZooKeeper {i} client"] = self.zk_client_port(i)
            named[f"ZooKeeper {i} quorum"] = self.zk_quorum_port(i)
            named[f"ZooKeeper {i} election"] = self.zk_election_port(i)
        for i in self.members:
            named[f"RabbitMQ {i} AMQP"] = self.node_amqp_port(i)
            named[f"RabbitMQ {i} Erlang distribution"] = self.dist_port(i)
        named["epmd"] = self.epmd_port
        low, high = self.cli_dist_ports
        named.update({f"rabbitmqctl {port - low + 1}": port for port in range(low, high + 1)})
        return named

    def zk_ports(self, i: int) -> dict[str, int]:
        return {
            f"ZooKeeper {i} client": self.zk_client_port(i),
            f"ZooKeeper {i} quorum": self.zk_quorum_port(i),
            f"ZooKeeper {i} election": self.zk_election_port(i),
        }

    def rabbit_ports(self, i: int) -> dict[str, int]:
        return {
            f"RabbitMQ {i} AMQP": self.node_amqp_port(i),
            f"RabbitMQ {i} Erlang distribution": self.dist_port(i),
        }


def _check(i: int) -> int:
    if not 1 <= i <= SIZE:
        raise ServerError(f"member {i} does not exist: members are numbered 1 to {SIZE}")
    return i


def role_urls(cluster: LocalCluster, role: str, password: str, vhost: str = "/") -> str:
    """The URLs of ``vhost`` on every node for ``role``'s user with ``password``, ";"-joined."""
    path = "" if vhost == "/" else quote(vhost, safe="")
    user = f"{ROLE_USERS[role]}:{quote(password, safe='')}"
    return ";".join(
        f"amqp://{user}@{HOST}:{cluster.node_amqp_port(i)}/{path}" for i in cluster.members
    )


# --------------------------------------------------------------------------- ports


def default_ports() -> tuple[int, int]:
    """The first AMQP and ZooKeeper ports: the environment's ROTA_LOCAL_CLUSTER_AMQP_PORT and
    ROTA_LOCAL_CLUSTER_ZK_PORT, else 29672 and 24181."""
    ports = []
    for name, default, span in ((AMQP_PORT_ENV, DEFAULT_AMQP_PORT, AMQP_SPAN),
                                (ZK_PORT_ENV, DEFAULT_ZK_PORT, ZK_SPAN)):
        text = os.environ.get(name, "").strip()
        if not text:
            ports.append(default)
            continue
        try:
            port = int(text)
        except ValueError:
            raise ServerError(f"{name}={text!r} is not a port number") from None
        if not 1024 <= port <= 65535 - span:
            raise ServerError(f"{name}={port} is outside 1024..{65535 - span}")
        ports.append(port)
    return ports[0], ports[1]


def _hint() -> str:
    low = ls.ephemeral_port_range()[0]
    return (
        "choose other ports with `python -m ops.localcluster start --amqp-port PORT --zk-port "
        f"PORT`, or set {AMQP_PORT_ENV} and {ZK_PORT_ENV} (RabbitMQ uses the AMQP port and the "
        f"{AMQP_SPAN - 1} above it, ZooKeeper the client port and the {ZK_SPAN - 1} above it; "
        f"keep them all below {low}, where the kernel's outgoing connections never take them)"
    )


def _require_free(ports: dict[str, int]) -> None:
    busy = [f"{name} port {port}" for name, port in ports.items() if not ls.port_free(port)]
    if busy:
        raise ServerError(f"{', '.join(busy)} already in use by another process; stop it or "
                          f"{_hint()}")


def find_free_ports(
    amqp_port: int | None = None, zk_port: int | None = None, attempts: int = 50
) -> tuple[int, int]:
    """The first AMQP and ZooKeeper base ports at or above the given ones (default:
    `default_ports`) whose whole blocks are free, moving a block at a time."""
    defaults = default_ports()
    amqp_port = amqp_port or defaults[0]
    zk_port = zk_port or defaults[1]
    limit = min(ls.ephemeral_port_range()[0], 32768)  # never into the ephemeral range
    for amqp in range(amqp_port, amqp_port + AMQP_SPAN * attempts, AMQP_SPAN):
        block = range(amqp, amqp + AMQP_SPAN)
        if block[-1] >= limit:
            raise ServerError(f"no free RabbitMQ ports found from {amqp_port} below {limit}; "
                              f"{_hint()}")
        if all(ls.port_free(p) for p in _rabbit_used(amqp)):
            break
    else:
        raise ServerError(f"no free RabbitMQ ports found from {amqp_port}; {_hint()}")
    for zk in range(zk_port, zk_port + ZK_SPAN * attempts, ZK_SPAN):
        wanted = range(zk, zk + ZK_SPAN)
        if wanted[-1] >= limit:
            break
        if not set(wanted) & set(block) and all(ls.port_free(p) for p in wanted):
            return amqp, zk
    raise ServerError(f"no free ZooKeeper ports found from {zk_port}; {_hint()}")


def _rabbit_used(amqp_port: int) -> list[int]:
    cluster = LocalCluster(Path(), amqp_port)
    return [p for name, p in cluster.ports().items() if not name.startswith("ZooKeeper")]


# --------------------------------------------------------------------------- state directory


class _Paths:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.config = root / CONFIG
        self.cookie = root / ".erlang.cookie"
        self.epmd_pid = root / "epmd.pid"
        self.epmd_log = root / "epmd.log"
        self.rabbit_env_conf = root / "rabbitmq-env.conf"

    def rabbit(self, i: int) -> Path:
        return self.root / f"rabbit{i}"

    def rabbit_pid(self, i: int) -> Path:
        return self.root / f"rabbit{i}.pid"

    def rabbit_wrapper_pid(self, i: int) -> Path:
        return self.root / f"rabbit{i}-server.pid"

    def rabbit_stdout(self, i: int) -> Path:
        return self.rabbit(i) / "log" / "stdout.log"

    def zk(self, i: int) -> Path:
        return self.root / f"zk{i}"

    def zk_pid(self, i: int) -> Path:
        return self.root / f"zk{i}.pid"

    def zk_log(self, i: int) -> Path:
        return self.zk(i) / "zookeeper.log"


def _rabbit_marker(cluster: LocalCluster, i: int) -> str:
    # The VM's command line names the state directory (its home), shared by the three nodes.
    return f"-home {cluster.state_dir} "


def _rabbit_pid(cluster: LocalCluster, i: int) -> int | None:
    """The pid of node ``i``'s Erlang VM if it runs: recorded in its pid file, with the state
    directory on its command line and the node's name in its environment."""
    pid = ls.live_pid(_Paths(cluster.state_dir).rabbit_pid(i), _rabbit_marker(cluster, i))
    if pid is None:
        return None
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return pid
    return pid if f"RABBITMQ_NODENAME={cluster.node(i)}".encode() in environ else None


def _zk_marker(cluster: LocalCluster, i: int) -> str:
    return str(_Paths(cluster.state_dir).zk(i) / "zoo.cfg")


def refresh_pids(cluster: LocalCluster) -> None:
    """Record in ``cluster.pids`` which of its processes run now."""
    paths = _Paths(cluster.state_dir)
    found: dict[str, int | None] = {"epmd": ls.live_pid(paths.epmd_pid, "epmd")}
    for i in cluster.members:
        found[f"rabbit{i}-server"] = ls.live_pid(paths.rabbit_wrapper_pid(i), "rabbitmq-server")
        found[f"rabbit{i}"] = _rabbit_pid(cluster, i)
        found[f"zk{i}"] = ls.live_pid(paths.zk_pid(i), _zk_marker(cluster, i))
    cluster.pids = {name: pid for name, pid in found.items() if pid is not None}


def load(state_dir: str | os.PathLike[str] = DEFAULT_DIR) -> LocalCluster | None:
    """The cluster recorded in ``state_dir`` (running or not), or None if there is none."""
    root = Path(state_dir).resolve()
    try:
        config = json.loads(_Paths(root).config.read_text())
        cluster = LocalCluster(root, int(config["amqp_port"]), int(config["zk_port"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None
    refresh_pids(cluster)
    return cluster


def _config(root: Path) -> dict[str, object]:
    try:
        loaded = json.loads(_Paths(root).config.read_text())
        return loaded if isinstance(loaded, dict) else {}
    except (OSError, ValueError):
        return {}


def _save(cluster: LocalCluster, formed: bool) -> None:
    config = {"amqp_port": cluster.amqp_port, "zk_port": cluster.zk_port, "formed": formed}
    _Paths(cluster.state_dir).config.write_text(json.dumps(config, indent=2) + "\n")


# --------------------------------------------------------------------------- configuration


def zoo_cfg(cluster: LocalCluster, i: int) -> str:
    """ZooKeeper server ``i``'s configuration: the whole ensemble on loopback, ticks of 0.2 s
    so elections are quick and a session (1 to 60 s; Rota asks for 2 s) expires at most 0.2 s
    after its timeout, on the next tick; `initLimit` and `syncLimit` are 10 s and 5 s."""
    data = _Paths(cluster.state_dir).zk(i) / "data"
    lines = [
        "# Written by ops.localcluster on every start.",
        "tickTime=200",
        "initLimit=50",
        "syncLimit=25",
        "minSessionTimeout=1000",
        "maxSessionTimeout=60000",
        f"dataDir={data}",
        f"clientPort={cluster.zk_client_port(i)}",
        f"clientPortAddress={HOST}",
        "maxClientCnxns=0",
        "admin.enableServer=false",
        "4lw.commands.whitelist=ruok,stat,srvr",
        "autopurge.snapRetainCount=3",
        "autopurge.purgeInterval=1",
    ]
    lines += [
        f"server.{n}={HOST}:{cluster.zk_quorum_port(n)}:{cluster.zk_election_port(n)}"
        for n in cluster.members
    ]
    return "\n".join(lines) + "\n"


def rabbitmq_conf(cluster: LocalCluster, i: int) -> str:
    """RabbitMQ node ``i``'s configuration. Under `pause_minority` a node that loses sight of
    the majority stops serving until it sees it again, so no two sides of a split accept
    conflicting writes."""
    return (
        "# Written by ops.localcluster on every start.\n"
        f"listeners.tcp.default = {HOST}:{cluster.node_amqp_port(i)}\n"
        "cluster_partition_handling = pause_minority\n"
        "consumer_timeout = 86400000\n"
        "log.console = false\n"
        "log.file.level = info\n"
    )


def _erlang_env(cluster: LocalCluster) -> dict[str, str]:
    paths = _Paths(cluster.state_dir)
    return ls.erlang_env(
        cluster.state_dir, cluster.epmd_port, cluster.cli_dist_ports, paths.rabbit_env_conf
    )


def _server_env(cluster: LocalCluster, i: int) -> dict[str, str]:
    paths = _Paths(cluster.state_dir)
    base = paths.rabbit(i)
    env = _erlang_env(cluster)
    env.update(
        RABBITMQ_NODENAME=cluster.node(i),
        RABBITMQ_NODE_PORT=str(cluster.node_amqp_port(i)),
        RABBITMQ_NODE_IP_ADDRESS=HOST,
        RABBITMQ_MNESIA_BASE=str(base / "mnesia"),
        RABBITMQ_LOG_BASE=str(base / "log"),
        RABBITMQ_CONFIG_FILE=str(base / "rabbitmq.conf"),
        RABBITMQ_ADVANCED_CONFIG_FILE=str(base / "advanced.config"),
        RABBITMQ_ENABLED_PLUGINS_FILE=str(base / "enabled_plugins"),
        RABBITMQ_PID_FILE=str(paths.rabbit_pid(i)),
        RABBITMQ_DIST_PORT=str(cluster.dist_port(i)),
        RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS=RABBITMQ_ERL_ARGS,
    )
    return env


def _write_rabbitmq_files(cluster: LocalCluster, i: int) -> None:
    paths = _Paths(cluster.state_dir)
    base = paths.rabbit(i)
    for directory in (base, base / "mnesia", base / "log"):
        directory.mkdir(parents=True, exist_ok=True)
    (base / "rabbitmq.conf").write_text(rabbitmq_conf(cluster, i))
    (base / "enabled_plugins").write_text("[].\n")
    paths.rabbit_env_conf.write_text("# Intentionally empty: settings come from the environment.\n")
    if not paths.cookie.exists():
        # One cookie for every node and rabbitmqctl, written before any of them starts.
        cookie = "".join(secrets.choice(string.ascii_uppercase) for _ in range(20))
        paths.cookie.write_text(cookie)
        paths.cookie.chmod(0o400)


def _write_zookeeper_files(cluster: LocalCluster, i: int) -> None:
    base = _Paths(cluster.state_dir).zk(i)
    for directory in (base, base / "conf", base / "data"):
        directory.mkdir(parents=True, exist_ok=True)
    (base / "zoo.cfg").write_text(zoo_cfg(cluster, i))
    (base / "data" / "myid").write_text(f"{i}\n")
    ls.write_zk_log4j(base / "conf")


# --------------------------------------------------------------------------- probes


def zk_mode(cluster: LocalCluster, i: int, timeout: float = 1.0) -> str | None:
    """What ZooKeeper server ``i`` says it is (`srvr`): "leader", "follower", or None when it
    does not answer or serves no requests (no quorum)."""
    try:
        with socket.create_connection((HOST, cluster.zk_client_port(i)), timeout=timeout) as sock:
            sock.sendall(b"srvr")
            reply = b""
            while chunk := sock.recv(4096):
                reply += chunk
    except OSError:
        return None
    for line in reply.decode(errors="replace").splitlines():
        if line.startswith("Mode:"):
            return line.split(":", 1)[1].strip()
    return None


def zk_leader(cluster: LocalCluster) -> int | None:
    """The member that leads the ensemble now, or None when no quorum serves."""
    for i in cluster.members:
        if zk_mode(cluster, i) == "leader":
            return i
    return None


def zk_serving(cluster: LocalCluster) -> list[int]:
    """The ZooKeeper members that serve requests (leader or follower)."""
    return [i for i in cluster.members if zk_mode(cluster, i) in ("leader", "follower")]


def _rabbit_alive(cluster: LocalCluster, i: int) -> bool:
    return _rabbit_pid(cluster, i) is not None


def rabbitmqctl(
    cluster: LocalCluster, *args: str, node: int | None = None, timeout: float = 60.0,
    check: bool = True,
) -> subprocess.CompletedProcess[str]:
    """Run ``rabbitmqctl ARGS...`` against node ``node``, by default the first running one."""
    if node is None:
        node = next((i for i in cluster.members if _rabbit_alive(cluster, i)), 1)
    return ls.run_rabbitmqctl(
        _erlang_env(cluster), cluster.node(node), *args, timeout=timeout, check=check
    )


def running_nodes(cluster: LocalCluster, node: int | None = None) -> list[int]:
    """The members that the cluster (as node ``node`` sees it) lists as running."""
    result = rabbitmqctl(cluster, "-q", "cluster_status", "--formatter", "json", node=node)
    status = json.loads(result.stdout)
    names = {cluster.node(i): i for i in cluster.members}
    return sorted(names[n] for n in status.get("running_nodes", []) if n in names)


def queue_leaders(cluster: LocalCluster, vhost: str = "/") -> dict[str, int]:
    """The member holding each quorum queue's leader in ``vhost``: {queue: member}."""
    result = rabbitmqctl(
        cluster, "-q", "list_queues", "-p", vhost, "name", "type", "leader",
        "--formatter", "json",
    )  # fmt: skip
    names = {cluster.node(i): i for i in cluster.members}
    leaders: dict[str, int] = {}
    for row in json.loads(result.stdout or "[]"):
        if row.get("type") == "quorum" and row.get("leader") in names:
            leaders[row["name"]] = names[row["leader"]]
    return leaders


def is_up(cluster: LocalCluster) -> bool:
    """Whether every member runs: three ZooKeeper servers serving, three RabbitMQ nodes
    answering on their AMQP ports."""
    refresh_pids(cluster)
    return all(
        f"zk{i}" in cluster.pids and f"rabbit{i}" in cluster.pids
        and ls.amqp_answers(cluster.node_amqp_port(i)) for i in cluster.members
    ) and len(zk_serving(cluster)) == SIZE


# --------------------------------------------------------------------------- epmd


def _ensure_epmd(cluster: LocalCluster) -> None:
    paths = _Paths(cluster.state_dir)
    if ls.live_pid(paths.epmd_pid, "epmd"):
        return
    _require_free({"epmd": cluster.epmd_port})
    epmd = shutil.which("epmd") or "epmd"
    command = [epmd, "-port", str(cluster.epmd_port), "-address", HOST]
    pid = ls.launch(command, dict(os.environ), paths.epmd_log, cluster.state_dir)
    paths.epmd_pid.write_text(f"{pid}\n")
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if not ls.alive(pid):
            raise ServerError(f"epmd exited during startup:\n{ls.tail(paths.epmd_log)}")
        with contextlib.suppress(OSError), socket.create_connection((HOST, cluster.epmd_port), 1):
            cluster.pids["epmd"] = pid
            cluster.started = True
            return
        time.sleep(0.05)
    raise ServerError(f"epmd did not listen on port {cluster.epmd_port}")


# --------------------------------------------------------------------------- members


def _launch_rabbit(cluster: LocalCluster, i: int) -> int | None:
    """Launch node ``i`` unless it runs; return its start script's pid if launched."""
    paths = _Paths(cluster.state_dir)
    if _rabbit_alive(cluster, i):
        return None
    for stale in (paths.rabbit_pid(i), paths.rabbit_wrapper_pid(i)):
        stale.unlink(missing_ok=True)
    _require_free(cluster.rabbit_ports(i))
    _write_rabbitmq_files(cluster, i)
    say(f"starting RabbitMQ node {i} ({cluster.node(i)}) on {HOST}:{cluster.node_amqp_port(i)}")
    wrapper = ls.launch(
        [str(ls.RABBITMQ_SERVER)], _server_env(cluster, i), paths.rabbit_stdout(i),
        cluster.state_dir,
    )  # fmt: skip
    paths.rabbit_wrapper_pid(i).write_text(f"{wrapper}\n")
    cluster.pids[f"rabbit{i}-server"] = wrapper
    cluster.started = True
    return wrapper


def _wait_rabbit(cluster: LocalCluster, i: int, wrapper: int | None, timeout: float) -> None:
    paths = _Paths(cluster.state_dir)
    if wrapper is None:
        wrapper = cluster.pids.get(f"rabbit{i}-server") or ls.read_pid(paths.rabbit_pid(i)) or 0
    ls.wait_rabbitmq(
        _erlang_env(cluster), cluster.node(i), cluster.node_amqp_port(i), wrapper,
        paths.rabbit_pid(i), _rabbit_marker(cluster, i), paths.rabbit(i) / "log",
        paths.rabbit_stdout(i), timeout, label=f"RabbitMQ node {i}",
    )  # fmt: skip


def _join(cluster: LocalCluster, i: int) -> None:
    """Make node ``i`` (empty, just booted) a member of node 1's cluster."""
    say(f"RabbitMQ node {i} joins {cluster.node(1)}")
    rabbitmqctl(cluster, "-q", "stop_app", node=i)
    rabbitmqctl(cluster, "-q", "join_cluster", cluster.node(1), node=i)
    rabbitmqctl(cluster, "-q", "start_app", node=i)


def _launch_zk(cluster: LocalCluster, i: int) -> bool:
    paths = _Paths(cluster.state_dir)
    if ls.live_pid(paths.zk_pid(i), _zk_marker(cluster, i)):
        return False
    paths.zk_pid(i).unlink(missing_ok=True)
    _require_free(cluster.zk_ports(i))
    _write_zookeeper_files(cluster, i)
    say(f"starting ZooKeeper server {i} on {HOST}:{cluster.zk_client_port(i)}")
    base = paths.zk(i)
    command = ls.zookeeper_command(base / "zoo.cfg", base, base / "conf", heap=ZK_HEAP)
    pid = ls.launch(command, dict(os.environ), paths.zk_log(i), cluster.state_dir)
    paths.zk_pid(i).write_text(f"{pid}\n")
    cluster.pids[f"zk{i}"] = pid
    cluster.started = True
    return True


def _wait_zk(cluster: LocalCluster, members: Sequence[int], timeout: float) -> None:
    """Wait until every server in ``members`` serves (is leader or follower)."""
    paths = _Paths(cluster.state_dir)
    started = time.monotonic()
    next_report = 2.0
    what = "a ZooKeeper quorum" if len(members) > 1 else f"ZooKeeper server {members[0]}"
    while True:
        serving = zk_serving(cluster)
        if set(members) <= set(serving):
            break
        elapsed = time.monotonic() - started
        for i in members:
            if not ls.live_pid(paths.zk_pid(i), _zk_marker(cluster, i)):
                raise ServerError(f"ZooKeeper server {i} exited during startup; see "
                                  f"{paths.zk_log(i)}\n{ls.tail(paths.zk_log(i))}")
        if elapsed > timeout:
            running = [i for i in cluster.members if f"zk{i}" in cluster.pids]
            raise ServerError(
                f"{what} did not serve within {timeout:.0f} s (serving: {serving or 'none'}; "
                f"running: {running}); a server serves only while a majority of the "
                f"{SIZE} runs: start the others (`python -m ops.localcluster start zk N`) or "
                f"see {paths.zk_log(members[0])}"
            )
        if elapsed >= next_report:
            say(f"waiting for {what}… {elapsed:.0f} s")
            next_report += 2.0
        time.sleep(0.1)
    say(f"ZooKeeper {'servers' if len(members) > 1 else 'server'} "
        f"{', '.join(map(str, members))} serving after {time.monotonic() - started:.1f} s "
        f"(leader: {zk_leader(cluster)})")


def kill_zk(cluster: LocalCluster, i: int) -> None:
    """SIGKILL ZooKeeper server ``i`` (its data stays) and wait until its ports are free."""
    _kill(cluster, f"ZooKeeper server {i}", [f"zk{i}"], cluster.zk_ports(i))
    _Paths(cluster.state_dir).zk_pid(i).unlink(missing_ok=True)


def start_zk(cluster: LocalCluster, i: int, timeout: float = START_TIMEOUT) -> None:
    """Start ZooKeeper server ``i`` again on its data and wait until it serves (which needs
    a majority of the ensemble running)."""
    with ls.locked(cluster.state_dir):
        refresh_pids(cluster)
        _launch_zk(cluster, _check(i))
        _wait_zk(cluster, [i], timeout)


def kill_rabbit(cluster: LocalCluster, i: int) -> None:
    """SIGKILL RabbitMQ node ``i`` (its data stays) and wait until its ports are free."""
    _kill(cluster, f"RabbitMQ node {i}", [f"rabbit{i}", f"rabbit{i}-server"],
          cluster.rabbit_ports(i))
    paths = _Paths(cluster.state_dir)
    paths.rabbit_pid(i).unlink(missing_ok=True)
    paths.rabbit_wrapper_pid(i).unlink(missing_ok=True)


def start_rabbit(cluster: LocalCluster, i: int, timeout: float = START_TIMEOUT) -> None:
    """Start RabbitMQ node ``i`` again on its data and wait until it has rejoined the cluster
    and answers."""
    with ls.locked(cluster.state_dir):
        refresh_pids(cluster)
        _ensure_epmd(cluster)
        wrapper = _launch_rabbit(cluster, _check(i))
        _wait_rabbit(cluster, i, wrapper, timeout)
        refresh_pids(cluster)
        if i not in running_nodes(cluster, i):
            raise ServerError(f"RabbitMQ node {i} runs but is not in the cluster; see "
                              f"{_Paths(cluster.state_dir).rabbit(i) / 'log'}")


def _kill(cluster: LocalCluster, what: str, names: Sequence[str], ports: dict[str, int]) -> None:
    with ls.locked(cluster.state_dir):
        refresh_pids(cluster)
        pids = [cluster.pids[name] for name in names if name in cluster.pids]
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        if pids:
            say(f"killed {what} (pids {', '.join(map(str, pids))})")
        else:
            say(f"{what} is not running")
        deadline = time.monotonic() + 10
        while any(ls.alive(pid) for pid in pids) and time.monotonic() < deadline:
            time.sleep(0.05)
        ls.terminate(pids, 1)  # reaps the children this process launched
        ls.wait_released(ports)
        for name in names:
            cluster.pids.pop(name, None)


# --------------------------------------------------------------------------- cluster


def start(
    state_dir: str | os.PathLike[str] = DEFAULT_DIR,
    amqp_port: int | None = None,
    zk_port: int | None = None,
    timeout: float = START_TIMEOUT,
) -> LocalCluster:
    """Start the ensemble and the cluster with state in ``state_dir``; reuse members already
    up, start the others (on their data) and wait until all serve."""
    defaults = default_ports()
    amqp_port = amqp_port or defaults[0]
    zk_port = zk_port or defaults[1]
    ls.ensure_installed()
    root = Path(state_dir).resolve()
    with ls.locked(root):
        cluster = LocalCluster(root, amqp_port, zk_port)
        previous = load(root)
        formed = bool(_config(root).get("formed"))
        if previous is not None and previous.pids:
            running = (previous.amqp_port, previous.zk_port)
            if running != (amqp_port, zk_port):
                raise ServerError(f"a cluster in {root} already runs on ports {running} "
                                  "(AMQP, ZooKeeper); stop it first")
        _save(cluster, formed)
        refresh_pids(cluster)
        already = set(cluster.pids.values())
        needed: dict[str, int] = {}
        if "epmd" not in cluster.pids:
            needed["epmd"] = cluster.epmd_port
        for i in cluster.members:
            if f"rabbit{i}" not in cluster.pids:
                needed.update(cluster.rabbit_ports(i))
            if f"zk{i}" not in cluster.pids:
                needed.update(cluster.zk_ports(i))
        _require_free(needed)
        began = time.monotonic()
        try:
            _ensure_epmd(cluster)
            # Everything is launched at once; the members find each other as they come up.
            for i in cluster.members:
                _launch_zk(cluster, i)
            wrappers = {i: _launch_rabbit(cluster, i) for i in cluster.members}
            for i in cluster.members:
                _wait_rabbit(cluster, i, wrappers[i], timeout - (time.monotonic() - began))
            if not formed or running_nodes(cluster, 1) != list(cluster.members):
                for i in cluster.members[1:]:
                    if i not in running_nodes(cluster, 1):
                        _join(cluster, i)
                _save(cluster, True)
            say(f"RabbitMQ cluster running on nodes {running_nodes(cluster, 1)}")
            _wait_zk(cluster, list(cluster.members), max(timeout - (time.monotonic() - began), 10))
        except BaseException:
            refresh_pids(cluster)
            launched = [pid for pid in cluster.pids.values() if pid not in already]
            if launched:
                say(f"stopping what this start launched (pids {', '.join(map(str, launched))})")
                ls.terminate(launched, STOP_TIMEOUT)
            raise
        refresh_pids(cluster)
        if not cluster.started:
            say(f"cluster in {root} already up; reusing it")
        return cluster


def stop(state_dir: str | os.PathLike[str] = DEFAULT_DIR, timeout: float = STOP_TIMEOUT) -> bool:
    """Stop every member recorded in ``state_dir`` by pid (TERM, then KILL after
    ``timeout``); return whether anything was running."""
    root = Path(state_dir).resolve()
    with ls.locked(root):
        cluster = load(root)
        if cluster is None:
            return False
        running = bool(cluster.pids)
        members = {name: pid for name, pid in cluster.pids.items() if name != "epmd"}
        if members:
            say(f"stopping {_describe(members)} (pids {', '.join(map(str, members.values()))})")
            ls.terminate(list(members.values()), timeout)
        if "epmd" in cluster.pids:
            ls.terminate([cluster.pids["epmd"]], timeout)
        paths = _Paths(root)
        for i in cluster.members:
            for path in (paths.rabbit_pid(i), paths.rabbit_wrapper_pid(i), paths.zk_pid(i)):
                path.unlink(missing_ok=True)
        paths.epmd_pid.unlink(missing_ok=True)
        ls.wait_released(cluster.ports())
        cluster.pids.clear()
        return running


def _describe(pids: dict[str, int]) -> str:
    """What processes named zkN, rabbitN and rabbitN-server are, in words."""
    zk = sorted({name[2:] for name in pids if name.startswith("zk")})
    rabbit = sorted({name[6:].removesuffix("-server") for name in pids
                     if name.startswith("rabbit")})
    parts = []
    if zk:
        parts.append(f"ZooKeeper server{'s' if len(zk) > 1 else ''} {', '.join(zk)}")
    if rabbit:
        parts.append(f"RabbitMQ node{'s' if len(rabbit) > 1 else ''} {', '.join(rabbit)}")
    return " and ".join(parts)


# --------------------------------------------------------------------------- users and vhosts


def role_passwords(cluster: LocalCluster) -> dict[str, str]:
    """Each Rota role's RabbitMQ password; the users (shared by every node) are created on
    first use, with the permissions of `protocol.topology.PERMISSIONS` on "/"."""
    return ls.ensure_role_users(cluster.state_dir, functools.partial(rabbitmqctl, cluster))


def add_vhost(cluster: LocalCluster, name: str) -> str:
    """Create virtual host ``name`` (full rights for guest, each role's for its user) and
    return guest's URLs of it on the three nodes, joined by ";"."""
    role_passwords(cluster)
    ls.create_vhost(functools.partial(rabbitmqctl, cluster), name)
    return cluster.vhost_urls(name)


def delete_vhost(cluster: LocalCluster, name: str) -> None:
    """Delete virtual host ``name`` and everything in it; a missing vhost is not an error."""
    ls.remove_vhost(functools.partial(rabbitmqctl, cluster), name)


# --------------------------------------------------------------------------- command line


def _env_lines(cluster: LocalCluster) -> list[str]:
    lines = [
        f"ROTA_AMQP_URL={cluster.amqp_urls}",
        f"ROTA_ZK={cluster.zk_hosts}",
        f"ROTA_CLUSTER_DIR={cluster.state_dir}",
    ]
    if any(f"rabbit{i}" in cluster.pids for i in cluster.members):
        try:
            lines += [f"ROTA_AMQP_URL_{role.upper()}={cluster.role_url(role)}" for role in ROLES]
        except ServerError as error:
            say(f"warning: no role users ({error})")
    return lines


def _status_lines(cluster: LocalCluster) -> list[str]:
    lines = []
    for i in cluster.members:
        mode = zk_mode(cluster, i) or ("no quorum" if f"zk{i}" in cluster.pids else "down")
        lines.append(f"zookeeper {i}  {mode:<10} pid {cluster.pids.get(f'zk{i}', '-')!s:<8} "
                     f"{HOST}:{cluster.zk_client_port(i)}")
    for i in cluster.members:
        state = "down"
        if f"rabbit{i}" in cluster.pids:
            state = "up" if ls.amqp_answers(cluster.node_amqp_port(i)) else "starting"
        lines.append(f"rabbitmq {i}   {state:<10} pid {cluster.pids.get(f'rabbit{i}', '-')!s:<8} "
                     f"{cluster.amqp_url(i)}  node {cluster.node(i)}")
    epmd = "up" if "epmd" in cluster.pids else "down"
    lines.append(f"epmd         {epmd:<10} pid {cluster.pids.get('epmd', '-')!s:<8} "
                 f"{HOST}:{cluster.epmd_port}")
    return lines


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--dir", type=Path, default=argparse.SUPPRESS, metavar="DIR",
        help=f"state directory for config, data, logs and pid files (default: {DEFAULT_DIR}/)",
    )
    parser = argparse.ArgumentParser(
        prog="python -m ops.localcluster",
        description=(
            f"Run a private {SIZE}-server ZooKeeper ensemble and {SIZE}-node RabbitMQ cluster on\n"
            "127.0.0.1 for Rota's fault tests. Everything they write stays in the state directory."
        ),
        epilog=(
            "export the connection settings into a shell with:\n"
            '  set -a; eval "$(python -m ops.localcluster env)"; set +a'
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        parents=[common],
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    start_cmd = commands.add_parser(
        "start", parents=[common],
        help="start every member (no-op for those up), or with `zk N` / `rabbit N` one member",
        description="Start the ensemble and the cluster, or one member again on its data.",
    )
    start_cmd.add_argument("kind", nargs="?", choices=("zk", "rabbit"),
                           help="start only this kind of member ...")
    start_cmd.add_argument("index", nargs="?", type=int, help=f"... number N (1-{SIZE})")
    start_cmd.add_argument(
        "--amqp-port", type=int, default=None, metavar="PORT",
        help=f"node 1's AMQP port; the cluster uses it and the {AMQP_SPAN - 1} above it "
        f"(default: ${AMQP_PORT_ENV}, else {DEFAULT_AMQP_PORT})",
    )
    start_cmd.add_argument(
        "--zk-port", type=int, default=None, metavar="PORT",
        help=f"server 1's client port; the ensemble uses it and the {ZK_SPAN - 1} above it "
        f"(default: ${ZK_PORT_ENV}, else {DEFAULT_ZK_PORT})",
    )
    start_cmd.add_argument("--timeout", type=float, default=START_TIMEOUT, metavar="SECONDS",
                           help="seconds to wait for the members (default: %(default)s)")
    kill_cmd = commands.add_parser("kill", parents=[common],
                                   help="SIGKILL one member (`zk N` or `rabbit N`); data stays")
    kill_cmd.add_argument("kind", choices=("zk", "rabbit"))
    kill_cmd.add_argument("index", type=int, help=f"member number N (1-{SIZE})")
    commands.add_parser("stop", parents=[common],
                        help="stop every member by pid (SIGTERM, then SIGKILL)")
    commands.add_parser("status", parents=[common], help="show each member's state")
    commands.add_parser(
        "env", parents=[common],
        help="print ROTA_AMQP_URL (guest, \";\"-joined), ROTA_ZK, ROTA_CLUSTER_DIR and each "
        "role's ROTA_AMQP_URL_<ROLE> lines",
    )
    return parser


def _loaded(state_dir: Path) -> LocalCluster:
    cluster = load(state_dir)
    if cluster is None:
        raise ServerError(f"no cluster in {Path(state_dir).resolve()}; run "
                          "`python -m ops.localcluster start` first")
    return cluster


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    state_dir: Path = getattr(args, "dir", DEFAULT_DIR)
    try:
        if args.command in ("start", "kill") and args.kind is not None:
            if args.index is None:
                parser.error(f"{args.command} {args.kind}: which member? give N (1-{SIZE})")
            cluster = _loaded(state_dir)
            action = {("kill", "zk"): kill_zk, ("kill", "rabbit"): kill_rabbit,
                      ("start", "zk"): start_zk, ("start", "rabbit"): start_rabbit}
            action[args.command, args.kind](cluster, _check(args.index))
            refresh_pids(cluster)
            print("\n".join(_status_lines(cluster)))
            return 0
        if args.command == "start":
            began = time.monotonic()
            cluster = start(state_dir, args.amqp_port, args.zk_port, timeout=args.timeout)
            if cluster.started:
                say(f"started in {time.monotonic() - began:.1f} s")
            print("\n".join(_status_lines(cluster)))
            return 0
        if args.command == "stop":
            if not stop(state_dir):
                say(f"nothing running in {Path(state_dir).resolve()}")
            return 0
        loaded = load(state_dir)
        if args.command == "status":
            if loaded is None:
                print(f"no cluster in {Path(state_dir).resolve()}")
                return 3
            print("\n".join(_status_lines(loaded)))
            return 0 if is_up(loaded) else 3
        if args.command == "env":
            if loaded is None:
                loaded = LocalCluster(Path(state_dir).resolve(), *default_ports())
            if not is_up(loaded):
                say("warning: the cluster is not fully up; run `python -m ops.localcluster start`")
            print("\n".join(_env_lines(loaded)))
            return 0
    except ServerError as error:
        say(f"error: {error}")
        return 1
    return 2


if __name__ == "__main__":
    sys.exit(main())
