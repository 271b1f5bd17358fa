"""The operator CLI as an operator runs it, against `rota up --http-port` in another process.

`rota up` makes an operator token and writes it where the CLI finds it; every command works
with it, exits 0 on success and non-zero (with the reason) when refused or when a waited run
failed; a wrong token is refused; a dead coordinator listed first in --url is passed over.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.harness import free_port


@dataclass
class Up:
    url: str
    env: dict[str, str]
    token_file: Path

    def rota(self, *args: str, url: str | None = None) -> subprocess.CompletedProcess[str]:
        env = {**self.env, "ROTA_URL": url or self.url}
        return subprocess.run([sys.executable, "-m", "rota.cli", *args], capture_output=True,
                              text=True, timeout=120, env=env, stdin=subprocess.DEVNULL)

    def json(self, *args: str) -> Any:
        out = self.rota(*args, "--json")
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)


@pytest.fixture(scope="module")
def up(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Up]:
    home = tmp_path_factory.mktemp("config")
    env = {k: v for k, v in os.environ.items()
           if k not in ("ROTA_ZK", "ROTA_AMQP_URL", "ROTA_URL", "ROTA_TOKEN",
                        "ROTA_OPERATOR_TOKENS")}
    env.update(XDG_CONFIG_HOME=str(home), PYTHONUNBUFFERED="1")
    port = free_port()
    log = home / "up.log"
    with open(log, "wb") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "rota.cli", "up", "--http-port",
                                 str(port), "--speed", "60"], stdout=fh,
                                stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 60
        while "service page on" not in log.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        yield Up(f"http://127.0.0.1:{port}", env, home / "rota" / "token")
    finally:
        os.kill(proc.pid, signal.SIGTERM)
        proc.wait(30)


def test_up_prints_the_token_once_and_saves_it_for_the_cli(up: Up) -> None:
    saved = up.token_file.read_text().split()[-1]
    assert len(saved) >= 16
    assert oct(up.token_file.stat().st_mode & 0o777) == "0o600"
    log = (up.token_file.parent.parent / "up.log").read_text()
    assert log.count(saved) == 1


def test_services_nodes_and_show(up: Up) -> None:
    services = up.json("services")["services"]
    assert len(services) == 35
    text = up.rota("services")
    assert text.returncode == 0 and "Cache Manager" in text.stdout and "6 min +3" in text.stdout
    nodes = {n["id"]: n for n in up.json("nodes")["nodes"]}
    assert set(nodes) == {"master-1", "redundancy-1", "processing-1"}
    shown = up.json("show", "Backup Manager")["service"]
    assert shown["schedule"] == "05:30" and shown["run_groups"] == ["factors", "stats_processing"]
    missing = up.rota("show", "No Such Service")
    assert missing.returncode == 1 and "unknown service 'No Such Service'" in missing.stderr


def test_rankings_and_one_ranking(up: Up) -> None:
    deadline = time.monotonic() + 60
    while True:  # node-health is computed every simulated minute: a second here
        listed = up.json("rankings")
        (entry,) = listed["rankings"]
        if entry["ranking"] and entry["ranking"]["SortedStatIDs"]:
            break
        assert time.monotonic() < deadline, listed
        time.sleep(0.5)
    assert entry["id"] == "node-health" and entry["next"] is not None
    ranking = up.json("ranking", "rota", "node-health")
    assert set(ranking["SortedStatIDs"]) <= {"node-master-1", "node-redundancy-1",
                                             "node-processing-1"}
    table = up.rota("ranking", "rota", "node-health")
    assert table.returncode == 0 and "*asr" in table.stdout
    assert ranking["SortedStatIDs"][0] in table.stdout.splitlines()[2]
    text = up.rota("rankings")
    assert text.returncode == 0 and "node-health" in text.stdout
    missing = up.rota("ranking", "rota", "nope")
    assert missing.returncode == 1 and "no ranking profile 'nope'" in missing.stderr


def test_run_wait_exit_code_follows_the_outcome(up: Up) -> None:
    out = up.rota("run", "Summary", "--wait", "--json")
    state = json.loads(out.stdout)
    assert state["state"] in ("succeeded", "failed")
    assert (out.returncode == 0) == (state["state"] == "succeeded"), out.stderr
    (run,) = state["runs"]
    assert run["service"] == "Summary" and run["requested_by"] == "operator"
    history = up.json("history", "Summary", "--limit", "10")["runs"]
    assert run["run_id"] in [r["run_id"] for r in history]


def test_run_on_a_node_prints_the_real_run_ids(up: Up) -> None:
    out = up.rota("run", "Cache Manager", "--node", "processing-1")
    assert out.returncode == 0, out.stderr
    assert "manual-" in out.stdout and "@processing-1" in out.stdout
    assert "@master-1" not in out.stdout


def test_a_refused_run_exits_non_zero_with_the_reason(up: Up) -> None:
    out = up.rota("run", "Calculator", "--wait")
    assert out.returncode == 1
    assert "'Calculator' is a daemon: daemons cannot be run manually" in out.stderr


def test_set_applies_or_exits_non_zero_naming_the_field(up: Up) -> None:
    bad = up.rota("set", "Cache Manager", "--period", "61")
    assert bad.returncode == 1
    assert "period 61 is over 60 minutes: use fixed time instead (period)" in bad.stderr
    bad = up.rota("set", "Cache Manager", "--period", "5", "--align", "5")
    assert bad.returncode == 1 and "(align)" in bad.stderr
    bad = up.rota("set", "Backup Manager", "--run-at", "05:30,25:00")
    assert bad.returncode == 1 and "'25:00'" in bad.stderr and "(run_at)" in bad.stderr
    assert up.json("show", "Cache Manager")["service"]["schedule"] == "6 min +3"
    good = up.rota("set", "Cache Manager", "--period", "5", "--align", "2")
    assert good.returncode == 0, good.stderr
    assert "6 min +3 -> 5 min +2" in good.stdout
    assert up.json("show", "Cache Manager")["service"]["schedule"] == "5 min +2"
    log = up.json("changes", "Cache Manager")["changes"]
    assert (log[0]["outcome"], log[0]["field"], log[0]["by"]) == (
        "applied", "schedule", "operator")
    assert [(c["outcome"], c["field"]) for c in log[1:3]] == [
        ("refused", "align"), ("refused", "period")]


def test_enable_disable_and_a_daemon_needs_yes(up: Up) -> None:
    assert up.rota("disable", "Mail Manager").returncode == 0
    assert up.json("show", "Mail Manager")["service"]["status"] == "disabled"
    assert up.rota("enable", "Mail Manager").returncode == 0
    assert up.json("show", "Mail Manager")["service"]["enabled"] is True
    asked = up.rota("disable", "Import Manager")
    assert asked.returncode == 2 and "--yes" in asked.stderr
    assert up.json("show", "Import Manager")["service"]["enabled"] is True
    assert up.rota("disable", "Import Manager", "--yes").returncode == 0
    assert up.json("show", "Import Manager")["service"]["enabled"] is False
    assert up.rota("enable", "Import Manager").returncode == 0
    fields = [(c["field"], c["new"]) for c in up.json("changes", "Import Manager")["changes"]]
    assert fields[:2] == [("enabled", True), ("enabled", False)]


def test_a_wrong_token_is_refused(up: Up) -> None:
    out = up.rota("disable", "Mail Manager", "--token", "not-the-operator-token")
    assert out.returncode == 1 and "wrong operator token" in out.stderr
    assert up.json("show", "Mail Manager")["service"]["enabled"] is True


def test_a_dead_coordinator_first_in_the_url_list_is_passed_over(up: Up) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    out = up.rota("nodes", url=f"{dead},{up.url}")
    assert out.returncode == 0, out.stderr
    alone = up.rota("nodes", url=dead)
    assert alone.returncode == 3 and f"cannot reach the Rota API at {dead}" in alone.stderr
