"""Telemetry validation: each refusal reason on its own, and the state a refusal must not move."""

from __future__ import annotations

import json
from typing import Any

import pytest

from bridge.messages import Telemetry
from bridge.signing import ReadingDomain
from bridge.site import SiteManifest
from bridge.validation import Rejected, RejectReason, TelemetryValidator, ValidationLimits
from tests.bridge.helpers import GENESIS, NOW_MS, SLOT, birth, telemetry


def _b(msg: dict[str, Any]) -> bytes:
    return json.dumps(msg).encode()


@pytest.fixture
def validator(site: SiteManifest, domain: ReadingDomain) -> TelemetryValidator:
    v = TelemetryValidator(site, domain, ValidationLimits(genesis=GENESIS))
    for d in site.devices:
        assert not isinstance(v.on_birth(d.id, birth(site, d.id), NOW_MS), Rejected)
    return v


def _check(v: TelemetryValidator, device: str, msg: dict[str, Any]) -> Telemetry | Rejected:
    return v.on_telemetry(device, _b(msg), NOW_MS)


def test_a_valid_signed_meter_reading_is_accepted(
    validator: TelemetryValidator, site: SiteManifest, domain: ReadingDomain, keys: dict[str, bytes]
) -> None:
    msg = telemetry(site, domain, keys["bus1-meter"], "bus1-meter")
    out = _check(validator, "bus1-meter", msg)
    assert isinstance(out, Telemetry) and out.reading is not None
    assert (
        validator.last_nonce["bus1-meter"] == 0 and validator.sessions["bus1-meter"].last_seq == 1
    )
    assert sum(validator.rejected.values()) == 0


def _reason(out: object) -> RejectReason:
    assert isinstance(out, Rejected), out
    return out.reason


@pytest.mark.parametrize(
    ("change", "reason", "field"),
    [
        (lambda m, k, d: m.update(device="bus2-meter"), RejectReason.TOPIC_MISMATCH, "device"),
        (lambda m, k, d: m.update(metrics={**m["metrics"], "soc": 2}), RejectReason.MALFORMED, ""),
        # Out of session and without a reading (one with a valid reading is relayed: below).
        (lambda m, k, d: m.update(bd_seq=7, reading=None), RejectReason.NO_SESSION, "bd_seq"),
        (lambda m, k, d: m.update(seq=0), RejectReason.REPLAYED, "seq"),
        # Stale and without a valid reading: refused whole (the next case has a wrong reading).
        (lambda m, k, d: m.update(ts=NOW_MS - 121_000, reading=None), RejectReason.STALE, "ts"),
        # Ahead of time and without a valid reading: refused whole (a valid one is relayed).
        (lambda m, k, d: m.update(ts=NOW_MS + 6_000, reading=None), RejectReason.FUTURE, "ts"),
        (lambda m, k, d: m.update(slot=SLOT - 1), RejectReason.STALE, "slot"),
        (lambda m, k, d: m.update(slot=SLOT + 2), RejectReason.FUTURE, "slot"),
        (
            lambda m, k, d: m.update(metrics={"kind": "meter", "net_kw": 500.0, "load_kw": 1.0}),
            RejectReason.IMPLAUSIBLE,
            "metrics.net_kw",
        ),
        (  # beyond the meter's cap (a disagreement with net_kw alone is relayed: below)
            lambda m, k, d: m["reading"].update(energy_wh=10**7),
            RejectReason.IMPLAUSIBLE,
            "reading.energy_wh",
        ),
        (
            lambda m, k, d: m["reading"].update(energy_wh=m["reading"]["energy_wh"] + 10),
            RejectReason.BAD_SIGNATURE,
            "reading.signature",
        ),
        (lambda m, k, d: m.pop("reading"), RejectReason.MISSING_READING, "reading"),
        (
            lambda m, k, d: m.update(metrics={"kind": "pv", "pv_kw": 1, "available_kw": 1,
                                              "curtailment": 0}),
            RejectReason.WRONG_KIND,
            "metrics.kind",
        ),
    ],
)  # fmt: skip
def test_each_refusal_is_counted_by_reason_and_names_the_field(
    validator: TelemetryValidator,
    site: SiteManifest,
    domain: ReadingDomain,
    keys: dict[str, bytes],
    change: Any,
    reason: RejectReason,
    field: str,
) -> None:
    msg = telemetry(site, domain, keys["bus1-meter"], "bus1-meter")
    change(msg, keys, domain)
    out = _check(validator, "bus1-meter", msg)
    assert _reason(out) is reason
    assert isinstance(out, Rejected) and out.detail.startswith(field) and "expected" in out.detail
    assert validator.rejected == {reason: 1}
    # The refusal moved no state: the genuine message is still accepted.
    good = telemetry(site, domain, keys["bus1-meter"], "bus1-meter")
    assert isinstance(_check(validator, "bus1-meter", good), Telemetry)


@pytest.mark.parametrize("forgery", ["other_key", "other_chain", "other_registry", "high_s"])
def test_forged_signatures_are_refused(
    validator: TelemetryValidator,
    site: SiteManifest,
    domain: ReadingDomain,
    keys: dict[str, bytes],
    forgery: str,
) -> None:
    sign_domain = {
        "other_chain": ReadingDomain(domain.chain_id + 1, domain.registry),
        "other_registry": ReadingDomain(domain.chain_id, "0x" + "77" * 20),
    }.get(forgery, domain)
    key = keys["bus2-meter"] if forgery == "other_key" else keys["bus1-meter"]
    msg = telemetry(site, sign_domain, key, "bus1-meter")
    if forgery == "high_s":
        sig = bytes.fromhex(msg["reading"]["signature"][2:])
        n = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141
        s = n - int.from_bytes(sig[32:64], "big")  # the malleable twin: same signer, high s
        flipped = sig[:32] + s.to_bytes(32, "big") + bytes([55 - sig[64]])
        msg["reading"]["signature"] = "0x" + flipped.hex()
    assert _reason(_check(validator, "bus1-meter", msg)) is RejectReason.BAD_SIGNATURE


def test_a_replayed_reading_nonce_is_refused_even_in_a_new_message(
    validator: TelemetryValidator, site: SiteManifest, domain: ReadingDomain, keys: dict[str, bytes]
) -> None:
    key = keys["bus1-meter"]
    assert isinstance(
        _check(validator, "bus1-meter", telemetry(site, domain, key, "bus1-meter")), Telemetry
    )
    again = telemetry(site, domain, key, "bus1-meter", seq=2, nonce=0)
    assert _reason(_check(validator, "bus1-meter", again)) is RejectReason.REPLAYED


def test_sessions_births_and_deaths(
    validator: TelemetryValidator, site: SiteManifest, domain: ReadingDomain, keys: dict[str, bytes]
) -> None:
    key = keys["bus1-battery"]
    death_old = json.dumps({"device": "bus1-battery", "bd_seq": 0, "ts": NOW_MS}).encode()
    assert validator.on_death("bus1-battery", death_old) is None  # an old session's will
    death = json.dumps({"device": "bus1-battery", "bd_seq": 1, "ts": NOW_MS}).encode()
    assert validator.on_death("bus1-battery", death) is not None
    msg = telemetry(site, domain, key, "bus1-battery")
    out = _check(validator, "bus1-battery", msg)
    assert _reason(out) is RejectReason.NO_SESSION
    assert isinstance(out, Rejected) and out.relay is not None  # its valid reading still counts
    assert not isinstance(
        validator.on_birth("bus1-battery", birth(site, "bus1-battery", 2), NOW_MS), Rejected
    )
    msg = telemetry(site, domain, key, "bus1-battery", bd_seq=2, seq=3, nonce=1)
    assert isinstance(_check(validator, "bus1-battery", msg), Telemetry)
    assert validator.sessions["bus1-battery"].missed == 2


def test_a_birth_that_disagrees_with_the_manifest_is_refused(
    validator: TelemetryValidator, site: SiteManifest
) -> None:
    raw = json.loads(birth(site, "bus1-meter", bd_seq=5))
    raw["address"] = "0x" + "99" * 20
    out = validator.on_birth("bus1-meter", json.dumps(raw).encode(), NOW_MS)
    assert _reason(out) is RejectReason.BIRTH_MISMATCH
    assert isinstance(out, Rejected) and out.detail.startswith("address: expected")
    assert _reason(validator.on_birth("ghost", birth(site, "bus1-meter"), NOW_MS)) is (
        RejectReason.TOPIC_MISMATCH
    )


def test_implausible_battery_power_names_the_rating(
    validator: TelemetryValidator, site: SiteManifest, domain: ReadingDomain, keys: dict[str, bytes]
) -> None:
    m = {"kind": "battery", "soc": 0.5, "soh": 1.0, "power_kw": 9.0}  # rated 5 kW
    msg = telemetry(site, domain, keys["bus1-battery"], "bus1-battery", metrics=m)
    out = _check(validator, "bus1-battery", msg)
    assert _reason(out) is RejectReason.IMPLAUSIBLE
    assert isinstance(out, Rejected) and "<= 5.250 kW" in out.detail


def test_stale_telemetry_is_refused_but_its_valid_reading_is_relayed_late(
    validator: TelemetryValidator, site: SiteManifest, domain: ReadingDomain, keys: dict[str, bytes]
) -> None:
    """A bridge back from an outage gets old DDATA from the broker: too old to act on, but the
    signed reading must still reach the chain, or the device's later nonces are blocked."""
    key = keys["bus1-meter"]
    old = telemetry(site, domain, key, "bus1-meter", slot=SLOT - 3, ts=NOW_MS - 600_000)
    out = _check(validator, "bus1-meter", old)
    assert isinstance(out, Rejected) and out.reason is RejectReason.STALE
    assert out.relay is not None and out.relay.reading is not None
    assert out.relay.reading.slot == SLOT - 3
    assert validator.rejected == {RejectReason.STALE: 1} and validator.relayed_readings == 1
    assert validator.telemetry_accepted == 0  # not used for control
    # Its nonce and seq are spent: the same message again is a replay, not a second relay.
    again = _check(validator, "bus1-meter", old)
    assert isinstance(again, Rejected) and again.reason is RejectReason.REPLAYED
    assert again.relay is None
    # A stale message with a forged reading is refused as stale and relays nothing.
    forged = telemetry(
        site, domain, key, "bus1-meter", seq=2, nonce=1, slot=SLOT - 2, ts=NOW_MS - 400_000,
        signer=keys["bus2-meter"],
    )  # fmt: skip
    out = _check(validator, "bus1-meter", forged)
    assert isinstance(out, Rejected) and out.reason is RejectReason.STALE and out.relay is None
    assert validator.last_nonce["bus1-meter"] == 0


def test_future_telemetry_is_refused_but_its_valid_reading_is_relayed(
    validator: TelemetryValidator, site: SiteManifest, domain: ReadingDomain, keys: dict[str, bytes]
) -> None:
    """A meter whose clock runs fast stamps its telemetry ahead of the bridge: not to act on,
    but the reading it signed is a real one and must reach the chain, once."""
    key = keys["bus1-meter"]
    ahead = telemetry(site, domain, key, "bus1-meter", ts=NOW_MS + 300_000)
    out = _check(validator, "bus1-meter", ahead)
    assert isinstance(out, Rejected) and out.reason is RejectReason.FUTURE
    assert out.detail.startswith("ts: expected at most 5.0 s ahead, got 300.0 s")
    assert out.relay is not None and out.relay.reading is not None
    assert out.relay.reading.slot == SLOT and out.relay.reading.nonce == 0
    assert validator.rejected == {RejectReason.FUTURE: 1} and validator.relayed_readings == 1
    assert validator.telemetry_accepted == 0  # not used for control
    # Its nonce and seq are spent: the same message again is a replay, not a second relay.
    again = _check(validator, "bus1-meter", ahead)
    assert isinstance(again, Rejected) and again.reason is RejectReason.REPLAYED
    assert again.relay is None and validator.relayed_readings == 1
    # A future message with a forged reading is refused as future and relays nothing.
    forged = telemetry(
        site, domain, key, "bus1-meter", seq=2, nonce=1, ts=NOW_MS + 300_000,
        signer=keys["bus2-meter"],
    )  # fmt: skip
    out = _check(validator, "bus1-meter", forged)
    assert isinstance(out, Rejected) and out.reason is RejectReason.FUTURE and out.relay is None
    assert validator.last_nonce["bus1-meter"] == 0 and validator.relayed_readings == 1
    # The genuine next message is still accepted.
    nxt = telemetry(site, domain, key, "bus1-meter", seq=2, nonce=1)
    assert isinstance(_check(validator, "bus1-meter", nxt), Telemetry)


def test_a_meter_whose_metrics_disagree_with_its_signed_reading_has_the_reading_relayed(
    validator: TelemetryValidator, site: SiteManifest, domain: ReadingDomain, keys: dict[str, bytes]
) -> None:
    """A frozen display (`stuck`) next to a live energy register: the metrics are not acted on,
    the reading the meter signed still reaches the chain; a tampered one does not."""
    key = keys["bus1-meter"]
    frozen = {"kind": "meter", "net_kw": 2.0, "load_kw": 2.5}  # 500 Wh; the register says 300
    msg = telemetry(site, domain, key, "bus1-meter", metrics=frozen, energy_wh=300)
    out = _check(validator, "bus1-meter", msg)
    assert isinstance(out, Rejected) and out.reason is RejectReason.IMPLAUSIBLE
    assert out.detail == "reading.energy_wh: expected net_kw x slot = 500 +/- 50 Wh, got 300"
    assert out.relay is not None and out.relay.reading is not None
    assert out.relay.reading.energy_wh == 300 and validator.relayed_readings == 1
    assert validator.telemetry_accepted == 0 and validator.last_nonce["bus1-meter"] == 0
    # The energy changed after signing: the signature no longer recovers, nothing relayed.
    tampered = telemetry(site, domain, key, "bus1-meter", seq=2, nonce=1, metrics=frozen)
    tampered["reading"]["energy_wh"] = 300
    out = _check(validator, "bus1-meter", tampered)
    assert isinstance(out, Rejected) and out.reason is RejectReason.BAD_SIGNATURE
    assert out.relay is None and validator.last_nonce["bus1-meter"] == 0


def test_a_reading_for_a_slot_ahead_is_relayed_one_slot_ahead_and_refused_whole_beyond(
    validator: TelemetryValidator, site: SiteManifest, domain: ReadingDomain, keys: dict[str, bytes]
) -> None:
    """The current slot at NOW_MS is SLOT + 1. A reading for SLOT + 2 has not ended: relayed
    (the outbox waits out the chain's "slot not ended"); one for SLOT + 3 measures nothing yet
    and would hold the meter's later readings behind it: refused whole, reading included."""
    key = keys["bus1-meter"]
    assert validator.current_slot(NOW_MS) == SLOT + 1
    far = telemetry(site, domain, key, "bus1-meter", slot=SLOT + 3, ts=NOW_MS + 1_800_000)
    out = _check(validator, "bus1-meter", far)
    assert isinstance(out, Rejected) and out.reason is RejectReason.FUTURE and out.relay is None
    assert out.detail.startswith("ts: expected at most 5.0 s ahead")
    assert "reading not relayed: expected its slot at most 1 ahead, got 2 ahead" in out.detail
    assert "bus1-meter" not in validator.last_nonce and validator.relayed_readings == 0
    near = telemetry(site, domain, key, "bus1-meter", slot=SLOT + 2)  # ts on time, slot ahead
    out = _check(validator, "bus1-meter", near)
    assert isinstance(out, Rejected) and out.reason is RejectReason.FUTURE
    assert out.detail == f"slot: expected {SLOT} or {SLOT + 1}, got {SLOT + 2}"
    assert out.relay is not None and out.relay.reading is not None
    assert out.relay.reading.slot == SLOT + 2 and validator.last_nonce["bus1-meter"] == 0
    assert validator.rejected == {RejectReason.FUTURE: 2} and validator.relayed_readings == 1
    # With no look-ahead allowed, the same message is refused whole.
    strict = TelemetryValidator(
        site, domain, ValidationLimits(genesis=GENESIS, max_reading_lead_slots=0)
    )
    assert not isinstance(
        strict.on_birth("bus1-meter", birth(site, "bus1-meter"), NOW_MS), Rejected
    )
    out = strict.on_telemetry("bus1-meter", _b(near), NOW_MS)
    assert isinstance(out, Rejected) and out.reason is RejectReason.FUTURE and out.relay is None


def test_session_state_survives_a_restart_through_take_dirty_and_restore(
    validator: TelemetryValidator, site: SiteManifest, domain: ReadingDomain, keys: dict[str, bytes]
) -> None:
    """What a restarted bridge needs to accept the messages the broker delivers again."""
    key = keys["bus1-meter"]
    validator.take_dirty()
    assert isinstance(
        _check(validator, "bus1-meter", telemetry(site, domain, key, "bus1-meter")), Telemetry
    )
    changed = validator.take_dirty()
    assert set(changed) == {"bus1-meter"} and validator.take_dirty() == {}
    session, nonce = changed["bus1-meter"]
    assert session is not None and (session.bd_seq, session.last_seq, nonce) == (1, 1, 0)
    fresh = TelemetryValidator(site, domain, validator.limits)
    fresh.restore({"bus1-meter": session}, {"bus1-meter": 0})
    nxt = telemetry(site, domain, key, "bus1-meter", seq=2, nonce=1)
    assert isinstance(fresh.on_telemetry("bus1-meter", _b(nxt), NOW_MS), Telemetry)
    replay = telemetry(site, domain, key, "bus1-meter", seq=2, nonce=1)
    assert _reason(fresh.on_telemetry("bus1-meter", _b(replay), NOW_MS)) is RejectReason.REPLAYED
