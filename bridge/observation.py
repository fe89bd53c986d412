"""From accepted telemetry to the policy's observation, through the env's own codec.

`SiteState` keeps the latest accepted metrics per device; `ObservationBuilder` turns them into
the same raw fields `envs.dynamics.observe` produces and encodes them with `envs.codec`, so the
policy sees live data exactly as it saw simulated data. Fields the devices cannot measure come
from a `Forecast` the caller supplies (a forecast service, or persistence of the last slot, the
env's `persistence` mode). A device with no fresh telemetry is reported by id: the decision
step falls back to the rule-based controller and says which devices were missing.

The builder does not walk 1,000 devices' models at decision time: `SiteState.latest` keeps the
metrics it reads in rows (`_Columns`) as telemetry is accepted, and `build` reads them as arrays
(tests/bridge/test_observation.py checks it against the walk).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

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


#: Per kind, the metrics a row holds, in column order (every field of the kind's model).
_ROWS = {
    "battery": ("soc", "soh", "power_kw"),
    "meter": ("net_kw", "load_kw"),
    "pv": ("available_kw", "pv_kw", "curtailment"),
    "appliance": ("load_kw", "backlog_kwh", "demand_kw", "dr_share"),
    "grid_sensor": ("v_min_pu", "v_max_pu", "line_loading", "trafo_loading", "trafo_net_kw"),
}
_OPTIONAL = {"appliance": "demand_kw", "grid_sensor": "trafo_net_kw"}
"""The field a kind may leave out: NaN in its row (NaN is refused on the wire)."""
_MODELS: dict[str, type[Metrics]] = {
    "battery": BatteryMetrics, "meter": MeterMetrics, "pv": PvMetrics,
    "appliance": ApplianceMetrics, "grid_sensor": GridSensorMetrics,
}  # fmt: skip
_WIDTH = max(len(fields) for fields in _ROWS.values())


class _Layout:
    """The rows `ObservationBuilder.build` reads, in blocks: batteries (codec order), meters,
    PV inverters, appliances (prosumer order each), then the grid sensor."""

    def __init__(self, site: SiteManifest, batteries: list[str]) -> None:
        n, b = len(site.prosumers), len(batteries)
        rows = [(d, "battery") for d in batteries]
        rows += [(p.meter, "meter") for p in site.prosumers]
        rows += [(p.pv, "pv") for p in site.prosumers]
        rows += [(p.appliance, "appliance") for p in site.prosumers]
        rows.append((site.grid_sensor, "grid_sensor"))
        self.names = [d for d, _ in rows]
        self.size = len(rows)
        where: dict[str, list[tuple[int, str]]] = {}
        for i, (device, kind) in enumerate(rows):
            where.setdefault(device, []).append((i, kind))
        self.where = {device: tuple(at) for device, at in where.items()}
        self.n_battery, self.n = b, n
        # The order `missing` names devices in: batteries, each prosumer's meter, PV and
        # appliance, the sensor (the order the devices were read in before the rows).
        per_prosumer = np.arange(n)[:, None] + b + n * np.arange(3)[None, :]
        self.missing_order = np.concatenate(
            [np.arange(b), per_prosumer.ravel(), [self.size - 1]]
        ).astype(np.intp)


class _Columns:
    """The metrics `build` reads, one row per `_Layout` row, kept current by `SiteState` as
    telemetry is accepted: a decision reads ~10 lists as arrays instead of 1,000 devices'
    models (walking them was the largest part of a 1,000-device decision, cache misses on
    freshly decoded objects mostly). Python lists, not arrays: a list store at ingest costs a
    fraction of numpy's per-item store."""

    def __init__(self, layout: _Layout) -> None:
        self.layout = layout
        size = layout.size
        self.slots = [-1] * size
        """The slot of the device's latest telemetry (-1: none)."""
        self.ok = [False] * size
        """Its metrics are of the row's kind (else the row reads as no metrics)."""
        self.values = [[0.0] * size for _ in range(_WIDTH)]
        """Column-major: `values[c][row]`, in the order of `_ROWS[kind]`."""

    def record(self, device: str, msg: Telemetry) -> None:
        at = self.layout.where.get(device)
        if at is None:
            return
        m = msg.metrics
        v = self.values
        for i, kind in at:
            self.slots[i] = msg.slot
            ok = self.ok[i] = m.kind == kind
            if not ok:
                continue
            if isinstance(m, BatteryMetrics):
                v[0][i], v[1][i], v[2][i] = m.soc, m.soh, m.power_kw
            elif isinstance(m, MeterMetrics):
                v[0][i], v[1][i] = m.net_kw, m.load_kw
            elif isinstance(m, PvMetrics):
                v[0][i], v[1][i], v[2][i] = m.available_kw, m.pv_kw, m.curtailment
            elif isinstance(m, ApplianceMetrics):
                v[0][i], v[1][i], v[3][i] = m.load_kw, m.backlog_kwh, m.dr_share
                v[2][i] = np.nan if m.demand_kw is None else m.demand_kw  # NaN: never sent
            elif isinstance(m, GridSensorMetrics):
                v[0][i], v[1][i], v[2][i], v[3][i] = (
                    m.v_min_pu, m.v_max_pu, m.line_loading, m.trafo_loading,
                )  # fmt: skip
                v[4][i] = np.nan if m.trafo_net_kw is None else m.trafo_net_kw

    def forget(self, device: str) -> None:
        for i, _ in self.layout.where.get(device, ()):
            self.slots[i], self.ok[i] = -1, False


class _Latest(dict[str, Telemetry]):
    """`SiteState.latest`: a dict that keeps a builder's `_Columns` in step with it. A change
    other than setting or deleting one device detaches them (the next build reads it all)."""

    __slots__ = ("columns",)

    def __init__(self) -> None:
        super().__init__()
        self.columns: _Columns | None = None

    def __setitem__(self, device: str, msg: Telemetry) -> None:
        super().__setitem__(device, msg)
        if self.columns is not None:
            self.columns.record(device, msg)

    def __delitem__(self, device: str) -> None:
        super().__delitem__(device)
        if self.columns is not None:
            self.columns.forget(device)

    def _detach(self) -> None:
        self.columns = None

    def pop(self, *args: Any) -> Any:
        self._detach()
        return super().pop(*args)

    def popitem(self) -> tuple[str, Telemetry]:
        self._detach()
        return super().popitem()

    def clear(self) -> None:
        self._detach()
        super().clear()

    def update(self, *args: Any, **kwargs: Any) -> None:
        self._detach()
        super().update(*args, **kwargs)

    def setdefault(self, *args: Any) -> Any:
        self._detach()
        return super().setdefault(*args)

    def __ior__(self, other: Any) -> _Latest:  # type: ignore[override,misc]
        self._detach()
        return super().__ior__(other)


@dataclass
class SiteState:
    """The latest accepted telemetry per device, with the slot it describes."""

    latest: dict[str, Telemetry] = field(default_factory=_Latest)

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
        self._layout = _Layout(site, self.batteries)
        size = self._layout.size
        self._last_values = np.zeros((_WIDTH, size))
        """Per row, the metrics of the last build that had the device's telemetry for its
        slot: what a device without fresh telemetry is read as (its last value)."""
        self._last_ok = np.zeros(size, dtype=bool)

    def slot_of_year(self, unix_s: int) -> int:
        """The env's slot index t (day of year x steps per day + slot of the day), from UTC."""
        return slot_of_year(unix_s, self.site.steps_per_day)

    def _last(self, device: str, kind: str) -> Metrics | None:
        """The device's metrics (of `kind`) as the last build that had them fresh read them."""
        for i, row_kind in self._layout.where.get(device, ()):
            if row_kind == kind and self._last_ok[i]:
                fields = dict(zip(_ROWS[kind], self._last_values[:, i].tolist(), strict=False))
                optional = _OPTIONAL.get(kind)
                if optional is not None and np.isnan(fields[optional]):
                    fields[optional] = None
                return _MODELS[kind].model_construct(kind=kind, **fields)
        return None

    def track(self, state: SiteState) -> None:
        """Keep `state`'s rows for this builder from now on (else the first `build` reads
        every device, ~1,000 models, inside a slot's decision)."""
        self._columns(state)

    def _columns(self, state: SiteState) -> _Columns:
        """`state`'s metrics as rows: kept by `state` since the last build, or read now."""
        latest = state.latest
        held = latest.columns if isinstance(latest, _Latest) else None
        if held is not None and held.layout is self._layout:
            return held
        columns = _Columns(self._layout)
        for device, msg in latest.items():
            columns.record(device, msg)
        if isinstance(latest, _Latest):
            latest.columns = columns
        return columns

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
            meter = state.metrics(p.meter, slot) or self._last(p.meter, "meter")
            inverter = state.metrics(p.pv, slot) or self._last(p.pv, "pv")
            appliance = state.metrics(p.appliance, slot) or self._last(p.appliance, "appliance")
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
            battery = state.metrics(community, slot) or self._last(community, "battery")
            if isinstance(battery, BatteryMetrics):
                net += battery.power_kw
        sensor = state.metrics(self.site.grid_sensor, slot) or self._last(
            self.site.grid_sensor, "grid_sensor"
        )
        flow = sensor.trafo_net_kw if isinstance(sensor, GridSensorMetrics) else None
        return self._persistence(load, pv, net, flow)

    def _persistence(
        self, load: np.ndarray, pv: np.ndarray, net: float, trafo_net_kw: float | None
    ) -> Forecast:
        """`persistence` from the slot's demand, available PV, the prosumers' and community
        battery's net exchange, and the grid sensor's transformer flow."""
        background = 0.0
        if trafo_net_kw is not None:
            background = trafo_net_kw - net
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
        n, h, site = self.n, self.h, self.site
        layout = self._layout
        columns = self._columns(state)
        fresh = np.array(columns.slots) == slot
        # A row with telemetry of `slot` takes it; any other keeps what the last build read.
        values, ok = self._last_values, self._last_ok
        values[:, fresh] = np.array(columns.values)[:, fresh]
        ok[fresh] = np.array(columns.ok)[fresh]
        order = layout.missing_order
        missing = [layout.names[i] for i in order[~fresh[order]].tolist()]
        b = layout.n_battery
        batteries, on = values[:, :b], ok[:b]
        soc = np.where(on, batteries[0], self.soc_default)
        cap = np.where(on, batteries[1] * self.nominal_kwh, self.nominal_kwh)
        meters, pvs, appliances = (values[:, b + k * n : b + (k + 1) * n] for k in range(3))
        meter_on, pv_on, appliance_on = (ok[b + k * n : b + (k + 1) * n] for k in range(3))
        # The household's demand (`_demand_kw`): what its meter served, with the flexible
        # load its appliance asked for in place of what demand response left of it.
        asked = appliance_on & ~np.isnan(appliances[2])
        load = np.where(
            meter_on,
            np.where(asked, meters[1] - appliances[0] + appliances[2], meters[1]),
            0.0,
        )
        pv = np.where(pv_on, pvs[0], 0.0)
        backlog = np.where(appliance_on, appliances[1], 0.0)
        # What `persistence` adds up, in its order (a float sum, one term at a time).
        net = 0.0
        for x in meters[0][meter_on].tolist():
            net += x
        if site.community_battery is not None and b and on[b - 1]:  # last in codec order
            net += float(batteries[2][b - 1])
        grid = np.array([1.0, 1.0, 0.0, 0.0])
        flow: float | None = None
        if ok[-1]:
            grid = values[:4, -1].copy()
            if not np.isnan(values[4, -1]):
                flow = float(values[4, -1])
        fc = forecast or self._persistence(load, pv, net, flow)
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
