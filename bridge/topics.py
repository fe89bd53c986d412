"""The MQTT topic namespace of docs/iot.md: `mgv1/<site>/<TYPE>/<id>`, like Sparkplug B.

Putting the message type in the topic (not only in the payload) is what lets the broker's ACL
say "this device may publish only its own DDATA, DBIRTH, DDEATH and DACK", and what lets the
bridge subscribe to exactly the traffic it handles.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from enum import StrEnum

from bridge.errors import TopicError

NAMESPACE = "mgv1"
#: Site and device ids: what fits in a topic level, a mosquitto user name and a file name.
ID_PATTERN = r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}"
_ID = re.compile(ID_PATTERN)


class MessageType(StrEnum):
    """Who publishes each type is part of the convention (and of the broker's ACL)."""

    NBIRTH = "NBIRTH"
    """Bridge -> all: the bridge is online (its session's bd_seq)."""
    NDEATH = "NDEATH"
    """Bridge last will: the bridge went away; devices hold their safe defaults."""
    DBIRTH = "DBIRTH"
    """Device -> bridge: online, with its kind, key address and ratings."""
    DDEATH = "DDEATH"
    """Device last will (or clean goodbye)."""
    DDATA = "DDATA"
    """Device -> bridge: telemetry, with a signed energy reading."""
    DCMD = "DCMD"
    """Bridge -> device: a command with an id and an expiry."""
    DACK = "DACK"
    """Device -> bridge: accepted / applied / rejected for a command id."""
    DREVENT = "DREVENT"
    """Bridge -> consumer: a demand-response event (start, target, incentive, end)."""


DEVICE_PUBLISHES = (MessageType.DBIRTH, MessageType.DDEATH, MessageType.DDATA, MessageType.DACK)
BRIDGE_PUBLISHES = (
    MessageType.NBIRTH,
    MessageType.NDEATH,
    MessageType.DCMD,
    MessageType.DREVENT,
)


@dataclass(frozen=True)
class Topic:
    """A parsed topic."""

    site: str
    message_type: MessageType
    entity: str
    """A device id, or the bridge's node id for NBIRTH/NDEATH."""

    def __str__(self) -> str:
        return f"{NAMESPACE}/{self.site}/{self.message_type.value}/{self.entity}"


def topic(site: str, message_type: MessageType, entity: str) -> str:
    """The topic string; ids are checked so nothing publishes where no ACL can reach."""
    for name, value in (("site", site), ("id", entity)):
        if not _ID.fullmatch(value):
            raise TopicError(f"topic {name}: expected {ID_PATTERN}, got {value!r}")
    return f"{NAMESPACE}/{site}/{message_type.value}/{entity}"


@functools.lru_cache(maxsize=65_536)
def parse_topic(text: str) -> Topic:
    """Parse `mgv1/<site>/<TYPE>/<id>`; a bad part raises TopicError naming it.

    Cached: a site's devices publish on the same few topics every slot, and the bridge parses
    one per message (a `Topic` is frozen, so sharing it is safe; a refusal is not cached)."""
    parts = text.split("/")
    if len(parts) != 4:
        raise TopicError(f"topic: expected 4 levels mgv1/<site>/<TYPE>/<id>, got {text!r}")
    ns, site, kind, entity = parts
    if ns != NAMESPACE:
        raise TopicError(f"topic namespace: expected {NAMESPACE!r}, got {ns!r}")
    if not _ID.fullmatch(site):
        raise TopicError(f"topic site: expected {ID_PATTERN}, got {site!r}")
    try:
        message_type = MessageType(kind)
    except ValueError:
        allowed = ", ".join(m.value for m in MessageType)
        raise TopicError(f"topic type: expected one of {allowed}, got {kind!r}") from None
    if not _ID.fullmatch(entity):
        raise TopicError(f"topic id: expected {ID_PATTERN}, got {entity!r}")
    return Topic(site, message_type, entity)


def bridge_subscriptions(site: str) -> list[str]:
    """What the bridge subscribes to: every device-published type of its site."""
    return [f"{NAMESPACE}/{site}/{t.value}/+" for t in DEVICE_PUBLISHES]


def device_subscriptions(site: str, device: str, bridge_node: str) -> list[str]:
    """What a device subscribes to: its own commands and DR events, and the bridge's state."""
    return [
        topic(site, MessageType.DCMD, device),
        topic(site, MessageType.DREVENT, device),
        topic(site, MessageType.NBIRTH, bridge_node),
        topic(site, MessageType.NDEATH, bridge_node),
    ]
