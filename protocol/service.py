"""A service: one utility with its schedule, allowed roles, run groups and run policy.

Services are immutable values loaded from the catalogue; operator edits (status and
schedule) are kept as overrides beside them, never by mutating these objects.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

from protocol.schedule import Schedule


class Kind(StrEnum):
    DAEMON = "daemon"
    PERIODIC = "periodic"
    FIXED = "fixed"
    CRON = "cron"


class Placement(StrEnum):
    ONE = "one"  # each slot runs once, on one live node holding an allowed role
    ALL = "all"  # each slot runs once on every live node holding an allowed role


class Overlap(StrEnum):
    COALESCE = "coalesce"  # at most one run waits while the previous one still runs
    SKIP = "skip"  # a slot that comes while the previous run still runs is skipped


@dataclass(frozen=True, slots=True)
class Utility:
    """What a worker executes: a Python callable `module:function` or a command line."""

    callable: str | None = None
    command: tuple[str, ...] | None = None

    def describe(self) -> str:
        return self.callable if self.callable else " ".join(self.command or ())


@dataclass(frozen=True, slots=True)
class Service:
    name: str
    kind: Kind
    schedule: Schedule | None  # None for daemons
    allowed_roles: frozenset[str]
    run_groups: frozenset[str] = frozenset()
    placement: Placement = Placement.ONE
    utility: Utility = field(default_factory=Utility)
    enabled: bool = True
    timeout: float = 3600.0  # seconds of the run before the worker kills it
    retries: int = 0  # extra attempts after a failed or timed-out run
    retry_delay: float = 10.0  # seconds between attempts
    overlap: Overlap = Overlap.COALESCE
    catch_up: float = 300.0  # seconds: a missed slot younger than this runs on recovery
    group: str = ""  # display group; defaults to the kind's heading
    description: str = ""
    rank_by: str | None = None  # ranking id used to order candidate nodes ("best first")

    @property
    def is_daemon(self) -> bool:
        return self.kind is Kind.DAEMON
