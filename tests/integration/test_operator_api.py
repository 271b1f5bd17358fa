"""The operators' API and CLI on a real cluster: two coordinators serving HTTP, two workers,
real RabbitMQ and ZooKeeper, the CLI run as a subprocess.

`rota run --wait` exits with the run's outcome; enable/disable and refused edits go out on
`rota.events` as `service.changed` events naming who; the change log and the edits survive
the leader's death; a manual run whose leader is SIGKILLed while it is being asked for runs
exactly once.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.harness import Cluster, EventRecorder, free_port, running_cluster

CATALOGUE = """\
[system]
timezone = "UTC"
roles = ["Master", "Processing"]

[[service]]
name = "Nightly"
kind = "fixed"
run_at = ["03:00"]
allowed_roles = ["Master"]
utility = "workers.demo:sleep"
params = { seconds = 0.5 }

[[service]]
name = "Broken"
kind = "fixed"
run_at = ["03:00"]
allowed_roles = ["Processing"]
utility = "workers.demo:fail"
params = { message = "the disk is full" }

[[service]]
name = "Hourly"
kind = "periodic"
period = 60
align = 7
allowed_roles = ["Master", "Processing"]
utility = "workers.demo:noop"

[[service]]
name = "Ticker"
kind = "daemon"
allowed_roles = ["Processing"]
utility = "workers.demo:ticker"
"""
WORKERS = {"w-master": "Master", "w-proc": "Processing"}
OPERATOR = "ops-oncall"


@dataclass
class Site:
    cluster: Cluster
    events: EventRecorder
    ports: dict[str, int]
    token: str

    @property
    def urls(self) -> str:
        return ",".join(f"http://127.0.0.1:{p}" for p in self.ports.values())

    def rota(self, *args: str, token: str | None = None) -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in os.environ.items() if k not in ("ROTA_ZK", "ROTA_AMQP_URL")}
        env.update(ROTA_URL=self.urls, ROTA_TOKEN=token or self.token,
                   ROTA_TOKEN_FILE=str(self.cluster.workdir / "no-token-file"))
        return subprocess.run([sys.executable, "-m", "rota.cli", *args], capture_output=True,
                              text=True, timeout=180, env=env, stdin=subprocess.DEVNULL)

    def popen(self, *args: str) -> subprocess.Popen[str]:
        env = {k: v for k, v in os.environ.items() if k not in ("ROTA_ZK", "ROTA_AMQP_URL")}
        env.update(ROTA_URL=self.urls, ROTA_TOKEN=self.token)
        return subprocess.Popen([sys.executable, "-m", "rota.cli", *args], text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)

    def json(self, *args: str) -> Any:
        out = self.rota(*args, "--json")
        assert out.returncode == 0, out.stderr + self.cluster.logs()
        return json.loads(out.stdout)

    def get(self, name: str, path: str) -> dict[str, Any]:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.ports[name]}{path}",
                                    timeout=10) as resp:
            body: dict[str, Any] = json.loads(resp.read())
            return body

    def leader(self) -> str:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            for name in self.ports:
                if self.cluster.procs[name].alive():
                    try:
                        if self.get(name, "/api/v1/leader")["is_leader"]:
                            return name
                    except OSError:
                        pass
            time.sleep(0.2)
        raise AssertionError("no coordinator leads\n" + self.cluster.logs())


@pytest.fixture
def site(amqp_url: str, zk_hosts: str, tmp_path: Path) -> Iterator[Site]:
    catalogue = tmp_path / "catalogue.toml"
    catalogue.write_text(CATALOGUE)
    token = secrets.token_urlsafe(24)
    with running_cluster(amqp_url, zk_hosts, catalogue, tmp_path) as (cluster, events):
        cluster.env["ROTA_OPERATOR_TOKENS"] = f"{OPERATOR}={token}"
        ports = {"c1": free_port(), "c2": free_port()}
        for name, port in ports.items():
            cluster.coordinator(name, http_port=port)
        for node, roles in WORKERS.items():
            cluster.worker(node, roles)
        s = Site(cluster, events, ports, token)
        leader = s.leader()
        deadline = time.monotonic() + 60
        while {n["id"] for n in s.get(leader, "/api/v1/nodes")["nodes"]} != set(WORKERS):
            assert time.monotonic() < deadline, cluster.logs()
            time.sleep(0.2)
        yield s


def test_run_wait_exits_with_the_outcome_and_the_events_agree(site: Site) -> None:
    out = site.rota("run", "Nightly", "--wait", "--json")
    assert out.returncode == 0, out.stderr + site.cluster.logs()
    state = json.loads(out.stdout)
    assert state["state"] == "succeeded"
    (run,) = state["runs"]
    assert run["node"] == "w-master" and run["requested_by"] == OPERATOR
    seen = site.events.wait_for(lambda r: r.run_id == run["run_id"] and r.state == "succeeded",
                                10)
    assert seen is not None and seen.trigger == "manual" and seen.node == "w-master"

    out = site.rota("run", "Broken", "--wait")
    assert out.returncode == 1
    assert "failed" in out.stderr and "the disk is full" in out.stderr
    out = site.rota("run", "Ticker", "--wait")
    assert out.returncode == 1 and "daemons cannot be run manually" in out.stderr


def test_edits_go_out_on_rota_events_and_survive_the_leaders_death(site: Site) -> None:
    assert site.rota("disable", "Hourly").returncode == 0
    refused = site.rota("set", "Hourly", "--period", "61")
    assert refused.returncode == 1 and "use fixed time instead (period)" in refused.stderr
    assert site.rota("set", "Hourly", "--period", "30", "--align", "5").returncode == 0
    wrong = site.rota("enable", "Hourly", token="not-the-operator-token-at-all")
    assert wrong.returncode == 1 and "wrong operator token" in wrong.stderr

    disabled = site.events.wait_for_change(lambda c: c.field == "enabled", 10)
    assert disabled is not None
    assert (disabled.service, disabled.by, disabled.old, disabled.new, disabled.outcome) == (
        "Hourly", OPERATOR, True, False, "applied")
    period = site.events.wait_for_change(lambda c: c.outcome == "refused", 10)
    assert period is not None and period.field == "period" and period.new == 61
    assert period.reason == "period 61 is over 60 minutes: use fixed time instead"
    moved = site.events.wait_for_change(lambda c: c.field == "schedule", 10)
    assert moved is not None and (moved.old, moved.new) == ("60 min +7", "30 min +5")
    time.sleep(1.0)
    assert len(site.events.changes) == 3  # the wrong token changed and recorded nothing

    old = site.leader()
    site.cluster.procs[old].kill()
    new = site.leader()
    assert new != old
    shown = site.json("show", "Hourly")["service"]
    assert shown["enabled"] is False and shown["schedule"] == "30 min +5"
    log = site.json("changes", "Hourly")["changes"]
    assert [(c["field"], c["outcome"], c["by"]) for c in log] == [
        ("schedule", "applied", OPERATOR), ("period", "refused", OPERATOR),
        ("enabled", "applied", OPERATOR)]
    assert site.get(new, "/api/v1/leader")["epoch"] > 1


def test_a_manual_run_asked_while_the_leader_is_killed_runs_once(site: Site) -> None:
    old = site.leader()
    waiting = site.popen("run", "Nightly", "--wait", "--json")
    time.sleep(0.3)  # the request is on its way, or already recorded
    site.cluster.procs[old].kill()
    out, err = waiting.communicate(timeout=180)
    assert waiting.returncode == 0, err + site.cluster.logs()
    state = json.loads(out)
    assert state["state"] == "succeeded"
    (run,) = state["runs"]
    time.sleep(2.0)  # a duplicate, if any, would have started by now
    starts = [e for e in site.cluster.journal()
              if e.get("event") == "start" and e.get("service") == "Nightly"]
    assert [e["run_id"] for e in starts] == [run["run_id"]]
    finals = [r for r in site.events.finals() if r.service == "Nightly"]
    assert [(r.run_id, r.state) for r in finals] == [(run["run_id"], "succeeded")]
