"""Property tests: round trips, hostile bytes and single-field type mutations."""

from __future__ import annotations

import dataclasses
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocol import (
    CHANGE_FIELDS,
    DAEMON_ACTIONS,
    EVENT_STATES,
    MAX_TIME,
    MESSAGE_TYPES,
    ORDER_TRIGGERS,
    RECORD_TRIGGERS,
    RUN_STATES,
    DaemonControl,
    DeadLetter,
    LedgerRun,
    ManualRunRequest,
    Message,
    NodeAnnouncement,
    ProtocolError,
    RankingAlert,
    RankingUpdate,
    RunEvent,
    RunOrder,
    RunRecord,
    ServiceChange,
    ServiceUpdate,
    decode,
    decode_as,
    encode,
    run_id_for,
)

INT64 = st.integers(-(2**63), 2**63 - 1)
NAMES = st.text(min_size=1, max_size=24)
TEXT = st.text(max_size=40)
TIMES = st.floats(min_value=0, max_value=MAX_TIME) | st.integers(0, 2**33)
DURATIONS = st.floats(min_value=0, exclude_min=True, allow_infinity=False)
FINITE = st.floats(allow_nan=False, allow_infinity=False)
GROUPS = st.lists(NAMES, max_size=4)
COMMANDS = st.lists(TEXT, min_size=1, max_size=4).map(lambda argv: ["/bin/x", *argv[1:]])
PARAMS = st.dictionaries(TEXT, st.one_of(TEXT, INT64, FINITE, st.booleans()), max_size=5)
HHMM = st.builds(lambda h, m: f"{h:02d}:{m:02d}", st.integers(0, 23), st.integers(0, 59))


def optional(strategy: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.none() | strategy


def choice(options: frozenset[str]) -> st.SearchStrategy[str]:
    return st.sampled_from(sorted(options))


@st.composite
def programs(draw: st.DrawFn, required: bool = True) -> dict[str, Any]:
    kinds = ["callable", "command"] + ([] if required else ["none"])
    kind = draw(st.sampled_from(kinds))
    return {
        "callable": draw(NAMES) if kind == "callable" else None,
        "command": draw(COMMANDS) if kind == "command" else None,
    }


@st.composite
def run_orders(draw: st.DrawFn) -> RunOrder:
    issued_at = draw(st.floats(min_value=0, max_value=MAX_TIME))
    return RunOrder(
        run_id=draw(NAMES),
        service=draw(NAMES),
        node=draw(NAMES),
        trigger=draw(choice(ORDER_TRIGGERS)),
        slot=draw(optional(TIMES)),
        attempt=draw(st.integers(1, 2**63 - 1)),
        epoch=draw(st.integers(0, 2**63 - 1)),
        issued_at=issued_at,
        deadline=draw(st.floats(min_value=issued_at, max_value=MAX_TIME)),
        timeout=draw(DURATIONS),
        run_groups=draw(GROUPS),
        params=draw(PARAMS),
        allowed_roles=draw(GROUPS),
        incarnation=draw(optional(NAMES)),
        **draw(programs()),
    )


@st.composite
def daemon_controls(draw: st.DrawFn) -> DaemonControl:
    action = draw(choice(DAEMON_ACTIONS))
    return DaemonControl(
        control_id=draw(NAMES),
        service=draw(NAMES),
        node=draw(NAMES),
        action=action,
        epoch=draw(st.integers(0, 2**63 - 1)),
        issued_at=draw(TIMES),
        run_groups=draw(GROUPS),
        params=draw(PARAMS),
        allowed_roles=draw(GROUPS),
        incarnation=draw(optional(NAMES)),
        seq=draw(st.integers(0, 2**63 - 1)),
        **draw(programs(required=action == "start")),
    )


RUN_EVENTS = st.builds(
    RunEvent,
    run_id=NAMES,
    service=NAMES,
    node=NAMES,
    state=choice(EVENT_STATES),
    at=TIMES,
    epoch=st.integers(0, 2**63 - 1),
    started_at=optional(TIMES),
    finished_at=optional(TIMES),
    exit_status=optional(INT64),
    error=optional(st.text(max_size=300)),
    output_tail=st.text(max_size=300),
    metrics=st.dictionaries(TEXT, FINITE | INT64, max_size=5),
    reason=optional(TEXT),
)
MANUAL_RUN_REQUESTS = st.builds(
    ManualRunRequest, request_id=NAMES, service=NAMES, requested_by=NAMES, requested_at=TIMES
)
SERVICE_UPDATES = st.builds(
    ServiceUpdate,
    request_id=NAMES,
    service=NAMES,
    requested_by=NAMES,
    enabled=optional(st.booleans()),
    period=optional(INT64),
    align=optional(INT64),
    run_at=optional(st.lists(HHMM, max_size=4)),
    cron=optional(TEXT),
)
SERVICE_CHANGES = st.builds(
    ServiceChange,
    request_id=NAMES,
    at=TIMES,
    by=NAMES,
    service=NAMES,
    field=choice(CHANGE_FIELDS),
    old=optional(TEXT | st.booleans() | INT64),
    new=optional(TEXT | st.booleans() | INT64 | FINITE),
    outcome=st.just("applied"),
    reason=optional(TEXT),
    epoch=st.integers(0, 2**63 - 1),
)
NODE_ANNOUNCEMENTS = st.builds(
    NodeAnnouncement,
    node=NAMES,
    roles=st.lists(NAMES, min_size=1, max_size=4),
    capacity=st.integers(1, 2**63 - 1),
    version=NAMES,
    started_at=TIMES,
    metrics_url=optional(NAMES),
    incarnation=optional(NAMES),
)
RUN_RECORDS = st.builds(
    RunRecord,
    run_id=NAMES,
    service=NAMES,
    node=optional(NAMES),
    trigger=choice(RECORD_TRIGGERS),
    slot=optional(TIMES),
    queued_at=optional(TIMES),
    started_at=optional(TIMES),
    finished_at=optional(TIMES),
    state=choice(RUN_STATES),
    outcome=optional(TEXT),
    run_groups=GROUPS,
    epoch=st.integers(0, 2**63 - 1),
    error=optional(st.text(max_size=300)),
    output_tail=st.text(max_size=300),
    reason=optional(TEXT),
    attempt=st.integers(1, 2**63 - 1),
    placement=optional(TEXT),
)
LEDGER_RUNS = st.builds(
    LedgerRun,
    run_id=NAMES,
    service=NAMES,
    node=optional(NAMES),
    target=TEXT,
    trigger=choice(RECORD_TRIGGERS),
    slot=optional(TIMES),
    queued_at=TIMES,
    dispatched_at=optional(TIMES),
    started_at=optional(TIMES),
    finished_at=optional(TIMES),
    deadline=optional(TIMES),
    state=choice(RUN_STATES),
    run_groups=GROUPS,
    epoch=st.integers(0, 2**63 - 1),
    attempt=st.integers(1, 2**63 - 1),
    error=optional(st.text(max_size=300)),
    output_tail=st.text(max_size=300),
    reason=optional(TEXT),
    metrics=st.dictionaries(TEXT, FINITE | INT64, max_size=5),
    incarnation=optional(NAMES),
    placement=optional(TEXT),
)
POSITIONS = optional(st.integers(0, 10_000))
RANKING_UPDATES = st.builds(
    RankingUpdate,
    tenant=NAMES,
    id=NAMES,
    last_update=TIMES,
    sorted_stat_ids=st.lists(NAMES, max_size=4),
    moved=st.lists(st.fixed_dictionaries(
        {"stat_id": NAMES, "before": POSITIONS, "after": POSITIONS}), max_size=4),
    epoch=st.integers(0, 2**63 - 1),
)
RANKING_ALERTS = st.builds(
    RankingAlert,
    tenant=NAMES,
    threshold_id=NAMES,
    ranking_id=NAMES,
    stat_id=NAMES,
    state=st.sampled_from(["firing", "recovered"]),
    at=TIMES,
    message=TEXT,
    node_out=optional(NAMES),
    epoch=st.integers(0, 2**63 - 1),
)
DEAD_LETTERS = st.builds(
    DeadLetter,
    original=st.binary(max_size=300),
    reason=NAMES,
    detail=TEXT,
    source=NAMES,
    at=TIMES,
)

STRATEGIES: dict[type[Message], st.SearchStrategy[Any]] = {
    RunOrder: run_orders(),
    RunEvent: RUN_EVENTS,
    DaemonControl: daemon_controls(),
    ManualRunRequest: MANUAL_RUN_REQUESTS,
    ServiceUpdate: SERVICE_UPDATES,
    ServiceChange: SERVICE_CHANGES,
    NodeAnnouncement: NODE_ANNOUNCEMENTS,
    RunRecord: RUN_RECORDS,
    LedgerRun: LEDGER_RUNS,
    DeadLetter: DEAD_LETTERS,
    RankingUpdate: RANKING_UPDATES,
    RankingAlert: RANKING_ALERTS,
}
ANY_MESSAGE = st.one_of(*STRATEGIES.values())
ALL_TYPES = list(STRATEGIES)
by_name = pytest.mark.parametrize("cls", ALL_TYPES, ids=lambda c: c.__name__)


def test_every_message_type_has_a_strategy() -> None:
    assert set(STRATEGIES) == set(MESSAGE_TYPES.values())


# --- round trips ----------------------------------------------------------------------------


@by_name
@given(data=st.data())
def test_round_trip(cls: type[Message], data: st.DataObject) -> None:
    msg = data.draw(STRATEGIES[cls])
    encoded = encode(msg)
    assert decode(encoded) == msg
    assert decode_as(encoded, cls) == msg
    assert encode(decode(encoded)) == encoded


@given(ANY_MESSAGE)
def test_construction_from_own_fields_is_identity(msg: Message) -> None:
    assert type(msg).from_dict(msg.to_dict()) == msg


@given(RUN_RECORDS)
def test_run_record_json_round_trip_keeps_times_to_the_microsecond(record: RunRecord) -> None:
    back = RunRecord.from_json_dict(record.to_json_dict())
    times = ("slot", "queued_at", "started_at", "finished_at")
    for name in times:
        before, after = getattr(record, name), getattr(back, name)
        assert (before is None) == (after is None)
        if before is not None:
            assert abs(before - after) <= 1e-6 + abs(before) * 1e-15
    assert dataclasses.replace(back, **{name: getattr(record, name) for name in times}) == record


@given(NAMES, TIMES, optional(NAMES), st.integers(1, 1000))
def test_run_id_is_stable_and_valid(service: str, slot: float, node: str | None, n: int) -> None:
    run_id = run_id_for(service, slot, node, n)
    assert run_id == run_id_for(service, float(slot), node, n)
    assert run_id.isascii() and " " not in run_id
    assert run_id != run_id_for(service, slot, node, n + 1)


# --- hostile input --------------------------------------------------------------------------


def decodes_or_refuses(data: bytes) -> None:
    """`decode` returns a valid message or raises ProtocolError; nothing else escapes."""
    try:
        msg = decode(data)
    except ProtocolError as exc:
        assert exc.reason and str(exc)
    else:
        assert isinstance(msg, Message)
        assert decode(encode(msg)) == msg


@given(st.binary(max_size=512))
def test_arbitrary_bytes(data: bytes) -> None:
    decodes_or_refuses(data)


@given(ANY_MESSAGE, st.data())
def test_corrupted_messages(msg: Message, data: st.DataObject) -> None:
    encoded = bytearray(encode(msg))
    for _ in range(data.draw(st.integers(1, 4))):
        position = data.draw(st.integers(0, len(encoded)))
        action = data.draw(st.sampled_from(["flip", "insert", "delete", "truncate"]))
        if action == "flip" and position < len(encoded):
            encoded[position] ^= data.draw(st.integers(1, 255))
        elif action == "insert":
            encoded[position:position] = data.draw(st.binary(min_size=1, max_size=4))
        elif action == "delete":
            del encoded[position : position + data.draw(st.integers(1, 4))]
        else:
            del encoded[position:]
    decodes_or_refuses(bytes(encoded))


MSGPACK_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.text(max_size=20)
    | st.binary(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.text(max_size=12) | st.binary(max_size=4), inner, max_size=4)
    ),
    max_leaves=20,
)


@given(MSGPACK_VALUES)
def test_arbitrary_msgpack_documents(value: Any) -> None:
    decodes_or_refuses(msgpack.packb(value, use_bin_type=True))


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(ALL_TYPES), st.data())
def test_arbitrary_field_values(cls: type[Message], data: st.DataObject) -> None:
    """Right envelope and keys, anything at all in the fields."""
    document = {"t": cls.__name__, "v": 1}
    document.update({name: data.draw(MSGPACK_VALUES, label=name) for name in cls.FIELDS})
    decodes_or_refuses(msgpack.packb(document, use_bin_type=True))


@given(ANY_MESSAGE, st.data())
def test_arbitrary_envelopes(msg: Message, data: st.DataObject) -> None:
    document = msgpack.unpackb(encode(msg), raw=False)
    document[data.draw(st.sampled_from(["t", "v"]))] = data.draw(MSGPACK_VALUES)
    if data.draw(st.booleans()):
        document[data.draw(st.text(max_size=8))] = data.draw(MSGPACK_VALUES)
    decodes_or_refuses(msgpack.packb(document, use_bin_type=True))


# --- one field of the wrong type ------------------------------------------------------------

# What each field accepts on the wire, by kind; everything else is a wrong type.
ACCEPTS: dict[str, set[str]] = {
    "str": {"str"},
    "float": {"float", "int"},
    "int": {"int"},
    "bool": {"bool"},
    "list": {"list"},
    "dict": {"dict"},
    "bytes": {"bytes"},
    "scalar": {"str", "int", "float", "bool"},
}
KINDS: dict[type[Message], dict[str, str]] = {
    RunOrder: {
        "run_id": "str",
        "service": "str",
        "node": "str",
        "trigger": "str",
        "slot": "float?",
        "attempt": "int",
        "epoch": "int",
        "issued_at": "float",
        "deadline": "float",
        "timeout": "float",
        "callable": "str?",
        "command": "list?",
        "run_groups": "list",
        "params": "dict",
        "allowed_roles": "list",
        "incarnation": "str?",
        "start_at": "float?",
    },
    RunEvent: {
        "run_id": "str",
        "service": "str",
        "node": "str",
        "state": "str",
        "at": "float",
        "epoch": "int",
        "started_at": "float?",
        "finished_at": "float?",
        "exit_status": "int?",
        "error": "str?",
        "output_tail": "str",
        "metrics": "dict",
        "reason": "str?",
    },
    DaemonControl: {
        "control_id": "str",
        "service": "str",
        "node": "str",
        "action": "str",
        "epoch": "int",
        "issued_at": "float",
        "callable": "str?",
        "command": "list?",
        "run_groups": "list",
        "params": "dict",
        "allowed_roles": "list",
        "incarnation": "str?",
        "seq": "int",
    },
    ManualRunRequest: {
        "request_id": "str",
        "service": "str",
        "requested_by": "str",
        "requested_at": "float",
    },
    ServiceUpdate: {
        "request_id": "str",
        "service": "str",
        "requested_by": "str",
        "enabled": "bool?",
        "period": "int?",
        "align": "int?",
        "run_at": "list?",
        "cron": "str?",
    },
    ServiceChange: {
        "request_id": "str",
        "at": "float",
        "by": "str",
        "service": "str",
        "field": "str",
        "old": "scalar?",
        "new": "scalar?",
        "outcome": "str",
        "reason": "str?",
        "epoch": "int",
    },
    NodeAnnouncement: {
        "node": "str",
        "roles": "list",
        "capacity": "int",
        "version": "str",
        "started_at": "float",
        "metrics_url": "str?",
        "incarnation": "str?",
    },
    RunRecord: {
        "run_id": "str",
        "service": "str",
        "node": "str?",
        "trigger": "str",
        "slot": "float?",
        "queued_at": "float?",
        "started_at": "float?",
        "finished_at": "float?",
        "state": "str",
        "outcome": "str?",
        "run_groups": "list",
        "epoch": "int",
        "error": "str?",
        "output_tail": "str",
        "reason": "str?",
        "attempt": "int",
        "placement": "str?",
    },
    LedgerRun: {
        "run_id": "str",
        "service": "str",
        "node": "str?",
        "target": "str",
        "trigger": "str",
        "slot": "float?",
        "queued_at": "float",
        "dispatched_at": "float?",
        "started_at": "float?",
        "finished_at": "float?",
        "deadline": "float?",
        "state": "str",
        "run_groups": "list",
        "epoch": "int",
        "attempt": "int",
        "error": "str?",
        "output_tail": "str",
        "reason": "str?",
        "metrics": "dict",
        "incarnation": "str?",
        "placement": "str?",
    },
    RankingUpdate: {
        "tenant": "str",
        "id": "str",
        "last_update": "float",
        "sorted_stat_ids": "list",
        "moved": "list",
        "epoch": "int",
    },
    RankingAlert: {
        "tenant": "str",
        "threshold_id": "str",
        "ranking_id": "str",
        "stat_id": "str",
        "state": "str",
        "at": "float",
        "message": "str",
        "node_out": "str?",
        "epoch": "int",
    },
    DeadLetter: {
        "original": "bytes",
        "reason": "str",
        "detail": "str",
        "source": "str",
        "at": "float",
    },
}
VALUES_BY_TYPE: dict[str, st.SearchStrategy[Any]] = {
    "str": st.text(max_size=10),
    "int": INT64,
    "float": st.floats(),
    "bool": st.booleans(),
    "none": st.none(),
    "list": st.lists(INT64, min_size=1, max_size=3),
    "dict": st.dictionaries(st.text(max_size=5), INT64, max_size=3),
    "bytes": st.binary(max_size=10),
}
# Element types a container field never accepts (its items are str, or scalars for params).
BAD_ELEMENTS: dict[str, st.SearchStrategy[Any]] = {
    "list": st.none() | INT64 | st.lists(st.text(), max_size=2),
    "dict": st.none() | st.lists(INT64, max_size=2) | st.binary(max_size=4),
}


def wrong_values(kind: str) -> st.SearchStrategy[Any]:
    base = kind.rstrip("?")
    accepted = ACCEPTS[base] | ({"none"} if kind.endswith("?") else set())
    wrong = [strategy for name, strategy in VALUES_BY_TYPE.items() if name not in accepted]
    if base == "list":
        wrong.append(BAD_ELEMENTS["list"].map(lambda item: [item]))
    elif base == "dict":
        wrong.append(BAD_ELEMENTS["dict"].map(lambda item: {"ok": item}))
    return st.one_of(*wrong)


def test_kind_table_covers_every_field() -> None:
    assert set(KINDS) == set(MESSAGE_TYPES.values())
    for cls, kinds in KINDS.items():
        assert tuple(kinds) == cls.FIELDS


@settings(max_examples=300)
@given(ANY_MESSAGE, st.data())
def test_one_field_of_the_wrong_type_is_named(msg: Message, data: st.DataObject) -> None:
    cls = type(msg)
    name = data.draw(st.sampled_from(cls.FIELDS), label="field")
    value = data.draw(wrong_values(KINDS[cls][name]), label="value")
    document = msgpack.unpackb(encode(msg), raw=False)
    document[name] = value
    document["v"] = max(document["v"], cls.SINCE.get(name, 1))  # the version with that field
    with pytest.raises(ProtocolError) as caught:
        decode(msgpack.packb(document, use_bin_type=True))
    assert caught.value.reason == "wrong_type"
    assert caught.value.field == name
    assert str(caught.value).startswith(f"{cls.__name__}.{name}")
    with pytest.raises(ProtocolError) as built:
        cls(**{**msg.to_dict(), name: value})
    assert str(built.value) == str(caught.value)
