"""The CoAP <-> MQTT mapping without a socket: paths, topics, response codes, endpoints, config."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from bridge.coap_resources import (
    CHANGED,
    CREATED,
    FORBIDDEN,
    Endpoint,
    Resource,
    ack_code,
    code_number,
    code_text,
    log_query,
    match_devices,
    notification_topic,
    outgoing,
    parse_endpoint,
    parse_log_query,
    parse_path,
    resource_path,
    response_topic,
    split_log,
)
from bridge.config import load_bridge_config
from bridge.errors import ConfigError, TopicError
from bridge.messages import AckStatus
from tests.bridge.services import REPO


def test_paths_round_trip_and_bad_parts_are_named() -> None:
    for r in Resource:
        path = resource_path("site1", "bus6-meter", r)
        assert path == ("mgv1", "site1", "bus6-meter", r.value)
        assert parse_path(path) == ("site1", "bus6-meter", r)
    with pytest.raises(TopicError, match="coap resource: expected one of birth"):
        parse_path(("mgv1", "site1", "bus6-meter", "DDATA"))
    with pytest.raises(TopicError, match="coap path"):
        parse_path(("other", "site1", "bus6-meter", "data"))
    with pytest.raises(TopicError, match="topic id"):
        resource_path("site1", "bus6/meter", Resource.DATA)


def test_observed_resources_stand_for_the_device_topics() -> None:
    assert notification_topic("s", "d1", Resource.BIRTH) == "mgv1/s/DBIRTH/d1"
    assert notification_topic("s", "d1", Resource.DEATH) == "mgv1/s/DDEATH/d1"
    assert notification_topic("s", "d1", Resource.DATA) == "mgv1/s/DDATA/d1"
    with pytest.raises(KeyError):
        notification_topic("s", "d1", Resource.CMD)  # not observed: a command is a request


def test_bridge_publishes_map_to_requests() -> None:
    assert outgoing("mgv1/s/DCMD/d1") == ("d1", Resource.CMD, "POST")
    assert outgoing("mgv1/s/DREVENT/d1") == ("d1", Resource.DR, "PUT")
    assert outgoing("mgv1/s/NBIRTH/bridge") is None  # no CoAP twin
    assert outgoing("not a topic") is None


def test_response_codes_carry_the_ack_model() -> None:
    assert code_number(CHANGED) == 68 and code_text(68) == "2.04"
    assert code_text(code_number(FORBIDDEN)) == "4.03"
    assert ack_code(AckStatus.APPLIED) == CHANGED and ack_code(AckStatus.REJECTED) == FORBIDDEN
    for status in (AckStatus.APPLIED, AckStatus.REJECTED):
        assert response_topic("s", "d1", code_number(ack_code(status))) == "mgv1/s/DACK/d1"
    assert response_topic("s", "d1", code_number(CREATED)) == "mgv1/s/DBIRTH/d1"
    assert response_topic("s", "d1", code_number((4, 0))) is None
    assert response_topic("s", "d1", code_number((5, 3))) is None


def test_backlog_query_and_lines() -> None:
    assert parse_log_query([log_query(41)]) == 41 and parse_log_query([]) == -1
    with pytest.raises(ValueError, match="after: expected an integer nonce"):
        parse_log_query(["after=x"])
    assert split_log(b'{"a":1}\n{"b":2}\n') == [b'{"a":1}', b'{"b":2}'] and split_log(b"") == []


def test_endpoints_parse_with_the_default_port() -> None:
    assert parse_endpoint("coap://127.0.0.1:5684") == Endpoint("127.0.0.1", 5684)
    assert parse_endpoint("coap://gw.local") == Endpoint("gw.local", 5683)
    e = parse_endpoint("coap://[::1]:6000")
    assert e.uri("s", "d1", Resource.DATA) == "coap://[::1]:6000/mgv1/s/d1/data"
    for bad in ("coaps://h:1", "http://h:1", "coap://h:1/path", "coap://h:99999", "coap://"):
        with pytest.raises(ValueError, match="coap://HOST:PORT"):
            parse_endpoint(bad)


def test_globs_pick_devices_and_a_typo_is_an_error() -> None:
    ids = ["bus1-meter", "bus1-pv", "bus2-meter", "feeder-sensor"]
    got = match_devices({"bus1-*": "coap://a:1", "bus1-meter": "coap://b:2"}, ids)
    assert got == {"bus1-meter": Endpoint("a", 1), "bus1-pv": Endpoint("a", 1)}
    with pytest.raises(ConfigError, match=r"coap.endpoints.bus9-\*: expected a device id"):
        match_devices({"bus9-*": "coap://a:1"}, ids)
    assert match_devices({}, ids) == {}


def test_bridge_config_names_the_bad_coap_field(tmp_path: Path) -> None:
    path = tmp_path / "b.yaml"
    coap = {"endpoints": {"bus1-*": "coap://127.0.0.1:5683"}, "oscore_dir": "oscore"}
    path.write_text(yaml.safe_dump({"coap": coap}))
    cfg = load_bridge_config(path)
    assert cfg.coap.endpoints == {"bus1-*": "coap://127.0.0.1:5683"}
    assert cfg.coap.request_timeout_s == 5.0
    for bad, field in (
        ({"endpoints": {"bus1-*": "mqtt://h:1"}}, "coap.endpoints: bus1-"),
        ({"endpoints": {"bus 1": "coap://h:1"}}, "coap.endpoints: expected a device id"),
        ({"retry_s": 0}, "coap.retry_s"),
        ({"timeout": 3}, "coap.timeout: no such field"),
    ):
        path.write_text(yaml.safe_dump({"coap": bad}))
        with pytest.raises(ConfigError, match=field):
            load_bridge_config(path)


def test_the_shipped_coap_example_config_loads() -> None:
    cfg = load_bridge_config(Path(__file__).resolve().parents[2] / "configs/bridge/local-coap.yaml")
    assert cfg.coap.endpoints == {"*-battery": "coap://127.0.0.1:5683"}
    assert cfg.coap.oscore_dir is not None and not cfg.coap.insecure
    assert cfg.coap.oscore_dir.resolve() == (REPO / ".bridge/oscore/bridge").resolve()
    shadow = cfg.model_copy(update={"dry_run": True}).coap_contexts()
    assert (
        shadow is not None
        and shadow.resolve() == (REPO / ".bridge/oscore/readers/shadow").resolve()
    )
