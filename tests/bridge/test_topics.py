"""Topic namespace: build, parse, and the refusals that keep publishers inside the ACL."""

from __future__ import annotations

import pytest

from bridge.errors import TopicError
from bridge.topics import (
    MessageType,
    bridge_subscriptions,
    device_subscriptions,
    parse_topic,
    topic,
)


def test_build_and_parse_round_trip() -> None:
    text = topic("site1", MessageType.DDATA, "bus6-meter")
    assert text == "mgv1/site1/DDATA/bus6-meter"
    parsed = parse_topic(text)
    assert (parsed.site, parsed.message_type, parsed.entity) == (
        "site1",
        MessageType.DDATA,
        "bus6-meter",
    )
    assert str(parsed) == text


@pytest.mark.parametrize(
    ("text", "part"),
    [
        ("mgv1/site1/DDATA", "4 levels"),
        ("spBv1.0/site1/DDATA/m1", "namespace"),
        ("mgv1/site1/DATA/m1", "type: expected one of NBIRTH"),
        ("mgv1/site1/DDATA/+", "topic id"),
        ("mgv1/#/DDATA/m1", "topic site"),
    ],
)
def test_bad_topics_name_the_part(text: str, part: str) -> None:
    with pytest.raises(TopicError, match=part):
        parse_topic(text)


def test_wildcards_cannot_be_published_to() -> None:
    with pytest.raises(TopicError, match="id"):
        topic("site1", MessageType.DCMD, "#")


def test_subscriptions() -> None:
    assert bridge_subscriptions("s") == [
        "mgv1/s/DBIRTH/+",
        "mgv1/s/DDEATH/+",
        "mgv1/s/DDATA/+",
        "mgv1/s/DACK/+",
    ]
    assert device_subscriptions("s", "m1", "bridge")[:2] == ["mgv1/s/DCMD/m1", "mgv1/s/DREVENT/m1"]
