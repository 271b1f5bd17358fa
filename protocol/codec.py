"""msgpack encoding of messages: a map of ``t`` (type name), ``v`` (schema version), fields."""

from __future__ import annotations

from typing import Any, Final, TypeVar, cast

import msgpack

from protocol.errors import (
    BAD_VALUE,
    GARBAGE,
    MISSING_FIELD,
    OVERSIZED,
    UNEXPECTED_TYPE,
    UNKNOWN_TYPE,
    UNKNOWN_VERSION,
    WRONG_TYPE,
    ProtocolError,
)
from protocol.messages import MESSAGE_TYPES, Message

SCHEMA_VERSION: Final = 1
"""The version of every message that sets no field added later (`Message.SINCE`)."""
LATEST_VERSION: Final = 2
"""2 added `RunOrder.start_at` (orders sent ahead of their slot)."""
SUPPORTED_VERSIONS: Final = frozenset(range(SCHEMA_VERSION, LATEST_VERSION + 1))
MAX_MESSAGE_BYTES: Final = 1024 * 1024

_M = TypeVar("_M", bound=Message)
_MISSING: Any = object()


def encode(msg: Message) -> bytes:
    """The wire bytes of `msg`; raises `ProtocolError` ("oversized") above the size limit."""
    cls = type(msg)
    if MESSAGE_TYPES.get(cls.__name__) is not cls:
        raise TypeError(f"expected a protocol message, got {cls.__name__}")
    if cls.SINCE:
        version = msg.schema_version()
        wire: dict[str, Any] = {"t": cls.__name__, "v": version}
        wire.update((k, v) for k, v in zip(cls.FIELDS, cls._values(msg), strict=True)
                    if cls.SINCE.get(k, 1) <= version)
    else:
        wire = {"t": cls.__name__, "v": SCHEMA_VERSION}
        wire.update(zip(cls.FIELDS, cls._values(msg), strict=True))
    try:
        data: bytes = msgpack.packb(wire, use_bin_type=True)
    except (TypeError, ValueError, OverflowError) as exc:
        raise ProtocolError(BAD_VALUE, f"{cls.__name__}: cannot be encoded ({exc})") from exc
    if len(data) > MAX_MESSAGE_BYTES:
        raise ProtocolError(
            OVERSIZED,
            f"{cls.__name__}: encodes to {len(data)} bytes, limit is {MAX_MESSAGE_BYTES}",
        )
    return data


def decode(data: bytes | bytearray | memoryview) -> Message:
    """The message in `data`, of whatever type it says it is.

    Raises `ProtocolError` for anything that is not a valid message of a known type and
    supported version; no other exception escapes for any input bytes.
    """
    return _decode(data, None)


def decode_as(data: bytes | bytearray | memoryview, cls: type[_M]) -> _M:
    """Like `decode`, but the message must be a `cls` ("unexpected_type" otherwise)."""
    return cast(_M, _decode(data, cls))


def _reject_extension(code: int, payload: bytes) -> Any:
    raise ProtocolError(GARBAGE, f"message: msgpack extension type {code} is not allowed")


def _decode(data: Any, expected: type[Message] | None) -> Message:
    if not isinstance(data, bytes | bytearray | memoryview):
        raise ProtocolError(WRONG_TYPE, f"message: expected bytes, got {type(data).__name__}")
    size = data.nbytes if isinstance(data, memoryview) else len(data)
    if size > MAX_MESSAGE_BYTES:
        raise ProtocolError(OVERSIZED, f"message: {size} bytes, limit is {MAX_MESSAGE_BYTES}")
    try:
        wire = msgpack.unpackb(
            data, raw=False, strict_map_key=True, ext_hook=_reject_extension, use_list=True
        )
    except ProtocolError:
        raise
    except Exception as exc:
        raise ProtocolError(
            GARBAGE, f"message: not valid msgpack ({type(exc).__name__}: {exc})"
        ) from exc
    if type(wire) is not dict:
        raise ProtocolError(
            GARBAGE, f"message: expected a map at the top, got {type(wire).__name__}"
        )
    return from_wire(wire, expected)


def from_wire(wire: dict[Any, Any], expected: type[Message] | None = None,
              where: str = "message") -> Message:
    """The message in an already unpacked wire map (which this consumes); `where` names it
    in errors (a record inside a batch: ``records[3]``)."""
    if type(wire) is not dict:
        raise ProtocolError(WRONG_TYPE, f"{where}: expected a map, got {type(wire).__name__}")
    version = wire.pop("v", _MISSING)
    if version is _MISSING:
        raise ProtocolError(MISSING_FIELD, f"{where}.v: missing", field="v")
    if type(version) is not int:
        raise ProtocolError(
            WRONG_TYPE, f"{where}.v: expected int, got {type(version).__name__}", field="v"
        )
    if version not in SUPPORTED_VERSIONS:
        supported = ", ".join(map(str, sorted(SUPPORTED_VERSIONS)))
        raise ProtocolError(
            UNKNOWN_VERSION,
            f"{where}.v: unsupported schema version {version} (supported: {supported})",
            field="v",
        )

    name = wire.pop("t", _MISSING)
    if name is _MISSING:
        raise ProtocolError(MISSING_FIELD, f"{where}.t: missing", field="t")
    if type(name) is not str:
        raise ProtocolError(
            WRONG_TYPE, f"{where}.t: expected str, got {type(name).__name__}", field="t"
        )
    cls = MESSAGE_TYPES.get(name)
    if cls is None:
        raise ProtocolError(
            UNKNOWN_TYPE, f"{where}.t: unknown message type {name[:60]!r}", field="t"
        )
    if expected is not None and cls is not expected:
        raise ProtocolError(
            UNEXPECTED_TYPE,
            f"{where}.t: expected {expected.__name__}, got {name}",
            field="t",
        )
    return cls.from_dict(wire, version)
