"""The service catalogue: a TOML file describing the system time zone, roles and services.

Format (`docs/catalogue.md` has the full reference)::

    [system]
    timezone = "UTC"          # system time zone (IANA name); default "UTC"
    roles = ["Master", "Redundancy", "Reporting", "Processing", "Calculation"]
    catch_up = 300            # seconds; default catch-up window for missed slots

    [[service]]
    name = "Cache Manager"    # unique
    kind = "periodic"         # daemon | periodic | fixed | cron
    period = 6                # periodic: minutes 1..60
    align = 3                 # periodic: 0..period-1 (default 0)
    # run_at = ["05:30"]      # fixed: one or more "HH:MM" in the system time zone
    # cron = "*/5 * * * *"    # cron: croniter syntax, optional 6th (seconds) field
    allowed_roles = ["Master", "Redundancy"]   # each one of [system].roles
    run_groups = []           # services with intersecting groups never run together
    placement = "one"         # one | all; daemons default to all, the others to one
    utility = "workers.demo:cache_manager"    # OR command = ["/usr/bin/env", "true"]
    timeout = 300             # seconds (not for daemons)
    retries = 0               # extra attempts after a failure (not for daemons)
    retry_delay = 10          # seconds (not for daemons)
    overlap = "coalesce"      # coalesce | skip (not for daemons)
    catch_up = 300            # seconds; default [system].catch_up (not for daemons)
    enabled = true
    description = "..."
    params = { batch = 500 }  # str/int/float/bool values handed to the utility
    rank_by = "node-health"   # ranking id: try the best-ranked allowed node first

    # RankingS: [rankings], [[stat]], [[ranking]], [[threshold]] (docs/rankings.md)

Every problem in a file is collected and reported at once, one per line, each naming the
file, the service and the field: `catalogue.toml: service "X": period: ...`.
"""

from __future__ import annotations

import difflib
import importlib
import math
import os
import re
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from protocol.rankings import RankingsConfig
from protocol.schedule import (
    Cron,
    FixedTimes,
    Periodic,
    Schedule,
    ScheduleError,
    parse_hhmm,
    zone,
)
from protocol.service import Kind, Overlap, Placement, Service, Utility

DEFAULT_ROLES = ("Master", "Redundancy", "Reporting", "Processing", "Calculation")
DEFAULT_CATCH_UP = 300.0
DISPLAY_ORDER = (Kind.DAEMON, Kind.FIXED, Kind.PERIODIC, Kind.CRON)
GROUP_TITLES = {
    Kind.DAEMON: "Daemon Services",
    Kind.FIXED: "Fixed Time Services",
    Kind.PERIODIC: "Periodical Services",
    Kind.CRON: "Cron Services",
}

_TOP_KEYS = ("system", "service", "rankings", "stat", "ranking", "threshold")
_SYSTEM_KEYS = ("timezone", "roles", "catch_up")
_SCHEDULE_KEYS = {"period": Kind.PERIODIC, "align": Kind.PERIODIC, "run_at": Kind.FIXED,
                  "cron": Kind.CRON}
_RUN_POLICY_KEYS = ("timeout", "retries", "retry_delay", "overlap", "catch_up")
_SERVICE_KEYS = (
    "name", "kind", *_SCHEDULE_KEYS, "allowed_roles", "run_groups", "placement", "utility",
    "command", "timeout", "retries", "retry_delay", "overlap", "catch_up", "enabled",
    "description", "params", "rank_by",
)
_INT64 = 2**63
_CRON_PROBE = 1_704_067_200.0  # 2024-01-01T00:00:00Z
_TOML_AT = re.compile(r"\(at line (\d+), column (\d+)\)")


class CatalogueError(ValueError):
    """A catalogue that cannot be used. `errors` holds one message per problem."""

    def __init__(self, errors: list[str] | str) -> None:
        self.errors = [errors] if isinstance(errors, str) else list(errors)
        super().__init__("\n".join(self.errors))


@dataclass(frozen=True)
class Catalogue:
    timezone: str
    roles: tuple[str, ...]
    services: dict[str, Service]  # by name, in file order
    catch_up: float = DEFAULT_CATCH_UP
    source: str = "<string>"
    params: dict[str, dict[str, object]] = field(default_factory=dict)  # by service name
    rankings: RankingsConfig = field(default_factory=RankingsConfig)  # docs/rankings.md

    def by_kind(self) -> dict[Kind, list[Service]]:
        """Services grouped for display: Daemon, Fixed Time, Periodical, Cron; file order
        within a group; empty groups left out."""
        groups: dict[Kind, list[Service]] = {kind: [] for kind in DISPLAY_ORDER}
        for svc in self.services.values():
            groups[svc.kind].append(svc)
        return {kind: svcs for kind, svcs in groups.items() if svcs}


def load_catalogue(path: str | os.PathLike[str], *, check_utilities: bool = True) -> Catalogue:
    """Read and validate a catalogue file; raises CatalogueError naming every problem."""
    source = os.fspath(path)
    try:
        text = Path(path).read_bytes().decode("utf-8")
    except OSError as exc:
        raise CatalogueError(f"{source}: cannot read: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise CatalogueError(f"{source}: not UTF-8 text: {exc}") from exc
    return parse_catalogue(text, source, check_utilities=check_utilities)


def parse_catalogue(
    text: str, source: str = "<string>", *, check_utilities: bool = True
) -> Catalogue:
    """Validate catalogue text. `check_utilities=False` skips importing utility callables
    (for a host that does not have the workers' code installed)."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        message = str(exc)
        at = _TOML_AT.search(message)
        if at:
            message = f"line {at[1]}, column {at[2]}: {message[: at.start()].rstrip()}"
        raise CatalogueError(f"{source}: TOML syntax error: {message}") from exc
    parser = _Parser(source, check_utilities)
    return parser.parse(data)


def validate_utility(utility: str | Utility) -> None:
    """Check that a `module:function` callable imports and is callable.

    Raises CatalogueError("unknown utility ..."). A Utility with a command line passes.
    """
    spec = utility.callable if isinstance(utility, Utility) else utility
    if spec is None:
        return
    module_name, sep, attr = spec.partition(":") if isinstance(spec, str) else ("", "", "")
    if not sep or not module_name.strip() or not attr.strip():
        raise CatalogueError(f"unknown utility {spec!r}: expected module:function")
    try:
        obj: object = importlib.import_module(module_name)
    except Exception as exc:  # ImportError, or anything the module raises on import
        raise CatalogueError(
            f"unknown utility {spec!r}: cannot import {module_name!r}: "
            f"{type(exc).__name__}: {exc}"
        ) from exc
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError as exc:
            raise CatalogueError(
                f"unknown utility {spec!r}: {module_name!r} has no {attr!r}"
            ) from exc
    if not callable(obj):
        raise CatalogueError(f"unknown utility {spec!r}: {type(obj).__name__} is not callable")


# -- parsing ----------------------------------------------------------------------------


class _Bad(Exception):
    """One field's problem, raised by the field readers."""


def _type_name(value: object) -> str:
    names = {bool: "boolean", int: "integer", float: "float", str: "string", list: "array",
             dict: "table"}
    return names.get(type(value), type(value).__name__)


def _shown(value: object) -> str:
    return f"{_type_name(value)} {value!r}"


def _suggest(key: str, known: tuple[str, ...] | list[str]) -> str:
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _string(value: object, *, nonempty: bool = True) -> str:
    if not isinstance(value, str):
        raise _Bad(f"expected a string, got {_shown(value)}")
    if nonempty and not value.strip():
        raise _Bad("must not be empty")
    return value


def _integer(value: object, minimum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _Bad(f"expected an integer, got {_shown(value)}")
    if minimum is not None and value < minimum:
        raise _Bad(f"must be {minimum} or more, got {value}")
    return value


def _seconds(value: object, *, positive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _Bad(f"expected a number of seconds, got {_shown(value)}")
    number = float(value)
    if not math.isfinite(number):
        raise _Bad(f"must be finite, got {value}")
    if positive and number <= 0:
        raise _Bad(f"must be above 0, got {value}")
    if number < 0:
        raise _Bad(f"must not be negative, got {value}")
    return number


def _string_list(value: object, *, nonempty: bool = False) -> list[str]:
    if not isinstance(value, list):
        raise _Bad(f"expected an array of strings, got {_shown(value)}")
    if nonempty and not value:
        raise _Bad("must not be empty")
    out: list[str] = []
    for i, item in enumerate(value):
        if not isinstance(item, str) or not item.strip():
            raise _Bad(f"item {i}: expected a non-empty string, got {_shown(item)}")
        out.append(item)
    return out


def _choice(value: object, enum: type[Kind] | type[Placement] | type[Overlap]) -> str:
    text = _string(value)
    allowed = [m.value for m in enum]
    if text not in allowed:
        raise _Bad(f"unknown value {text!r}: expected one of {' | '.join(allowed)}")
    return text


def _params(value: object) -> dict[str, object]:
    if not isinstance(value, dict):
        raise _Bad(f"expected a table, got {_shown(value)}")
    out: dict[str, object] = {}
    for key, item in value.items():
        if isinstance(item, bool | str):
            pass
        elif isinstance(item, int):
            if not -_INT64 <= item < _INT64:
                raise _Bad(f"{key}: integer {item} outside the 64-bit range")
        elif isinstance(item, float):
            if not math.isfinite(item):
                raise _Bad(f"{key}: must be finite, got {item}")
        else:
            raise _Bad(f"{key}: expected a string, integer, float or boolean, got "
                       f"{_shown(item)}")
        out[key] = item
    return out


class _Parser:
    def __init__(self, source: str, check_utilities: bool) -> None:
        self.source = source
        self.check_utilities = check_utilities
        self.errors: list[str] = []

    def error(self, where: str, key: str | None, message: str) -> None:
        parts = [self.source, where] + ([key] if key else [])
        self.errors.append(": ".join(p for p in parts if p) + f": {message}")

    def read(self, where: str, table: dict[str, object], key: str,
             reader: Callable[[object], object]) -> object:
        """`reader(table[key])`, or None after recording the problem."""
        try:
            return reader(table[key])
        except _Bad as exc:
            self.error(where, key, str(exc))
            return None

    def parse(self, data: dict[str, object]) -> Catalogue:
        for key in data:
            if key not in _TOP_KEYS:
                self.error("", None, f"unknown top-level key {key!r}{_suggest(key, _TOP_KEYS)}")
        system = data.get("system", {})
        if not isinstance(system, dict):
            self.error("[system]", None, "must be a table: write [system]")
            system = {}
        timezone, roles, catch_up = self.parse_system(system)
        raw = data.get("service", [])
        if isinstance(raw, dict):
            self.error("", "service", "write each service as [[service]] (an array of tables)")
            raw = []
        elif not isinstance(raw, list):
            self.error("", "service", f"expected [[service]] tables, got {_shown(raw)}")
            raw = []
        services: dict[str, Service] = {}
        params: dict[str, dict[str, object]] = {}
        first_at: dict[str, int] = {}
        if not raw and not self.errors:
            self.error("", None, "no services: add [[service]] tables")
        for index, entry in enumerate(raw, start=1):
            if not isinstance(entry, dict):
                self.error(f"service #{index}", None, f"expected a table, got {_shown(entry)}")
                continue
            name = entry.get("name")
            duplicate = isinstance(name, str) and name in first_at
            where = f"{_where(name)} (#{index})" if isinstance(name, str) and duplicate else None
            parsed = self.parse_service(index, entry, roles, catch_up, where)
            if duplicate and isinstance(name, str):
                self.error(where or "", "name", f"duplicate name: service #{first_at[name]} "
                           "has it already")
                continue
            if isinstance(name, str):
                first_at[name] = index
            if parsed is not None:
                svc, svc_params = parsed
                services[svc.name] = svc
                if svc_params:
                    params[svc.name] = svc_params
        from protocol.catalogue_rankings import parse_rankings  # it reads this module

        rankings = parse_rankings(self, data)
        if self.errors:
            raise CatalogueError(self.errors)
        return Catalogue(timezone=timezone, roles=roles, services=services, catch_up=catch_up,
                         source=self.source, params=params, rankings=rankings)

    def parse_system(self, system: dict[str, object]) -> tuple[str, tuple[str, ...], float]:
        where = "[system]"
        for key in system:
            if key not in _SYSTEM_KEYS:
                self.error(where, key, f"unknown key{_suggest(key, _SYSTEM_KEYS)}")
        timezone = "UTC"
        if "timezone" in system:
            tz = self.read(where, system, "timezone", _string)
            if isinstance(tz, str):
                try:
                    zone(tz)
                    timezone = tz
                except ScheduleError as exc:
                    self.error(where, "timezone", str(exc))
        roles = DEFAULT_ROLES
        if "roles" in system:
            got = self.read(where, system, "roles",
                            lambda v: _string_list(v, nonempty=True))
            if isinstance(got, list):
                dupes = sorted({r for r in got if got.count(r) > 1})
                if dupes:
                    self.error(where, "roles", f"duplicate role {', '.join(dupes)}")
                roles = tuple(dict.fromkeys(got))
        catch_up = DEFAULT_CATCH_UP
        if "catch_up" in system:
            got = self.read(where, system, "catch_up", _seconds)
            if isinstance(got, float):
                catch_up = got
        return timezone, roles, catch_up

    def parse_service(
        self, index: int, entry: dict[str, object], roles: tuple[str, ...], catch_up: float,
        where: str | None = None,
    ) -> tuple[Service, dict[str, object]] | None:
        name = entry.get("name")
        if isinstance(name, str) and name.strip():
            where = where or _where(name)
        else:
            where = f"service #{index}"
            if "name" not in entry:
                self.error(where, "name", "missing")
            else:
                self.read(where, entry, "name", _string)
            name = None
        before = len(self.errors)

        for key in entry:
            if key not in _SERVICE_KEYS:
                self.error(where, key, f"unknown key{_suggest(key, _SERVICE_KEYS)}")

        kind: Kind | None = None
        if "kind" not in entry:
            self.error(where, "kind", "missing: expected daemon | periodic | fixed | cron")
        else:
            got = self.read(where, entry, "kind", lambda v: _choice(v, Kind))
            kind = Kind(got) if isinstance(got, str) else None

        schedule = self.parse_schedule(where, entry, kind) if kind is not None else None

        allowed: frozenset[str] = frozenset()
        if "allowed_roles" not in entry:
            self.error(where, "allowed_roles", "missing: name the roles this service may run on")
        else:
            got = self.read(where, entry, "allowed_roles",
                            lambda v: _string_list(v, nonempty=True))
            if isinstance(got, list):
                for role in got:
                    if role not in roles:
                        self.error(where, "allowed_roles",
                                   f"unknown role {role!r}{_suggest(role, roles)}: "
                                   f"[system].roles defines {', '.join(roles)}")
                allowed = frozenset(got)

        groups: frozenset[str] = frozenset()
        if "run_groups" in entry:
            got = self.read(where, entry, "run_groups", _string_list)
            groups = frozenset(got) if isinstance(got, list) else groups

        placement = Placement.ALL if kind is Kind.DAEMON else Placement.ONE
        if "placement" in entry:
            got = self.read(where, entry, "placement", lambda v: _choice(v, Placement))
            placement = Placement(got) if isinstance(got, str) else placement

        utility = self.parse_utility(where, entry)

        if kind is Kind.DAEMON:
            for key in _RUN_POLICY_KEYS:
                if key in entry:
                    self.error(where, key, "does not apply to a daemon (daemons run until "
                               "stopped and are restarted with backoff)")
        policy: dict[str, object] = {"catch_up": catch_up}
        readers: dict[str, Callable[[object], object]] = {
            "timeout": lambda v: _seconds(v, positive=True),
            "retries": lambda v: _integer(v, minimum=0),
            "retry_delay": _seconds,
            "overlap": lambda v: Overlap(_choice(v, Overlap)),
            "catch_up": _seconds,
            "enabled": _boolean,
            "description": lambda v: _string(v, nonempty=False),
            "params": _params,
            "rank_by": _string,
        }
        for key, reader in readers.items():
            if key not in entry or (kind is Kind.DAEMON and key in _RUN_POLICY_KEYS):
                continue
            got = self.read(where, entry, key, reader)
            if got is not None:
                policy[key] = got

        if len(self.errors) > before or name is None or kind is None or utility is None:
            return None
        svc = Service(
            name=name,
            kind=kind,
            schedule=schedule,
            allowed_roles=allowed,
            run_groups=groups,
            placement=placement,
            utility=utility,
            enabled=policy.get("enabled", True),  # type: ignore[arg-type]
            timeout=policy.get("timeout", 3600.0),  # type: ignore[arg-type]
            retries=policy.get("retries", 0),  # type: ignore[arg-type]
            retry_delay=policy.get("retry_delay", 10.0),  # type: ignore[arg-type]
            overlap=policy.get("overlap", Overlap.COALESCE),  # type: ignore[arg-type]
            catch_up=policy["catch_up"],  # type: ignore[arg-type]
            group=GROUP_TITLES[kind],
            description=policy.get("description", ""),  # type: ignore[arg-type]
            rank_by=policy.get("rank_by"),  # type: ignore[arg-type]
        )
        return svc, policy.get("params", {})  # type: ignore[return-value]

    def parse_schedule(self, where: str, entry: dict[str, object], kind: Kind) -> Schedule | None:
        for key, owner in _SCHEDULE_KEYS.items():
            if key in entry and owner is not kind:
                self.error(where, key, f"not allowed for a {kind.value} service "
                           f"({owner.value} services only)")
        if kind is Kind.PERIODIC:
            return self.parse_periodic(where, entry)
        if kind is Kind.FIXED:
            return self.parse_fixed(where, entry)
        if kind is Kind.CRON:
            if "cron" not in entry:
                self.error(where, "cron", "missing: a cron service needs a cron expression")
                return None
            expr = self.read(where, entry, "cron", _string)
            if not isinstance(expr, str):
                return None
            try:
                cron = Cron(expr)
            except ScheduleError as exc:
                self.error(where, "cron", str(exc))
                return None
            try:  # valid fields can still name a date that never comes (February 31)
                cron.next_after(_CRON_PROBE, zone("UTC"))
            except Exception:
                self.error(where, "cron", f"cron expression {expr!r} never fires")
                return None
            return cron
        return None

    def parse_periodic(self, where: str, entry: dict[str, object]) -> Periodic | None:
        if "period" not in entry:
            self.error(where, "period", "missing: a periodic service needs a period in "
                       "minutes (1..60)")
            return None
        period = self.read(where, entry, "period", _integer)
        if not isinstance(period, int):
            return None
        try:
            Periodic(period)
        except ScheduleError as exc:
            self.error(where, "period", str(exc))
            return None
        align = self.read(where, entry, "align", _integer) if "align" in entry else 0
        if not isinstance(align, int):
            return None
        try:
            return Periodic(period, align)
        except ScheduleError as exc:
            self.error(where, "align", str(exc))
            return None

    def parse_fixed(self, where: str, entry: dict[str, object]) -> FixedTimes | None:
        if "run_at" not in entry:
            self.error(where, "run_at", 'missing: a fixed service needs run times, e.g. '
                       'run_at = ["05:30"]')
            return None
        texts = self.read(where, entry, "run_at", lambda v: _string_list(v, nonempty=True))
        if not isinstance(texts, list):
            return None
        times: list[tuple[int, int]] = []
        for text in texts:
            try:
                times.append(parse_hhmm(text))
            except ScheduleError as exc:
                self.error(where, "run_at", str(exc))
        if len(times) != len(texts):
            return None
        return FixedTimes(tuple(times))

    def parse_utility(self, where: str, entry: dict[str, object]) -> Utility | None:
        has_callable, has_command = "utility" in entry, "command" in entry
        if has_callable == has_command:
            self.error(where, "utility", "give exactly one of utility = \"module:function\" or "
                       "command = [...]" + (" (both given)" if has_callable else ""))
            return None
        if has_command:
            cmd = self.read(where, entry, "command", lambda v: _string_list(v, nonempty=True))
            return Utility(command=tuple(cmd)) if isinstance(cmd, list) else None
        spec = self.read(where, entry, "utility", _string)
        if not isinstance(spec, str):
            return None
        if self.check_utilities:
            try:
                validate_utility(spec)
            except CatalogueError as exc:
                self.error(where, "utility", str(exc))
                return None
        elif spec.count(":") != 1 or spec.startswith(":") or spec.endswith(":"):
            self.error(where, "utility", f"unknown utility {spec!r}: expected module:function")
            return None
        return Utility(callable=spec)


def _where(name: str) -> str:
    return f'service "{name}"'


def _boolean(value: object) -> bool:
    if not isinstance(value, bool):
        raise _Bad(f"expected true or false, got {_shown(value)}")
    return value
