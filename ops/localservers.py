"""Private RabbitMQ and ZooKeeper servers on loopback for development, tests and benchmarks.

Both servers run as the current user from Debian's packages, listen on 127.0.0.1 only and
keep all their state (configuration, data, logs, pid files, Erlang cookie) in one directory.

Ports: AMQP 26672, then epmd (+1), the broker's Erlang distribution (+2) and rabbitmqctl's
(+3 to +12); ZooKeeper 22181. All lie below the kernel's ephemeral port range (32768 and up),
so no outgoing connection can be holding them. `--amqp-port` and `--zk-port`, or the
environment's ROTA_LOCAL_AMQP_PORT and ROTA_LOCAL_ZK_PORT, choose others.

    python -m ops.localservers start          # idempotent; reuses servers already up
    python -m ops.localservers status
    set -a; eval "$(python -m ops.localservers env)"; set +a
    python -m ops.localservers stop

RabbitMQ gets a user per Rota role (`rota-coordinator`, `rota-worker`, `rota-operator`) with the
permissions of `protocol.topology.PERMISSIONS` on the default virtual host and on every virtual
host `add_vhost` creates; their passwords are generated into `rabbitmq-users.json` in the state
directory and `env` prints their URLs as ROTA_AMQP_URL_COORDINATOR, _WORKER and _OPERATOR.
`guest` keeps every right, for administration and tests.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import functools
import json
import os
import re
import secrets
import shutil
import signal
import socket
import string
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol
from urllib.parse import quote

from protocol.topology import PERMISSIONS, ROLES

DEFAULT_DIR = Path(".rota-servers")
# Every default port lies below Linux's ephemeral range (32768-60999 by default, see
# /proc/sys/net/ipv4/ip_local_port_range), from which the kernel picks the local port of any
# outgoing connection: a port in that range can be held by some client at any moment. The
# broker's other ports follow its AMQP port (see `rabbitmq_ports`), so they stay below it too.
DEFAULT_AMQP_PORT = 26672
DEFAULT_ZK_PORT = 22181
AMQP_PORT_ENV = "ROTA_LOCAL_AMQP_PORT"
ZK_PORT_ENV = "ROTA_LOCAL_ZK_PORT"
CTL_PORTS = 10
"""rabbitmqctl processes that can run at once (each listens on a port of its own range)."""
RABBITMQ_PORT_SPAN = 3 + CTL_PORTS
"""Ports used from the AMQP port up: AMQP, epmd, Erlang distribution, the rabbitmqctl range."""
NODE_NAME = "rota-test@localhost"
HOST = "127.0.0.1"

RABBITMQ_BIN = Path("/usr/lib/rabbitmq/bin")
RABBITMQ_SERVER = RABBITMQ_BIN / "rabbitmq-server"
RABBITMQCTL = RABBITMQ_BIN / "rabbitmqctl"
ZK_MAIN = "org.apache.zookeeper.server.quorum.QuorumPeerMain"

START_TIMEOUT = 120.0
STOP_TIMEOUT = 30.0

ROLE_USERS = {role: f"rota-{role}" for role in ROLES}
"""RabbitMQ user of each Rota role."""
USERS_FILE = "rabbitmq-users.json"

_SAFE_VHOST = re.compile(r"^[A-Za-z0-9_.\-]+$")
# Popen handles of processes started by this interpreter, so they can be reaped after a stop.
_children: dict[int, subprocess.Popen[bytes]] = {}


class ServerError(RuntimeError):
    """A local server could not be installed, started, stopped or managed."""


@dataclass
class Servers:
    """A running pair of local servers and how to reach them."""

    state_dir: Path
    amqp_port: int = DEFAULT_AMQP_PORT
    zk_port: int = DEFAULT_ZK_PORT
    epmd_port: int = 0
    """The private Erlang port mapper; 0 means the AMQP port + 1."""
    node: str = NODE_NAME
    pids: dict[str, int] = field(default_factory=dict)
    started: bool = False
    """True when the call that returned this object launched at least one process."""
    dist_port: int = 0
    """The broker's Erlang distribution port; 0 means the AMQP port + 2 (RabbitMQ's own
    default, AMQP + 20000, would land in the ephemeral port range)."""

    def __post_init__(self) -> None:
        if not self.epmd_port:
            self.epmd_port = self.amqp_port + 1
        if not self.dist_port:
            self.dist_port = self.amqp_port + 2

    @property
    def amqp_url(self) -> str:
        return f"amqp://guest:guest@{HOST}:{self.amqp_port}/"

    @property
    def zk_hosts(self) -> str:
        return f"{HOST}:{self.zk_port}"

    def vhost_url(self, vhost: str) -> str:
        """AMQP URL of ``vhost`` on this broker."""
        return self.amqp_url + quote(vhost, safe="")

    def role_url(self, role: str, vhost: str = "/") -> str:
        """AMQP URL of ``vhost`` for the RabbitMQ user of Rota role ``role``."""
        password = role_passwords(self)[role]
        path = "" if vhost == "/" else quote(vhost, safe="")
        return (f"amqp://{ROLE_USERS[role]}:{quote(password, safe='')}@{HOST}:"
                f"{self.amqp_port}/{path}")

    @property
    def cli_dist_ports(self) -> tuple[int, int]:
        """Distribution port range for rabbitmqctl: the ports just above the broker's."""
        low = self.amqp_port + 3
        return low, low + CTL_PORTS - 1

    def ports(self) -> dict[str, int]:
        """Every port these servers listen on, by what listens there."""
        low, high = self.cli_dist_ports
        named = {
            "AMQP": self.amqp_port,
            "epmd": self.epmd_port,
            "Erlang distribution": self.dist_port,
            "ZooKeeper": self.zk_port,
        }
        named.update({f"rabbitmqctl {port - low + 1}": port for port in range(low, high + 1)})
        return named


def default_ports() -> tuple[int, int]:
    """The AMQP and ZooKeeper ports to use when none are given: the environment's
    ``ROTA_LOCAL_AMQP_PORT`` and ``ROTA_LOCAL_ZK_PORT``, else the built-in defaults."""
    ports = []
    for name, default in ((AMQP_PORT_ENV, DEFAULT_AMQP_PORT), (ZK_PORT_ENV, DEFAULT_ZK_PORT)):
        text = os.environ.get(name, "").strip()
        if not text:
            ports.append(default)
            continue
        try:
            port = int(text)
        except ValueError:
            raise ServerError(f"{name}={text!r} is not a port number") from None
        if not 1024 <= port <= 65535 - RABBITMQ_PORT_SPAN:
            raise ServerError(f"{name}={port} is outside 1024..{65535 - RABBITMQ_PORT_SPAN}")
        ports.append(port)
    return ports[0], ports[1]


def ephemeral_port_range() -> tuple[int, int]:
    """The range the kernel picks outgoing connections' local ports from."""
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default


# --------------------------------------------------------------------------- output


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- installation


def zk_classpath(conf_dir: Path) -> str:
    """Classpath for the ZooKeeper server, led by our own log4j configuration directory."""
    java = Path("/usr/share/java")
    parts = [str(conf_dir)]
    if (java / "zookeeper.jar").exists():
        # Debian's jar names its dependencies in its manifest; add a logging backend.
        parts.append(str(java / "zookeeper.jar"))
        logging_jars = ("slf4j-log4j12.jar", "log4j-1.2.jar")
        parts += [str(java / jar) for jar in logging_jars if (java / jar).exists()]
    elif (lib := Path("/usr/share/zookeeper/lib")).is_dir():
        parts += [str(Path("/usr/share/zookeeper") / "*"), str(lib / "*")]
    else:
        parts.append(str(java / "*"))
    return ":".join(parts)


def _zk_installed() -> bool:
    candidates = [Path("/usr/share/java/zookeeper.jar")]
    candidates += Path("/usr/share/zookeeper").glob("*.jar")
    candidates += Path("/usr/share/zookeeper/lib").glob("zookeeper-*.jar")
    return any(p.exists() for p in candidates) and find_java() is not None


def find_java() -> str | None:
    java_home = os.environ.get("JAVA_HOME")
    if java_home and (Path(java_home) / "bin" / "java").exists():
        return str(Path(java_home) / "bin" / "java")
    return shutil.which("java")


def ensure_installed() -> None:
    """Install Debian's rabbitmq-server and zookeeper packages when they are missing."""
    missing = []
    if not (RABBITMQ_SERVER.exists() and RABBITMQCTL.exists() and shutil.which("epmd")):
        missing.append("rabbitmq-server")
    if not _zk_installed():
        missing.append("zookeeper")
    if not missing:
        return
    commands = [["apt-get", "update"], ["apt-get", "install", "-y", *missing]]
    if shutil.which("apt-get") is None:
        raise ServerError(f"missing packages {', '.join(missing)} and apt-get is not available")
    if os.geteuid() != 0:
        hint = " && ".join("sudo " + " ".join(c) for c in commands)
        raise ServerError(f"missing packages {', '.join(missing)}; install them with:\n  {hint}")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in commands:
        say("$ " + " ".join(command))
        if subprocess.run(command, env=env).returncode != 0:
            raise ServerError(f"{' '.join(command)} failed")


# --------------------------------------------------------------------------- processes


def alive(pid: int | None) -> bool:
    """Whether ``pid`` is a running (not zombie) process."""
    if not pid or pid <= 0:
        return False
    child = _children.get(pid)
    if child is not None and child.poll() is not None:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[-1].split()[0] not in ("Z", "X")


def cmdline(pid: int) -> str:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
        return raw.replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def _signal(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, sig)


def terminate(pids: Sequence[int], timeout: float) -> None:
    """Send TERM to ``pids``, wait up to ``timeout`` seconds, then KILL whatever is left."""
    pids = [p for p in pids if alive(p)]
    for pid in pids:
        _signal(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    for pid in pids:
        if alive(pid):
            say(f"process {pid} ignored SIGTERM for {timeout:.0f} s; sending SIGKILL")
            _signal(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    for pid in pids:
        child = _children.pop(pid, None)
        if child is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.wait(timeout=1)


def launch(command: Sequence[str], env: dict[str, str], log: Path, cwd: Path) -> int:
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            list(command),
            env=env,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    _children[proc.pid] = proc
    return proc.pid


def port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
    return True


HOW_TO_CHOOSE_PORTS = (
    "choose other ports with `python -m ops.localservers start --amqp-port PORT --zk-port PORT`"
    f", or for ops/test, ops/bench and the test suite set {AMQP_PORT_ENV} and {ZK_PORT_ENV}"
    f" (the broker uses the AMQP port and the {RABBITMQ_PORT_SPAN - 1} above it; keep them all"
    " below {low}, where the kernel's outgoing connections never take them)"
)


def wait_released(ports: dict[str, int], timeout: float = 15.0) -> None:
    """Wait until a stopped server's ``ports`` can be bound again.

    A multi-threaded server (the JVM, the Erlang VM) can be reported gone while its last
    threads still hold the listening socket; starting again in that window fails.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(port_free(port) for port in ports.values()):
            return
        time.sleep(0.1)


def require_free(ports: dict[str, int]) -> None:
    busy = [f"{name} port {port}" for name, port in ports.items() if not port_free(port)]
    if busy:
        low, high = ephemeral_port_range()
        in_range = [port for port in ports.values() if low <= port <= high]
        note = (
            f"; {', '.join(map(str, in_range))} lie in the ephemeral port range {low}-{high}"
            if in_range
            else ""
        )
        raise ServerError(
            f"{', '.join(busy)} already in use by another process{note}; stop it or {_hint()}"
        )


def find_free_ports(
    amqp_port: int | None = None, zk_port: int | None = None, attempts: int = 100
) -> tuple[int, int]:
    """The first AMQP and ZooKeeper ports at or above the given ones (default: `default_ports`)
    that new servers can use.

    For the AMQP port this includes the ports derived from it (epmd, Erlang distribution and
    the rabbitmqctl range), so several pairs of servers can run side by side.
    """
    defaults = default_ports()
    amqp_port = amqp_port or defaults[0]
    zk_port = zk_port or defaults[1]
    step = RABBITMQ_PORT_SPAN
    for amqp in range(amqp_port, amqp_port + step * attempts, step):
        needed = [p for name, p in Servers(Path(), amqp).ports().items() if name != "ZooKeeper"]
        if max(needed) <= 65535 and all(port_free(port) for port in needed):
            break
    else:
        raise ServerError(f"no free AMQP port pattern found from {amqp_port}; {_hint()}")
    for zk in range(zk_port, zk_port + attempts):
        if zk not in needed and port_free(zk):
            return amqp, zk
    raise ServerError(f"no free ZooKeeper port found from {zk_port}; {_hint()}")


def _hint() -> str:
    return HOW_TO_CHOOSE_PORTS.replace("{low}", str(ephemeral_port_range()[0]))


def tail(path: Path, lines: int = 20) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return "(no log)"
    return "\n".join(text[-lines:])


# --------------------------------------------------------------------------- probes


def amqp_answers(port: int, timeout: float = 1.0) -> bool:
    """Whether something accepts connections on the AMQP ``port``.

    RabbitMQ opens its listener only once it has booted. A bare connect, unlike a protocol
    header, closes without a warning in the broker's log.
    """
    try:
        with socket.create_connection((HOST, port), timeout=timeout):
            return True
    except OSError:
        return False


def zk_answers(port: int, timeout: float = 1.0) -> bool:
    """Whether a ZooKeeper server on ``port`` answers ``ruok`` with ``imok``."""
    try:
        with socket.create_connection((HOST, port), timeout=timeout) as sock:
            sock.sendall(b"ruok")
            reply = b""
            while chunk := sock.recv(16):
                reply += chunk
            return reply == b"imok"
    except OSError:
        return False


# --------------------------------------------------------------------------- state directory


class _Paths:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.config = root / "servers.json"
        self.lock = root / ".lock"
        self.cookie = root / ".erlang.cookie"
        self.epmd_pid = root / "epmd.pid"
        self.epmd_log = root / "epmd.log"
        self.rabbit = root / "rabbitmq"
        self.rabbit_conf = self.rabbit / "rabbitmq.conf"
        self.rabbit_env_conf = self.rabbit / "rabbitmq-env.conf"
        self.rabbit_plugins = self.rabbit / "enabled_plugins"
        self.rabbit_advanced = self.rabbit / "advanced.config"
        self.rabbit_mnesia = self.rabbit / "mnesia"
        self.rabbit_logs = self.rabbit / "log"
        self.rabbit_stdout = self.rabbit_logs / "stdout.log"
        self.rabbit_pid = root / "rabbitmq.pid"
        self.rabbit_wrapper_pid = root / "rabbitmq-server.pid"
        self.zk = root / "zookeeper"
        self.zk_cfg = self.zk / "zoo.cfg"
        self.zk_conf = self.zk / "conf"
        self.zk_data = self.zk / "data"
        self.zk_log = self.zk / "zookeeper.log"
        self.zk_pid = root / "zookeeper.pid"


@contextlib.contextmanager
def locked(root: Path) -> Iterator[None]:
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def live_pid(path: Path, marker: str) -> int | None:
    """The pid recorded in ``path`` if that process is alive and still ours."""
    pid = read_pid(path)
    if pid is None:
        return None
    if alive(pid) and marker in cmdline(pid):
        return pid
    return None


def _refresh_pids(servers: Servers) -> None:
    paths = _Paths(servers.state_dir)
    root = str(servers.state_dir)
    found = {
        "epmd": live_pid(paths.epmd_pid, "epmd"),
        "rabbitmq-server": live_pid(paths.rabbit_wrapper_pid, "rabbitmq-server"),
        "rabbitmq": live_pid(paths.rabbit_pid, root),
        "zookeeper": live_pid(paths.zk_pid, root),
    }
    servers.pids = {name: pid for name, pid in found.items() if pid is not None}


def load(state_dir: str | os.PathLike[str] = DEFAULT_DIR) -> Servers | None:
    """Servers recorded in ``state_dir`` (running or not), or None if it holds no servers."""
    root = Path(state_dir).resolve()
    try:
        config = json.loads(_Paths(root).config.read_text())
    except (OSError, ValueError):
        return None
    servers = Servers(
        state_dir=root,
        amqp_port=int(config["amqp_port"]),
        zk_port=int(config["zk_port"]),
        epmd_port=int(config["epmd_port"]),
        node=str(config["node"]),
        # Servers started before the distribution port was recorded used RabbitMQ's default.
        dist_port=int(config.get("dist_port") or int(config["amqp_port"]) + 20000),
    )
    _refresh_pids(servers)
    return servers


def _save(servers: Servers) -> None:
    config = {
        "amqp_port": servers.amqp_port,
        "zk_port": servers.zk_port,
        "epmd_port": servers.epmd_port,
        "dist_port": servers.dist_port,
        "node": servers.node,
    }
    _Paths(servers.state_dir).config.write_text(json.dumps(config, indent=2) + "\n")


def rabbitmq_up(servers: Servers) -> bool:
    return "rabbitmq" in servers.pids and amqp_answers(servers.amqp_port)


def zookeeper_up(servers: Servers) -> bool:
    return "zookeeper" in servers.pids and zk_answers(servers.zk_port)


def is_up(servers: Servers | str | os.PathLike[str]) -> bool:
    """Whether both servers are running and answering on their ports."""
    if not isinstance(servers, Servers):
        loaded = load(servers)
        if loaded is None:
            return False
        servers = loaded
    else:
        _refresh_pids(servers)
    return rabbitmq_up(servers) and zookeeper_up(servers)


# --------------------------------------------------------------------------- epmd


def _ensure_epmd(servers: Servers) -> None:
    """Run a private Erlang port mapper on loopback so nodes elsewhere cannot clash."""
    paths = _Paths(servers.state_dir)
    if live_pid(paths.epmd_pid, "epmd"):
        return
    require_free({"epmd": servers.epmd_port})
    epmd = shutil.which("epmd") or "epmd"
    command = [epmd, "-port", str(servers.epmd_port), "-address", HOST]
    pid = launch(command, dict(os.environ), paths.epmd_log, servers.state_dir)
    paths.epmd_pid.write_text(f"{pid}\n")
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if not alive(pid):
            raise ServerError(f"epmd exited during startup:\n{tail(paths.epmd_log)}")
        with contextlib.suppress(OSError), socket.create_connection((HOST, servers.epmd_port), 1):
            servers.pids["epmd"] = pid
            servers.started = True
            return
        time.sleep(0.05)
    raise ServerError(f"epmd did not listen on port {servers.epmd_port}")


# --------------------------------------------------------------------------- RabbitMQ


LOOPBACK_DIST = "-kernel inet_dist_use_interface {127,0,0,1}"
"""Erlang arguments that keep a node's distribution listener on loopback."""


def erlang_env(
    home: Path, epmd_port: int, cli_dist_ports: tuple[int, int], env_conf: Path
) -> dict[str, str]:
    """Environment for RabbitMQ's scripts: the Erlang cookie in ``home``, the private port
    mapper on ``epmd_port``, rabbitmqctl's distribution ports in ``cli_dist_ports``."""
    env = dict(os.environ)
    for name in ("NOTIFY_SOCKET", "RABBITMQ_ALLOW_INPUT", "RABBITMQ_DIST_PORT", "ERL_EPMD_ADDRESS"):
        env.pop(name, None)
    low, high = cli_dist_ports
    env.update(
        HOME=str(home),
        ERL_EPMD_PORT=str(epmd_port),
        RABBITMQ_CONF_ENV_FILE=str(env_conf),
        RABBITMQ_CTL_DIST_PORT_MIN=str(low),
        RABBITMQ_CTL_DIST_PORT_MAX=str(high),
        RABBITMQ_CTL_ERL_ARGS=LOOPBACK_DIST,
    )
    return env


def _erlang_env(servers: Servers) -> dict[str, str]:
    paths = _Paths(servers.state_dir)
    return erlang_env(
        servers.state_dir, servers.epmd_port, servers.cli_dist_ports, paths.rabbit_env_conf
    )


def _server_env(servers: Servers) -> dict[str, str]:
    paths = _Paths(servers.state_dir)
    env = _erlang_env(servers)
    env.update(
        RABBITMQ_NODENAME=servers.node,
        RABBITMQ_NODE_PORT=str(servers.amqp_port),
        RABBITMQ_NODE_IP_ADDRESS=HOST,
        RABBITMQ_MNESIA_BASE=str(paths.rabbit_mnesia),
        RABBITMQ_LOG_BASE=str(paths.rabbit_logs),
        RABBITMQ_CONFIG_FILE=str(paths.rabbit_conf),
        RABBITMQ_ADVANCED_CONFIG_FILE=str(paths.rabbit_advanced),
        RABBITMQ_ENABLED_PLUGINS_FILE=str(paths.rabbit_plugins),
        RABBITMQ_PID_FILE=str(paths.rabbit_pid),
        RABBITMQ_DIST_PORT=str(servers.dist_port),
        RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS=LOOPBACK_DIST,
    )
    return env


def _write_rabbitmq_files(servers: Servers) -> None:
    paths = _Paths(servers.state_dir)
    for directory in (paths.rabbit, paths.rabbit_mnesia, paths.rabbit_logs):
        directory.mkdir(parents=True, exist_ok=True)
    paths.rabbit_conf.write_text(
        "# Written by ops.localservers on every start.\n"
        f"listeners.tcp.default = {HOST}:{servers.amqp_port}\n"
        "consumer_timeout = 86400000\n"
        "log.console = false\n"
        "log.file.level = info\n"
    )
    paths.rabbit_plugins.write_text("[].\n")
    paths.rabbit_env_conf.write_text("# Intentionally empty: settings come from the environment.\n")
    if not paths.cookie.exists():
        # Written before the first start so the server and rabbitmqctl never race to create it.
        cookie = "".join(secrets.choice(string.ascii_uppercase) for _ in range(20))
        paths.cookie.write_text(cookie)
        paths.cookie.chmod(0o400)


def rabbitmqctl(
    servers: Servers, *args: str, timeout: float = 60.0, check: bool = True
) -> subprocess.CompletedProcess[str]:
    """Run ``rabbitmqctl -n NODE ARGS...`` against the local broker."""
    return run_rabbitmqctl(_erlang_env(servers), servers.node, *args, timeout=timeout, check=check)


class Rabbitmqctl(Protocol):
    """Runs rabbitmqctl against one broker (or cluster): ``ctl(*args, check=...)``."""

    def __call__(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]: ...


def run_rabbitmqctl(
    env: dict[str, str], node: str, *args: str, timeout: float = 60.0, check: bool = True
) -> subprocess.CompletedProcess[str]:
    """Run ``rabbitmqctl -n NODE ARGS...`` with ``env`` (see `erlang_env`)."""
    command = [str(RABBITMQCTL), "-n", node, *args]
    result = subprocess.run(
        command,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )
    if check and result.returncode != 0:
        output = (result.stdout + result.stderr).strip()
        raise ServerError(f"{' '.join(command)} failed ({result.returncode}):\n{output}")
    return result


def _wait_rabbitmq(servers: Servers, wrapper: int, timeout: float) -> None:
    paths = _Paths(servers.state_dir)
    wait_rabbitmq(
        _erlang_env(servers), servers.node, servers.amqp_port, wrapper, paths.rabbit_pid,
        str(servers.state_dir), paths.rabbit_logs, paths.rabbit_stdout, timeout,
    )  # fmt: skip


def wait_rabbitmq(
    env: dict[str, str],
    node: str,
    amqp_port: int,
    wrapper: int,
    pid_file: Path,
    marker: str,
    logs: Path,
    stdout_log: Path,
    timeout: float,
    label: str = "RabbitMQ",
) -> None:
    """Wait until the broker ``node`` launched as ``wrapper`` has booted and answers on
    ``amqp_port``, saying every two seconds how long it has waited (as ``label``)."""
    command = [
        str(RABBITMQCTL), "-n", node, "wait", str(pid_file), "--timeout", str(int(timeout)),
    ]  # fmt: skip
    started = time.monotonic()
    waiter = subprocess.Popen(
        command,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    next_report = 2.0
    try:
        while waiter.poll() is None:
            elapsed = time.monotonic() - started
            if not alive(wrapper) and not live_pid(pid_file, marker):
                raise ServerError(
                    f"{label} exited during startup; see {logs}\n"
                    f"{tail(stdout_log)}"
                )
            if elapsed > timeout + 5:
                raise ServerError(f"{label} did not start within {timeout:.0f} s")
            if elapsed >= next_report:
                say(f"waiting for {label}… {elapsed:.0f} s")
                next_report += 2.0
            time.sleep(0.2)
    finally:
        if waiter.poll() is None:
            waiter.kill()
        output = waiter.communicate()[0].decode(errors="replace").strip()
    if waiter.returncode != 0:
        raise ServerError(f"rabbitmqctl wait failed:\n{output}\n{tail(stdout_log)}")
    while not amqp_answers(amqp_port):
        if time.monotonic() - started > timeout:
            raise ServerError(f"{label} is running but port {amqp_port} does not answer")
        time.sleep(0.2)
    say(f"{label} up on {HOST}:{amqp_port} after {time.monotonic() - started:.1f} s")


def _start_rabbitmq(servers: Servers, timeout: float) -> None:
    paths = _Paths(servers.state_dir)
    _refresh_pids(servers)
    if "rabbitmq" in servers.pids:
        if amqp_answers(servers.amqp_port):
            return
        say(f"RabbitMQ (pid {servers.pids['rabbitmq']}) is running but not answering; waiting")
        wrapper = servers.pids.get("rabbitmq-server", servers.pids["rabbitmq"])
        with contextlib.suppress(ServerError):
            _wait_rabbitmq(servers, wrapper, timeout)
            return
        say("RabbitMQ did not come up; restarting it")
        _stop_rabbitmq(servers)
    for stale in (paths.rabbit_pid, paths.rabbit_wrapper_pid):
        if stale.exists():
            say(f"removing stale pid file {stale}")
            stale.unlink()
    require_free({"AMQP": servers.amqp_port, "Erlang distribution": servers.dist_port})
    _write_rabbitmq_files(servers)
    say(f"starting RabbitMQ node {servers.node} on {HOST}:{servers.amqp_port}")
    wrapper = launch(
        [str(RABBITMQ_SERVER)], _server_env(servers), paths.rabbit_stdout, servers.state_dir
    )
    paths.rabbit_wrapper_pid.write_text(f"{wrapper}\n")
    servers.started = True
    try:
        _wait_rabbitmq(servers, wrapper, timeout)
    except BaseException:
        terminate([wrapper, *filter(None, [read_pid(paths.rabbit_pid)])], STOP_TIMEOUT)
        raise
    _refresh_pids(servers)


def _stop_rabbitmq(servers: Servers, timeout: float = STOP_TIMEOUT) -> None:
    paths = _Paths(servers.state_dir)
    _refresh_pids(servers)
    pids = [servers.pids[k] for k in ("rabbitmq-server", "rabbitmq") if k in servers.pids]
    if pids:
        say(f"stopping RabbitMQ (pids {', '.join(map(str, pids))})")
        terminate(pids, timeout)
        wait_released({"AMQP": servers.amqp_port, "Erlang distribution": servers.dist_port})
    for path in (paths.rabbit_pid, paths.rabbit_wrapper_pid):
        path.unlink(missing_ok=True)
    servers.pids.pop("rabbitmq", None)
    servers.pids.pop("rabbitmq-server", None)


# --------------------------------------------------------------------------- ZooKeeper


def _write_zookeeper_files(servers: Servers) -> None:
    paths = _Paths(servers.state_dir)
    for directory in (paths.zk, paths.zk_conf, paths.zk_data):
        directory.mkdir(parents=True, exist_ok=True)
    paths.zk_cfg.write_text(
        "# Written by ops.localservers on every start.\n"
        "tickTime=200\n"
        "minSessionTimeout=1000\n"
        "maxSessionTimeout=60000\n"
        f"dataDir={paths.zk_data}\n"
        f"clientPort={servers.zk_port}\n"
        f"clientPortAddress={HOST}\n"
        "maxClientCnxns=0\n"
        "admin.enableServer=false\n"
        "4lw.commands.whitelist=ruok,stat,srvr\n"
        "autopurge.snapRetainCount=3\n"
        "autopurge.purgeInterval=1\n"
    )
    write_zk_log4j(paths.zk_conf)


def write_zk_log4j(conf_dir: Path) -> None:
    """A log4j configuration in ``conf_dir`` that sends ZooKeeper's log to its stdout."""
    (conf_dir / "log4j.properties").write_text(
        "log4j.rootLogger=INFO, CONSOLE\n"
        "log4j.appender.CONSOLE=org.apache.log4j.ConsoleAppender\n"
        "log4j.appender.CONSOLE.layout=org.apache.log4j.PatternLayout\n"
        "log4j.appender.CONSOLE.layout.ConversionPattern=%d{ISO8601} %-5p [%t:%C{1}@%L] %m%n\n"
    )


def zookeeper_command(cfg: Path, log_dir: Path, conf_dir: Path, heap: str = "512m") -> list[str]:
    """The java command line of a ZooKeeper server reading ``cfg``, its log4j configuration
    from ``conf_dir`` (see `write_zk_log4j`), with at most ``heap`` of heap."""
    java = find_java()
    if java is None:
        raise ServerError("java not found; install a JRE (Debian: default-jre-headless)")
    return [
        java,
        "-Xms64m",
        f"-Xmx{heap}",
        f"-Dzookeeper.log.dir={log_dir}",
        "-Dzookeeper.root.logger=INFO,CONSOLE",
        "-cp",
        zk_classpath(conf_dir),
        ZK_MAIN,
        str(cfg),
    ]


def _zookeeper_command(servers: Servers) -> list[str]:
    paths = _Paths(servers.state_dir)
    return zookeeper_command(paths.zk_cfg, paths.zk, paths.zk_conf)


def _start_zookeeper(servers: Servers, timeout: float) -> None:
    paths = _Paths(servers.state_dir)
    _refresh_pids(servers)
    if "zookeeper" in servers.pids:
        pid = servers.pids["zookeeper"]
    else:
        if paths.zk_pid.exists():
            say(f"removing stale pid file {paths.zk_pid}")
            paths.zk_pid.unlink()
        require_free({"ZooKeeper": servers.zk_port})
        _write_zookeeper_files(servers)
        say(f"starting ZooKeeper on {HOST}:{servers.zk_port}")
        command = _zookeeper_command(servers)
        pid = launch(command, dict(os.environ), paths.zk_log, servers.state_dir)
        paths.zk_pid.write_text(f"{pid}\n")
        servers.pids["zookeeper"] = pid
        servers.started = True
    started = time.monotonic()
    next_report = 2.0
    while not zk_answers(servers.zk_port):
        elapsed = time.monotonic() - started
        if not alive(pid):
            paths.zk_pid.unlink(missing_ok=True)
            servers.pids.pop("zookeeper", None)
            raise ServerError(f"ZooKeeper exited during startup:\n{tail(paths.zk_log)}")
        if elapsed > timeout:
            _stop_zookeeper(servers)
            raise ServerError(f"ZooKeeper did not answer within {timeout:.0f} s")
        if elapsed >= next_report:
            say(f"waiting for ZooKeeper… {elapsed:.0f} s")
            next_report += 2.0
        time.sleep(0.1)
    if servers.started:
        say(f"ZooKeeper up on {HOST}:{servers.zk_port} after {time.monotonic() - started:.1f} s")


def _stop_zookeeper(servers: Servers, timeout: float = STOP_TIMEOUT) -> None:
    paths = _Paths(servers.state_dir)
    _refresh_pids(servers)
    if "zookeeper" in servers.pids:
        say(f"stopping ZooKeeper (pid {servers.pids['zookeeper']})")
        terminate([servers.pids["zookeeper"]], timeout)
        wait_released({"ZooKeeper": servers.zk_port})
    paths.zk_pid.unlink(missing_ok=True)
    servers.pids.pop("zookeeper", None)


# --------------------------------------------------------------------------- public API


def start(
    state_dir: str | os.PathLike[str] = DEFAULT_DIR,
    amqp_port: int | None = None,
    zk_port: int | None = None,
    epmd_port: int | None = None,
    timeout: float = START_TIMEOUT,
) -> Servers:
    """Start RabbitMQ and ZooKeeper with state in ``state_dir``; reuse whatever is already up.

    The ports default to `default_ports` (the environment, else the built-in defaults);
    ``epmd_port`` (the private Erlang port mapper) defaults to ``amqp_port + 1``.
    """
    defaults = default_ports()
    amqp_port = amqp_port or defaults[0]
    zk_port = zk_port or defaults[1]
    ensure_installed()
    root = Path(state_dir).resolve()
    with locked(root):
        servers = Servers(root, amqp_port, zk_port, epmd_port or amqp_port + 1)
        previous = load(root)
        if previous is not None and previous.pids:
            wanted = (servers.amqp_port, servers.zk_port, servers.epmd_port)
            running = (previous.amqp_port, previous.zk_port, previous.epmd_port)
            # Reused as they run, even when recorded by an older version with other ports.
            servers.dist_port = previous.dist_port
            if wanted != running:
                raise ServerError(
                    f"servers in {root} already run on ports {running}; stop them first"
                )
        _save(servers)
        _refresh_pids(servers)
        already = set(servers.pids.values())
        needed: dict[str, int] = {}
        if "epmd" not in servers.pids:
            needed["epmd"] = servers.epmd_port
        if "rabbitmq" not in servers.pids:
            needed["AMQP"] = servers.amqp_port
            needed["Erlang distribution"] = servers.dist_port
        if "zookeeper" not in servers.pids:
            needed["ZooKeeper"] = servers.zk_port
        require_free(needed)
        try:
            _ensure_epmd(servers)
            _start_rabbitmq(servers, timeout)
            _start_zookeeper(servers, timeout)
        except BaseException:
            _refresh_pids(servers)
            launched = [pid for pid in servers.pids.values() if pid not in already]
            if launched:
                say(f"stopping what this start launched (pids {', '.join(map(str, launched))})")
                terminate(launched, STOP_TIMEOUT)
            raise
        _refresh_pids(servers)
        if not servers.started:
            say(f"servers in {root} already up; reusing them")
        return servers


def _stop_all(servers: Servers, timeout: float = STOP_TIMEOUT) -> None:
    paths = _Paths(servers.state_dir)
    _refresh_pids(servers)
    rabbit = [servers.pids[k] for k in ("rabbitmq-server", "rabbitmq") if k in servers.pids]
    zk = [servers.pids["zookeeper"]] if "zookeeper" in servers.pids else []
    if rabbit:
        say(f"stopping RabbitMQ (pids {', '.join(map(str, rabbit))})")
    if zk:
        say(f"stopping ZooKeeper (pid {zk[0]})")
    terminate(rabbit + zk, timeout)
    if "epmd" in servers.pids:
        say(f"stopping epmd (pid {servers.pids['epmd']})")
        terminate([servers.pids["epmd"]], timeout)
    for path in (paths.rabbit_pid, paths.rabbit_wrapper_pid, paths.zk_pid, paths.epmd_pid):
        path.unlink(missing_ok=True)
    servers.pids.clear()


def stop(state_dir: str | os.PathLike[str] = DEFAULT_DIR, timeout: float = STOP_TIMEOUT) -> bool:
    """Stop the servers recorded in ``state_dir``; return whether anything was running."""
    root = Path(state_dir).resolve()
    with locked(root):
        servers = load(root)
        if servers is None:
            return False
        running = bool(servers.pids)
        _stop_all(servers, timeout)
        return running


def stop_rabbitmq(servers: Servers, timeout: float = STOP_TIMEOUT) -> None:
    """Stop the broker (TERM, then KILL after ``timeout``) and keep its data."""
    with locked(servers.state_dir):
        _stop_rabbitmq(servers, timeout)


def start_rabbitmq(servers: Servers, timeout: float = START_TIMEOUT) -> None:
    """Start the broker again on the same port and data, and wait until it answers."""
    with locked(servers.state_dir):
        _ensure_epmd(servers)
        _start_rabbitmq(servers, timeout)


def restart_rabbitmq(servers: Servers, timeout: float = START_TIMEOUT) -> Servers:
    """Stop the broker by pid and start it again on the same port and data."""
    with locked(servers.state_dir):
        _stop_rabbitmq(servers)
        _ensure_epmd(servers)
        _start_rabbitmq(servers, timeout)
    return servers


def stop_zookeeper(servers: Servers, timeout: float = STOP_TIMEOUT) -> None:
    """Stop ZooKeeper (TERM, then KILL after ``timeout``) and keep its data."""
    with locked(servers.state_dir):
        _stop_zookeeper(servers, timeout)


def start_zookeeper(servers: Servers, timeout: float = START_TIMEOUT) -> None:
    """Start ZooKeeper again on the same port and data, and wait until it answers."""
    with locked(servers.state_dir):
        _start_zookeeper(servers, timeout)


def restart_zookeeper(servers: Servers, timeout: float = START_TIMEOUT) -> Servers:
    """Stop ZooKeeper by pid and start it again on the same port and data."""
    with locked(servers.state_dir):
        _stop_zookeeper(servers)
        _start_zookeeper(servers, timeout)
    return servers


def erlang_binary(text: str) -> str:
    return '<<"' + text.replace("\\", "\\\\").replace('"', '\\"') + '">>'


# Users known to exist on a broker, by state directory: checked once per process.
_users_ready: dict[Path, dict[str, str]] = {}


def role_passwords(servers: Servers) -> dict[str, str]:
    """The password of each role's RabbitMQ user; the users are created (or their passwords
    set) on first use by this process, with the passwords kept in the state directory."""
    return ensure_role_users(servers.state_dir, functools.partial(rabbitmqctl, servers))


def ensure_role_users(root: Path, ctl: Rabbitmqctl) -> dict[str, str]:
    """Create (or set the passwords of) each Rota role's RabbitMQ user through ``ctl``, with
    the permissions of `PERMISSIONS` on the default virtual host, once per process and state
    directory ``root``, where the passwords are kept; return them by role."""
    ready = _users_ready.get(root)
    if ready is not None:
        return ready
    path = root / USERS_FILE
    with locked(root):
        try:
            passwords = {role: str(pw) for role, pw in json.loads(path.read_text()).items()}
        except (OSError, ValueError):
            passwords = {}
        if set(passwords) != set(ROLES):
            alphabet = string.ascii_letters + string.digits
            passwords = {role: "".join(secrets.choice(alphabet) for _ in range(24))
                         for role in ROLES}
            path.write_text(json.dumps(passwords, indent=2) + "\n")
            path.chmod(0o600)
        for role, password in passwords.items():
            user = ROLE_USERS[role]
            added = ctl("-q", "add_user", user, password, check=False)
            if added.returncode != 0:
                output = added.stdout + added.stderr
                if "already_exists" not in output and "already exists" not in output:
                    raise ServerError(f"cannot add RabbitMQ user {user}:\n{output.strip()}")
                ctl("-q", "change_password", user, password)
        grant_role_permissions(ctl, "/")
    _users_ready[root] = passwords
    return passwords


def grant_role_permissions(ctl: Rabbitmqctl, vhost: str) -> None:
    """Give each Rota role's user the permissions of `PERMISSIONS` on ``vhost``."""
    for role, (configure, write, read) in PERMISSIONS.items():
        ctl("-q", "set_permissions", "-p", vhost, ROLE_USERS[role], configure, write, read)


def add_vhost(servers: Servers, name: str) -> str:
    """Create virtual host ``name`` with full permissions for guest and each Rota role's
    permissions for its user (`role_passwords`); return its AMQP URL (guest's)."""
    role_passwords(servers)
    create_vhost(functools.partial(rabbitmqctl, servers), name)
    return servers.vhost_url(name)


def create_vhost(ctl: Rabbitmqctl, name: str) -> None:
    """Create virtual host ``name`` through ``ctl`` with full permissions for guest and each
    Rota role's permissions for its user (the users must exist: `ensure_role_users`)."""
    if _SAFE_VHOST.match(name):
        # One CLI round trip instead of four; falls back to the documented commands below.
        grants = [("guest", (".*", ".*", ".*"))]
        grants += [(ROLE_USERS[role], perms) for role, perms in PERMISSIONS.items()]
        expr = f'rabbit_vhost:add(<<"{name}">>, <<"rota">>), ' + ", ".join(
            "rabbit_auth_backend_internal:set_permissions("
            f'{erlang_binary(user)}, <<"{name}">>, '
            + ", ".join(erlang_binary(p) for p in perms) + ', <<"rota">>)'
            for user, perms in grants) + "."
        result = ctl("-q", "eval", expr, check=False)
        if result.returncode == 0 and result.stdout.strip() == "ok":
            return
    ctl("-q", "add_vhost", name)
    ctl("-q", "set_permissions", "-p", name, "guest", ".*", ".*", ".*")
    grant_role_permissions(ctl, name)


def delete_vhost(servers: Servers, name: str) -> None:
    """Delete virtual host ``name`` and everything in it; a missing vhost is not an error."""
    remove_vhost(functools.partial(rabbitmqctl, servers), name)


def remove_vhost(ctl: Rabbitmqctl, name: str) -> None:
    """Delete virtual host ``name`` through ``ctl``; a missing vhost is not an error."""
    result = ctl("-q", "delete_vhost", name, check=False)
    output = result.stdout + result.stderr
    if result.returncode != 0 and "does not exist" not in output and "no_such_vhost" not in output:
        raise ServerError(f"delete_vhost {name} failed ({result.returncode}):\n{output.strip()}")


# --------------------------------------------------------------------------- command line


def _env_lines(servers: Servers) -> list[str]:
    lines = [
        f"ROTA_AMQP_URL={servers.amqp_url}",
        f"ROTA_ZK={servers.zk_hosts}",
        f"ROTA_SERVERS_DIR={servers.state_dir}",
    ]
    if rabbitmq_up(servers):
        try:
            lines += [f"ROTA_AMQP_URL_{role.upper()}={servers.role_url(role)}" for role in ROLES]
        except ServerError as error:
            say(f"warning: no role users ({error})")
    return lines


def _status_lines(servers: Servers) -> list[str]:
    pids = servers.pids
    rabbit = "up" if rabbitmq_up(servers) else ("starting" if "rabbitmq" in pids else "down")
    zk = "up" if zookeeper_up(servers) else ("starting" if "zookeeper" in pids else "down")
    epmd = "up" if "epmd" in pids else "down"
    return [
        f"rabbitmq   {rabbit:<8} pid {pids.get('rabbitmq', '-')!s:<8} "
        f"{servers.amqp_url}  node {servers.node}",
        f"zookeeper  {zk:<8} pid {pids.get('zookeeper', '-')!s:<8} {servers.zk_hosts}",
        f"epmd       {epmd:<8} pid {pids.get('epmd', '-')!s:<8} {HOST}:{servers.epmd_port}",
    ]


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--dir",
        type=Path,
        default=argparse.SUPPRESS,
        metavar="DIR",
        help=f"state directory for config, data, logs and pid files (default: {DEFAULT_DIR}/)",
    )
    parser = argparse.ArgumentParser(
        prog="python -m ops.localservers",
        description=(
            "Run private RabbitMQ and ZooKeeper servers on 127.0.0.1 for Rota's integration\n"
            "tests and benchmarks. Everything they write stays in the state directory."
        ),
        epilog=(
            "export the connection settings into a shell with:\n"
            '  set -a; eval "$(python -m ops.localservers env)"; set +a'
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        parents=[common],
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    start_cmd = commands.add_parser(
        "start",
        parents=[common],
        help="start both servers (installs the Debian packages if missing); no-op if already up",
        description="Start RabbitMQ and ZooKeeper, or reuse them if they are already up.",
    )
    start_cmd.add_argument(
        "--amqp-port",
        type=int,
        default=None,
        metavar="PORT",
        help=f"AMQP port; epmd, Erlang distribution and rabbitmqctl use the "
        f"{RABBITMQ_PORT_SPAN - 1} ports above it (default: ${AMQP_PORT_ENV}, else "
        f"{DEFAULT_AMQP_PORT})",
    )
    start_cmd.add_argument(
        "--zk-port",
        type=int,
        default=None,
        metavar="PORT",
        help=f"ZooKeeper port (default: ${ZK_PORT_ENV}, else {DEFAULT_ZK_PORT})",
    )
    start_cmd.add_argument(
        "--timeout",
        type=float,
        default=START_TIMEOUT,
        metavar="SECONDS",
        help="seconds to wait for each server (default: %(default)s)",
    )
    commands.add_parser(
        "stop", parents=[common], help="stop both servers by pid (SIGTERM, then SIGKILL)"
    )
    commands.add_parser("status", parents=[common], help="show which servers are up")
    commands.add_parser(
        "env", parents=[common],
        help="print ROTA_AMQP_URL (guest), ROTA_ZK, ROTA_SERVERS_DIR and each role's "
        "ROTA_AMQP_URL_<ROLE> lines"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    state_dir: Path = getattr(args, "dir", DEFAULT_DIR)
    try:
        if args.command == "start":
            began = time.monotonic()
            servers = start(state_dir, args.amqp_port, args.zk_port, timeout=args.timeout)
            if servers.started:
                say(f"started in {time.monotonic() - began:.1f} s")
            print("\n".join(_status_lines(servers)))
            return 0
        if args.command == "stop":
            if not stop(state_dir):
                say(f"nothing running in {Path(state_dir).resolve()}")
            return 0
        servers = load(state_dir)
        if args.command == "status":
            if servers is None:
                print(f"no servers in {Path(state_dir).resolve()}")
                return 3
            print("\n".join(_status_lines(servers)))
            return 0 if rabbitmq_up(servers) and zookeeper_up(servers) else 3
        if args.command == "env":
            if servers is None:
                servers = Servers(Path(state_dir).resolve(), *default_ports())
            if not (rabbitmq_up(servers) and zookeeper_up(servers)):
                say("warning: servers are not up; run `python -m ops.localservers start`")
            print("\n".join(_env_lines(servers)))
            return 0
    except ServerError as error:
        say(f"error: {error}")
        return 1
    return 2


if __name__ == "__main__":
    sys.exit(main())
