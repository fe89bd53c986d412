"""The CoAP face of docs/iot.md: which resource carries which MQTT message, and back.

A constrained device speaks CoAP (RFC 7252) instead of MQTT, but it sends the *same* JSON
payloads, signed the same way, so the bridge validates them with the same code and counts every
refusal by the same reasons. This module is the whole mapping, sans I/O, so it is tested without
a socket: a device's resources live under ``/mgv1/<site>/<id>/``, each the twin of one topic:

| resource | MQTT twin | methods | what it holds |
|---|---|---|---|
| ``birth`` | ``DBIRTH`` | GET, Observe | the current session's birth certificate |
| ``death`` | ``DDEATH`` | GET, Observe | the last session's goodbye (empty while none) |
| ``data`` | ``DDATA`` | GET, Observe | the telemetry of the slot that just ended |
| ``cmd`` | ``DCMD`` -> ``DACK`` | POST | a command in; the device's acknowledgement out |
| ``dr`` | ``DREVENT`` | PUT | the consumer's current demand-response event |
| ``log`` | ``DDATA`` | GET ``?after=N`` | the signed telemetry with a reading nonce above N |

Observe (RFC 7641) transfers *state*, not events: a re-registered observation delivers the
current representation again. The bridge's shell drops a representation identical to the last
one it handed on (the same bytes are the same message), so only a new message reaches the
validator, where a replayed old one is still refused as `replayed`.

Observe cannot queue what the bridge missed while it was away, as a broker does, and a reading
missed is one the chain never gets. So a device keeps its recent signed
telemetry in ``log``: ``GET log?after=N`` answers every DDATA whose reading nonce is above N,
oldest first, one JSON object per line (the bytes as first sent). The bridge asks for it with
the last nonce it holds each time it (re-)registers its observation of ``data``, and the
validator relays those readings as it relays stale MQTT telemetry.

A command's answer is the exchange itself: the device acknowledges the confirmable POST
(`accepted`) and its response carries the DACK with the final `applied` or `rejected` (2.04
Changed, or 4.03 Forbidden for a refusal), or a new DBIRTH for `rebirth` (2.01 Created). A
device that cannot parse the command answers 4.00 Bad Request, as an MQTT device ignores it; one
that is not up (before its birth, after its goodbye) answers 5.03 Service Unavailable. A
request that is not protected by the device's own OSCORE context gets 4.01 Unauthorized
(`bridge.oscore`).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum
from urllib.parse import urlsplit

from bridge.errors import ConfigError, TopicError
from bridge.messages import AckStatus
from bridge.topics import NAMESPACE, MessageType, parse_topic, topic

#: application/json (RFC 7252 section 12.3): every payload, both ways.
CONTENT_FORMAT_JSON = 50
DEFAULT_PORT = 5683

# CoAP response codes as (class, detail) pairs, spelled like the RFC (c.dd), so this module needs
# no aiocoap import; the shells convert with `code_number`.
CONTENT = (2, 5)
CHANGED = (2, 4)
CREATED = (2, 1)
BAD_REQUEST = (4, 0)
UNAUTHORIZED = (4, 1)
FORBIDDEN = (4, 3)
UNSUPPORTED_CONTENT_FORMAT = (4, 15)
SERVICE_UNAVAILABLE = (5, 3)


def code_number(code: tuple[int, int]) -> int:
    """A (class, detail) code as the 8-bit number on the wire (2.05 -> 69)."""
    return code[0] << 5 | code[1]


def code_text(number: int) -> str:
    """The wire number as the RFC writes it (69 -> "2.05")."""
    return f"{number >> 5}.{number & 31:02d}"


class Resource(StrEnum):
    """The last path segment of a device resource."""

    BIRTH = "birth"
    DEATH = "death"
    DATA = "data"
    CMD = "cmd"
    DR = "dr"
    LOG = "log"


#: Resources the bridge observes, and the message type each notification is.
OBSERVED: dict[Resource, MessageType] = {
    Resource.BIRTH: MessageType.DBIRTH,
    Resource.DEATH: MessageType.DDEATH,
    Resource.DATA: MessageType.DDATA,
}
#: What the bridge sends to a device, and how: (resource, method).
SENT: dict[MessageType, tuple[Resource, str]] = {
    MessageType.DCMD: (Resource.CMD, "POST"),
    MessageType.DREVENT: (Resource.DR, "PUT"),
}


def resource_path(site: str, device: str, resource: Resource) -> tuple[str, ...]:
    """Uri-Path segments of one device resource; ids are checked as topic ids are."""
    topic(site, MessageType.DDATA, device)  # raises TopicError naming a bad id
    return (NAMESPACE, site, device, resource.value)


def parse_path(segments: Iterable[str]) -> tuple[str, str, Resource]:
    """(site, device, resource) of a Uri-Path; a bad part raises TopicError naming it."""
    parts = tuple(segments)
    if len(parts) != 4 or parts[0] != NAMESPACE:
        raise TopicError(f"coap path: expected /{NAMESPACE}/<site>/<id>/<resource>, got {parts!r}")
    _, site, device, name = parts
    try:
        resource = Resource(name)
    except ValueError:
        allowed = ", ".join(r.value for r in Resource)
        raise TopicError(f"coap resource: expected one of {allowed}, got {name!r}") from None
    topic(site, MessageType.DDATA, device)
    return site, device, resource


def notification_topic(site: str, device: str, resource: Resource) -> str:
    """The MQTT topic a notification of an observed resource stands for (what the core parses)."""
    return topic(site, OBSERVED[resource], device)


def outgoing(topic_text: str) -> tuple[str, Resource, str] | None:
    """(device, resource, method) for a bridge publish to a CoAP device; None: not for CoAP.

    NBIRTH/NDEATH have no CoAP twin: a CoAP device learns of the bridge from its commands.
    """
    try:
        t = parse_topic(topic_text)
    except TopicError:
        return None
    route = SENT.get(t.message_type)
    if route is None:
        return None
    return t.entity, route[0], route[1]


def response_topic(site: str, device: str, code: int) -> str | None:
    """The message a command's response payload is: a DACK, a DBIRTH (rebirth), or none."""
    if code in (code_number(CHANGED), code_number(FORBIDDEN)):
        return topic(site, MessageType.DACK, device)
    if code == code_number(CREATED):
        return topic(site, MessageType.DBIRTH, device)
    return None


def log_query(after: int) -> str:
    """The Uri-Query of a backlog request: telemetry with a reading nonce above `after`."""
    return f"after={after}"


def parse_log_query(queries: Iterable[str]) -> int:
    """`after` of a backlog request (-1: everything kept); a ValueError names what was wrong."""
    for q in queries:
        name, _, value = q.partition("=")
        if name == "after":
            try:
                return int(value)
            except ValueError:
                raise ValueError(f"after: expected an integer nonce, got {value!r}") from None
    return -1


def split_log(payload: bytes) -> list[bytes]:
    """The DDATA payloads of a backlog response, oldest first (compact JSON has no newline)."""
    return [line for line in payload.split(b"\n") if line.strip()]


def ack_code(status: AckStatus) -> tuple[int, int]:
    """The response code a device answers a command with, for the DACK it carries."""
    return FORBIDDEN if status is AckStatus.REJECTED else CHANGED


@dataclass(frozen=True)
class Endpoint:
    """Where one CoAP device answers."""

    host: str
    port: int

    @property
    def base(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"coap://{host}:{self.port}"

    def uri(self, site: str, device: str, resource: Resource) -> str:
        return self.base + "/" + "/".join(resource_path(site, device, resource))


def parse_endpoint(url: str) -> Endpoint:
    """`coap://HOST[:PORT]` (5683 by default); a ValueError says what was expected."""
    parts = urlsplit(url)
    if parts.scheme != "coap" or not parts.hostname or parts.path not in ("", "/"):
        raise ValueError(f"expected coap://HOST:PORT, got {url!r}")
    try:
        port = parts.port or DEFAULT_PORT
    except ValueError:
        raise ValueError(f"expected a port 1..65535 in coap://HOST:PORT, got {url!r}") from None
    return Endpoint(parts.hostname, port)


def match_devices(
    patterns: dict[str, str], device_ids: Iterable[str], field: str = "coap.endpoints"
) -> dict[str, Endpoint]:
    """Device id -> endpoint, from a mapping of ids or globs (``bus6-*``) to ``coap://`` URLs.

    Every key must name at least one device of the site, so a typo is an error, not a device
    silently left on MQTT; a device matched by two keys takes the first.
    """
    ids = list(device_ids)
    out: dict[str, Endpoint] = {}
    for pattern, url in patterns.items():
        try:
            endpoint = parse_endpoint(url)
        except ValueError as exc:
            raise ConfigError(f"{field}.{pattern}: {exc}") from None
        matched = fnmatch.filter(ids, pattern)
        if not matched:
            raise ConfigError(
                f"{field}.{pattern}: expected a device id (or glob) of the site, matched none"
            )
        for device in matched:
            out.setdefault(device, endpoint)
    return out
