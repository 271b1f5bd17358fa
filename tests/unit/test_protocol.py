"""Wire messages: construction, encoding, decoding and every way a message can be refused."""

from __future__ import annotations

import dataclasses
import json
import pickle
from datetime import timedelta, timezone
from typing import Any

import msgpack
import pytest

from protocol import (
    MAX_DEAD_LETTER_BYTES,
    MAX_ERROR_CHARS,
    MAX_MESSAGE_BYTES,
    MAX_OUTPUT_TAIL_CHARS,
    MAX_TIME,
    MESSAGE_TYPES,
    REASONS,
    SCHEMA_VERSION,
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

T0 = 1_700_000_000.0


def order_fields(**changes: Any) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "run_id": "backup-db-1",
        "service": "backup-db",
        "node": "node-1",
        "trigger": "scheduled",
        "slot": T0,
        "attempt": 1,
        "epoch": 5,
        "issued_at": T0 + 0.25,
        "deadline": T0 + 60,
        "timeout": 300.0,
        "callable": "rota.utilities.backup:run",
        "command": None,
        "run_groups": ["db"],
        "params": {"full": True, "keep": 7, "ratio": 0.5, "target": "s3://bucket"},
    }
    fields.update(changes)
    return fields


def event_fields(**changes: Any) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "run_id": "backup-db-1",
        "service": "backup-db",
        "node": "node-1",
        "state": "succeeded",
        "at": T0 + 30,
        "epoch": 5,
        "started_at": T0 + 1,
        "finished_at": T0 + 30,
        "exit_status": 0,
        "error": None,
        "output_tail": "done\n",
        "metrics": {"bytes": 1024.0, "files": 3.0},
        "reason": None,
    }
    fields.update(changes)
    return fields


def control_fields(**changes: Any) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "control_id": "ctl-1",
        "service": "log-shipper",
        "node": "node-2",
        "action": "start",
        "epoch": 5,
        "issued_at": T0,
        "callable": None,
        "command": ["/usr/bin/shipper", "--follow", ""],
        "run_groups": [],
        "params": {},
    }
    fields.update(changes)
    return fields


def manual_fields(**changes: Any) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "request_id": "req-1",
        "service": "backup-db",
        "requested_by": "alice",
        "requested_at": T0,
    }
    fields.update(changes)
    return fields


def update_fields(**changes: Any) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "request_id": "req-2",
        "service": "backup-db",
        "requested_by": "alice",
        "enabled": True,
        "period": 3600,
        "align": 0,
        "run_at": ["00:00", "23:59"],
        "cron": None,
    }
    fields.update(changes)
    return fields


def change_fields(**changes: Any) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "request_id": "req-3",
        "at": T0,
        "by": "alice",
        "service": "Cache Manager",
        "field": "schedule",
        "old": "6 min +3",
        "new": "5 min +2",
        "outcome": "applied",
        "reason": None,
        "epoch": 4,
    }
    fields.update(changes)
    return fields


def announcement_fields(**changes: Any) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "node": "node-1",
        "roles": ["db", "web"],
        "capacity": 4,
        "version": "0.1.0",
        "started_at": T0,
        "metrics_url": "http://node-1:9100/metrics",
    }
    fields.update(changes)
    return fields


def record_fields(**changes: Any) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "run_id": "backup-db-1",
        "service": "backup-db",
        "node": "node-1",
        "trigger": "scheduled",
        "slot": T0,
        "queued_at": T0 + 0.1,
        "started_at": T0 + 1,
        "finished_at": T0 + 30.5,
        "state": "succeeded",
        "outcome": "ok",
        "run_groups": ["db"],
        "epoch": 5,
        "error": None,
        "output_tail": "done\n",
        "reason": None,
        "attempt": 1,
    }
    fields.update(changes)
    return fields


def dead_letter_fields(**changes: Any) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "original": b"\xc1garbage",
        "reason": "garbage",
        "detail": "message: not valid msgpack",
        "source": "rota.node.node-1",
        "at": T0,
    }
    fields.update(changes)
    return fields


def ledger_run_fields(**changes: Any) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "run_id": "run-1",
        "service": "Cache Manager",
        "node": "node-1",
        "target": "",
        "trigger": "scheduled",
        "slot": T0,
        "queued_at": T0,
        "dispatched_at": T0 + 1,
        "started_at": None,
        "finished_at": None,
        "deadline": T0 + 61,
        "state": "dispatched",
        "run_groups": ["db"],
        "epoch": 5,
        "attempt": 1,
        "error": None,
        "output_tail": "",
        "reason": None,
        "metrics": {},
    }
    fields.update(changes)
    return fields


def ranking_update_fields(**changes: Any) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "tenant": "rota",
        "id": "node-health",
        "last_update": T0,
        "sorted_stat_ids": ["node-2", "node-1"],
        "moved": [{"stat_id": "node-2", "before": 1, "after": 0},
                  {"stat_id": "node-1", "before": 0, "after": 1}],
        "epoch": 5,
    }
    fields.update(changes)
    return fields


def ranking_alert_fields(**changes: Any) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "tenant": "rota",
        "threshold_id": "node-1-failing",
        "ranking_id": "node-health",
        "stat_id": "node-1",
        "state": "firing",
        "at": T0,
        "message": "*asr of node-1 below 50",
        "node_out": "node-1",
        "epoch": 5,
    }
    fields.update(changes)
    return fields


FACTORIES: dict[type[Message], Any] = {
    RunOrder: order_fields,
    RunEvent: event_fields,
    DaemonControl: control_fields,
    ManualRunRequest: manual_fields,
    ServiceUpdate: update_fields,
    ServiceChange: change_fields,
    NodeAnnouncement: announcement_fields,
    RunRecord: record_fields,
    LedgerRun: ledger_run_fields,
    DeadLetter: dead_letter_fields,
    RankingUpdate: ranking_update_fields,
    RankingAlert: ranking_alert_fields,
}
ALL_TYPES = list(FACTORIES)


def build(cls: type[Message], **changes: Any) -> Any:
    return cls(**FACTORIES[cls](**changes))


def wire(cls: type[Message], **changes: Any) -> dict[str, Any]:
    """A valid wire map for `cls`, with `changes` applied after validation."""
    data = msgpack.unpackb(encode(build(cls)), raw=False)
    data.update(changes)
    return data


def refused(data: Any) -> ProtocolError:
    with pytest.raises(ProtocolError) as caught:
        decode(data if isinstance(data, bytes) else msgpack.packb(data, use_bin_type=True))
    return caught.value


# --- registry and round trips -------------------------------------------------------------


def test_registry_lists_every_message_type() -> None:
    assert set(MESSAGE_TYPES.values()) == set(ALL_TYPES)
    assert all(name == cls.__name__ for name, cls in MESSAGE_TYPES.items())


@pytest.mark.parametrize("cls", ALL_TYPES, ids=lambda c: c.__name__)
def test_round_trip(cls: type[Message]) -> None:
    msg = build(cls)
    data = encode(msg)
    assert decode(data) == msg
    assert decode_as(data, cls) == msg
    assert encode(decode(data)) == data


@pytest.mark.parametrize("cls", ALL_TYPES, ids=lambda c: c.__name__)
def test_wire_map_has_type_version_and_exactly_the_fields(cls: type[Message]) -> None:
    msg = build(cls)
    data = msgpack.unpackb(encode(msg), raw=False)
    assert data.pop("t") == cls.__name__
    assert data.pop("v") == SCHEMA_VERSION == 1
    # Fields added in a later version are left out while unset (so version 1 still reads it).
    assert list(data) == [f for f in cls.FIELDS if f not in cls.SINCE]
    assert data == {k: v for k, v in msg.to_dict().items() if k not in cls.SINCE}


def test_an_order_sent_ahead_is_written_in_version_2_and_read_back() -> None:
    order = build(RunOrder, issued_at=T0 - 1.5, start_at=T0)
    data = encode(order)
    wire = msgpack.unpackb(data, raw=False)
    assert (wire["v"], wire["start_at"], list(wire)[-1]) == (2, T0, "start_at")
    assert decode_as(data, RunOrder) == order
    assert decode_as(encode(build(RunOrder)), RunOrder).start_at is None


def test_version_1_refuses_start_at_and_version_2_requires_it() -> None:
    wire = msgpack.unpackb(encode(build(RunOrder, issued_at=T0 - 1.5, start_at=T0)), raw=False)
    wire["v"] = 1
    with pytest.raises(ProtocolError, match=r"RunOrder\.start_at: unknown field") as e1:
        decode(msgpack.packb(wire))
    del wire["start_at"]
    wire["v"] = 2
    with pytest.raises(ProtocolError, match=r"RunOrder\.start_at: missing") as e2:
        decode(msgpack.packb(wire))
    assert (e1.value.reason, e2.value.reason) == ("unknown_field", "missing_field")


def test_a_receiver_of_version_1_only_refuses_an_order_sent_ahead_naming_the_version(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import protocol.codec as codec

    monkeypatch.setattr(codec, "SUPPORTED_VERSIONS", frozenset({1}))
    assert decode(encode(build(RunOrder))) == build(RunOrder)  # not sent ahead: still read
    with pytest.raises(ProtocolError, match=r"unsupported schema version 2 \(supported: 1\)"):
        decode(encode(build(RunOrder, issued_at=T0 - 1.5, start_at=T0)))


def test_start_at_after_the_deadline_is_refused() -> None:
    with pytest.raises(ProtocolError, match=r"RunOrder\.start_at: later than deadline"):
        build(RunOrder, start_at=T0 + 61)


@pytest.mark.parametrize("cls", ALL_TYPES, ids=lambda c: c.__name__)
def test_messages_are_frozen_and_slotted(cls: type[Message]) -> None:
    msg = build(cls)
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(msg, cls.FIELDS[0], "other")
    assert not hasattr(msg, "__dict__")


@pytest.mark.parametrize("cls", ALL_TYPES, ids=lambda c: c.__name__)
def test_from_dict_inverts_to_dict(cls: type[Message]) -> None:
    msg = build(cls)
    assert cls.from_dict(msg.to_dict()) == msg


def test_bytearray_and_memoryview_input_decode() -> None:
    data = encode(build(RunOrder))
    assert decode(bytearray(data)) == decode(memoryview(data)) == build(RunOrder)


def test_defaults_give_a_minimal_message() -> None:
    event = RunEvent(
        run_id="r", service="s", node="n", state="started", at=T0, epoch=0, started_at=T0
    )
    assert event.output_tail == "" and event.metrics == {} and event.error is None
    order = RunOrder(
        run_id="r",
        service="s",
        node="n",
        trigger="manual",
        slot=None,
        epoch=0,
        issued_at=T0,
        deadline=T0,
        timeout=1,
        command=["true"],
    )
    assert order.attempt == 1 and order.run_groups == [] and order.params == {}
    record = RunRecord(run_id="r", service="s", trigger="daemon", state="queued", epoch=0)
    assert record.node is None and record.attempt == 1
    assert decode(encode(record)) == record


def test_defaults_are_not_shared_between_messages() -> None:
    a = RunRecord(run_id="r", service="s", trigger="daemon", state="queued", epoch=0)
    b = RunRecord(run_id="r", service="s", trigger="daemon", state="queued", epoch=0)
    assert a.run_groups is not b.run_groups


# --- normalisation --------------------------------------------------------------------------


def test_ints_are_accepted_for_floats_and_stored_as_floats() -> None:
    order = build(RunOrder, slot=1_700_000_000, issued_at=1_700_000_000, timeout=300)
    assert type(order.slot) is float and type(order.issued_at) is float
    assert type(order.timeout) is float and order.timeout == 300.0
    event = build(RunEvent, metrics={"files": 3})
    assert type(event.metrics["files"]) is float


def test_params_keep_their_scalar_types() -> None:
    order = build(RunOrder, params={"a": 1, "b": True, "c": 1.5, "d": "x"})
    decoded = decode_as(encode(order), RunOrder)
    assert [type(v) for v in decoded.params.values()] == [int, bool, float, str]


def test_sequences_become_lists_and_containers_are_copied() -> None:
    groups = ["db"]
    params: dict[str, Any] = {"a": 1}
    order = build(RunOrder, run_groups=groups, params=params, callable=None, command=("ls", "-l"))
    assert order.command == ["ls", "-l"]
    groups.append("web")
    params["b"] = 2
    assert order.run_groups == ["db"] and order.params == {"a": 1}
    assert decode(encode(order)) == order


def test_dead_letter_original_is_truncated_and_made_bytes() -> None:
    big = bytearray(b"x" * (MAX_DEAD_LETTER_BYTES + 10))
    letter = build(DeadLetter, original=big)
    assert type(letter.original) is bytes
    assert len(letter.original) == MAX_DEAD_LETTER_BYTES
    assert decode(encode(letter)) == letter


def test_replace_revalidates() -> None:
    order = build(RunOrder)
    assert dataclasses.replace(order, epoch=6).epoch == 6
    with pytest.raises(ProtocolError, match=r"RunOrder\.epoch: expected int, got str"):
        dataclasses.replace(order, epoch="6")


def test_text_limits_are_inclusive() -> None:
    event = build(RunEvent, error="e" * MAX_ERROR_CHARS, output_tail="o" * MAX_OUTPUT_TAIL_CHARS)
    assert decode(encode(event)) == event


def test_time_limits_are_inclusive() -> None:
    assert build(ManualRunRequest, requested_at=0.0).requested_at == 0.0
    assert build(ManualRunRequest, requested_at=MAX_TIME).requested_at == MAX_TIME


def test_non_ascii_text_round_trips() -> None:
    event = build(RunEvent, output_tail="ok ✓ 日本語 \u0000", error="ärger")
    assert decode(encode(event)) == event


# --- construction errors --------------------------------------------------------------------

NAN = float("nan")
INF = float("inf")

CONSTRUCTION_ERRORS = [
    # (class, field, bad value, reason, message fragment)
    (RunOrder, "epoch", "5", "wrong_type", "RunOrder.epoch: expected int, got str"),
    (RunOrder, "epoch", True, "wrong_type", "RunOrder.epoch: expected int, got bool"),
    (RunOrder, "epoch", 5.0, "wrong_type", "RunOrder.epoch: expected int, got float"),
    (RunOrder, "epoch", -1, "bad_value", "RunOrder.epoch: must be >= 0, got -1"),
    (RunOrder, "epoch", 2**63, "bad_value", "RunOrder.epoch: outside the signed 64-bit"),
    (RunOrder, "attempt", 0, "bad_value", "RunOrder.attempt: must be >= 1"),
    (RunOrder, "run_id", "", "bad_value", "RunOrder.run_id: must not be empty"),
    (RunOrder, "run_id", None, "wrong_type", "RunOrder.run_id: expected str, got None"),
    (RunOrder, "service", b"svc", "wrong_type", "RunOrder.service: expected str, got bytes"),
    (RunOrder, "node", "", "bad_value", "RunOrder.node: must not be empty"),
    (RunOrder, "trigger", "daemon", "bad_value", "RunOrder.trigger: expected one of manual"),
    (RunOrder, "trigger", 1, "wrong_type", "RunOrder.trigger: expected str, got int"),
    (RunOrder, "slot", "now", "wrong_type", "RunOrder.slot: expected float or None, got str"),
    (RunOrder, "slot", NAN, "bad_value", "RunOrder.slot: must be finite, got nan"),
    (RunOrder, "slot", -1.0, "bad_value", "RunOrder.slot: must be >= 0.0"),
    (RunOrder, "issued_at", INF, "bad_value", "RunOrder.issued_at: must be finite"),
    (RunOrder, "issued_at", True, "wrong_type", "RunOrder.issued_at: expected float, got bool"),
    (RunOrder, "issued_at", 10**400, "bad_value", "RunOrder.issued_at: too large"),
    (RunOrder, "deadline", MAX_TIME + 1, "bad_value", "RunOrder.deadline: must be <="),
    (RunOrder, "deadline", T0, "bad_value", "RunOrder.deadline: earlier than issued_at"),
    (RunOrder, "timeout", 0, "bad_value", "RunOrder.timeout: must be > 0"),
    (RunOrder, "timeout", -5.0, "bad_value", "RunOrder.timeout: must be > 0"),
    (RunOrder, "timeout", NAN, "bad_value", "RunOrder.timeout: must be finite"),
    (RunOrder, "callable", "", "bad_value", "RunOrder.callable: must not be empty"),
    (RunOrder, "callable", 3, "wrong_type", "RunOrder.callable: expected str or None"),
    (RunOrder, "command", ["ls"], "bad_value", "RunOrder.command: exactly one of callable"),
    (RunOrder, "run_groups", "db", "wrong_type", "RunOrder.run_groups: expected list of str"),
    (RunOrder, "run_groups", [""], "bad_value", "RunOrder.run_groups[0]: must not be empty"),
    (RunOrder, "run_groups", ["db", 7], "wrong_type", "RunOrder.run_groups[1]: expected str"),
    (RunOrder, "params", [], "wrong_type", "RunOrder.params: expected dict of str to"),
    (RunOrder, "params", {"a": [1]}, "wrong_type", "RunOrder.params['a']: expected str, int"),
    (RunOrder, "params", {"a": None}, "wrong_type", "RunOrder.params['a']: expected str, int"),
    (RunOrder, "params", {"a": NAN}, "bad_value", "RunOrder.params['a']: must be finite"),
    (RunOrder, "params", {"a": -(2**64)}, "bad_value", "RunOrder.params['a']: outside"),
    (RunOrder, "params", {1: "x"}, "wrong_type", "RunOrder.params[1]: expected str, got int"),
    (RunOrder, "params", {b"k": "x"}, "wrong_type", "RunOrder.params[b'k']: expected str"),
    (RunEvent, "state", "queued", "bad_value", "RunEvent.state: expected one of exited"),
    (RunEvent, "at", None, "wrong_type", "RunEvent.at: expected float, got None"),
    (RunEvent, "started_at", "x", "wrong_type", "RunEvent.started_at: expected float or None"),
    (RunEvent, "exit_status", 1.0, "wrong_type", "RunEvent.exit_status: expected int or None"),
    (RunEvent, "exit_status", False, "wrong_type", "RunEvent.exit_status: expected int or"),
    (RunEvent, "error", "e" * (MAX_ERROR_CHARS + 1), "bad_value", "RunEvent.error: longer"),
    (RunEvent, "output_tail", None, "wrong_type", "RunEvent.output_tail: expected str, got"),
    (RunEvent, "output_tail", "o" * 8193, "bad_value", "RunEvent.output_tail: longer than 8192"),
    (RunEvent, "metrics", {"x": "1"}, "wrong_type", "RunEvent.metrics['x']: expected float"),
    (RunEvent, "metrics", {"x": True}, "wrong_type", "RunEvent.metrics['x']: expected float"),
    (RunEvent, "metrics", {"x": INF}, "bad_value", "RunEvent.metrics['x']: must be finite"),
    (RunEvent, "reason", 5, "wrong_type", "RunEvent.reason: expected str or None, got int"),
    (RunEvent, "output_tail", "\udcff", "bad_value", "RunEvent.output_tail: not encodable"),
    (DaemonControl, "action", "restart", "bad_value", "DaemonControl.action: expected one of"),
    (DaemonControl, "command", None, "bad_value", "DaemonControl.command: exactly one of"),
    (DaemonControl, "command", [], "bad_value", "DaemonControl.command: must not be empty"),
    (DaemonControl, "command", "ls", "wrong_type", "DaemonControl.command: expected list of"),
    (DaemonControl, "control_id", "", "bad_value", "DaemonControl.control_id: must not be"),
    (ManualRunRequest, "requested_at", "now", "wrong_type", "requested_at: expected float"),
    (ManualRunRequest, "requested_by", "", "bad_value", "requested_by: must not be empty"),
    (ServiceUpdate, "enabled", 1, "wrong_type", "ServiceUpdate.enabled: expected bool or None"),
    (ServiceUpdate, "period", "60", "wrong_type", "ServiceUpdate.period: expected int or None"),
    (ServiceUpdate, "align", 1.5, "wrong_type", "ServiceUpdate.align: expected int or None"),
    (ServiceUpdate, "run_at", "09:00", "wrong_type", "ServiceUpdate.run_at: expected list of"),
    (ServiceUpdate, "run_at", ["24:00"], "bad_value", "ServiceUpdate.run_at[0]: expected HH:MM"),
    (ServiceUpdate, "run_at", ["9:00"], "bad_value", "ServiceUpdate.run_at[0]: expected HH:MM"),
    (ServiceUpdate, "run_at", ["09:60"], "bad_value", "ServiceUpdate.run_at[0]: expected HH"),
    (ServiceUpdate, "run_at", [930], "wrong_type", "ServiceUpdate.run_at[0]: expected str"),
    (ServiceUpdate, "cron", ["*"], "wrong_type", "ServiceUpdate.cron: expected str or None"),
    (NodeAnnouncement, "roles", [], "bad_value", "NodeAnnouncement.roles: must not be empty"),
    (NodeAnnouncement, "capacity", 0, "bad_value", "NodeAnnouncement.capacity: must be >= 1"),
    (NodeAnnouncement, "version", "", "bad_value", "NodeAnnouncement.version: must not be"),
    (NodeAnnouncement, "metrics_url", "", "bad_value", "NodeAnnouncement.metrics_url: must"),
    (RunRecord, "state", "started", "bad_value", "RunRecord.state: expected one of dispatched"),
    (RunRecord, "trigger", "cron", "bad_value", "RunRecord.trigger: expected one of daemon"),
    (RunRecord, "node", "", "bad_value", "RunRecord.node: must not be empty"),
    (RunRecord, "queued_at", NAN, "bad_value", "RunRecord.queued_at: must be finite"),
    (RunRecord, "attempt", 0, "bad_value", "RunRecord.attempt: must be >= 1"),
    (RunRecord, "outcome", 0, "wrong_type", "RunRecord.outcome: expected str or None, got int"),
    (DeadLetter, "original", "text", "wrong_type", "DeadLetter.original: expected bytes, got"),
    (DeadLetter, "reason", "", "bad_value", "DeadLetter.reason: must not be empty"),
    (DeadLetter, "at", None, "wrong_type", "DeadLetter.at: expected float, got None"),
]


@pytest.mark.parametrize(
    ("cls", "name", "value", "reason", "fragment"),
    CONSTRUCTION_ERRORS,
    ids=[f"{c.__name__}.{n}-{i}" for i, (c, n, *_) in enumerate(CONSTRUCTION_ERRORS)],
)
def test_construction_refuses_bad_fields(
    cls: type[Message], name: str, value: Any, reason: str, fragment: str
) -> None:
    with pytest.raises(ProtocolError) as caught:
        build(cls, **{name: value})
    assert caught.value.reason == reason
    assert caught.value.field == name
    assert fragment in str(caught.value)


def _wire_case(value: Any) -> bool:
    """Whether `value` reaches the decoder as itself (msgpack can carry it, keys are str)."""
    if isinstance(value, dict) and any(type(key) is int for key in value):
        return False
    try:
        msgpack.packb(value, use_bin_type=True)
    except (OverflowError, ValueError):
        return False
    return True


WIRE_ERRORS = [case for case in CONSTRUCTION_ERRORS if _wire_case(case[2])]


@pytest.mark.parametrize(
    ("cls", "name", "value", "reason", "fragment"),
    WIRE_ERRORS,
    ids=[f"{c.__name__}.{n}-{i}" for i, (c, n, *_) in enumerate(WIRE_ERRORS)],
)
def test_decoding_refuses_the_same_bad_fields(
    cls: type[Message], name: str, value: Any, reason: str, fragment: str
) -> None:
    data = msgpack.packb(wire(cls, **{name: value}), use_bin_type=True)
    with pytest.raises(ProtocolError) as caught:
        decode(data)
    assert caught.value.reason == reason
    assert caught.value.field == name
    assert fragment in str(caught.value)


def test_both_callable_and_command_is_refused() -> None:
    with pytest.raises(ProtocolError, match="exactly one of callable and command may be set"):
        build(RunOrder, command=["ls"])
    with pytest.raises(ProtocolError, match="exactly one of callable and command may be set"):
        build(DaemonControl, action="stop", callable="x:y")


def test_neither_callable_nor_command_is_refused_for_orders() -> None:
    with pytest.raises(ProtocolError, match="must be set, neither is") as caught:
        build(RunOrder, callable=None)
    assert caught.value.reason == "bad_value" and caught.value.field == "command"


@pytest.mark.parametrize("action", ["stop", "pause", "resume"])
def test_daemon_controls_other_than_start_need_no_program(action: str) -> None:
    control = build(DaemonControl, action=action, command=None)
    assert decode(encode(control)) == control


def test_deadline_may_equal_issued_at() -> None:
    assert build(RunOrder, deadline=T0 + 0.25).deadline == T0 + 0.25


def test_service_update_leaves_semantics_to_the_coordinator() -> None:
    update = build(ServiceUpdate, period=-3, align=10**9, cron="not really cron", run_at=[])
    assert decode(encode(update)) == update
    blank = ServiceUpdate(request_id="r", service="s", requested_by="bob")
    assert decode(encode(blank)) == blank


def test_missing_required_argument_is_a_type_error_in_code() -> None:
    with pytest.raises(TypeError):
        ManualRunRequest(request_id="r", service="s", requested_by="a")  # type: ignore[call-arg]


# --- decoding errors ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\xc1",  # never-used msgpack byte
        b"\x85",  # map header with no entries following
        b"\x81\xa1t",  # truncated map
        msgpack.packb({"t": "RunOrder"}) + b"\x00",  # trailing data
        b"\x81\xa2\xff\xfe\x01",  # invalid UTF-8 in a key
        b"\x81\x01\x02",  # int map key
        b"\x91" * 2000 + b"\xc0",  # absurdly deep nesting
        msgpack.packb(msgpack.ExtType(5, b"x")),
        msgpack.packb({"t": "RunOrder", "v": 1, "run_id": msgpack.ExtType(7, b"x")}),
    ],
    ids=[
        "empty",
        "reserved-byte",
        "short-map",
        "truncated",
        "trailing",
        "bad-utf8",
        "int-key",
        "deep",
        "ext-top",
        "ext-field",
    ],
)
def test_garbage_is_refused(data: bytes) -> None:
    assert refused(data).reason == "garbage"


@pytest.mark.parametrize("top", [[1, 2], "RunOrder", 7, None, 1.5, b"raw", True])
def test_top_level_must_be_a_map(top: Any) -> None:
    error = refused(msgpack.packb(top, use_bin_type=True))
    assert error.reason == "garbage"
    assert "expected a map at the top" in str(error)


def test_nested_int_map_keys_are_garbage() -> None:
    data = msgpack.packb({**wire(RunOrder), "params": {1: "x"}})
    assert refused(data).reason == "garbage"


def test_bytes_map_keys_are_unknown_fields() -> None:
    data = wire(ManualRunRequest)
    data[b"service"] = data.pop("service")  # type: ignore[index]
    error = refused(data)
    assert error.reason == "unknown_field"
    assert "b'service'" in str(error)


def test_msgpack_timestamp_is_not_a_time() -> None:
    data = wire(ManualRunRequest, requested_at=msgpack.Timestamp(1_700_000_000, 0))
    error = refused(msgpack.packb(data, datetime=False))
    assert error.reason == "wrong_type" and error.field == "requested_at"


def test_oversized_input_is_refused_before_parsing() -> None:
    error = refused(b"\xc1" * (MAX_MESSAGE_BYTES + 1))
    assert error.reason == "oversized"
    assert str(MAX_MESSAGE_BYTES) in str(error)


def test_message_at_the_size_limit_is_accepted() -> None:
    base = len(encode(build(DeadLetter, detail="")))
    padded = build(DeadLetter, detail="d" * (MAX_MESSAGE_BYTES - base - 4))
    data = encode(padded)
    assert len(data) == MAX_MESSAGE_BYTES
    assert decode(data) == padded


def test_encode_refuses_oversized_messages() -> None:
    msg = build(RunOrder, callable=None, command=["x" * 1000] * 1100)
    with pytest.raises(ProtocolError) as caught:
        encode(msg)
    assert caught.value.reason == "oversized"
    assert "RunOrder: encodes to" in str(caught.value)


def test_missing_version() -> None:
    data = wire(RunOrder)
    del data["v"]
    error = refused(data)
    assert (error.reason, error.field, str(error)) == ("missing_field", "v", "message.v: missing")


@pytest.mark.parametrize("version", ["1", 1.0, True, None, [1]])
def test_version_of_wrong_type(version: Any) -> None:
    error = refused(wire(RunOrder, v=version))
    assert (error.reason, error.field) == ("wrong_type", "v")
    assert str(error).startswith("message.v: expected int, got")


@pytest.mark.parametrize("version", [0, 3, -1, 2**64 - 1])
def test_unknown_version(version: int) -> None:
    error = refused(wire(RunOrder, v=version))
    assert (error.reason, error.field) == ("unknown_version", "v")
    assert f"unsupported schema version {version}" in str(error)


def test_missing_type() -> None:
    data = wire(RunOrder)
    del data["t"]
    error = refused(data)
    assert (error.reason, error.field) == ("missing_field", "t")


@pytest.mark.parametrize("name", [5, None, b"RunOrder", ["RunOrder"]])
def test_type_of_wrong_type(name: Any) -> None:
    error = refused(wire(RunOrder, t=name))
    assert (error.reason, error.field) == ("wrong_type", "t")


@pytest.mark.parametrize("name", ["Nope", "runorder", "", "Message", "__init__"])
def test_unknown_type(name: str) -> None:
    error = refused(wire(RunOrder, t=name))
    assert (error.reason, error.field) == ("unknown_type", "t")


def test_unknown_field_is_refused() -> None:
    error = refused(wire(RunOrder, priority=3))
    assert (error.reason, error.field) == ("unknown_field", "priority")
    assert str(error) == "RunOrder.priority: unknown field"


def test_several_unknown_fields_are_counted() -> None:
    error = refused(wire(RunOrder, a=1, b=2))
    assert error.field == "a" and "(and 1 more)" in str(error)


@pytest.mark.parametrize("cls", ALL_TYPES, ids=lambda c: c.__name__)
def test_every_missing_field_is_refused(cls: type[Message]) -> None:
    for name in cls.fields_at(SCHEMA_VERSION):
        if name in cls._ADDED:
            continue
        data = wire(cls)
        del data[name]
        error = refused(data)
        assert (error.reason, error.field) == ("missing_field", name)
        assert str(error) == f"{cls.__name__}.{name}: missing"


@pytest.mark.parametrize("cls", [RunRecord, LedgerRun], ids=lambda c: c.__name__)
def test_a_message_written_before_placement_existed_decodes(cls: type[Message]) -> None:
    data = wire(cls, placement="ranking node-health: best-ranked eligible node #1 of n1")
    assert decode(msgpack.packb(data)).placement.startswith("ranking node-health")  # type: ignore[attr-defined]
    del data["placement"]
    assert decode(msgpack.packb(data)).placement is None  # type: ignore[attr-defined]


def test_a_ranking_update_move_names_its_stat_and_positions() -> None:
    error = refused(wire(RankingUpdate, moved=[{"stat_id": "a", "before": -1, "after": 0}]))
    assert error.field == "moved" and "moved[0]" in str(error)
    assert refused(wire(RankingUpdate, moved=[{"stat_id": "a"}])).field == "moved"
    assert refused(wire(RankingAlert, state="loud")).field == "state"


def test_optional_fields_must_still_be_on_the_wire() -> None:
    data = wire(RunEvent)
    del data["reason"]
    assert refused(data).reason == "missing_field"


def test_decode_as_checks_the_type() -> None:
    data = encode(build(RunEvent))
    with pytest.raises(ProtocolError) as caught:
        decode_as(data, RunOrder)
    assert caught.value.reason == "unexpected_type"
    assert str(caught.value) == "message.t: expected RunOrder, got RunEvent"


def test_decode_as_still_validates() -> None:
    with pytest.raises(ProtocolError) as caught:
        decode_as(msgpack.packb(wire(RunOrder, epoch="x")), RunOrder)
    assert caught.value.reason == "wrong_type"


@pytest.mark.parametrize("data", ["text", None, 5, [1]])
def test_decode_refuses_non_bytes(data: Any) -> None:
    with pytest.raises(ProtocolError) as caught:
        decode(data)
    assert caught.value.reason == "wrong_type"
    assert str(caught.value).startswith("message: expected bytes")


def test_encode_refuses_non_messages() -> None:
    with pytest.raises(TypeError):
        encode({"t": "RunOrder"})  # type: ignore[arg-type]


# --- errors ---------------------------------------------------------------------------------


def test_protocol_error_is_a_value_error_with_a_reason() -> None:
    error = ProtocolError("bad_value", "RunOrder.epoch: must be >= 0", field="epoch")
    assert isinstance(error, ValueError)
    assert (error.reason, error.field, str(error)) == (
        "bad_value",
        "epoch",
        "RunOrder.epoch: must be >= 0",
    )
    copy = pickle.loads(pickle.dumps(error))
    assert (copy.reason, copy.field, str(copy)) == (error.reason, error.field, str(error))


def test_protocol_error_reasons_are_fixed() -> None:
    assert {
        "garbage",
        "missing_field",
        "wrong_type",
        "unknown_version",
        "unknown_type",
        "oversized",
        "bad_value",
        "unknown_field",
        "unexpected_type",
    } == REASONS
    with pytest.raises(ValueError):
        ProtocolError("whatever", "x")


def test_error_messages_do_not_echo_huge_values() -> None:
    with pytest.raises(ProtocolError) as caught:
        build(RunOrder, trigger="x" * 100_000)
    assert len(str(caught.value)) < 200


# --- RunRecord ------------------------------------------------------------------------------


@pytest.mark.parametrize("state", ["queued", "succeeded", "timed_out", "missed"])
def test_routing_key(state: str) -> None:
    assert build(RunRecord, state=state).routing_key == f"run.{state}"


def test_json_dict_renders_times_in_utc_by_default() -> None:
    record = build(RunRecord)
    out = record.to_json_dict()
    assert out["slot"] == "2023-11-14T22:13:20+00:00"
    assert out["finished_at"] == "2023-11-14T22:13:50.500000+00:00"
    assert out["epoch"] == 5 and out["run_groups"] == ["db"]
    assert json.loads(json.dumps(out)) == out


def test_json_dict_renders_times_in_the_given_zone() -> None:
    out = build(RunRecord).to_json_dict(timezone(timedelta(hours=2)))
    assert out["slot"] == "2023-11-15T00:13:20+02:00"


def test_json_dict_keeps_missing_times_none() -> None:
    out = build(RunRecord, started_at=None, finished_at=None).to_json_dict()
    assert out["started_at"] is None and out["finished_at"] is None


def test_json_dict_does_not_share_run_groups() -> None:
    record = build(RunRecord)
    record.to_json_dict()["run_groups"].append("x")
    assert record.run_groups == ["db"]


def test_json_dict_round_trips() -> None:
    record = build(RunRecord)
    zone = timezone(timedelta(hours=-5))
    assert RunRecord.from_json_dict(record.to_json_dict(zone)) == record
    assert RunRecord.from_json_dict(json.loads(json.dumps(record.to_json_dict()))) == record


def test_latest_time_renders_in_any_zone() -> None:
    record = build(RunRecord, finished_at=MAX_TIME)
    assert record.to_json_dict(timezone(timedelta(hours=23, minutes=59)))["finished_at"]
    assert record.to_json_dict(timezone(timedelta(hours=-23)))["finished_at"]


@pytest.mark.parametrize(
    ("value", "fragment"),
    [("yesterday", "not an ISO 8601 time"), ("2023-11-14T22:13:20", "lacks a UTC offset")],
)
def test_json_dict_with_bad_times_is_refused(value: str, fragment: str) -> None:
    data = build(RunRecord).to_json_dict()
    data["started_at"] = value
    with pytest.raises(ProtocolError, match=fragment) as caught:
        RunRecord.from_json_dict(data)
    assert caught.value.field == "started_at"


def test_json_dict_must_be_a_mapping() -> None:
    with pytest.raises(ProtocolError):
        RunRecord.from_json_dict([])  # type: ignore[arg-type]


def test_json_dict_is_strict_about_fields() -> None:
    data = build(RunRecord).to_json_dict()
    data["extra"] = 1
    with pytest.raises(ProtocolError, match="unknown field"):
        RunRecord.from_json_dict(data)


# --- dead letters ---------------------------------------------------------------------------


def test_dead_letter_names_the_error() -> None:
    body = b"\xc1"
    with pytest.raises(ProtocolError) as caught:
        decode(body)
    letter = DeadLetter(original=body, reason=caught.value.reason, detail=str(caught.value),
                        source="rota.orders.node-1", at=T0)
    assert letter.reason == "garbage" and letter.detail == str(caught.value)
    assert decode_as(encode(letter), DeadLetter) == letter


def test_dead_letter_of_an_oversized_message_fits() -> None:
    body = b"\x00" * (MAX_MESSAGE_BYTES + 1)
    with pytest.raises(ProtocolError) as caught:
        decode(body)
    letter = DeadLetter(original=body, reason=caught.value.reason, detail=str(caught.value),
                        source="q", at=T0)
    assert len(encode(letter)) < MAX_DEAD_LETTER_BYTES + 1024


# --- run ids --------------------------------------------------------------------------------


def test_run_id_is_deterministic_and_readable() -> None:
    run_id = run_id_for("backup-db", T0, "node-1")
    assert run_id == run_id_for("backup-db", T0, "node-1", 1)
    assert run_id.startswith("backup-db-20231114T221320Z-")
    assert len(run_id.rsplit("-", 1)[1]) == 16


def test_run_id_accepts_an_int_slot_as_the_same_time() -> None:
    assert run_id_for("s", 1_700_000_000, None) == run_id_for("s", 1_700_000_000.0, None)


def test_run_id_differs_for_every_part() -> None:
    ids = {
        run_id_for("backup-db", T0, "node-1"),
        run_id_for("backup-dc", T0, "node-1"),
        run_id_for("backup-db", T0 + 0.001, "node-1"),
        run_id_for("backup-db", T0, "node-2"),
        run_id_for("backup-db", T0, None),
        run_id_for("backup-db", T0, "node-1", 2),
    }
    assert len(ids) == 6


def test_run_id_slug_is_safe() -> None:
    assert run_id_for("Nightly Backup / DB!", T0, None).startswith("nightly-backup-db-2023")
    assert run_id_for("日本", T0, None).startswith("run-2023")
    assert len(run_id_for("x" * 500, T0, None)) <= 32 + 1 + 16 + 1 + 16


def test_run_id_is_a_valid_run_id() -> None:
    run_id = run_id_for("Nightly Backup", T0, "node-1", 3)
    assert build(RunOrder, run_id=run_id).run_id == run_id


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (("", T0, None), "run_id_for.service: must not be empty"),
        (("s", NAN, None), "run_id_for.slot: must be finite"),
        (("s", "now", None), "run_id_for.slot: expected float"),
        (("s", T0, ""), "run_id_for.node: must not be empty"),
        (("s", T0, None, 0), "run_id_for.attempt: must be >= 1"),
    ],
)
def test_run_id_refuses_bad_parts(args: tuple[Any, ...], fragment: str) -> None:
    with pytest.raises(ProtocolError, match=fragment.replace(".", r"\.")):
        run_id_for(*args)
