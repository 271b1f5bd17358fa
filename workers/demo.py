"""Demo utilities for the shipped System Services catalogue, plus `noop`, `sleep`, `fail`.

Each utility simulates its service's work: it waits in clock time (`ctx.clock.sleep`, so
a fast simulated clock shortens it), in pieces of at most one clock second that check
`ctx.cancelled()`, so a cancelled or timed-out run ends promptly. Durations stay well
inside the service's period. Runs report metrics and log lines, and fail about 3% of the
time with a plausible error; the randomness is seeded by the run id, so a run id always
behaves the same. `params["failure_rate"]` overrides the failure rate: the chance (0..1)
that a run fails, or for a daemon the expected crashes per clock hour.

Daemons loop on `ctx.cycle()` and crash rarely (`DAEMON_CRASHES_PER_HOUR`), so the
supervisor's restart shows in a long demo.
"""

from __future__ import annotations

import functools
import json
import random
from collections.abc import Callable

from workers.context import RunContext

FAILURE_RATE = 0.03
DAEMON_CRASHES_PER_HOUR = 0.1
CHUNK = 1.0  # clock seconds between looks at ctx.cancelled()


class _Cancelled(Exception):
    """Raised inside a demo utility when its context is cancelled."""


class _Job:
    """Simulation helpers bound to one run: seeded randomness, chunked waits, failures."""

    def __init__(self, ctx: RunContext, failure_rate: float = FAILURE_RATE) -> None:
        self.ctx = ctx
        self.rng = random.Random(ctx.run_id)
        rate = ctx.params.get("failure_rate", failure_rate)
        self.failure_rate = float(rate) if isinstance(rate, int | float) else failure_rate
        self.cycles = 0
        self.waited = 0.0  # clock seconds waited since the last crash_sometimes()

    def wait(self, seconds: float) -> None:
        """Sleep `seconds` of clock time in pieces; raise _Cancelled once cancelled."""
        left = seconds
        while True:
            if self.ctx.cancelled():
                raise _Cancelled
            if left <= 0:
                return
            piece = min(CHUNK, left)
            self.ctx.clock.sleep(piece)
            self.waited += piece
            left -= piece

    def work(self, low: float, high: float) -> float:
        duration = self.rng.uniform(low, high)
        self.wait(duration)
        return duration

    def step(self, text: str, low: float, high: float) -> float:
        self.ctx.log(text)
        return self.work(low, high)

    def count(self, low: int, high: int) -> int:
        return self.rng.randint(low, high)

    def chance(self, p: float) -> bool:
        return self.rng.random() < p

    def fail_sometimes(self, error: Exception) -> None:
        if self.rng.random() < self.failure_rate:
            raise error

    def crash_sometimes(self, error: Exception) -> None:
        """Daemons: raise `error` at `failure_rate` per clock hour of work since last call."""
        chance = self.failure_rate * self.waited / 3600.0
        self.waited = 0.0
        if self.rng.random() < chance:
            raise error

    def every(self, n: int) -> bool:
        """Count a daemon cycle; True on every n-th one."""
        self.cycles += 1
        return self.cycles % n == 0


def _utility(fn: Callable[[RunContext], None]) -> Callable[[RunContext], None]:
    """A cancelled demo run logs that it stopped early and returns."""

    @functools.wraps(fn)
    def run(ctx: RunContext) -> None:
        try:
            fn(ctx)
        except _Cancelled:
            ctx.log("cancelled: stopped early")

    return run


# -- tests and benchmarks ------------------------------------------------------------------


def noop(ctx: RunContext) -> None:
    """Returns at once."""


@_utility
def sleep(ctx: RunContext) -> None:
    """Sleeps `params["seconds"]` clock seconds (default 1), honouring cancellation."""
    seconds = ctx.params.get("seconds", 1.0)
    _Job(ctx).wait(float(seconds) if isinstance(seconds, int | float) else 1.0)


def ticker(ctx: RunContext) -> None:
    """A daemon whose cycles take `params["cycle"]` clock seconds (default 0.2)."""
    cycle = ctx.params.get("cycle", 0.2)
    seconds = float(cycle) if isinstance(cycle, int | float) else 0.2
    n = 0
    while ctx.cycle():
        ctx.clock.sleep(seconds)
        n += 1
        ctx.metric("cycles", n)


def fail(ctx: RunContext) -> None:
    """Raises RuntimeError(params["message"])."""
    raise RuntimeError(str(ctx.params.get("message", "demo failure")))


def per_node(ctx: RunContext) -> None:
    """Behaves as the JSON file `params["behaviour"]` says for the node it runs on, read at
    each run (so it can change while the cluster runs): `{"<node>": {"seconds": 0.2,
    "fail": true, "acc": 1.5}}` sleeps that long, fails when `fail`, and reports metric
    `acc` when given. A node not in the file returns at once."""
    path = ctx.params.get("behaviour")
    plan: dict[str, object] = {}
    if isinstance(path, str):
        try:
            with open(path, encoding="utf-8") as f:
                found = json.load(f).get(ctx.node, {})
            plan = found if isinstance(found, dict) else {}
        except (OSError, ValueError):
            plan = {}
    seconds = plan.get("seconds", 0.0)
    if isinstance(seconds, int | float) and seconds > 0:
        _Job(ctx).wait(float(seconds))
    acc = plan.get("acc")
    if isinstance(acc, int | float):
        ctx.metric("acc", float(acc))
    if plan.get("fail"):
        raise RuntimeError(f"{ctx.node} is set to fail")


# -- daemon services -----------------------------------------------------------------------


@_utility
def calculator(ctx: RunContext) -> None:
    job = _Job(ctx, DAEMON_CRASHES_PER_HOUR)
    ctx.log(f"calculator started on {ctx.node}")
    files = records = 0
    while ctx.cycle():
        batch = job.count(0, 12)
        if batch:
            job.work(2, 10)
            files += batch
            records += batch * job.count(2_000, 20_000)
        else:
            job.wait(2)
        ctx.metric("files", files)
        ctx.metric("records", records)
        if job.every(20):
            ctx.log(f"processed {files} xDR files, {records} records so far")
        job.crash_sometimes(RuntimeError("xDR file cdr-0142.csv: unknown column 'duration_ms'"))


@_utility
def import_manager(ctx: RunContext) -> None:
    job = _Job(ctx, DAEMON_CRASHES_PER_HOUR)
    imported = 0
    while ctx.cycle():
        job.wait(5)
        if job.chance(0.05):
            table = f"rates-{job.count(100, 999)}.xlsx"
            rates = job.count(200, 50_000)
            job.step(f"importing rate table {table}", 10, 60)
            imported += 1
            ctx.log(f"imported {table}: {rates} rates")
            ctx.metric("rates", rates)
        ctx.metric("imports", imported)
        job.crash_sometimes(ConnectionError("database connection lost during rates import"))


@_utility
def quotas_updater(ctx: RunContext) -> None:
    job = _Job(ctx, DAEMON_CRASHES_PER_HOUR)
    synced = 0
    while ctx.cycle():
        job.work(2, 5)
        synced += job.count(0, 150)
        ctx.metric("balances_synced", synced)
        if job.every(60):
            ctx.log(f"{synced} balances synchronized")
        job.crash_sometimes(TimeoutError("balance synchronization: lock wait timeout exceeded"))


def _protocol_server(ctx: RunContext, protocol: str, port: str, low: int, high: int) -> None:
    job = _Job(ctx, DAEMON_CRASHES_PER_HOUR)
    ctx.log(f"{protocol} listening on {ctx.node}:{port}")
    requests = rejected = 0
    while ctx.cycle():
        job.wait(1)
        n = job.count(low, high)
        requests += n
        rejected += int(n * job.rng.uniform(0.0, 0.04))
        ctx.metric("requests", requests)
        ctx.metric("rejected", rejected)
        if job.every(300):
            ctx.log(f"{requests} requests served, {rejected} rejected")
        job.crash_sometimes(ConnectionResetError(f"{protocol}: billing database connection "
                                                "reset by peer"))


@_utility
def radius_server(ctx: RunContext) -> None:
    _protocol_server(ctx, "RADIUS server", "1812/udp", 20, 400)


@_utility
def rates_generator(ctx: RunContext) -> None:
    job = _Job(ctx, DAEMON_CRASHES_PER_HOUR)
    generated = 0
    while ctx.cycle():
        job.wait(5)
        if job.chance(0.03):
            job.step("generating rates for scheduled rate plans", 20, 120)
            n = job.count(100, 20_000)
            generated += n
            ctx.log(f"generated {n} rates")
        ctx.metric("rates_generated", generated)
        job.crash_sometimes(ValueError("rate plan 'Wholesale-EU': negative margin"))


@_utility
def sip_redirect_server(ctx: RunContext) -> None:
    _protocol_server(ctx, "SIP Redirect server", "5060/udp", 10, 300)


# -- fixed time services -------------------------------------------------------------------


@_utility
def backup_manager(ctx: RunContext) -> None:
    job = _Job(ctx)
    tables = job.count(180, 260)
    job.step(f"dumping database: {tables} tables", 120, 300)
    job.step("archiving configuration and xDR spool", 10, 40)
    size = job.count(2_000, 60_000)
    job.fail_sometimes(OSError("backup storage /var/backups: No space left on device"))
    job.step(f"uploading {size} MB to backup storage", 60, 200)
    ctx.metric("tables", tables)
    ctx.metric("size_mb", size)
    ctx.log("backup complete")


@_utility
def balances_manager(ctx: RunContext) -> None:
    job = _Job(ctx)
    job.step("creating automatic charges", 60, 240)
    job.fail_sometimes(RuntimeError("deadlock detected while charging account 10423; "
                                    "transaction rolled back"))
    charges = job.count(50, 5_000)
    ctx.metric("charges", charges)
    ctx.log(f"{charges} automatic charges created")


@_utility
def cleaner(ctx: RunContext) -> None:
    job = _Job(ctx)
    job.step("deleting Events Log messages older than 90 days", 30, 150)
    job.fail_sometimes(TimeoutError("DELETE FROM events_log: statement timeout"))
    deleted = job.count(0, 200_000)
    ctx.metric("messages_deleted", deleted)
    ctx.log(f"{deleted} old messages deleted")


@_utility
def jurisdiction_manager(ctx: RunContext) -> None:
    job = _Job(ctx)
    job.step("loading LERG/TMP data sources", 30, 90)
    job.fail_sometimes(FileNotFoundError("LERG source LERG6.DAT not found on the data source"))
    job.step("generating the jurisdiction table", 30, 150)
    rows = job.count(150_000, 400_000)
    ctx.metric("records", rows)
    ctx.log(f"jurisdiction table rebuilt: {rows} rows")


@_utility
def substitution_manager(ctx: RunContext) -> None:
    job = _Job(ctx)
    job.step("applying scheduled substitutions", 10, 90)
    job.fail_sometimes(ValueError("substitution rule 17: pattern '^00(1' does not compile"))
    applied = job.count(0, 400)
    ctx.metric("substitutions", applied)
    ctx.log(f"{applied} substitutions applied")


@_utility
def log_rotator(ctx: RunContext) -> None:
    job = _Job(ctx)
    files = job.count(5, 40)
    job.step(f"rotating {files} log files on {ctx.node}", 5, 45)
    job.fail_sometimes(PermissionError("cannot rename /var/log/rota/radius.log: "
                                       "Permission denied"))
    ctx.metric("files_rotated", files)
    ctx.metric("compressed_mb", job.count(10, 2_000))
    ctx.log(f"{files} log files rotated")


# -- periodical services -------------------------------------------------------------------


def _periodic(
    ctx: RunContext, low: float, high: float, metric: str, count: tuple[int, int],
    done: str, error: Exception,
) -> None:
    """The common shape of a periodic run: work, maybe fail, report one count."""
    job = _Job(ctx)
    job.work(low, high)
    job.fail_sometimes(error)
    n = job.count(*count)
    ctx.metric(metric, n)
    ctx.log(done.format(n=n))


@_utility
def aaa_manager(ctx: RunContext) -> None:
    job = _Job(ctx)
    job.work(1, 8)
    job.fail_sometimes(TimeoutError("DELETE FROM aaa_sessions: lock wait timeout exceeded"))
    sessions, routes = job.count(0, 3_000), job.count(0, 10_000)
    ctx.metric("sessions_deleted", sessions)
    ctx.metric("routing_results_deleted", routes)
    ctx.log(f"deleted {sessions} old AAA sessions and {routes} routing results")


@_utility
def cache_manager(ctx: RunContext) -> None:
    job = _Job(ctx)
    clients = job.count(200, 5_000)
    job.step(f"checking {clients} clients for changes", 3, 20)
    changes = job.count(0, 25)
    if changes:
        job.step(f"loading {changes} client changes into the RADIUS/SIP cache", 1, 8)
    job.fail_sometimes(ConnectionError("cache store unreachable: connection refused"))
    ctx.metric("clients_checked", clients)
    ctx.metric("cache_updates", changes)
    ctx.log(f"cache refreshed: {changes} changes")


@_utility
def calling_cards_manager(ctx: RunContext) -> None:
    _periodic(ctx, 30, 180, "cards_processed", (0, 20_000), "{n} calling cards processed",
              RuntimeError("calling card batch 2231: serial range overlaps batch 2197"))


@_utility
def dynamic_routing_manager(ctx: RunContext) -> None:
    job = _Job(ctx)
    tables = job.count(3, 40)
    job.step(f"building {tables} dynamic routing tables", 60, 240)
    job.fail_sometimes(ValueError("routing table 'LCR-main': no vendor rates for 12 codes"))
    routes = tables * job.count(1_000, 30_000)
    ctx.metric("routing_tables", tables)
    ctx.metric("routes", routes)
    ctx.log(f"{tables} routing tables rebuilt, {routes} routes")


@_utility
def email_rates_manager(ctx: RunContext) -> None:
    job = _Job(ctx)
    emails = job.count(0, 6)
    job.step(f"checking rates mailbox: {emails} new emails", 2, 10)
    if emails:
        job.work(3, 20)
    job.fail_sometimes(ConnectionError("IMAP imap.example.net:993: login failed"))
    ctx.metric("emails", emails)
    ctx.metric("rate_tables_imported", job.count(0, emails))


@_utility
def events_manager(ctx: RunContext) -> None:
    _periodic(ctx, 2, 25, "events_sent", (0, 120), "{n} events sent to email",
              ConnectionError("SMTP smtp.example.net:587: connection timed out"))


@_utility
def factors_watcher(ctx: RunContext) -> None:
    _periodic(ctx, 2, 20, "factors_checked", (10, 400), "{n} factors checked",
              RuntimeError("Factors Watcher tool exited with status 2"))


@_utility
def files_collector(ctx: RunContext) -> None:
    job = _Job(ctx)
    files = job.count(0, 60)
    job.step(f"collecting {files} xDR files", 20, 120)
    job.fail_sometimes(OSError("collector 'switch-2': /data/xdr/incoming is not mounted"))
    ctx.metric("files", files)
    ctx.metric("records", files * job.count(1_000, 25_000))
    ctx.log(f"{files} files collected")


@_utility
def files_downloader(ctx: RunContext) -> None:
    job = _Job(ctx)
    files = job.count(0, 30)
    job.step(f"downloading {files} xDR files from the switch host", 5, 60)
    job.fail_sometimes(ConnectionRefusedError("sftp switch-1.example.net:22: connection "
                                              "refused"))
    ctx.metric("files_downloaded", files)
    ctx.metric("bytes", files * job.count(100_000, 40_000_000))


@_utility
def invoicing_manager(ctx: RunContext) -> None:
    _periodic(ctx, 30, 240, "invoices", (0, 300), "{n} invoices generated",
              RuntimeError("invoice template 'default-eu' failed to render: missing VAT id"))


@_utility
def mail_manager(ctx: RunContext) -> None:
    _periodic(ctx, 2, 30, "emails_sent", (0, 200), "{n} emails sent from the mail queue",
              ConnectionError("SMTP smtp.example.net:587: 421 too many connections"))


@_utility
def notificator(ctx: RunContext) -> None:
    _periodic(ctx, 10, 90, "notifications", (0, 50),
              "{n} low balance / HDD space notifications sent",
              ConnectionError("SMTP smtp.example.net:587: connection timed out"))


@_utility
def orig_term_report_generator(ctx: RunContext) -> None:
    _periodic(ctx, 30, 240, "rows", (1_000, 500_000), "Orig-Term report data: {n} rows",
              MemoryError("Orig-Term aggregation exceeded its memory limit"))


@_utility
def packages_manager(ctx: RunContext) -> None:
    _periodic(ctx, 5, 60, "packages", (0, 2_000), "{n} packages updated",
              RuntimeError("package 'Unlimited-EU' has no active tariff"))


@_utility
def provisioning_manager(ctx: RunContext) -> None:
    _periodic(ctx, 2, 30, "events_processed", (0, 500), "{n} provisioning events processed",
              TimeoutError("provisioning endpoint https://crm.example.net timed out"))


@_utility
def rates_notificator(ctx: RunContext) -> None:
    _periodic(ctx, 2, 25, "notifications", (0, 40), "{n} clients notified of rate changes",
              ConnectionError("SMTP smtp.example.net:587: 535 authentication failed"))


@_utility
def reports_to_email(ctx: RunContext) -> None:
    _periodic(ctx, 3, 45, "reports_sent", (0, 30), "{n} scheduled reports sent",
              ConnectionError("reseller SMTP mail.reseller.example: 535 authentication "
                              "failed"))


@_utility
def rerating(ctx: RunContext) -> None:
    _periodic(ctx, 1, 8, "records_rerated", (0, 5_000), "{n} records rerated",
              RuntimeError("rerating task 881: rate table 'Retail-2022' was deleted"))


@_utility
def statistics_manager(ctx: RunContext) -> None:
    job = _Job(ctx)
    packages = job.count(1, 24)
    job.step(f"building {packages} statistics packages", 60, 300)
    job.fail_sometimes(RuntimeError("statistics package 'daily-2022-01-23' is locked by "
                                    "another process"))
    ctx.metric("packages", packages)
    ctx.metric("records", packages * job.count(10_000, 200_000))


@_utility
def statistics_meta_info(ctx: RunContext) -> None:
    _periodic(ctx, 2, 20, "stat_tables", (5, 120), "meta-information of {n} tables gathered",
              RuntimeError("statistics table stats_2022_01 is being rebuilt"))


@_utility
def summary(ctx: RunContext) -> None:
    _periodic(ctx, 1, 8, "rows_aggregated", (0, 20_000), "Summary Report: {n} rows aggregated",
              TimeoutError("Summary aggregation: lock wait timeout exceeded"))


@_utility
def swap_deals_manager(ctx: RunContext) -> None:
    _periodic(ctx, 30, 180, "deals", (0, 60), "statistics cached for {n} swap deals",
              RuntimeError("swap deal 57: commitment period ended before its start"))


@_utility
def traffic_rules_manager(ctx: RunContext) -> None:
    _periodic(ctx, 2, 30, "rules_applied", (0, 300), "{n} traffic rules applied",
              ValueError("traffic rule 'block-premium': unknown destination group 44"))
