"""Payload models: the examples of docs/iot.md decode, and refusals name field and expectation."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from bridge.errors import PayloadError
from bridge.messages import (
    MAX_PAYLOAD_BYTES,
    Ack,
    AckStatus,
    BatteryMetrics,
    Command,
    DeviceBirth,
    DeviceDeath,
    DrEvent,
    NodeBirth,
    Telemetry,
    decode,
    encode,
)

DOC = Path(__file__).resolve().parents[2] / "docs" / "iot.md"

TELEMETRY = {
    "device": "bus6-battery",
    "bd_seq": 4,
    "seq": 17,
    "ts": 1_718_000_002_000,
    "slot": 1907,
    "metrics": {"kind": "battery", "soc": 0.5, "soh": 0.98, "power_kw": -2.0},
}


def _bytes(obj: object) -> bytes:
    return json.dumps(obj).encode()


def test_every_json_example_in_the_guide_decodes() -> None:
    """The guide is the operator's contract: its examples must be valid payloads."""
    blocks = re.findall(r"```json\n(.*?)```", DOC.read_text(), flags=re.S)
    models = {
        "kind": DeviceBirth,
        "metrics": Telemetry,
        "action": Command,
        "status": Ack,
        "event_id": DrEvent,
        "mode": NodeBirth,
    }
    decoded = []
    for block in blocks:
        obj = json.loads(block.replace("0x…65 bytes…", "0x" + "ab" * 65))
        model = next((m for key, m in models.items() if key in obj), DeviceDeath)
        if "event_id" in obj:
            model = DrEvent
        decoded.append(decode(model, _bytes(obj)))
    assert len(decoded) == len(blocks) >= 7
    assert {type(m) for m in decoded} >= {DeviceBirth, DeviceDeath, Telemetry, Command, Ack}


def test_round_trip_is_exact() -> None:
    message = decode(Telemetry, _bytes(TELEMETRY))
    assert isinstance(message.metrics, BatteryMetrics) and message.metrics.soc == 0.5
    assert decode(Telemetry, encode(message)) == message


@pytest.mark.parametrize(
    ("mutate", "field", "expected"),
    [
        (lambda d: d["metrics"].update(soc=1.3), "metrics.battery.soc", "a value <= 1.0"),
        (lambda d: d["metrics"].update(soc="0.5"), "metrics.battery.soc", "a number"),
        (lambda d: d.update(seq=-1), "seq", "a value >= 0"),
        (lambda d: d.update(device="a/b"), "device", "a string matching"),
        (lambda d: d.pop("ts"), "ts", "the field is required"),
        (lambda d: d.update(extra=1), "extra", "no such field"),
        (lambda d: d["metrics"].update(kind="toaster"), "metrics", "'kind' one of"),
        (lambda d: d.update(seq=1.5), "seq", "an integer"),
    ],
)
def test_refusals_name_the_field_and_the_expected_value(
    mutate: object, field: str, expected: str
) -> None:
    bad = json.loads(json.dumps(TELEMETRY))
    mutate(bad)  # type: ignore[operator]
    with pytest.raises(PayloadError) as err:
        decode(Telemetry, _bytes(bad))
    assert err.value.field == field
    assert expected in err.value.expected
    assert str(err.value).startswith(f"Telemetry.{field}: expected ")


@pytest.mark.parametrize("token", [b"NaN", b"Infinity", b"-Infinity"])
def test_non_finite_numbers_are_refused(token: bytes) -> None:
    raw = _bytes(TELEMETRY).replace(b"-2.0", token)
    with pytest.raises(PayloadError, match=r"metrics\.battery\.power_kw: expected a finite"):
        decode(Telemetry, raw)


@pytest.mark.parametrize("raw", [b"", b"{", b"[]", b"null", b"\xff\xfe", b'"text"'])
def test_non_objects_are_refused(raw: bytes) -> None:
    with pytest.raises(PayloadError) as err:
        decode(Telemetry, raw)
    assert err.value.field == "<payload>"


def test_oversized_payloads_are_refused_before_parsing() -> None:
    raw = b" " * (MAX_PAYLOAD_BYTES + 1)
    with pytest.raises(PayloadError, match=f"at most {MAX_PAYLOAD_BYTES} bytes"):
        decode(Telemetry, raw)


def test_birth_must_start_the_sequence_at_zero() -> None:
    birth = {
        "device": "m1",
        "kind": "meter",
        "address": "0x" + "11" * 20,
        "bd_seq": 0,
        "seq": 1,
        "ts": 0,
        "ratings": {"capacity_w": 4000},
    }
    with pytest.raises(PayloadError) as err:
        decode(DeviceBirth, _bytes(birth))
    assert err.value.field == "seq" and "0" in err.value.expected


def test_ack_status_values() -> None:
    ack = {"command_id": "c1", "device": "m1", "bd_seq": 0, "seq": 3, "ts": 0, "status": "done"}
    with pytest.raises(PayloadError, match="status: expected one of 'accepted', 'applied'"):
        decode(Ack, _bytes(ack))
    ack["status"] = "rejected"
    assert decode(Ack, _bytes(ack)).status is AckStatus.REJECTED
