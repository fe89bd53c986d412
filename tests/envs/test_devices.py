"""Device models: batteries respect limits and efficiencies; demand response conserves energy."""

from __future__ import annotations

import numpy as np

from envs.devices import battery_step, flexible_load_step, pv_output
from envs.params import BatteryParams


def _battery(cap: float = 10.0, power: float = 5.0) -> BatteryParams:
    one = np.array([1.0])
    return BatteryParams(
        capacity_kwh=np.array([cap]), power_kw=np.array([power]),
        efficiency_charge=one * 0.9, efficiency_discharge=one * 0.8, soc_min=one * 0.1,
        soc_max=one * 0.9, soc_initial=one * 0.5, fade_per_full_cycle=one * 1e-3,
        replacement_cost_per_kwh=one * 100.0,
    )  # fmt: skip


def test_charging_applies_efficiency_and_power_limit() -> None:
    b = _battery()
    out = battery_step(b, np.array([[0.5]]), np.array([[10.0]]), np.array([[8.0]]), 0.25)
    assert out.power_kw[0, 0] == 5.0  # power limit
    assert np.isclose(out.soc[0, 0], 0.5 + 5.0 * 0.9 * 0.25 / 10.0)
    assert np.isclose(out.limited_kw[0, 0], 3.0)


def test_discharge_stops_at_soc_min_including_losses() -> None:
    b = _battery()
    out = battery_step(b, np.array([[0.15]]), np.array([[10.0]]), np.array([[-5.0]]), 0.25)
    # 0.05 * 10 kWh of cell energy at 80 % efficiency gives 0.4 kWh, i.e. 1.6 kW for 15 min.
    assert np.isclose(out.power_kw[0, 0], -1.6)
    assert np.isclose(out.soc[0, 0], 0.1)


def test_fade_grows_with_throughput_only() -> None:
    b = _battery()
    idle = battery_step(b, np.array([[0.5]]), np.array([[10.0]]), np.array([[0.0]]), 0.25)
    busy = battery_step(b, np.array([[0.5]]), np.array([[10.0]]), np.array([[4.0]]), 0.25)
    assert idle.fade_kwh[0, 0] == 0.0
    assert busy.fade_kwh[0, 0] > 0.0
    assert busy.capacity_kwh[0, 0] < 10.0


def test_demand_response_backlog_is_served_later() -> None:
    load = np.full((1, 1), 4.0)
    backlog = np.zeros((1, 1))
    deferred_total = 0.0
    rebound_total = 0.0
    for k in range(40):
        share = np.full((1, 1), 1.0 if k < 4 else 0.0)
        out = flexible_load_step(load, backlog, share, 0.1, 0.2, 0.25, 0.25)
        deferred_total += out.deferred_kw[0, 0] * 0.25
        rebound_total += out.rebound_kw[0, 0] * 0.25
        backlog = out.backlog_kwh
    assert np.isclose(deferred_total, rebound_total + backlog[0, 0])
    assert backlog[0, 0] < 0.01 * deferred_total


def test_pv_curtailment() -> None:
    assert np.allclose(pv_output(np.array([10.0, 10.0]), np.array([0.0, 0.3])), [10.0, 7.0])
