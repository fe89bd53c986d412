"""The bridge's branch of the project's one error family (`envs.errors.MicrogridError`).

Operators catch `BridgeError` for anything the bridge refused on purpose; the subclasses say
which door refused it. Every message names the field and what was expected, so a log line is
enough to fix a device's firmware or a config file.
"""

from __future__ import annotations

from envs.errors import MicrogridError


class BridgeError(MicrogridError):
    """Base class of every error the bridge raises on purpose."""


class PayloadError(BridgeError, ValueError):
    """An MQTT payload is not what docs/iot.md specifies; names the field and expected value."""

    def __init__(self, message_type: str, field: str, expected: str, got: object) -> None:
        self.message_type = message_type
        self.field = field
        self.expected = expected
        self.got = got
        shown = repr(got)
        if len(shown) > 80:
            shown = shown[:77] + "..."
        super().__init__(f"{message_type}.{field}: expected {expected}, got {shown}")


class TopicError(BridgeError, ValueError):
    """A topic does not follow `mgv1/<site>/<TYPE>/<id>`; names the part and what was allowed."""


class ConfigError(BridgeError, ValueError):
    """A bridge or site file is invalid; the message names the field and allowed values."""


class OutboxError(BridgeError):
    """The durable outbox cannot make progress (a permanent chain refusal or a corrupt store)."""
