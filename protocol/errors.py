"""The single error type raised for anything wrong with a wire message."""

from __future__ import annotations

from typing import Final

GARBAGE: Final = "garbage"
OVERSIZED: Final = "oversized"
MISSING_FIELD: Final = "missing_field"
UNKNOWN_FIELD: Final = "unknown_field"
WRONG_TYPE: Final = "wrong_type"
BAD_VALUE: Final = "bad_value"
UNKNOWN_VERSION: Final = "unknown_version"
UNKNOWN_TYPE: Final = "unknown_type"
UNEXPECTED_TYPE: Final = "unexpected_type"

REASONS: Final[frozenset[str]] = frozenset(
    {
        GARBAGE,
        OVERSIZED,
        MISSING_FIELD,
        UNKNOWN_FIELD,
        WRONG_TYPE,
        BAD_VALUE,
        UNKNOWN_VERSION,
        UNKNOWN_TYPE,
        UNEXPECTED_TYPE,
    }
)


class ProtocolError(ValueError):
    """A message could not be encoded, decoded or constructed.

    `reason` is a short machine-readable code (one of `REASONS`), suitable for metrics
    labels and dead-letter records. `field` names the offending message field when there
    is one (`"t"` and `"v"` for the envelope). `str(error)` reads like
    ``"RunOrder.epoch: expected int, got str"``.
    """

    def __init__(self, reason: str, message: str, *, field: str | None = None) -> None:
        if reason not in REASONS:
            raise ValueError(f"unknown ProtocolError reason {reason!r}")
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.field = field

    def __reduce__(self) -> tuple[object, ...]:
        return (_rebuild, (self.reason, self.message, self.field))

    def __repr__(self) -> str:
        return f"ProtocolError({self.reason!r}, {self.message!r})"


def _rebuild(reason: str, message: str, field: str | None) -> ProtocolError:
    return ProtocolError(reason, message, field=field)
