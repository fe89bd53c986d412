"""A simulated device obeys commands only within its own limits, whatever the bridge asks: a
battery clamps its set-point to its rating and to what its SoC window lets reach the cells, a
command for another kind of device or past its expiry is rejected with the reason, and a re-sent
command is not applied twice."""

from __future__ import annotations

import json

import pytest

from bridge.messages import BatterySetpoint, Command, PvCurtailment, encode
from bridge.signing import ReadingDomain
from bridge.site import SiteManifest
from bridge.site_builder import device_key
from bridge.virtual_device import VirtualDevice
from tests.bridge.helpers import NOW_MS, SLOT


def _battery(site: SiteManifest, domain: ReadingDomain) -> VirtualDevice:
    spec = site.device("bus1-battery")
    assert spec is not None and spec.power_kw > 0
    dev = VirtualDevice(site.site, spec, device_key("test", spec.id), domain)
    dev.capacity_kwh, dev.soc_min, dev.soc_max = spec.capacity_kwh, 0.1, 0.9
    dev.connect(NOW_MS)
    return dev


def _command(
    n: int, action: BatterySetpoint | PvCurtailment, expires_in_ms: int = 900_000
) -> bytes:
    return encode(
        Command(
            command_id=f"{n}.bus1-battery",
            device="bus1-battery",
            ts=NOW_MS,
            slot=SLOT + 1,
            expires_ts=NOW_MS + expires_in_ms,
            action=action,
        )
    )


def _answer(dev: VirtualDevice, payload: bytes) -> dict[str, object]:
    *_, (_, last) = dev.on_command(payload, NOW_MS, 0.25)
    return dict(json.loads(last))


@pytest.mark.parametrize("soc", [0.5, 0.88, 0.1])
def test_a_battery_clamps_to_its_rating_and_soc_window(
    site: SiteManifest, domain: ReadingDomain, soc: float
) -> None:
    dev = _battery(site, domain)
    dev.soc = soc
    rating = dev.spec.power_kw
    room_kw = (dev.soc_max - soc) * dev.spec.capacity_kwh / (dev.efficiency_charge * 0.25)
    charge = _answer(
        dev, _command(1, BatterySetpoint(kind="battery_setpoint", power_kw=50 * rating))
    )
    assert charge["status"] == "applied"
    assert charge["applied"] == pytest.approx(min(rating, room_kw)) and dev.setpoint_kw <= rating
    stored_kw = (soc - dev.soc_min) * dev.spec.capacity_kwh * dev.efficiency_discharge / 0.25
    out = _answer(dev, _command(2, BatterySetpoint(kind="battery_setpoint", power_kw=-50 * rating)))
    assert out["applied"] == pytest.approx(-min(rating, stored_kw))


def test_a_battery_rejects_what_is_not_its_own_and_what_expired(
    site: SiteManifest, domain: ReadingDomain
) -> None:
    dev = _battery(site, domain)
    wrong = _answer(dev, _command(1, PvCurtailment(kind="pv_curtailment", fraction=0.5)))
    assert wrong["status"] == "rejected" and "not for a battery" in str(wrong["reason"])
    late = _command(2, BatterySetpoint(kind="battery_setpoint", power_kw=1.0), expires_in_ms=-1)
    expired = _answer(dev, late)
    assert expired["status"] == "rejected" and expired["reason"] == "expired"
    assert dev.setpoint_kw == 0.0
    ok = _command(3, BatterySetpoint(kind="battery_setpoint", power_kw=1.0))
    assert _answer(dev, ok)["status"] == "applied"
    assert dev.on_command(ok, NOW_MS, 0.25) == []  # a re-send: answered already, not again
