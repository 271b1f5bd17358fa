"""Every message Rota puts on the wire, as frozen dataclasses that validate themselves.

Constructing a message with a bad field raises `ProtocolError` exactly as decoding one
from the wire would, so a message object that exists is always a valid message. Times are
floats, seconds since the Unix epoch (UTC).
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime, tzinfo
from operator import attrgetter
from typing import Any, ClassVar, Final, NoReturn, TypeVar

from protocol.errors import (
    BAD_VALUE,
    MISSING_FIELD,
    UNKNOWN_FIELD,
    WRONG_TYPE,
    ProtocolError,
)

ParamValue = str | int | float | bool
"""A utility parameter value."""

MAX_TIME: Final = 253402214400.0
"""Latest accepted time (9999-12-31T00:00:00Z), so every time renders in any time zone."""
MAX_ERROR_CHARS: Final = 4096
MAX_OUTPUT_TAIL_CHARS: Final = 8192
MAX_DEAD_LETTER_BYTES: Final = 64 * 1024

ORDER_TRIGGERS: Final = frozenset({"scheduled", "manual", "retry"})
RECORD_TRIGGERS: Final = ORDER_TRIGGERS | {"daemon"}
EVENT_STATES: Final = frozenset(
    {
        "started",
        "succeeded",
        "failed",
        "timed_out",
        "rejected",
        "paused",
        "resumed",
        "stopped",
        "exited",
    }
)
RUN_STATES: Final = frozenset(
    {
        "queued",
        "dispatched",
        "running",
        "succeeded",
        "failed",
        "timed_out",
        "lost",
        "expired",
        "rejected",
        "skipped",
        "missed",
    }
)
DAEMON_ACTIONS: Final = frozenset({"start", "stop", "pause", "resume"})

_INT_MIN: Final = -(2**63)
_INT_MAX: Final = 2**63 - 1
_HHMM: Final = re.compile(r"(?:[01][0-9]|2[0-3]):[0-5][0-9]")
_set_attr = object.__setattr__

Check = Callable[[Any], Any]
"""Validates one field value, returning it (possibly normalised) or raising `_Invalid`."""

_FAST_PATHS: dict[Check, tuple[str, object]] = {}
"""Inline tests, per check, that pass exactly the values the check accepts unchanged.

Each is an expression over ``{v}`` (the value) and ``{c}`` (the paired constant); a value
failing it goes through the full check, which normalises it or names the problem.
"""


def _fast(check: Check, expr: str, const: object = None) -> Check:
    _FAST_PATHS[check] = (expr, const)
    return check


class _Invalid(Exception):
    """Internal: a field check failed; turned into a `ProtocolError` naming the field."""

    def __init__(
        self, reason: str, detail: str = "", *, expected: str = "", got: object = None
    ) -> None:
        super().__init__(reason)
        self.reason = reason
        self.detail = detail
        self.expected = expected
        self.got = got
        self.path = ""

    def inside(self, step: str) -> _Invalid:
        self.path = step + self.path
        return self

    def describe(self) -> str:
        if self.expected:
            return f"expected {self.expected}, got {_type_name(self.got)}"
        return self.detail

    def error(self, owner: str, name: str) -> ProtocolError:
        return ProtocolError(
            self.reason, f"{owner}.{name}{self.path}: {self.describe()}", field=name
        )


def _type_name(value: object) -> str:
    return "None" if value is None else type(value).__name__


def _clip(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _short(value: object, limit: int = 60) -> str:
    return _clip(repr(value), limit)


def _wrong(expected: str, value: object) -> _Invalid:
    return _Invalid(WRONG_TYPE, expected=expected, got=value)


def _text(*, nonempty: bool = False, max_len: int | None = None) -> Check:
    def check(value: Any) -> str:
        if not isinstance(value, str):
            raise _wrong("str", value)
        if not value and nonempty:
            raise _Invalid(BAD_VALUE, "must not be empty")
        if max_len is not None and len(value) > max_len:
            raise _Invalid(BAD_VALUE, f"longer than {max_len} characters ({len(value)})")
        if not value.isascii():
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                raise _Invalid(BAD_VALUE, "not encodable as UTF-8") from None
        return value

    expr = "type({v}) is str and {v}.isascii()"
    if nonempty:
        expr += " and {v}"
    if max_len is not None:
        expr += f" and len({{v}}) <= {max_len}"
    return _fast(check, expr)


def _choice(options: frozenset[str]) -> Check:
    listed = ", ".join(sorted(options))

    def check(value: Any) -> str:
        if not isinstance(value, str):
            raise _wrong("str", value)
        if value not in options:
            raise _Invalid(BAD_VALUE, f"expected one of {listed}, got {_short(value)}")
        return value

    return _fast(check, "type({v}) is str and {v} in {c}", options)


def _pattern(regex: re.Pattern[str], shape: str) -> Check:
    def check(value: Any) -> str:
        if not isinstance(value, str):
            raise _wrong("str", value)
        if regex.fullmatch(value) is None:
            raise _Invalid(BAD_VALUE, f"expected {shape}, got {_short(value)}")
        return value

    return check


def _integer(*, minimum: int | None = None) -> Check:
    def check(value: Any) -> int:
        number: int = value
        if type(value) is not int:
            if isinstance(value, bool) or not isinstance(value, int):
                raise _wrong("int", value)
            number = int(value)
        if not _INT_MIN <= number <= _INT_MAX:
            raise _Invalid(BAD_VALUE, "outside the signed 64-bit range")
        if minimum is not None and number < minimum:
            raise _Invalid(BAD_VALUE, f"must be >= {minimum}, got {number}")
        return number

    low = _INT_MIN if minimum is None else max(minimum, _INT_MIN)
    return _fast(check, f"type({{v}}) is int and {low} <= {{v}} <= {_INT_MAX}")


def _as_float(value: Any) -> float:
    """`value` as a finite float; ints are accepted, bools are not."""
    number: float = value
    if type(value) is not float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise _wrong("float", value)
        try:
            number = float(value)
        except OverflowError:
            raise _Invalid(BAD_VALUE, "too large for a float") from None
    if not math.isfinite(number):
        raise _Invalid(BAD_VALUE, f"must be finite, got {number}")
    return number


def _number(
    *, minimum: float | None = None, maximum: float | None = None, positive: bool = False
) -> Check:
    def check(value: Any) -> float:
        number = _as_float(value)
        if positive and number <= 0.0:
            raise _Invalid(BAD_VALUE, f"must be > 0, got {number}")
        if minimum is not None and number < minimum:
            raise _Invalid(BAD_VALUE, f"must be >= {minimum}, got {number}")
        if maximum is not None and number > maximum:
            raise _Invalid(BAD_VALUE, f"must be <= {maximum}, got {number}")
        return number

    tests = ["type({v}) is float"]
    if positive:
        tests.append("0.0 < {v}")
    if minimum is not None:
        tests.append(f"{float(minimum)!r} <= {{v}}")
    if not positive and minimum is None:
        tests.append("-{c} < {v}")
    tests.append("{v} < {c}" if maximum is None else f"{{v}} <= {float(maximum)!r}")
    return _fast(check, " and ".join(tests), math.inf)


def _boolean(value: Any) -> bool:
    if type(value) is not bool:
        raise _wrong("bool", value)
    return value


_fast(_boolean, "type({v}) is bool")


def _optional(check: Check) -> Check:
    def optional(value: Any) -> Any:
        if value is None:
            return None
        try:
            return check(value)
        except _Invalid as exc:
            if exc.expected and not exc.path:
                exc.expected += " or None"
            raise

    inner = _FAST_PATHS.get(check)
    if inner is None:
        return _fast(optional, "{v} is None")
    return _fast(optional, f"{{v}} is None or ({inner[0]})", inner[1])


def _str_list(item: Check, *, nonempty: bool = False) -> Check:
    def check(value: Any) -> list[str]:
        if not isinstance(value, list | tuple):
            raise _wrong("list of str", value)
        if nonempty and not value:
            raise _Invalid(BAD_VALUE, "must not be empty")
        out = []
        for index, element in enumerate(value):
            try:
                out.append(item(element))
            except _Invalid as exc:
                raise exc.inside(f"[{index}]") from None
        return out

    return check


_key = _text()


def _str_dict(item: Check, expected: str) -> Check:
    def check(value: Any) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise _wrong(expected, value)
        out = {}
        for key, element in value.items():
            try:
                out[_key(key)] = item(element)
            except _Invalid as exc:
                raise exc.inside(f"[{_short(key, 40)}]") from None
        return out

    return check


_plain_text = _text()
_plain_int = _integer()


def _param_value(value: object) -> ParamValue:
    if isinstance(value, str):
        text: str = _plain_text(value)
        return text
    if isinstance(value, bool):
        return value
    if isinstance(value, int):
        number: int = _plain_int(value)
        return number
    if isinstance(value, float):
        return _as_float(value)
    raise _wrong("str, int, float or bool", value)


def _blob(limit: int) -> Check:
    def check(value: Any) -> bytes:
        data: bytes = value
        if type(value) is not bytes:
            if not isinstance(value, bytes | bytearray | memoryview):
                raise _wrong("bytes", value)
            data = memoryview(value).tobytes()
        return data[:limit] if len(data) > limit else data

    return check


_ID = _text(nonempty=True)
_NAME = _text(nonempty=True)
_TEXT = _text()
_OPT_NAME = _optional(_NAME)
_OPT_TEXT = _optional(_TEXT)
_TIME = _number(minimum=0.0, maximum=MAX_TIME)
_OPT_TIME = _optional(_TIME)
_EPOCH = _integer(minimum=0)
_ATTEMPT = _integer(minimum=1)
_ERROR = _optional(_text(max_len=MAX_ERROR_CHARS))
_OUTPUT_TAIL = _text(max_len=MAX_OUTPUT_TAIL_CHARS)
_GROUPS = _str_list(_NAME)
_COMMAND = _optional(_str_list(_TEXT, nonempty=True))
_PARAMS = _str_dict(_param_value, "dict of str to str, int, float or bool")
_METRICS = _str_dict(_as_float, "dict of str to float")


class Message:
    """Base of every wire message. Subclasses are frozen, slotted, keyword-only dataclasses."""

    __slots__ = ()

    FIELDS: ClassVar[tuple[str, ...]] = ()
    """Field names in wire order."""
    SINCE: ClassVar[Mapping[str, int]] = {}
    """Optional fields added after schema version 1, with the version that added them. A
    message that leaves them at None is written in the oldest version that has its fields,
    so a receiver that only knows that version still reads it; one that sets them is written
    in the newer version, which an older receiver refuses as an unknown version."""
    _RULES: ClassVar[Mapping[str, Check]] = {}
    _CHECKS: ClassVar[tuple[tuple[str, Check], ...]] = ()
    _FIELD_SET: ClassVar[frozenset[str]] = frozenset()
    _ADDED: ClassVar[Mapping[str, Any]] = {}
    """Fields added to a message after its first version, with the value a message written
    before them means: decoding one that lacks them gives them that value."""
    _values: ClassVar[Callable[[Any], tuple[Any, ...]]]

    def __post_init__(self) -> None:
        for name, check in self._CHECKS:
            _apply(self, name, check, getattr(self, name))
        self._check_consistency()

    def _check_consistency(self) -> None:
        """Cross-field rules; runs after every field passed its own check."""

    def _fail(self, name: str, detail: str) -> NoReturn:
        raise ProtocolError(BAD_VALUE, f"{type(self).__name__}.{name}: {detail}", field=name)

    def to_dict(self) -> dict[str, Any]:
        """The fields by name, in wire order (containers are shared, not copied)."""
        return dict(zip(self.FIELDS, type(self)._values(self), strict=True))

    def schema_version(self) -> int:
        """The schema version this message is written in: 1, or the newest version whose
        optional field it sets."""
        return max((v for name, v in self.SINCE.items() if getattr(self, name) is not None),
                   default=1)

    @classmethod
    def fields_at(cls, version: int) -> tuple[str, ...]:
        """The fields of this message in schema `version`, in wire order."""
        if not cls.SINCE:
            return cls.FIELDS
        return tuple(f for f in cls.FIELDS if cls.SINCE.get(f, 1) <= version)

    @classmethod
    def from_dict(cls: type[_M], data: Mapping[Any, Any], version: int | None = None) -> _M:
        """Build and validate from exactly this message's fields (those of schema `version`,
        the others taking their defaults; None: every field); no more, no fewer."""
        keys = data.keys()
        expected = cls._FIELD_SET
        if version is not None and cls.SINCE:
            expected = frozenset(cls.fields_at(version))
        if keys != expected and cls._ADDED and not keys - expected:
            data = {**{k: v for k, v in cls._ADDED.items() if k not in keys and k in expected},
                    **data}
            keys = data.keys()
        if keys != expected:
            unknown = sorted(k if isinstance(k, str) else repr(k) for k in keys - expected)
            if unknown:
                more = f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else ""
                name = _clip(unknown[0])
                raise ProtocolError(
                    UNKNOWN_FIELD, f"{cls.__name__}.{name}: unknown field{more}", field=name
                )
            missing = [name for name in cls.FIELDS if name in expected and name not in keys]
            more = f" (and {', '.join(missing[1:])})" if len(missing) > 1 else ""
            raise ProtocolError(
                MISSING_FIELD, f"{cls.__name__}.{missing[0]}: missing{more}", field=missing[0]
            )
        construct: Callable[..., _M] = cls
        return construct(**data)


_M = TypeVar("_M", bound=Message)


def _apply(msg: Message, name: str, check: Check, value: Any) -> None:
    try:
        checked = check(value)
    except _Invalid as exc:
        raise exc.error(type(msg).__name__, name) from None
    if checked is not value:
        _set_attr(msg, name, checked)


def _compile_post_init(cls: type[Message]) -> Callable[[Message], None]:
    """`Message.__post_init__` specialised for `cls`, with the fast paths inlined."""
    namespace: dict[str, Any] = {"_apply": _apply}
    lines = ["def __post_init__(self):"]
    for index, (name, check) in enumerate(cls._CHECKS):
        rule, const = f"_rule{index}", f"_const{index}"
        namespace[rule] = check
        lines.append(f"    v = self.{name}")
        call = f"_apply(self, {name!r}, {rule}, v)"
        fast = _FAST_PATHS.get(check)
        if fast is None:
            lines.append(f"    {call}")
        else:
            namespace[const] = fast[1]
            lines.append(f"    if not ({fast[0].format(v='v', c=const)}):")
            lines.append(f"        {call}")
    if cls._check_consistency is not Message._check_consistency:
        lines.append("    self._check_consistency()")
    exec("\n".join(lines), namespace)
    post_init: Callable[[Message], None] = namespace["__post_init__"]
    post_init.__qualname__ = f"{cls.__qualname__}.__post_init__"
    return post_init


MESSAGE_TYPES: Final[dict[str, type[Message]]] = {}
"""Every message class by its wire type name."""


def _register(cls: type[_M]) -> type[_M]:
    names = tuple(f.name for f in fields(cls))  # type: ignore[arg-type]
    rules = cls._RULES
    if set(rules) != set(names):
        raise TypeError(f"{cls.__name__}: rules do not match fields")
    cls.FIELDS = names
    cls._CHECKS = tuple((name, rules[name]) for name in names)
    cls._FIELD_SET = frozenset(names)
    cls._values = attrgetter(*names)
    cls.__post_init__ = _compile_post_init(cls)  # type: ignore[method-assign, assignment]
    MESSAGE_TYPES[cls.__name__] = cls
    return cls


def _check_program(msg: RunOrder | DaemonControl, required: bool) -> None:
    if msg.callable is not None and msg.command is not None:
        msg._fail("command", "exactly one of callable and command may be set, both are")
    if required and msg.callable is None and msg.command is None:
        msg._fail("command", "exactly one of callable and command must be set, neither is")


@_register
@dataclass(frozen=True, slots=True, kw_only=True)
class RunOrder(Message):
    """Coordinator → worker: run one utility now, or at `start_at`."""

    run_id: str
    service: str
    node: str
    trigger: str
    slot: float | None
    attempt: int = 1
    epoch: int
    issued_at: float
    deadline: float
    """The run must start before this time, or be rejected."""
    timeout: float
    """Seconds the run may take once started."""
    callable: str | None = None
    command: list[str] | None = None
    run_groups: list[str] = field(default_factory=list)
    params: dict[str, ParamValue] = field(default_factory=dict)
    allowed_roles: list[str] = field(default_factory=list)
    """Roles that may run this service; a worker holding none of them refuses the order."""
    incarnation: str | None = None
    """The node session the order was placed on (its announcement's `incarnation`); a worker
    in another session refuses it, since the leader has ended every run of the old one."""
    start_at: float | None = None
    """Schema version 2: an order sent ahead of its slot. The worker holds it and starts the
    run at this instant, after checking it again (epoch, session, deadline); None: at once."""

    SINCE = {"start_at": 2}
    _RULES = {
        "run_id": _ID,
        "service": _NAME,
        "node": _NAME,
        "trigger": _choice(ORDER_TRIGGERS),
        "slot": _OPT_TIME,
        "attempt": _ATTEMPT,
        "epoch": _EPOCH,
        "issued_at": _TIME,
        "deadline": _TIME,
        "timeout": _number(positive=True),
        "callable": _OPT_NAME,
        "command": _COMMAND,
        "run_groups": _GROUPS,
        "params": _PARAMS,
        "allowed_roles": _GROUPS,
        "incarnation": _OPT_NAME,
        "start_at": _OPT_TIME,
    }

    def _check_consistency(self) -> None:
        if self.deadline < self.issued_at:
            self._fail("deadline", f"earlier than issued_at ({self.deadline} < {self.issued_at})")
        if self.start_at is not None and self.start_at > self.deadline:
            self._fail("start_at", f"later than deadline ({self.start_at} > {self.deadline})")
        _check_program(self, required=True)


@_register
@dataclass(frozen=True, slots=True, kw_only=True)
class RunEvent(Message):
    """Worker → coordinator: something happened to a run or a daemon."""

    run_id: str
    service: str
    node: str
    state: str
    at: float
    epoch: int
    """Epoch of the order or control this event answers."""
    started_at: float | None = None
    finished_at: float | None = None
    exit_status: int | None = None
    error: str | None = None
    output_tail: str = ""
    metrics: dict[str, float] = field(default_factory=dict)
    reason: str | None = None
    """Why the order was rejected, e.g. ``"stale epoch 3 < 5"``."""

    _RULES = {
        "run_id": _ID,
        "service": _NAME,
        "node": _NAME,
        "state": _choice(EVENT_STATES),
        "at": _TIME,
        "epoch": _EPOCH,
        "started_at": _OPT_TIME,
        "finished_at": _OPT_TIME,
        "exit_status": _optional(_integer()),
        "error": _ERROR,
        "output_tail": _OUTPUT_TAIL,
        "metrics": _METRICS,
        "reason": _OPT_TEXT,
    }


@_register
@dataclass(frozen=True, slots=True, kw_only=True)
class DaemonControl(Message):
    """Coordinator → worker: start, stop, pause or resume a long-running service."""

    control_id: str
    service: str
    node: str
    action: str
    epoch: int
    issued_at: float
    callable: str | None = None
    command: list[str] | None = None
    run_groups: list[str] = field(default_factory=list)
    params: dict[str, ParamValue] = field(default_factory=dict)
    allowed_roles: list[str] = field(default_factory=list)
    incarnation: str | None = None
    """The node session this control is meant for, as in `RunOrder.incarnation`."""
    seq: int = 0
    """Rises with every control one leader sends: a worker applies a daemon's controls in
    (epoch, issued_at, seq) order and drops one that is not newer than the last it applied,
    so two controls of one turn (same `issued_at`) taken by different consumer threads, or a
    control delivered twice, cannot undo a later one."""

    _RULES = {
        "control_id": _ID,
        "service": _NAME,
        "node": _NAME,
        "action": _choice(DAEMON_ACTIONS),
        "epoch": _EPOCH,
        "issued_at": _TIME,
        "callable": _OPT_NAME,
        "command": _COMMAND,
        "run_groups": _GROUPS,
        "params": _PARAMS,
        "allowed_roles": _GROUPS,
        "incarnation": _OPT_NAME,
        "seq": _integer(minimum=0),
    }

    def _check_consistency(self) -> None:
        _check_program(self, required=self.action == "start")


@_register
@dataclass(frozen=True, slots=True, kw_only=True)
class ManualRunRequest(Message):
    """Operator → coordinator: run a service now."""

    request_id: str
    service: str
    requested_by: str
    requested_at: float

    _RULES = {
        "request_id": _ID,
        "service": _NAME,
        "requested_by": _NAME,
        "requested_at": _TIME,
    }


@_register
@dataclass(frozen=True, slots=True, kw_only=True)
class ServiceUpdate(Message):
    """Operator → coordinator: change a service's schedule; None leaves a setting alone.

    Only the shape is checked here; whether the values make sense is the coordinator's call.
    """

    request_id: str
    service: str
    requested_by: str
    enabled: bool | None = None
    period: int | None = None
    align: int | None = None
    run_at: list[str] | None = None
    """Times of day as ``HH:MM``."""
    cron: str | None = None

    _RULES = {
        "request_id": _ID,
        "service": _NAME,
        "requested_by": _NAME,
        "enabled": _optional(_boolean),
        "period": _optional(_integer()),
        "align": _optional(_integer()),
        "run_at": _optional(_str_list(_pattern(_HHMM, "HH:MM"))),
        "cron": _OPT_TEXT,
    }


CHANGE_OUTCOMES: Final = frozenset({"applied", "refused"})
CHANGE_FIELDS: Final = frozenset(
    {"service", "enabled", "schedule", "period", "align", "run_at", "cron"}
)
_CHANGE_VALUE = _optional(_param_value)


@_register
@dataclass(frozen=True, slots=True, kw_only=True)
class ServiceChange(Message):
    """Coordinator → `rota.events` (routing key ``service.changed``): one operator edit of one
    field, applied or refused, with who asked, when, and the value before and after.

    `field` is ``enabled`` or ``schedule`` for an applied edit; for a refused one it names the
    field the refusal is about (``period``, ``align``, ``run_at``, ``cron``, ``enabled`` or
    ``service``). A schedule is shown as the service table shows it (``5 min +2``, ``05:30``,
    ``cron */5 * * * *``); a refused value as it was given.
    """

    request_id: str
    at: float
    by: str
    service: str
    field: str
    old: ParamValue | None = None
    new: ParamValue | None = None
    outcome: str
    reason: str | None = None
    epoch: int

    _RULES = {
        "request_id": _ID,
        "at": _TIME,
        "by": _NAME,
        "service": _NAME,
        "field": _choice(CHANGE_FIELDS),
        "old": _CHANGE_VALUE,
        "new": _CHANGE_VALUE,
        "outcome": _choice(CHANGE_OUTCOMES),
        "reason": _OPT_TEXT,
        "epoch": _EPOCH,
    }

    ROUTING_KEY: ClassVar[str] = "service.changed"

    @property
    def routing_key(self) -> str:
        """Topic routing key on the events exchange: ``service.changed``."""
        return self.ROUTING_KEY

    def _check_consistency(self) -> None:
        if self.outcome == "refused" and not self.reason:
            self._fail("reason", "a refused change needs a reason")


@_register
@dataclass(frozen=True, slots=True, kw_only=True)
class NodeAnnouncement(Message):
    """What a worker node stores in its ephemeral znode."""

    node: str
    roles: list[str]
    capacity: int
    version: str
    started_at: float
    metrics_url: str | None = None
    incarnation: str | None = None
    """Changes whenever the node announces itself in a new ZooKeeper session: orders and
    controls carry it, so nothing sent to an ended session runs in a later one."""

    _RULES = {
        "node": _NAME,
        "roles": _str_list(_NAME, nonempty=True),
        "capacity": _integer(minimum=1),
        "version": _NAME,
        "started_at": _TIME,
        "metrics_url": _OPT_NAME,
        "incarnation": _OPT_NAME,
    }


_RECORD_TIMES: Final = ("slot", "queued_at", "started_at", "finished_at")


@_register
@dataclass(frozen=True, slots=True, kw_only=True)
class RunRecord(Message):
    """A run's state as published on the events exchange and written to the history."""

    run_id: str
    service: str
    node: str | None = None
    trigger: str
    slot: float | None = None
    queued_at: float | None = None
    started_at: float | None = None
    finished_at: float | None = None
    state: str
    outcome: str | None = None
    run_groups: list[str] = field(default_factory=list)
    epoch: int
    error: str | None = None
    output_tail: str = ""
    reason: str | None = None
    attempt: int = 1
    placement: str | None = None
    """Why the run went to its node (a `one` service): the ranking it followed, or the
    fallback and why. Absent from records written before it existed."""

    _ADDED = {"placement": None}
    _RULES = {
        "run_id": _ID,
        "service": _NAME,
        "node": _OPT_NAME,
        "trigger": _choice(RECORD_TRIGGERS),
        "slot": _OPT_TIME,
        "queued_at": _OPT_TIME,
        "started_at": _OPT_TIME,
        "finished_at": _OPT_TIME,
        "state": _choice(RUN_STATES),
        "outcome": _OPT_TEXT,
        "run_groups": _GROUPS,
        "epoch": _EPOCH,
        "error": _ERROR,
        "output_tail": _OUTPUT_TAIL,
        "reason": _OPT_TEXT,
        "attempt": _ATTEMPT,
        "placement": _OPT_TEXT,
    }

    @property
    def routing_key(self) -> str:
        """Topic routing key on the events exchange: ``run.<state>``."""
        return f"run.{self.state}"

    def to_json_dict(self, tz: tzinfo = UTC) -> dict[str, Any]:
        """JSON-ready fields, times as ISO 8601 strings with their UTC offset in `tz`."""
        out = self.to_dict()
        out["run_groups"] = list(self.run_groups)
        for name in _RECORD_TIMES:
            value = out[name]
            if value is not None:
                out[name] = datetime.fromtimestamp(value, tz).isoformat()
        return out

    @classmethod
    def from_json_dict(cls, data: Mapping[str, Any]) -> RunRecord:
        """Inverse of `to_json_dict` (times come back with microsecond precision)."""
        if not isinstance(data, Mapping):
            raise ProtocolError(
                WRONG_TYPE, f"RunRecord: expected a mapping, got {_type_name(data)}"
            )
        values = dict(data)
        for name in _RECORD_TIMES:
            value = values.get(name)
            if isinstance(value, str):
                values[name] = _parse_iso(name, value)
        return cls.from_dict(values)


def _parse_iso(name: str, text: str) -> float:
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise ProtocolError(
            BAD_VALUE, f"RunRecord.{name}: not an ISO 8601 time: {_short(text)}", field=name
        ) from None
    if moment.tzinfo is None:
        raise ProtocolError(
            BAD_VALUE, f"RunRecord.{name}: ISO 8601 time lacks a UTC offset", field=name
        )
    return moment.timestamp()


@_register
@dataclass(frozen=True, slots=True, kw_only=True)
class LedgerRun(Message):
    """An active run as the leader keeps it in the ledger, so the next leader can adopt it."""

    run_id: str
    service: str
    node: str | None = None
    target: str = ""
    """The overlap key: the node for `all` placement, empty for `one`."""
    trigger: str
    slot: float | None = None
    queued_at: float
    dispatched_at: float | None = None
    started_at: float | None = None
    finished_at: float | None = None
    deadline: float | None = None
    state: str
    run_groups: list[str] = field(default_factory=list)
    epoch: int
    attempt: int = 1
    error: str | None = None
    output_tail: str = ""
    reason: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    incarnation: str | None = None
    """The session of `node` the run was dispatched to."""
    placement: str | None = None
    """Why the run went to its node, as in `RunRecord.placement`."""

    _ADDED = {"placement": None}
    _RULES = {
        "run_id": _ID,
        "service": _NAME,
        "node": _OPT_NAME,
        "target": _TEXT,
        "trigger": _choice(RECORD_TRIGGERS),
        "slot": _OPT_TIME,
        "queued_at": _TIME,
        "dispatched_at": _OPT_TIME,
        "started_at": _OPT_TIME,
        "finished_at": _OPT_TIME,
        "deadline": _OPT_TIME,
        "state": _choice(RUN_STATES),
        "run_groups": _GROUPS,
        "epoch": _EPOCH,
        "attempt": _ATTEMPT,
        "error": _ERROR,
        "output_tail": _OUTPUT_TAIL,
        "reason": _OPT_TEXT,
        "metrics": _METRICS,
        "incarnation": _OPT_NAME,
        "placement": _OPT_TEXT,
    }


_STAT_IDS = _str_list(_NAME)


def _moves(value: Any) -> list[dict[str, Any]]:
    """`RankingUpdate.moved`: [{"stat_id": str, "before": int | None, "after": int | None}]."""
    if not isinstance(value, list | tuple):
        raise _wrong("list of moves", value)
    position = _optional(_integer(minimum=0))
    out = []
    for index, move in enumerate(value):
        if not isinstance(move, dict):
            raise _wrong("map of stat_id, before, after", move).inside(f"[{index}]")
        if set(move) != {"stat_id", "before", "after"}:
            raise _Invalid(BAD_VALUE, "expected a map of stat_id, before, after",
                           ).inside(f"[{index}]")
        try:
            out.append({"stat_id": _NAME(move["stat_id"]), "before": position(move["before"]),
                        "after": position(move["after"])})
        except _Invalid as exc:
            raise exc.inside(f"[{index}]") from None
    return out


@_register
@dataclass(frozen=True, slots=True, kw_only=True)
class RankingUpdate(Message):
    """Coordinator → `rota.events` (routing key ``ranking.update``): a ranking changed when
    it was computed (its order, or a metric of a ranked stat). `moved` lists the stats whose
    0-based position changed (`before` None: newly ranked; `after` None: no longer ranked)."""

    tenant: str
    id: str
    last_update: float
    sorted_stat_ids: list[str] = field(default_factory=list)
    moved: list[dict[str, Any]] = field(default_factory=list)
    epoch: int

    _RULES = {
        "tenant": _NAME,
        "id": _NAME,
        "last_update": _TIME,
        "sorted_stat_ids": _STAT_IDS,
        "moved": _moves,
        "epoch": _EPOCH,
    }

    ROUTING_KEY: ClassVar[str] = "ranking.update"

    @property
    def routing_key(self) -> str:
        return self.ROUTING_KEY


RANKING_ALERT_STATES: Final = frozenset({"firing", "recovered"})


@_register
@dataclass(frozen=True, slots=True, kw_only=True)
class RankingAlert(Message):
    """Coordinator → `rota.events` (routing key ``ranking.alert``): a ranking threshold fired
    or recovered; `node_out` names the node it took out of placement (firing) or that went
    back (recovered), when it did."""

    tenant: str
    threshold_id: str
    ranking_id: str
    stat_id: str
    state: str
    at: float
    message: str
    node_out: str | None = None
    epoch: int

    _RULES = {
        "tenant": _NAME,
        "threshold_id": _NAME,
        "ranking_id": _NAME,
        "stat_id": _NAME,
        "state": _choice(RANKING_ALERT_STATES),
        "at": _TIME,
        "message": _TEXT,
        "node_out": _OPT_NAME,
        "epoch": _EPOCH,
    }

    ROUTING_KEY: ClassVar[str] = "ranking.alert"

    @property
    def routing_key(self) -> str:
        return self.ROUTING_KEY


@_register
@dataclass(frozen=True, slots=True, kw_only=True)
class DeadLetter(Message):
    """A refused message, as sent to the dead-letter queue."""

    original: bytes
    """The refused payload, truncated to `MAX_DEAD_LETTER_BYTES`."""
    reason: str
    """The `ProtocolError.reason` (or another short code) it was refused for."""
    detail: str
    source: str
    """Name of the queue it was taken from."""
    at: float

    _RULES = {
        "original": _blob(MAX_DEAD_LETTER_BYTES),
        "reason": _NAME,
        "detail": _TEXT,
        "source": _NAME,
        "at": _TIME,
    }


def run_id_for(service: str, slot: float, node: str | None, attempt: int = 1) -> str:
    """Deterministic run id: the same service, slot, node and attempt give the same id.

    Reads as ``<service-slug>-<slot as YYYYmmddTHHMMSSZ>-<16 hex digits>``, so a re-sent
    order is recognisable and ids sort by slot within a service.
    """
    checks: tuple[tuple[str, Check, Any], ...] = (
        ("service", _NAME, service),
        ("slot", _TIME, slot),
        ("node", _OPT_NAME, node),
        ("attempt", _ATTEMPT, attempt),
    )
    for name, check, value in checks:
        try:
            check(value)
        except _Invalid as exc:
            raise exc.error("run_id_for", name) from None
    moment = float(slot)
    key = "\x1f".join(
        (service, moment.hex(), "-" if node is None else "n:" + node, str(int(attempt)))
    )
    digest = hashlib.blake2b(key.encode(), digest_size=8, person=b"rota-run-id").hexdigest()
    slug = re.sub(r"[^a-z0-9]+", "-", service.lower()).strip("-")[:32].strip("-") or "run"
    stamp = datetime.fromtimestamp(moment, UTC).strftime("%Y%m%dT%H%M%SZ")
    return f"{slug}-{stamp}-{digest}"
