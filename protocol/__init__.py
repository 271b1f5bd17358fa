"""Rota's wire protocol: every message, its msgpack encoding and its strict validation.

Senders build a message dataclass and `encode` it; receivers `decode` (or `decode_as` a
given type) and get either a valid message or a `ProtocolError` with a short `reason`.
"""

from protocol.codec import (
    LATEST_VERSION,
    MAX_MESSAGE_BYTES,
    SCHEMA_VERSION,
    SUPPORTED_VERSIONS,
    decode,
    decode_as,
    encode,
)
from protocol.errors import REASONS, ProtocolError
from protocol.messages import (
    DAEMON_ACTIONS,
    EVENT_STATES,
    MAX_DEAD_LETTER_BYTES,
    MAX_ERROR_CHARS,
    MAX_OUTPUT_TAIL_CHARS,
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
    ParamValue,
    RunEvent,
    RunOrder,
    RunRecord,
    ServiceUpdate,
    run_id_for,
)

__all__ = [
    "DAEMON_ACTIONS",
    "EVENT_STATES",
    "LATEST_VERSION",
    "MAX_DEAD_LETTER_BYTES",
    "MAX_ERROR_CHARS",
    "MAX_MESSAGE_BYTES",
    "MAX_OUTPUT_TAIL_CHARS",
    "MAX_TIME",
    "MESSAGE_TYPES",
    "ORDER_TRIGGERS",
    "REASONS",
    "RECORD_TRIGGERS",
    "RUN_STATES",
    "SCHEMA_VERSION",
    "SUPPORTED_VERSIONS",
    "DaemonControl",
    "DeadLetter",
    "LedgerRun",
    "ManualRunRequest",
    "Message",
    "NodeAnnouncement",
    "ParamValue",
    "ProtocolError",
    "RunEvent",
    "RunOrder",
    "RunRecord",
    "ServiceUpdate",
    "decode",
    "decode_as",
    "encode",
    "run_id_for",
]
