"""The System Services page in a real browser, against a real cluster.

A coordinator process (with its HTTP API and an operator token) and two worker processes
run on real RabbitMQ and ZooKeeper; Debian's chromium, driven by Playwright, does what an
operator does: reads the grouped table, edits a period in the dialog, presses run and
watches the run arrive in the service's history, is refused with a wrong token and sees the
catalogue's message next to a bad field. Screenshots of each step are kept in the test's
temporary directory.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest

from tests.harness import Cluster, EventRecorder, free_port, poll_until, running_cluster

# tests/e2e hides the servers' addresses (its `rota up` runs stay in memory); this test needs
# them, so it keeps them as they were when it was collected and uses the integration
# tests' fixtures for a fresh virtual host and ZooKeeper chroot.
from tests.integration.conftest import (  # noqa: F401 - fixtures used by name
    amqp_url,
    servers,
    vhost_factory,
    zk_hosts,
)

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
_SERVER_ENV = {var: os.environ[var] for var in ("ROTA_AMQP_URL", "ROTA_ZK", "ROTA_SERVERS_DIR")
               if var in os.environ}
WAIT_MS = 30_000  # how long the page may take to show what the cluster did
SESSION_TIMEOUT = "10"  # this test is not about failover: a loaded machine keeps its leader

pytestmark = [
    pytest.mark.integration,
    pytest.mark.slow,
    pytest.mark.skipif(not CHROMIUM.exists(),
                       reason=f"{CHROMIUM} is missing: install Debian's chromium package"),
]

CATALOGUE = """\
[system]
timezone = "UTC"
roles = ["Master", "Processing"]
catch_up = 30

[[service]]
name = "Radius Daemon"
kind = "daemon"
allowed_roles = ["Master", "Processing"]
utility = "workers.demo:ticker"
params = { cycle = 0.5 }

[[service]]
name = "Nightly Backup"
kind = "fixed"
run_at = ["05:30", "17:30"]
allowed_roles = ["Master"]
run_groups = ["backup"]
utility = "workers.demo:noop"

[[service]]
name = "Cache Refresh"
kind = "periodic"
period = 5
align = 1
allowed_roles = ["Processing"]
command = ["/bin/echo", "cache refreshed"]
timeout = 30

[[service]]
name = "Heartbeat"
kind = "cron"
cron = "* * * * * */5"
allowed_roles = ["Master"]
utility = "workers.demo:noop"
timeout = 10

[[stat]]
id = "master-runs"
nodes = ["w-master"]

[[stat]]
id = "proc-runs"
nodes = ["w-proc"]

[[ranking]]
id = "workers"
schedule = "@every 2s"
stat_ids = ["master-runs", "proc-runs"]
metric_ids = ["*runs", "*asr"]
sorting = "*desc"
sorting_parameters = ["*runs"]
"""
WORKERS = {"w-master": "Master", "w-proc": "Processing"}
OPERATOR = "ops-alice"


@dataclass
class Api:
    """The coordinator's HTTP API, read beside the page to check what really changed."""

    base: str

    def get(self, path: str) -> Any:
        with urllib.request.urlopen(self.base + path, timeout=10) as resp:
            return json.loads(resp.read())

    def service(self, name: str) -> dict[str, Any]:
        body: dict[str, Any] = self.get(f"/api/v1/services/{quote(name, safe='')}")
        return body

    def changes(self, name: str) -> list[dict[str, Any]]:
        body = self.get(f"/api/v1/changes?service={quote(name, safe='')}&limit=100")
        changes: list[dict[str, Any]] = body["changes"]
        return changes


@contextmanager
def _server_env() -> Iterator[None]:
    saved = {var: os.environ.get(var) for var in _SERVER_ENV}
    os.environ.update(_SERVER_ENV)
    try:
        yield
    finally:
        for var, value in saved.items():
            if value is None:
                os.environ.pop(var, None)
            else:
                os.environ[var] = value


@dataclass
class Site:
    cluster: Cluster
    events: EventRecorder
    api: Api
    url: str
    token: str
    leader_id: str


@pytest.fixture
def site(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Site]:
    """One coordinator serving the page, two workers; every process stopped by pid after."""
    with _server_env():
        request.getfixturevalue("servers")
    amqp: str = request.getfixturevalue("amqp_url")
    zk: str = request.getfixturevalue("zk_hosts")
    catalogue = tmp_path / "catalogue.toml"
    catalogue.write_text(CATALOGUE)
    token = secrets.token_urlsafe(24)
    with running_cluster(amqp, zk, catalogue, tmp_path) as (cluster, events):
        cluster.env["ROTA_OPERATOR_TOKENS"] = f"{OPERATOR}={token}"
        try:
            api = _coordinator(cluster, "c1")
            for node, roles in WORKERS.items():
                cluster.worker(node, roles, session_timeout=float(SESSION_TIMEOUT))
            poll_until("the coordinator leads",
                       lambda: api.get("/api/v1/leader")["is_leader"], timeout=60)
            poll_until("both workers are live",
                       lambda: {n["id"] for n in api.get("/api/v1/nodes")["nodes"]} == set(WORKERS))
        except AssertionError:
            raise AssertionError(cluster.logs()) from None
        yield Site(cluster, events, api, api.base + "/", token, "c1")


def _coordinator(cluster: Cluster, name: str) -> Api:
    """The harness's coordinator, serving the page and API on a port the OS had free; another
    port if something took that one before the coordinator could."""
    for _attempt in range(5):
        port = free_port()
        proc = cluster._spawn(name, [
            "coordinator", "--id", name, "--zk", cluster.zk_hosts, "--amqp", cluster.amqp_url,
            "--catalogue", str(cluster.catalogue), "--session-timeout", SESSION_TIMEOUT,
            "--http-port", str(port),
        ])
        api = Api(f"http://127.0.0.1:{port}")
        if poll_until(f"{name} answers on port {port} or exits",
                      lambda api=api, proc=proc: not proc.alive() or api.get("/api/v1/leader"),
                      timeout=60) is True:
            if "cannot serve HTTP" in proc.tail():
                continue
            raise AssertionError(f"{name} exited: {proc.tail()}")
        return api
    raise AssertionError(f"{name} found no free port in 5 attempts")


def _agreed(apis: dict[str, Api]) -> dict[str, dict[str, Any]] | None:
    """What each coordinator says of the leadership, once they all name the same leader."""
    views = {name: api.get("/api/v1/leader") for name, api in apis.items()}
    leaders = {v["leader"] for v in views.values()}
    return views if len(leaders) == 1 and leaders <= set(apis) else None


@pytest.fixture
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()


def _row(page: Any, name: str) -> Any:
    return page.locator(f'tr[data-name="{name}"]')


def _give_token(page: Any, token: str) -> None:
    """Answer the page's token prompt."""
    dialog = page.get_by_role("dialog", name="Operator token")
    dialog.wait_for(state="visible")
    dialog.get_by_label("Token:").fill(token)
    dialog.get_by_role("button", name="OK", exact=True).click()


def test_operator_reads_edits_and_runs_from_the_page(
    site: Site, browser: Any, tmp_path: Path
) -> None:
    from playwright.sync_api import expect

    shots = tmp_path / "screenshots"
    shots.mkdir()
    page = browser.new_page(viewport={"width": 1280, "height": 800})
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(site.url)
    # Set once; a reload would lose it.
    page.evaluate("window.__loadedOnce = true")

    # -- the grouped table ------------------------------------------------------------------
    groups = {"daemon": "Daemon Services", "fixed": "Fixed Time Services",
              "periodic": "Periodical Services", "cron": "Cron Services"}
    members = {"daemon": "Radius Daemon", "fixed": "Nightly Backup",
               "periodic": "Cache Refresh", "cron": "Heartbeat"}
    for kind, title in groups.items():
        group = page.locator(f'tbody[data-kind="{kind}"]')
        expect(group.locator("tr.group")).to_contain_text(title, timeout=WAIT_MS)
        expect(group.locator(f'tr[data-name="{members[kind]}"]')).to_be_visible()
    expect(_row(page, "Cache Refresh").locator("td.c-sched")).to_have_text("↻ 5 min +1")
    expect(_row(page, "Nightly Backup").locator("td.c-sched")).to_have_text("◷ 05:30, 17:30")
    expect(_row(page, "Nightly Backup")).to_contain_text("backup")
    expect(_row(page, "Cache Refresh")).to_contain_text("Processing")
    daemon_run = _row(page, "Radius Daemon").get_by_role("button", name=re.compile("Run"))
    expect(daemon_run).to_have_count(0)
    expect(_row(page, "Heartbeat").get_by_role("button", name="Run Heartbeat now")).to_be_visible()
    expect(page.locator("#leader")).to_contain_text(f"Leader: {site.leader_id}")
    expect(page.locator("#leader")).to_contain_text(re.compile(r"epoch \d+"))
    # Live: the cron service runs every 5 s and its Last Run counts up, with no reload.
    last_run = _row(page, "Heartbeat").locator("td.c-time").first
    expect(last_run).to_have_text(re.compile(r"^\d\d:\d\d:\d\d ago$"), timeout=WAIT_MS)
    first = last_run.inner_text()
    expect(last_run).not_to_have_text(first, timeout=WAIT_MS)
    clock = page.locator("#clock").inner_text()
    expect(page.locator("#clock")).not_to_have_text(clock)
    page.screenshot(path=str(shots / "1-table.png"), full_page=True)

    # -- a wrong token is refused, and nothing changes ---------------------------------------
    dialog = page.get_by_role("dialog", name=re.compile("System Services"))
    _row(page, "Cache Refresh").get_by_role("button", name="Cache Refresh", exact=True).click()
    expect(dialog).to_be_visible()
    expect(dialog.get_by_label("Name:")).to_have_value("Cache Refresh")
    expect(dialog.get_by_label("Period:")).to_have_value("5")
    expect(dialog.get_by_label("align to:")).to_have_value("1")
    dialog.get_by_label("Period:").fill("7")
    dialog.get_by_role("button", name="Apply").click()
    _give_token(page, "not-" + site.token)
    expect(page.locator("#edit-error")).to_contain_text("token was refused (401", timeout=WAIT_MS)
    page.screenshot(path=str(shots / "2-wrong-token.png"))
    dialog.get_by_role("button", name="Cancel").click()
    expect(dialog).to_be_hidden()
    expect(_row(page, "Cache Refresh").locator("td.c-sched")).to_have_text("↻ 5 min +1")
    definition = site.api.service("Cache Refresh")["service"]["definition"]
    assert (definition["period"], definition["align"]) == (5, 1)
    assert site.api.changes("Cache Refresh") == []  # not even a refusal: it never got there

    # -- the catalogue's message next to a bad period ----------------------------------------
    _row(page, "Cache Refresh").get_by_role("button", name="Cache Refresh", exact=True).click()
    dialog.get_by_label("Period:").fill("61")
    dialog.get_by_role("button", name="Apply").click()
    _give_token(page, site.token)  # the refused token was forgotten: the page asks again
    period_error = page.locator("#err-period")
    expect(period_error).to_contain_text("period 61 is over 60 minutes: use fixed time instead",
                                         timeout=WAIT_MS)
    # Next to the field: in the Period row, described by it.
    expect(page.locator("#row-period")).to_contain_text("period 61 is over 60 minutes")
    expect(dialog.get_by_label("Period:")).to_have_attribute(
        "aria-describedby", re.compile(r"\berr-period\b"))
    expect(dialog.get_by_label("Period:")).to_have_attribute("aria-invalid", "true")
    expect(page.locator("#edit-error")).to_have_text("")
    page.screenshot(path=str(shots / "3-period-61.png"))
    definition = site.api.service("Cache Refresh")["service"]["definition"]
    assert (definition["period"], definition["align"]) == (5, 1)

    # -- a good edit, applied, shows in the table --------------------------------------------
    dialog.get_by_label("Period:").fill("7")
    dialog.get_by_role("button", name="Apply").click()
    expect(page.locator("#edit-status")).to_have_text("Applied.", timeout=WAIT_MS)
    expect(period_error).to_have_text("")
    dialog.get_by_role("button", name="OK", exact=True).click()
    expect(dialog).to_be_hidden()
    expect(_row(page, "Cache Refresh").locator("td.c-sched")).to_have_text("↻ 7 min +1")
    definition = site.api.service("Cache Refresh")["service"]["definition"]
    assert (definition["period"], definition["align"]) == (7, 1)
    applied = [c for c in site.api.changes("Cache Refresh") if c["outcome"] == "applied"]
    assert applied and {c["by"] for c in applied} == {OPERATOR}, applied
    assert any(c["field"] in ("period", "schedule") for c in applied), applied

    # -- a fixed-time service: another run-at time, and disabled, in one OK ------------------
    _row(page, "Nightly Backup").get_by_role("button", name="Nightly Backup", exact=True).click()
    expect(dialog.get_by_label("Schedule:")).to_have_value("fixed")
    expect(dialog.get_by_label("Period:")).to_be_hidden()
    expect(dialog.get_by_label("Run at, time 1")).to_have_value("05:30")
    expect(dialog.get_by_label("Run at, time 2")).to_have_value("17:30")
    dialog.get_by_role("button", name="Add a time").click()
    dialog.get_by_label("Run at, time 3").fill("18:45")
    dialog.get_by_label("Status:").select_option("false")
    dialog.get_by_role("button", name="OK", exact=True).click()
    expect(dialog).to_be_hidden(timeout=WAIT_MS)
    backup = _row(page, "Nightly Backup")
    expect(backup.locator("td.c-sched")).to_have_text("◷ 05:30, 17:30, 18:45")
    expect(backup.get_by_role("img", name="disabled")).to_be_visible()
    definition = site.api.service("Nightly Backup")["service"]["definition"]
    assert definition["run_at"] == ["05:30", "17:30", "18:45"] and definition["enabled"] is False

    # -- a cron service's dialog: its expression, and where the seconds go ------------------
    _row(page, "Heartbeat").get_by_role("button", name="Heartbeat", exact=True).click()
    expect(dialog.get_by_label("Cron:")).to_have_value("* * * * * */5")
    expect(dialog.locator("#cron-help")).to_contain_text("optional sixth field gives the seconds")
    dialog.get_by_role("button", name="Cancel").click()
    expect(dialog).to_be_hidden()

    # -- run now, from the service view: the run arrives in its history ----------------------
    _row(page, "Cache Refresh").get_by_role("link", name="Runs of Cache Refresh").click()
    view = page.locator("#view-service")
    expect(view.get_by_role("heading", name="Cache Refresh")).to_be_visible()
    expect(view.locator("dl.facts")).to_contain_text("7 min +1")
    runs = page.locator("#service-runs tbody tr")
    manual = runs.filter(has_text="manual")
    expect(manual).to_have_count(0)
    view.get_by_role("button", name="Run now").click()
    result = page.locator("#service-run-result")
    expect(result).to_contain_text("✓ succeeded on w-proc", timeout=WAIT_MS)
    expect(manual).to_have_count(1, timeout=WAIT_MS)
    cells = manual.first.locator("td")
    expect(cells.nth(0)).to_have_text("w-proc")  # node
    expect(cells.nth(2)).to_have_text("—")  # a manual run has no slot
    expect(cells.nth(5)).to_contain_text("succeeded")
    expect(cells.nth(6)).to_contain_text("cache refreshed")  # output tail
    expect(cells.nth(7)).to_have_text(OPERATOR)  # requested by
    assert page.evaluate("window.__loadedOnce") is True, "the page was reloaded"
    page.screenshot(path=str(shots / "4-service-runs.png"), full_page=True)

    # What the cluster did: one manual run of the service, on the only Processing node,
    # asked for by the token's owner.
    record = site.events.wait_for(
        lambda r: r.service == "Cache Refresh" and r.trigger == "manual"
        and r.state == "succeeded", timeout=30)
    assert record is not None, site.cluster.logs()
    assert record.node == "w-proc"
    ran = [e for e in site.cluster.journal() if e.get("run_id") == record.run_id]
    assert sorted(str(e["event"]) for e in ran) == ["end", "start"], ran
    assert {e["node"] for e in ran} == {"w-proc"} and {e["service"] for e in ran} == {
        "Cache Refresh"}, ran
    # The edit is in the service's change log, with who made it.
    changes = page.locator("#service-changes tbody tr")
    expect(changes.filter(has_text=OPERATOR).filter(has_text="7 min +1")).to_have_count(
        1, timeout=WAIT_MS)

    # -- the table's run button shows the outcome when the run ends --------------------------
    page.get_by_role("link", name="Services", exact=True).click()
    _row(page, "Heartbeat").get_by_role("button", name="Run Heartbeat now").click()
    expect(_row(page, "Heartbeat").locator(".result")).to_contain_text(
        "✓ succeeded on w-master", timeout=WAIT_MS)

    # -- the nodes view ------------------------------------------------------------------------
    page.get_by_role("link", name="Nodes", exact=True).click()
    nodes = page.locator("#nodes tbody tr")
    expect(nodes).to_have_count(2, timeout=WAIT_MS)
    expect(page.locator('#nodes tr[data-node="w-master"]')).to_contain_text("Master")
    expect(page.locator('#nodes tr[data-node="w-proc"]')).to_contain_text("Processing")
    expect(page.locator('#nodes tr[data-node="w-proc"]')).to_contain_text("Radius Daemon")
    expect(page.locator('#nodes tr[data-node="w-master"]')).to_contain_text("in")
    page.screenshot(path=str(shots / "5-nodes.png"))

    # -- the rankings view: stats best first, with their metrics ----------------------------
    page.get_by_role("link", name="Rankings", exact=True).click()
    ranking = page.locator('#rankings article[data-ranking="workers"]')
    expect(ranking).to_contain_text("rota/workers", timeout=WAIT_MS)
    # w-master ran Heartbeat (and the manual run), w-proc only the periodic command
    expect(ranking.locator("tbody tr").first).to_have_attribute(
        "data-stat", "master-runs", timeout=WAIT_MS)
    expect(ranking.locator("thead")).to_contain_text("*runs")
    expect(ranking.locator("thead")).to_contain_text("*asr")
    expect(ranking).to_contain_text("*desc by *runs")
    page.screenshot(path=str(shots / "5b-rankings.png"))

    # -- the filter ---------------------------------------------------------------------------
    page.get_by_role("link", name="Services", exact=True).click()
    page.get_by_label("Filter").fill("w-master")
    expect(_row(page, "Heartbeat")).to_be_visible()
    expect(_row(page, "Nightly Backup")).to_be_visible()
    expect(_row(page, "Cache Refresh")).to_be_hidden()
    expect(page.locator('tbody[data-kind="periodic"]')).to_be_hidden()
    page.get_by_label("Filter").fill("")
    page.get_by_label("Group").select_option("periodic")
    expect(_row(page, "Cache Refresh")).to_be_visible()
    expect(_row(page, "Heartbeat")).to_be_hidden()

    # -- disabling a daemon asks first ------------------------------------------------------
    page.get_by_label("Group").select_option("")
    _row(page, "Radius Daemon").get_by_role("button", name="Radius Daemon", exact=True).click()
    expect(dialog.get_by_label("Schedule:")).to_be_hidden()
    dialog.get_by_label("Status:").select_option("false")
    asked: list[str] = []

    def answer(accept: bool) -> Callable[[Any], None]:
        def reply(box: Any) -> None:
            asked.append(box.message)
            if accept:
                box.accept()
            else:
                box.dismiss()
        return reply

    page.once("dialog", answer(False))
    dialog.get_by_role("button", name="Apply").click()
    expect(page.locator("#edit-status")).to_have_text("Not disabled.")
    assert site.api.service("Radius Daemon")["service"]["definition"]["enabled"] is True
    page.once("dialog", answer(True))
    dialog.get_by_role("button", name="OK", exact=True).click()
    expect(dialog).to_be_hidden(timeout=WAIT_MS)
    expect(_row(page, "Radius Daemon").get_by_role("img", name="disabled")).to_be_visible()
    assert site.api.service("Radius Daemon")["service"]["definition"]["enabled"] is False
    assert asked == ["Disabling Radius Daemon stops it on every node it runs on. "
                     "Disable it?"] * 2, asked

    # -- a standby coordinator's page says who leads -----------------------------------------
    apis = {"c1": site.api, "c2": _coordinator(site.cluster, "c2")}
    views = poll_until("both coordinators agree on the leader", lambda: _agreed(apis))
    leader = views["c1"]["leader"]
    standby = "c2" if leader == "c1" else "c1"
    assert views[standby]["is_leader"] is False and views[leader]["is_leader"] is True, views
    other = browser.new_page(viewport={"width": 1280, "height": 400})
    other.on("pageerror", lambda exc: errors.append(str(exc)))
    other.goto(apis[standby].base + "/")
    expect(other.locator("#standby")).to_contain_text(
        f"This coordinator ({standby}) is a standby. The leader is {leader}", timeout=WAIT_MS)
    expect(other.locator("#leader")).to_contain_text(f"Leader: {leader}")
    # ... and links to the leader's own page, at the address the leader advertised.
    assert views[standby]["leader_url"] == apis[leader].base, views
    expect(other.locator("#standby a")).to_have_attribute("href", apis[leader].base)
    other.screenshot(path=str(shots / "6-standby.png"))
    assert not errors, errors
