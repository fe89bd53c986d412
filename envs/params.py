"""Frozen, compiled description of one microgrid: everything a step needs, as numpy arrays.

`GridParams` is built once per scenario by `envs.grid` (the only place that touches pandapower)
and then shared read-only by the power flow, the device models and the environments. Keeping it a
plain dataclass of arrays is what lets a batch of grids step with a handful of numpy calls.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

FloatArray = NDArray[np.float64]
ComplexArray = NDArray[np.complex128]
IntArray = NDArray[np.int64]


@dataclass(frozen=True)
class NetworkParams:
    """Admittance model of the feeder in per unit, reduced to what the power flow solves.

    Buses are pandapower's internal (ppc) buses: bus-bus switches already fused, auxiliary
    buses for open line switches included. `pq` are the buses whose voltage is unknown,
    `ref` the slack buses with fixed voltage `v_ref`.
    """

    base_mva: float
    n_bus: int
    pq: IntArray
    ref: IntArray
    v_ref: ComplexArray
    ybus: ComplexArray
    """Dense bus admittance matrix, shape (n_bus, n_bus)."""
    z_pq: ComplexArray
    """inv(Ybus[pq, pq]): the implicit Z-bus used by the fixed-point iteration."""
    w_pq: ComplexArray
    """No-load voltages of the pq buses, -z_pq @ Ybus[pq, ref] @ v_ref."""
    yf: ComplexArray
    """Branch-from current admittances, shape (n_branch, n_bus)."""
    yt: ComplexArray
    """Branch-to current admittances, shape (n_branch, n_bus)."""
    line_rows: IntArray
    """Rows of yf/yt that are lines, in pandapower's line order."""
    trafo_rows: IntArray
    """Rows of yf/yt that are transformers, in pandapower's trafo order."""
    line_i_base_ka_f: FloatArray
    line_i_base_ka_t: FloatArray
    line_i_max_ka: FloatArray
    """Thermal limit per line: max_i_ka * derating factor * parallel systems."""
    trafo_i_base_ka_f: FloatArray
    trafo_i_base_ka_t: FloatArray
    trafo_i_rated_ka_f: FloatArray
    trafo_i_rated_ka_t: FloatArray
    dead: IntArray
    """Isolated buses (neither pq nor ref): reported at 0 V, excluded from every statistic."""
    y_out_t: ComplexArray
    """Transposed stack [yf[lines]; yt[lines]; yf[trafos]; yt[trafos]; ybus[ref]]: one mat-mul
    gives every current the results need."""
    i_scale: FloatArray
    """Per row of y_out_t (branch rows only): |I| pu -> fraction of the element's rating."""
    v_min_pu: FloatArray
    """Lower voltage limit of each solved (pq) bus."""
    v_max_pu: FloatArray
    """Upper voltage limit of each solved (pq) bus."""

    @property
    def n_line(self) -> int:
        return int(self.line_rows.shape[0])

    @property
    def n_trafo(self) -> int:
        return int(self.trafo_rows.shape[0])


@dataclass(frozen=True)
class BatteryParams:
    """All batteries of the grid, prosumers' first, then the community battery if any."""

    capacity_kwh: FloatArray
    power_kw: FloatArray
    efficiency_charge: FloatArray
    efficiency_discharge: FloatArray
    soc_min: FloatArray
    soc_max: FloatArray
    soc_initial: FloatArray
    fade_per_full_cycle: FloatArray
    replacement_cost_per_kwh: FloatArray

    @property
    def n(self) -> int:
        return int(self.capacity_kwh.shape[0])


@dataclass(frozen=True)
class GridParams:
    """Everything a step needs, built once per scenario. Profiles cover the whole year.

    Sign conventions: loads, PV and battery power in kW as positive numbers; a battery's power
    is positive when charging. Injections into the power flow are in per unit, generation
    positive. Profile arrays are indexed by absolute 15-minute slot of the year.
    """

    grid_code: str
    network: NetworkParams
    steps_per_day: int
    dt_h: float
    n_days: int
    episode_steps: int
    # Prosumers: each owns the loads, PV and storage at one bus.
    prosumer_names: tuple[str, ...]
    prosumer_pq: IntArray
    """Position of each prosumer's bus in network.pq."""
    prosumer_load_kw: FloatArray
    """(T, n_prosumer) active load."""
    prosumer_load_kvar: FloatArray
    prosumer_pv_kw: FloatArray
    """(T, n_prosumer) available PV."""
    load_scale_kw: FloatArray
    """Per prosumer, the year's peak load: the codec's observation scale."""
    pv_scale_kw: FloatArray
    # Everything not controlled, pre-summed per pq bus (per unit injection, generation > 0).
    background_s_pu: ComplexArray
    """(T, n_pq) complex injection of uncontrolled loads, PV and storage."""
    background_load_kw: FloatArray
    """(T,) total uncontrolled load (for KPIs and the energy balance)."""
    background_pv_kw: FloatArray
    background_storage_kw: FloatArray
    """(T,) uncontrolled storage following its simbench profile (charging > 0)."""
    background_load_pv_kw: FloatArray
    """(T, 2) uncontrolled load and PV side by side: what the background forecast reads."""
    batteries: BatteryParams
    battery_pq: IntArray
    """Position of each battery's bus in network.pq."""
    has_community_battery: bool
    injection_map: FloatArray
    """(n_prosumer + n_battery, n_pq) 0/1 map from prosumer and battery injections to buses."""
    # Prices, one value per slot of the day.
    import_price: FloatArray
    feed_in_price: float
    tod_multiplier: FloatArray
    base_rate: float
    stress_threshold: float
    signal_range: float
    demand_reference_kw: float
    """The year's peak community net load: demandFactor = net load / this."""
    # Demand response.
    curtailable_share: float
    shiftable_share: float
    rebound_per_step: float
    discomfort_cost_per_kwh: float
    unserved_penalty_per_kwh: float
    # Forecasts.
    horizon: int
    forecast_mode: str
    forecast_noise_std: float
    # Reward weights.
    w_cost: float
    w_voltage: float
    w_thermal: float
    w_degradation: float
    w_discomfort: float
    divergence_penalty: float
    # Day split.
    train_days: IntArray
    validation_days: IntArray
    test_days: IntArray

    @property
    def n_prosumer(self) -> int:
        return int(self.prosumer_pq.shape[0])

    @property
    def n_battery(self) -> int:
        return self.batteries.n

    def days(self, split: str) -> IntArray:
        """Days of the year (0-based) in `split` (`train`, `validation` or `test`)."""
        if split == "train":
            return self.train_days
        if split == "validation":
            return self.validation_days
        if split == "test":
            return self.test_days
        raise ValueError(f"split must be 'train', 'validation' or 'test', got {split!r}")
