"""`ObservationBuilder.build` reads rows kept current at ingest; it must see what reading each
device's latest model sees, over slots with devices missing, deleted and misreporting."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from bridge.bench import synthetic_site
from bridge.messages import (
    ApplianceMetrics,
    BatteryMetrics,
    GridSensorMetrics,
    MeterMetrics,
    PvMetrics,
    Telemetry,
)
from bridge.observation import Metrics, ObservationBuilder, SiteState
from bridge.site import SiteManifest
from tests.bridge.helpers import NOW_MS, SLOT


def _metrics(kind: str, rng: np.random.Generator) -> dict[str, Any]:
    u = lambda lo, hi: float(rng.uniform(lo, hi))  # noqa: E731
    if kind == "battery":
        return {"kind": kind, "soc": u(0, 1), "soh": u(0.7, 1), "power_kw": u(-5, 5)}
    if kind == "meter":
        return {"kind": kind, "net_kw": u(-5, 5), "load_kw": u(0, 5)}
    if kind == "pv":
        return {"kind": kind, "pv_kw": u(0, 3), "available_kw": u(0, 4), "curtailment": u(0, 1)}
    if kind == "appliance":
        m = {"kind": kind, "load_kw": u(0, 2), "backlog_kwh": u(0, 3), "dr_share": u(0, 1)}
        return m | ({"demand_kw": u(0, 3)} if rng.random() < 0.5 else {})
    m = {"kind": kind, "v_min_pu": u(0.9, 1), "v_max_pu": u(1, 1.1)}
    m |= {"line_loading": u(0, 1), "trafo_loading": u(0, 1)}
    return m | ({"trafo_net_kw": u(-50, 50)} if rng.random() < 0.7 else {})


def _message(device: str, slot: int, metrics: dict[str, Any]) -> Telemetry:
    return Telemetry.model_validate(
        {"device": device, "bd_seq": 1, "seq": 1, "ts": NOW_MS, "slot": slot, "metrics": metrics}
    )


def _walk(
    site: SiteManifest, state: SiteState, slot: int, last: dict[str, Metrics]
) -> dict[str, Any]:
    """What `build` read when it walked every device's model (before the rows), restated."""
    missing: list[str] = []

    def get(device: str) -> Metrics | None:
        msg = state.latest.get(device)
        if msg is None or msg.slot != slot:
            missing.append(device)
            return last.get(device)
        last[device] = msg.metrics
        return msg.metrics

    spec = site.batteries
    soc, cap = list(spec.soc_initial), list(spec.capacity_kwh)
    m: Metrics | None = None
    for k, device in enumerate(site.battery_devices()):
        m = get(device)
        if isinstance(m, BatteryMetrics):
            soc[k], cap[k] = m.soc, m.soh * spec.capacity_kwh[k]
    community = m
    load, pv, backlog, net = [], [], [], 0.0
    for p in site.prosumers:
        meter, inverter, appliance = get(p.meter), get(p.pv), get(p.appliance)
        demand = 0.0
        if isinstance(meter, MeterMetrics):
            demand = meter.load_kw
            if isinstance(appliance, ApplianceMetrics) and appliance.demand_kw is not None:
                demand = meter.load_kw - appliance.load_kw + appliance.demand_kw
            net += meter.net_kw
        load.append(demand)
        pv.append(inverter.available_kw if isinstance(inverter, PvMetrics) else 0.0)
        backlog.append(appliance.backlog_kwh if isinstance(appliance, ApplianceMetrics) else 0.0)
    if site.community_battery is not None and isinstance(community, BatteryMetrics):
        net += community.power_kw
    sensor = get(site.grid_sensor)
    grid, background = [1.0, 1.0, 0.0, 0.0], 0.0
    if isinstance(sensor, GridSensorMetrics):
        grid = [sensor.v_min_pu, sensor.v_max_pu, sensor.line_loading, sensor.trafo_loading]
        if sensor.trafo_net_kw is not None:
            background = sensor.trafo_net_kw - net
    return {
        "soc": soc, "capacity": cap, "load": load, "pv": pv, "backlog": backlog, "grid": grid,
        "background": background, "missing": tuple(missing),
    }  # fmt: skip


@pytest.mark.parametrize("devices", [None, 42])
def test_the_rows_read_what_the_models_say(site: SiteManifest, devices: int | None) -> None:
    if devices is not None:
        site = synthetic_site(devices)
    rng = np.random.default_rng(devices or 1)
    builder = ObservationBuilder(site)
    state = SiteState()
    last: dict[str, Metrics] = {}
    meter, pv = site.prosumers[0].meter, site.prosumers[-1].pv
    t = builder.slot_of_year(NOW_MS // 1000)
    for slot in range(SLOT, SLOT + 9):
        for d in site.devices:
            if rng.random() > 0.2 or slot == SLOT:  # else: no telemetry this slot
                state.update(_message(d.id, slot, _metrics(d.kind.value, rng)))
        if slot == SLOT + 3:
            del state.latest[site.grid_sensor]  # what the parity test does: one row forgotten
        if slot == SLOT + 4:
            state.latest.pop(pv, None)  # any other change: the rows are read again
        if slot == SLOT + 5:  # a model of another kind than the row's: read as none
            state.latest[meter] = _message(meter, slot, _metrics("pv", rng))
        obs = builder.build(state, slot, t, community_price=0.3)
        want = _walk(site, state, slot, last)
        raw = obs.raw
        assert obs.missing == want["missing"], slot
        np.testing.assert_array_equal(obs.soc, want["soc"])
        np.testing.assert_array_equal(obs.capacity_kwh, want["capacity"])
        for key in ("load", "pv", "backlog", "grid"):
            np.testing.assert_array_equal(raw[key][0], want[key], err_msg=f"{key} {slot}")
        np.testing.assert_array_equal(raw["background_net_forecast"][0], want["background"])
        # `persistence` reads a missing device's last values back from the rows.
        forecast = builder.persistence(state, slot)
        np.testing.assert_array_equal(forecast.load_kw[:, 0], want["load"])
        np.testing.assert_array_equal(forecast.pv_kw[:, 0], want["pv"])
        np.testing.assert_array_equal(forecast.background_net_kw, raw["background_net_forecast"][0])
