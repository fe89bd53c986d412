"""Device models, batched: batteries, PV curtailment and flexible loads.

Each function takes arrays with a leading batch axis and returns new arrays; nothing is
mutated, so the same code serves one environment, a batch of 1,024, and the bridge's
what-if checks. Power is in kW, energy in kWh, a battery's power is positive when charging.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from envs.params import BatteryParams, FloatArray


@dataclass(frozen=True)
class BatteryStep:
    """Outcome of one battery step for a batch (shapes (B, n_battery))."""

    power_kw: FloatArray
    """Grid-side power actually applied (charge > 0), after SoC and power limits."""
    soc: FloatArray
    capacity_kwh: FloatArray
    """Usable capacity after this step's fade: it only ever shrinks."""
    fade_kwh: FloatArray
    """Capacity lost this step."""
    limited_kw: FloatArray
    """|requested - applied|: how much the limits cut the set-point."""


def battery_step(
    params: BatteryParams,
    soc: FloatArray,
    capacity_kwh: FloatArray,
    setpoint_kw: FloatArray,
    dt_h: float,
) -> BatteryStep:
    """Apply power set-points within power and SoC limits; track SoC and cycle-ageing fade.

    The SoC limits are enforced on the energy that reaches the cells, so a charge of P kW for
    dt hours adds P * eta_c * dt kWh, and a discharge of P kW removes P / eta_d * dt kWh.
    Fade is proportional to cell throughput (equivalent full cycles), the standard first-order
    cycle-ageing model; calendar ageing is left out because an episode lasts days.
    """
    cap = np.maximum(capacity_kwh, 1e-12)
    eta_c = params.efficiency_charge
    eta_d = params.efficiency_discharge
    max_charge = np.minimum(params.power_kw, (params.soc_max - soc) * cap / (eta_c * dt_h))
    max_discharge = np.minimum(params.power_kw, (soc - params.soc_min) * cap * eta_d / dt_h)
    power = np.clip(setpoint_kw, -np.maximum(max_discharge, 0.0), np.maximum(max_charge, 0.0))
    cell_kwh = np.where(power > 0.0, power * eta_c, power / eta_d) * dt_h
    new_soc = np.clip(soc + cell_kwh / cap, params.soc_min, params.soc_max)
    new_soc = np.where(capacity_kwh > 0.0, new_soc, soc)
    nominal = params.capacity_kwh
    full_cycles = np.abs(cell_kwh) / np.maximum(2.0 * nominal, 1e-12)
    fade = params.fade_per_full_cycle * full_cycles * nominal
    return BatteryStep(
        power_kw=power,
        soc=new_soc,
        capacity_kwh=np.maximum(capacity_kwh - fade, 0.0),
        fade_kwh=fade,
        limited_kw=np.abs(setpoint_kw - power),
    )


@dataclass(frozen=True)
class FlexibleLoadStep:
    """Outcome of one demand-response step (shapes (B, n_prosumer))."""

    served_kw: FloatArray
    """Load actually drawn: base load - curtailed - deferred + rebound."""
    curtailed_kw: FloatArray
    deferred_kw: FloatArray
    rebound_kw: FloatArray
    backlog_kwh: FloatArray


def flexible_load_step(
    load_kw: FloatArray,
    backlog_kwh: FloatArray,
    dr_share: FloatArray,
    curtailable_share: float,
    shiftable_share: float,
    rebound_per_step: float,
    dt_h: float,
) -> FlexibleLoadStep:
    """Drop and defer a share of the load under a DR signal; serve the backlog once released.

    A signal of 1 drops `curtailable_share` of the load for good and defers `shiftable_share`
    into a backlog; with signal s the rebound serves (1 - s) * rebound_per_step of the backlog,
    so the backlog is paid back when the grid is relieved, as real shiftable appliances do.
    """
    curtailed = dr_share * curtailable_share * load_kw
    deferred = dr_share * shiftable_share * load_kw
    rebound = (1.0 - dr_share) * rebound_per_step * backlog_kwh / dt_h
    served = load_kw - curtailed - deferred + rebound
    return FlexibleLoadStep(
        served_kw=served,
        curtailed_kw=curtailed,
        deferred_kw=deferred,
        rebound_kw=rebound,
        backlog_kwh=backlog_kwh + (deferred - rebound) * dt_h,
    )


def pv_output(available_kw: FloatArray, curtailment: FloatArray) -> FloatArray:
    """PV fed in after curtailing a fraction (0 = all available power, 1 = none)."""
    return available_kw * (1.0 - curtailment)
