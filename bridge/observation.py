"""From accepted telemetry to the policy's observation, through the env's own codec.

`SiteState` keeps the latest accepted metrics per device; `ObservationBuilder` turns them into
the same raw fields `envs.dynamics.observe` produces and encodes them with `envs.codec`, so the
policy sees live data exactly as it saw simulated data. Fields the devices cannot measure come
from a `Forecast` the caller supplies (a forecast service, or persistence of the last slot, the
env's `persistence` mode). A device with no fresh telemetry is reported by id: the decision
step falls back to the rule-based controller and says which devices were missing.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from bridge.clock import slot_of_year
from bridge.messages import (
    ApplianceMetrics,
    BatteryMetrics,
    GridSensorMetrics,
    MeterMetrics,
    PvMetrics,
    Telemetry,
)
from bridge.site import SiteManifest
from envs.codec import Codec
from envs.pricing import DEMAND_FACTOR_FLOOR

Metrics = MeterMetrics | PvMetrics | BatteryMetrics | ApplianceMetrics | GridSensorMetrics


@dataclass(frozen=True)
class Forecast:
    """Lead-step forecasts, (n_prosumer, horizon) kW and (horizon,) kW of background net load."""

    load_kw: np.ndarray
    pv_kw: np.ndarray
    background_net_kw: np.ndarray


@dataclass
class SiteState:
    """The latest accepted telemetry per device, with the slot it describes."""

    latest: dict[str, Telemetry] = field(default_factory=dict)

    def update(self, msg: Telemetry) -> None:
        held = self.latest.get(msg.device)
        if held is None or (msg.slot, msg.ts) >= (held.slot, held.ts):
            self.latest[msg.device] = msg

    def metrics(self, device: str, slot: int) -> Metrics | None:
        """The device's metrics for `slot`, or None if it has not reported that slot."""
        msg = self.latest.get(device)
        return msg.metrics if msg is not None and msg.slot == slot else None


@dataclass(frozen=True)
class Observation:
    """An encoded observation and what went into it."""

    obs: np.ndarray
    """float32 (obs_dim,), codec-scaled and clipped."""
    raw: dict[str, np.ndarray]
    soc: np.ndarray
    """Per battery (codec order): what the shield needs."""
    capacity_kwh: np.ndarray
    missing: tuple[str, ...]
    """Devices with no telemetry for the slot (their last value or a safe default was used)."""


class ObservationBuilder:
    """Builds observations for one site; the codec and tariff come from the site manifest."""

    def __init__(self, site: SiteManifest, codec: Codec | None = None) -> None:
        self.site = site
        self.codec = codec or site.make_codec()
        self.n = len(site.prosumers)
        self.h = site.horizon
        self.batteries = site.battery_devices()
        self.import_price = np.asarray(site.import_price, dtype=np.float64)
        spec = site.batteries
        self.nominal_kwh = np.asarray(spec.capacity_kwh, dtype=np.float64)
        self.soc_default = np.asarray(spec.soc_initial, dtype=np.float64)
        self._last: dict[str, Metrics] = {}

    def slot_of_year(self, unix_s: int) -> int:
        """The env's slot index t (day of year x steps per day + slot of the day), from UTC."""
        return slot_of_year(unix_s, self.site.steps_per_day)

    def _get(self, state: SiteState, device: str, slot: int, missing: list[str]) -> Metrics | None:
        msg = state.latest.get(device)  # state.metrics, inlined: once per device per decision
        if msg is None or msg.slot != slot:
            missing.append(device)
            return self._last.get(device)
        self._last[device] = msg.metrics
        return msg.metrics

    def _demand_kw(self, meter: Metrics | None, appliance: Metrics | None) -> float:
        """The household's demand in the slot: what its meter served, with the flexible load
        its appliances report asked for in place of what demand response left of it (the env's
        `load` is the demand; a meter alone sees only what was served)."""
        if not isinstance(meter, MeterMetrics):
            return 0.0
        if isinstance(appliance, ApplianceMetrics) and appliance.demand_kw is not None:
            return meter.load_kw - appliance.load_kw + appliance.demand_kw
        return meter.load_kw

    def community_price(
        self, state: SiteState, slot: int, t: int, multiplier: float = 1.0
    ) -> float | None:
        """The seed formula's price of `slot` (the env's `community_price` after that slot),
        from the grid sensor's transformer flow and loading and the price signal that was in
        force (`multiplier`); `t` is the env's slot of the year of `slot`. None without the
        formula in the manifest or a transformer flow from the sensor."""
        seed = self.site.seed_price
        sensor = state.metrics(self.site.grid_sensor, slot)
        if seed is None or not isinstance(sensor, GridSensorMetrics):
            return None
        if sensor.trafo_net_kw is None:
            return None
        # envs.pricing.seed_price, restated for one site (tests/bridge/test_parity.py).
        demand = max(sensor.trafo_net_kw / self.site.demand_reference_kw, DEMAND_FACTOR_FLOOR)
        stress = max(sensor.trafo_loading - seed.stress_threshold, 0.0) / max(
            1.0 - seed.stress_threshold, 1e-9
        )
        tod = seed.time_of_day_multiplier[t % self.site.steps_per_day]
        return seed.base_rate * (demand + stress) * tod * multiplier

    def persistence(self, state: SiteState, slot: int) -> Forecast:
        """Every lead repeats the last slot (the env's `persistence` forecast mode)."""
        load = np.zeros(self.n)
        pv = np.zeros(self.n)
        net = 0.0
        for i, p in enumerate(self.site.prosumers):
            meter = state.metrics(p.meter, slot) or self._last.get(p.meter)
            inverter = state.metrics(p.pv, slot) or self._last.get(p.pv)
            appliance = state.metrics(p.appliance, slot) or self._last.get(p.appliance)
            load[i] = self._demand_kw(meter, appliance)
            if isinstance(meter, MeterMetrics):
                net += meter.net_kw
            if isinstance(inverter, PvMetrics):
                pv[i] = inverter.available_kw
        # The env's background is the feeder's uncontrolled load - PV: what the transformer
        # carries less the prosumers' meters and the community battery (controlled, not
        # background; its own telemetry says what it exchanged).
        community = self.site.community_battery
        if community is not None:
            battery = state.metrics(community, slot) or self._last.get(community)
            if isinstance(battery, BatteryMetrics):
                net += battery.power_kw
        sensor = state.metrics(self.site.grid_sensor, slot) or self._last.get(self.site.grid_sensor)
        return self._persistence(load, pv, net, sensor)

    def _persistence(
        self, load: np.ndarray, pv: np.ndarray, net: float, sensor: Metrics | None
    ) -> Forecast:
        """`persistence` from the slot's demand, available PV, the prosumers' and community
        battery's net exchange, and the grid sensor's metrics."""
        background = 0.0
        if isinstance(sensor, GridSensorMetrics) and sensor.trafo_net_kw is not None:
            background = sensor.trafo_net_kw - net
        return Forecast(
            load_kw=np.repeat(load[:, None], self.h, axis=1),
            pv_kw=np.repeat(pv[:, None], self.h, axis=1),
            background_net_kw=np.full(self.h, background),
        )

    def build(
        self,
        state: SiteState,
        slot: int,
        t: int,
        community_price: float,
        forecast: Forecast | None = None,
    ) -> Observation:
        """The observation for deciding slot `slot` + 1 from telemetry of `slot`.

        `t` is the env's slot-of-year index of the slot being decided (`slot_of_year`).
        """
        missing: list[str] = []
        n, h, site = self.n, self.h, self.site
        # Filled as Python lists, made arrays once: numpy's per-item stores cost more than the
        # rest of the loop at 1,000 devices.
        get = self._get
        soc_l: list[float] = self.soc_default.tolist()
        nominal_l: list[float] = self.nominal_kwh.tolist()
        cap_l = list(nominal_l)
        m: Metrics | None = None
        for k, device in enumerate(self.batteries):
            m = get(state, device, slot, missing)
            if isinstance(m, BatteryMetrics):
                soc_l[k] = m.soc
                cap_l[k] = m.soh * nominal_l[k]
        soc, cap = np.array(soc_l, dtype=np.float64), np.array(cap_l, dtype=np.float64)
        community = m if site.community_battery is not None else None  # last in codec order
        # What `persistence` adds up, gathered here from the same metrics, in its order.
        net = 0.0
        load_l, pv_l, backlog_l = [0.0] * n, [0.0] * n, [0.0] * n
        for i, p in enumerate(site.prosumers):
            meter = get(state, p.meter, slot, missing)
            inverter = get(state, p.pv, slot, missing)
            appliance = get(state, p.appliance, slot, missing)
            load_l[i] = self._demand_kw(meter, appliance)
            if isinstance(meter, MeterMetrics):
                net += meter.net_kw
            if isinstance(inverter, PvMetrics):
                pv_l[i] = inverter.available_kw
            if isinstance(appliance, ApplianceMetrics):
                backlog_l[i] = appliance.backlog_kwh
        load = np.array(load_l, dtype=np.float64)
        pv = np.array(pv_l, dtype=np.float64)
        backlog = np.array(backlog_l, dtype=np.float64)
        if isinstance(community, BatteryMetrics):
            net += community.power_kw
        sensor = self._get(state, site.grid_sensor, slot, missing)
        grid = np.array([1.0, 1.0, 0.0, 0.0])
        if isinstance(sensor, GridSensorMetrics):
            grid = np.array(
                [sensor.v_min_pu, sensor.v_max_pu, sensor.line_loading, sensor.trafo_loading]
            )
        fc = forecast or self._persistence(load, pv, net, sensor)
        spd = site.steps_per_day
        slot_of_day = t % spd
        day_phase = 2.0 * np.pi * slot_of_day / spd
        year_phase = 2.0 * np.pi * (t // spd) / max(site.n_days, 1)
        lead = (slot_of_day + np.arange(h)) % spd
        nominal = np.where(self.nominal_kwh > 0, self.nominal_kwh, 1.0)
        raw = {
            "time_of_day": np.array([[np.sin(day_phase), np.cos(day_phase)]]),
            "day_of_year": np.array([[np.sin(year_phase), np.cos(year_phase)]]),
            "soc": soc[None],
            "state_of_health": np.where(self.nominal_kwh > 0, cap / nominal, 1.0)[None],
            "load": load[None],
            "pv": pv[None],
            "backlog": backlog[None],
            "load_forecast": np.asarray(fc.load_kw, dtype=np.float64).reshape(1, n * h),
            "pv_forecast": np.asarray(fc.pv_kw, dtype=np.float64).reshape(1, n * h),
            "background_net_forecast": np.asarray(fc.background_net_kw).reshape(1, h),
            "import_price_forecast": self.import_price[lead][None],
            "feed_in_price": np.array([[site.feed_in_price]]),
            "community_price": np.array([[community_price]]),
            "grid": grid[None],
        }
        obs = self.codec.encode(raw, 1)[0]
        return Observation(obs, raw, soc, cap, tuple(missing))
