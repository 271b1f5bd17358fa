"""The catalogue loader: the shipped System Services catalogue and every error it reports."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from protocol.catalogue import (
    Catalogue,
    CatalogueError,
    load_catalogue,
    parse_catalogue,
    validate_utility,
)
from protocol.schedule import Cron, FixedTimes, Periodic
from protocol.service import Kind, Overlap, Placement, Utility

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = ROOT / "rota" / "catalogues" / "system-services.toml"
DOCS = ROOT / "docs" / "catalogue.md"

# The seed's service table: group | name | schedule | allowed nodes | run groups.
SEED_TABLE = """
Daemon   | Calculator                     | -     | Master Calculation | stats_processing
Daemon   | Import Manager                 | -     | Master             | -
Daemon   | Quotas Updater                 | -     | Master             | -
Daemon   | RADIUS Server                  | -     | Master Redundancy Reporting Processing | -
Daemon   | Rates Generator                | -     | Master             | -
Daemon   | SIP Redirect Server            | -     | Master Redundancy Reporting Processing | -
Fixed    | Backup Manager                 | 05:30 | Master             | factors stats_processing
Fixed    | Balances Manager               | 03:20 | Master             | -
Fixed    | Cleaner | 01:20 | Master Redundancy Reporting Processing Calculation | -
Fixed    | Jurisdiction Manager           | 00:20 | Master             | -
Fixed    | Substitution Manager           | 00:20 | Master Redundancy Reporting Processing | -
Fixed    | Log Rotator                    | 01:10 | Calculation        | -
Periodic | AAA Manager                    | 1     | Master             | -
Periodic | Cache Manager | 6 | Master Redundancy Reporting Processing Calculation | -
Periodic | Calling Cards Manager          | 60    | Master             | -
Periodic | Dynamic Routing Manager        | 60    | Master Processing  | -
Periodic | Email Rates Manager            | 5     | Master             | -
Periodic | Events Manager                 | 5     | Master             | -
Periodic | Factors Watcher                | 5     | Master             | factors
Periodic | Files Collector                | 10    | Master             | stats_processing
Periodic | Files Downloader               | 5     | Master             | -
Periodic | Invoicing Manager              | 60    | Master             | -
Periodic | Mail Manager                   | 5     | Master             | -
Periodic | Notificator                    | 60    | Master             | -
Periodic | Orig-Term Report Generator     | 16    | Master             | -
Periodic | Packages Manager               | 10    | Master             | -
Periodic | Provisioning Manager           | 5     | Master             | -
Periodic | Rates Notificator              | 5     | Master             | -
Periodic | Reports To Email               | 6     | Master             | -
Periodic | Rerating                       | 1     | Master             | -
Periodic | Statistics Manager             | 60    | Master             | stats_processing
Periodic | Statistics Manager / Meta Info | 5     | Master             | -
Periodic | Summary                        | 1     | Master             | -
Periodic | Swap Deals Manager             | 60    | Master             | -
Periodic | Traffic Rules Manager          | 6     | Master Processing Calculation | -
"""


def _seed_rows() -> list[tuple[str, str, str, list[str], list[str]]]:
    rows = []
    for line in SEED_TABLE.strip().splitlines():
        group, name, sched, roles, groups = (c.strip() for c in line.split("|"))
        rows.append((group, name, sched, roles.split(), [] if groups == "-" else groups.split()))
    return rows


SEED_ROWS = _seed_rows()


@pytest.fixture(scope="module")
def shipped() -> Catalogue:
    return load_catalogue(SHIPPED)


# -- the shipped catalogue ---------------------------------------------------------------


def test_shipped_catalogue_system(shipped: Catalogue) -> None:
    assert shipped.timezone == "UTC"
    assert shipped.roles == ("Master", "Redundancy", "Reporting", "Processing", "Calculation")
    assert shipped.catch_up == 300.0
    assert shipped.source == str(SHIPPED)


def test_shipped_catalogue_has_every_seed_service_in_order(shipped: Catalogue) -> None:
    assert list(shipped.services) == [
        "Calculator", "Import Manager", "Quotas Updater", "RADIUS Server", "Rates Generator",
        "SIP Redirect Server",
        "Backup Manager", "Balances Manager", "Cleaner", "Jurisdiction Manager",
        "Substitution Manager", "Log Rotator",
        "AAA Manager", "Cache Manager", "Calling Cards Manager", "Dynamic Routing Manager",
        "Email Rates Manager", "Events Manager", "Factors Watcher", "Files Collector",
        "Files Downloader", "Invoicing Manager", "Mail Manager", "Notificator",
        "Orig-Term Report Generator", "Packages Manager", "Provisioning Manager",
        "Rates Notificator", "Reports To Email", "Rerating", "Statistics Manager",
        "Statistics Manager / Meta Info", "Summary", "Swap Deals Manager",
        "Traffic Rules Manager",
    ]
    assert list(shipped.services) == [row[1] for row in SEED_ROWS]


@pytest.mark.parametrize("row", SEED_ROWS, ids=[r[1] for r in SEED_ROWS])
def test_shipped_service_matches_seed_table(
    shipped: Catalogue, row: tuple[str, str, str, list[str], list[str]]
) -> None:
    group, name, sched, roles, groups = row
    svc = shipped.services[name]
    assert svc.kind is {"Daemon": Kind.DAEMON, "Fixed": Kind.FIXED,
                        "Periodic": Kind.PERIODIC}[group]
    if svc.kind is Kind.DAEMON:
        assert svc.schedule is None
        assert svc.placement is Placement.ALL
    elif svc.kind is Kind.FIXED:
        assert svc.schedule == FixedTimes.parse([sched])
    else:
        assert isinstance(svc.schedule, Periodic)
        assert svc.schedule.period == int(sched)
        assert 0 <= svc.schedule.align < svc.schedule.period
    assert svc.allowed_roles == frozenset(roles)
    assert svc.run_groups == frozenset(groups)
    # the table lists roles in the catalogue's role order
    assert [r for r in shipped.roles if r in roles] == roles
    assert svc.enabled
    assert svc.description
    assert svc.utility.callable is not None
    assert svc.utility.callable.startswith("workers.demo:")
    validate_utility(svc.utility)


# A dozen rows checked field by field against the seed's screenshot and edit dialog.
EXACT = [
    ("Backup Manager", Kind.FIXED, FixedTimes(((5, 30),)), {"Master"},
     {"factors", "stats_processing"}),
    ("Cache Manager", Kind.PERIODIC, Periodic(6, 3),
     {"Master", "Redundancy", "Reporting", "Processing", "Calculation"}, set()),
    ("Calculator", Kind.DAEMON, None, {"Master", "Calculation"}, {"stats_processing"}),
    ("RADIUS Server", Kind.DAEMON, None, {"Master", "Redundancy", "Reporting", "Processing"},
     set()),
    ("SIP Redirect Server", Kind.DAEMON, None,
     {"Master", "Redundancy", "Reporting", "Processing"}, set()),
    ("Files Collector", Kind.PERIODIC, Periodic(10, 2), {"Master"}, {"stats_processing"}),
    ("Statistics Manager", Kind.PERIODIC, Periodic(60, 45), {"Master"}, {"stats_processing"}),
    ("Factors Watcher", Kind.PERIODIC, Periodic(5, 2), {"Master"}, {"factors"}),
    ("Log Rotator", Kind.FIXED, FixedTimes(((1, 10),)), {"Calculation"}, set()),
    ("Substitution Manager", Kind.FIXED, FixedTimes(((0, 20),)),
     {"Master", "Redundancy", "Reporting", "Processing"}, set()),
    ("Dynamic Routing Manager", Kind.PERIODIC, Periodic(60, 15), {"Master", "Processing"},
     set()),
    ("Traffic Rules Manager", Kind.PERIODIC, Periodic(6, 5),
     {"Master", "Processing", "Calculation"}, set()),
    ("Orig-Term Report Generator", Kind.PERIODIC, Periodic(16, 8), {"Master"}, set()),
    ("AAA Manager", Kind.PERIODIC, Periodic(1, 0), {"Master"}, set()),
    ("Balances Manager", Kind.FIXED, FixedTimes(((3, 20),)), {"Master"}, set()),
]


@pytest.mark.parametrize("name, kind, schedule, roles, groups", EXACT, ids=[e[0] for e in EXACT])
def test_shipped_service_exact(
    shipped: Catalogue, name: str, kind: Kind, schedule: object, roles: set[str],
    groups: set[str],
) -> None:
    svc = shipped.services[name]
    assert (svc.kind, svc.schedule, set(svc.allowed_roles), set(svc.run_groups)) == (
        kind, schedule, roles, groups)


def test_shipped_descriptions_come_from_the_seed(shipped: Catalogue) -> None:
    assert shipped.services["Cache Manager"].description == (
        "Cache Manager process whose main function is to monitor and include client-related "
        "changes for RADIUS and SIP Redirect continuously")
    assert shipped.services["Balances Manager"].description == "Creates automatic charges"
    assert shipped.services["Mail Manager"].description == (
        "Sends emails from mail queue (invoices, notifications, etc.)")


def test_shipped_timeouts_fit_inside_the_period(shipped: Catalogue) -> None:
    for svc in shipped.services.values():
        if isinstance(svc.schedule, Periodic):
            assert svc.timeout < svc.schedule.period * 60, svc.name
        assert svc.overlap is Overlap.COALESCE


def test_shipped_aligns_spread_services_of_equal_period(shipped: Catalogue) -> None:
    by_period: dict[int, list[int]] = {}
    for svc in shipped.services.values():
        if isinstance(svc.schedule, Periodic):
            by_period.setdefault(svc.schedule.period, []).append(svc.schedule.align)
    for period, aligns in by_period.items():
        # every offset is used before any is used twice
        assert len(set(aligns)) == min(len(aligns), period), (period, aligns)


def test_by_kind_groups_in_display_order(shipped: Catalogue) -> None:
    groups = shipped.by_kind()
    assert list(groups) == [Kind.DAEMON, Kind.FIXED, Kind.PERIODIC]
    assert [len(v) for v in groups.values()] == [6, 6, 23]
    assert groups[Kind.FIXED][0].name == "Backup Manager"
    assert groups[Kind.FIXED][0].group == "Fixed Time Services"


def test_docs_example_parses() -> None:
    text = DOCS.read_text()
    example = re.search(r"## Example\n\n```toml\n(.*?)```", text, re.S)
    assert example
    cat = parse_catalogue(example[1], "docs", check_utilities=False)
    assert list(cat.services) == ["Cache Manager", "Backup Manager", "RADIUS Server",
                                  "Ranking Refresh"]
    assert cat.services["Backup Manager"].utility == Utility(
        command=("/usr/local/bin/backup", "--full"))
    assert cat.services["Ranking Refresh"].schedule == Cron("*/15 * * * * 30")
    assert cat.services["Ranking Refresh"].rank_by == "node-health"
    assert cat.params == {"Ranking Refresh": {"tenant": "acme", "limit": 100}}
    assert cat.services["RADIUS Server"].placement is Placement.ALL
    assert cat.services["Cache Manager"].placement is Placement.ALL


# -- parsing details ---------------------------------------------------------------------

SYSTEM = '[system]\ntimezone = "UTC"\nroles = ["Master", "Calculation"]\ncatch_up = 120\n'
BASE: dict[str, object] = {
    "name": "Cache Manager",
    "kind": "periodic",
    "period": 6,
    "align": 3,
    "allowed_roles": ["Master"],
    "utility": "workers.demo:noop",
}


def _value(v: object) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list):
        return "[" + ", ".join(_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{k} = {_value(x)}" for k, x in v.items()) + " }"
    return repr(v)


def service(**changes: object) -> str:
    """A [[service]] table: BASE with `changes` applied (a value of None drops the key)."""
    fields = {**BASE, **changes}
    lines = [f"{k} = {_value(v)}" for k, v in fields.items() if v is not None]
    return "\n[[service]]\n" + "\n".join(lines) + "\n"


def test_minimal_service_defaults() -> None:
    cat = parse_catalogue(SYSTEM + service(align=None))
    svc = cat.services["Cache Manager"]
    assert svc.schedule == Periodic(6, 0)
    assert svc.placement is Placement.ONE
    assert svc.run_groups == frozenset()
    assert svc.catch_up == 120.0  # from [system]
    assert (svc.timeout, svc.retries, svc.retry_delay) == (3600.0, 0, 10.0)
    assert svc.enabled and svc.rank_by is None
    assert cat.params == {}
    assert cat.source == "<string>"


def test_system_defaults() -> None:
    cat = parse_catalogue(service())
    assert cat.timezone == "UTC"
    assert cat.roles == ("Master", "Redundancy", "Reporting", "Processing", "Calculation")
    assert cat.catch_up == 300.0


def test_all_fields() -> None:
    cat = parse_catalogue(SYSTEM + service(
        run_groups=["a", "b"], placement="all", timeout=30, retries=2, retry_delay=1.5,
        overlap="skip", catch_up=0, enabled=False, description="d",
        params={"s": "x", "i": 1, "f": 0.5, "b": True}, rank_by="node-health",
    ) + service(name="Cron", kind="cron", period=None, align=None, cron="0 */2 * * *",
                command=["/bin/true", "-x"], utility=None)
      + service(name="Fixed", kind="fixed", period=None, align=None,
                run_at=["23:59", "00:00"]))
    svc = cat.services["Cache Manager"]
    assert svc.run_groups == {"a", "b"} and svc.placement is Placement.ALL
    assert (svc.timeout, svc.retries, svc.retry_delay, svc.catch_up) == (30.0, 2, 1.5, 0.0)
    assert svc.overlap is Overlap.SKIP and not svc.enabled and svc.description == "d"
    assert svc.rank_by == "node-health"
    assert cat.params["Cache Manager"] == {"s": "x", "i": 1, "f": 0.5, "b": True}
    assert cat.services["Cron"].schedule == Cron("0 */2 * * *")
    assert cat.services["Cron"].utility == Utility(command=("/bin/true", "-x"))
    assert cat.services["Fixed"].schedule == FixedTimes(((0, 0), (23, 59)))


def test_check_utilities_off_skips_imports() -> None:
    text = SYSTEM + service(utility="not_installed_here.jobs:run")
    with pytest.raises(CatalogueError):
        parse_catalogue(text)
    cat = parse_catalogue(text, check_utilities=False)
    assert cat.services["Cache Manager"].utility.callable == "not_installed_here.jobs:run"


def test_validate_utility() -> None:
    validate_utility("workers.demo:noop")
    validate_utility(Utility(command=("true",)))
    for spec, why in [
        ("workers.demo", "expected module:function"),
        ("no_such_module_rota:f", "cannot import"),
        ("workers.demo:missing", "has no 'missing'"),
        ("workers.demo:FAILURE_RATE", "not callable"),
    ]:
        with pytest.raises(CatalogueError, match="unknown utility") as exc:
            validate_utility(spec)
        assert why in str(exc.value)


# -- errors ------------------------------------------------------------------------------

CM = 'service "Cache Manager"'
DAEMON = {"kind": "daemon", "period": None, "align": None}
FIXED = {"kind": "fixed", "period": None, "align": None}
CRON = {"kind": "cron", "period": None, "align": None}

# (id, catalogue text, where, field, fragment of the message)
ERRORS: list[tuple[str, str, str, str, str]] = [
    ("missing name", SYSTEM + service(name=None), "service #1", "name", "missing"),
    ("empty name", SYSTEM + service(name=" "), "service #1", "name", "must not be empty"),
    ("name type", SYSTEM + service(name=5), "service #1", "name", "expected a string"),
    ("missing kind", SYSTEM + service(kind=None), CM, "kind", "missing"),
    ("unknown kind", SYSTEM + service(kind="hourly"), CM, "kind",
     "unknown value 'hourly': expected one of daemon | periodic | fixed | cron"),
    ("missing period", SYSTEM + service(period=None, align=None), CM, "period", "missing"),
    ("period 0", SYSTEM + service(period=0, align=None), CM, "period",
     "period 0 is below 1 minute"),
    ("period 61", SYSTEM + service(period=61, align=None), CM, "period",
     "use fixed time instead"),
    ("period string", SYSTEM + service(period="5"), CM, "period",
     "expected an integer, got string '5'"),
    ("period float", SYSTEM + service(period=5.0, align=None), CM, "period",
     "expected an integer"),
    ("period bool", SYSTEM + service(period=True, align=None), CM, "period",
     "expected an integer"),
    ("align = period", SYSTEM + service(align=6), CM, "align", "between 0 and period-1 (5)"),
    ("align negative", SYSTEM + service(align=-1), CM, "align", "between 0 and period-1"),
    ("bad HH:MM", SYSTEM + service(**FIXED, run_at=["5:30"]), CM, "run_at",
     "bad run time '5:30': expected HH:MM"),
    ("HH:MM 24:00", SYSTEM + service(**FIXED, run_at=["05:30", "24:00"]), CM, "run_at",
     "bad run time '24:00'"),
    ("empty run_at", SYSTEM + service(**FIXED, run_at=[]), CM, "run_at", "must not be empty"),
    ("run_at string", SYSTEM + service(**FIXED, run_at="05:30"), CM, "run_at",
     "expected an array of strings"),
    ("missing run_at", SYSTEM + service(**FIXED), CM, "run_at", "missing"),
    ("bad cron", SYSTEM + service(**CRON, cron="* * *"), CM, "cron",
     "bad cron expression '* * *'"),
    ("cron never fires", SYSTEM + service(**CRON, cron="0 0 31 2 *"), CM, "cron",
     "cron expression '0 0 31 2 *' never fires"),
    ("missing cron", SYSTEM + service(**CRON), CM, "cron", "missing"),
    ("unknown role", SYSTEM + service(allowed_roles=["Master", "Mastr"]), CM, "allowed_roles",
     "unknown role 'Mastr' (did you mean 'Master'?): [system].roles defines Master, "
     "Calculation"),
    ("role not in system roles", SYSTEM + service(allowed_roles=["Reporting"]), CM,
     "allowed_roles", "unknown role 'Reporting'"),
    ("empty allowed_roles", SYSTEM + service(allowed_roles=[]), CM, "allowed_roles",
     "must not be empty"),
    ("missing allowed_roles", SYSTEM + service(allowed_roles=None), CM, "allowed_roles",
     "missing"),
    ("allowed_roles string", SYSTEM + service(allowed_roles="Master"), CM, "allowed_roles",
     "expected an array of strings, got string 'Master'"),
    ("run_groups type", SYSTEM + service(run_groups=["a", 1]), CM, "run_groups",
     "item 1: expected a non-empty string"),
    ("utility and command", SYSTEM + service(command=["true"]), CM, "utility",
     "exactly one of utility"),
    ("neither utility nor command", SYSTEM + service(utility=None), CM, "utility",
     "exactly one of utility"),
    ("empty command", SYSTEM + service(utility=None, command=[]), CM, "command",
     "must not be empty"),
    ("utility not importable", SYSTEM + service(utility="no_such_module_rota:run"), CM,
     "utility", "unknown utility 'no_such_module_rota:run': cannot import"),
    ("utility missing", SYSTEM + service(utility="workers.demo:no_such_utility"), CM,
     "utility", "unknown utility 'workers.demo:no_such_utility'"),
    ("utility not callable", SYSTEM + service(utility="workers.demo:FAILURE_RATE"), CM,
     "utility", "not callable"),
    ("utility form", SYSTEM + service(utility="workers.demo.noop"), CM, "utility",
     "expected module:function"),
    ("unknown key", SYSTEM + service(perod=5), CM, "perod",
     "unknown key (did you mean 'period'?)"),
    ("unknown key no guess", SYSTEM + service(colour="red"), CM, "colour", "unknown key"),
    ("bad placement", SYSTEM + service(placement="some"), CM, "placement",
     "unknown value 'some': expected one of one | all"),
    ("bad overlap", SYSTEM + service(overlap="queue"), CM, "overlap",
     "expected one of coalesce | skip"),
    ("negative timeout", SYSTEM + service(timeout=-5), CM, "timeout", "must be above 0"),
    ("zero timeout", SYSTEM + service(timeout=0), CM, "timeout", "must be above 0"),
    ("timeout string", SYSTEM + service(timeout="300"), CM, "timeout",
     "expected a number of seconds"),
    ("negative retries", SYSTEM + service(retries=-1), CM, "retries", "must be 0 or more"),
    ("retries float", SYSTEM + service(retries=1.5), CM, "retries", "expected an integer"),
    ("negative retry_delay", SYSTEM + service(retry_delay=-1), CM, "retry_delay",
     "must not be negative"),
    ("negative catch_up", SYSTEM + service(catch_up=-1), CM, "catch_up",
     "must not be negative"),
    ("infinite catch_up", SYSTEM + service(catch_up=float("inf")), CM,
     "catch_up", "must be finite"),
    ("enabled string", SYSTEM + service(enabled="yes"), CM, "enabled",
     "expected true or false"),
    ("description type", SYSTEM + service(description=3), CM, "description",
     "expected a string"),
    ("rank_by empty", SYSTEM + service(rank_by=""), CM, "rank_by", "must not be empty"),
    ("params value", SYSTEM + service(params={"a": [1]}), CM, "params",
     "a: expected a string, integer, float or boolean"),
    ("params type", SYSTEM + service(params="x"), CM, "params", "expected a table"),
    ("period on a daemon", SYSTEM + service(**{**DAEMON, "period": 5}), CM, "period",
     "not allowed for a daemon service (periodic services only)"),
    ("align on a fixed", SYSTEM + service(**{**FIXED, "align": 1}, run_at=["01:00"]), CM,
     "align", "not allowed for a fixed service"),
    ("run_at on a periodic", SYSTEM + service(run_at=["01:00"]), CM, "run_at",
     "not allowed for a periodic service (fixed services only)"),
    ("cron on a fixed", SYSTEM + service(**FIXED, run_at=["01:00"], cron="* * * * *"), CM,
     "cron", "not allowed for a fixed service (cron services only)"),
    ("timeout on a daemon", SYSTEM + service(**DAEMON, timeout=10), CM, "timeout",
     "does not apply to a daemon"),
    ("overlap on a daemon", SYSTEM + service(**DAEMON, overlap="skip"), CM, "overlap",
     "does not apply to a daemon"),
    ("unknown time zone", '[system]\ntimezone = "Mars/Olympus"\n' + service(), "[system]",
     "timezone", "unknown time zone 'Mars/Olympus'"),
    ("time zone type", "[system]\ntimezone = 1\n" + service(), "[system]", "timezone",
     "expected a string"),
    ("unknown system key", "[system]\nrole = []\n" + service(), "[system]", "role",
     "unknown key (did you mean 'roles'?)"),
    ("empty roles", "[system]\nroles = []\n" + service(), "[system]", "roles",
     "must not be empty"),
    ("duplicate roles", '[system]\nroles = ["Master", "Master"]\n' + service(), "[system]",
     "roles", "duplicate role Master"),
    ("negative system catch_up", "[system]\ncatch_up = -3\n" + service(), "[system]",
     "catch_up", "must not be negative"),
]


@pytest.mark.parametrize("text, where, key, fragment", [e[1:] for e in ERRORS],
                         ids=[e[0] for e in ERRORS])
def test_error_names_file_service_and_field(text: str, where: str, key: str,
                                            fragment: str) -> None:
    with pytest.raises(CatalogueError) as exc:
        parse_catalogue(text, "catalogue.toml")
    errors = exc.value.errors
    assert len(errors) == 1, errors
    prefix = f"catalogue.toml: {where}: {key}: "
    assert errors[0].startswith(prefix), errors[0]
    assert fragment in errors[0][len(prefix):], errors[0]
    assert str(exc.value) == errors[0]
    assert isinstance(exc.value, ValueError)


def test_duplicate_name() -> None:
    with pytest.raises(CatalogueError) as exc:
        parse_catalogue(SYSTEM + service() + service(period=5, align=None), "catalogue.toml")
    assert exc.value.errors == [
        'catalogue.toml: service "Cache Manager" (#2): name: duplicate name: service #1 has '
        "it already"
    ]


def test_toml_syntax_error_names_the_line() -> None:
    text = SYSTEM + service() + "\n[[service]\nname = 1\n"
    with pytest.raises(CatalogueError) as exc:
        parse_catalogue(text, "catalogue.toml")
    line = text.splitlines().index("[[service]") + 1
    assert re.match(rf"catalogue\.toml: TOML syntax error: line {line}, column \d+: ",
                    str(exc.value)), str(exc.value)


@pytest.mark.parametrize("text, message", [
    ("", "catalogue.toml: no services: add [[service]] tables"),
    ("servce = 1\n" + service(),
     "catalogue.toml: unknown top-level key 'servce' (did you mean 'service'?)"),
    ("[service]\nname = 'x'\n", "catalogue.toml: service: write each service as [[service]]"),
    ("system = 1\n" + service(), "catalogue.toml: [system]: must be a table"),
])
def test_file_level_errors(text: str, message: str) -> None:
    with pytest.raises(CatalogueError) as exc:
        parse_catalogue(text, "catalogue.toml")
    assert exc.value.errors[0].startswith(message), exc.value.errors


def test_all_errors_are_reported_together() -> None:
    text = (
        '[system]\ntimezone = "Nowhere/Special"\nroles = ["Master"]\n'
        + service(period=0, align=None)
        + service(name="Log Rotator", perod=5, period=None, align=None)
        + service(name="Backup Manager", **FIXED, run_at=["5:30"], allowed_roles=["Mastr"])
        + service(name=None, utility=None)
        + service(name="Fine", period=5, align=4)
    )
    with pytest.raises(CatalogueError) as exc:
        parse_catalogue(text, "catalogue.toml")
    assert str(exc.value).splitlines() == exc.value.errors
    assert exc.value.errors == [
        "catalogue.toml: [system]: timezone: unknown time zone 'Nowhere/Special'",
        'catalogue.toml: service "Cache Manager": period: period 0 is below 1 minute',
        "catalogue.toml: service \"Log Rotator\": perod: unknown key (did you mean 'period'?)",
        'catalogue.toml: service "Log Rotator": period: missing: a periodic service needs a '
        "period in minutes (1..60)",
        "catalogue.toml: service \"Backup Manager\": run_at: bad run time '5:30': expected "
        "HH:MM, 00:00 to 23:59",
        "catalogue.toml: service \"Backup Manager\": allowed_roles: unknown role 'Mastr' "
        "(did you mean 'Master'?): [system].roles defines Master",
        "catalogue.toml: service #4: name: missing",
        'catalogue.toml: service #4: utility: give exactly one of utility = "module:function" '
        "or command = [...]",
    ]


def test_load_catalogue_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "catalogue.toml"
    path.write_text(SYSTEM + service(period=0, align=None))
    with pytest.raises(CatalogueError) as exc:
        load_catalogue(path)
    assert str(exc.value).startswith(f'{path}: service "Cache Manager": period: ')
    path.write_bytes(b"\xff\xfe")
    with pytest.raises(CatalogueError, match="not UTF-8"):
        load_catalogue(path)
    with pytest.raises(CatalogueError, match="cannot read"):
        load_catalogue(tmp_path / "missing.toml")
    path.write_text(SYSTEM + service())
    assert load_catalogue(str(path)).source == str(path)
