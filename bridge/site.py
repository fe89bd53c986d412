"""The site manifest: which devices make up the microgrid, and the layout the policy was trained on.

The bridge may not build the grid (that needs pandapower), so everything it needs from the
scenario is written once into this file (`microgrid devices site`): the codec (the same object
the env used, so observations match to the bit), the battery parameters the shield needs, the
tariff, and which device stands behind each codec label. It is authoritative: a device whose
birth disagrees with it about kind, key or ratings is refused.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, model_validator

from bridge.errors import ConfigError
from bridge.messages import Address, DeviceId, DeviceKind
from envs.codec import Codec
from envs.params import BatteryParams

_CONFIG = ConfigDict(extra="forbid", frozen=True)
Positive = Annotated[float, Field(gt=0.0)]


class SiteDevice(BaseModel):
    """One field device as installed: its id (also its broker user), kind, key and ratings."""

    model_config = _CONFIG
    id: DeviceId
    kind: DeviceKind
    address: Address
    capacity_w: Annotated[int, Field(gt=0, lt=2**32)]
    """Registered in DeviceRegistry; caps a slot's reading at capacity_w * 900 s / 3600."""
    power_kw: Annotated[float, Field(ge=0.0)] = 0.0
    capacity_kwh: Annotated[float, Field(ge=0.0)] = 0.0
    prosumer: str | None = None
    """The codec label (e.g. ``bus6``) this device belongs to; None for site-wide devices."""


class Prosumer(BaseModel):
    """The devices behind one codec prosumer label."""

    model_config = _CONFIG
    name: str
    meter: DeviceId
    pv: DeviceId
    battery: DeviceId
    appliance: DeviceId


class BatterySpec(BaseModel):
    """`envs.params.BatteryParams` as lists: what the shield needs to bound set-points."""

    model_config = _CONFIG
    capacity_kwh: list[float]
    power_kw: list[float]
    efficiency_charge: list[float]
    efficiency_discharge: list[float]
    soc_min: list[float]
    soc_max: list[float]
    soc_initial: list[float]
    fade_per_full_cycle: list[float]
    replacement_cost_per_kwh: list[float]

    def params(self) -> BatteryParams:
        return BatteryParams(**{k: np.asarray(v, dtype=np.float64) for k, v in self})

    @classmethod
    def of(cls, b: BatteryParams) -> BatterySpec:
        return cls(**{k: [float(x) for x in getattr(b, k)] for k in cls.model_fields})


class SeedPrice(BaseModel):
    """The community price's seed formula (`envs.pricing.seed_price`), as the env computes the
    `community_price` the policy observes:
    base_rate x (demand factor + grid stress factor) x time-of-day multiplier x price signal."""

    model_config = _CONFIG
    base_rate: float
    stress_threshold: Annotated[float, Field(ge=0.0, lt=1.0)]
    time_of_day_multiplier: list[float]
    """Per slot of the day."""


class SiteMarket(BaseModel):
    """What the env's default bidding rule and the slot's price parameters need of the scenario
    (`envs.scenario.MarketConfig` and the flexible load), so the bridge bids as the env does
    (`envs.market.rule_book`) and posts the same reference price and band."""

    model_config = _CONFIG
    band_low_bps: Annotated[int, Field(ge=0, le=10_000)]
    band_high_bps: Annotated[int, Field(ge=10_000, le=100_000)]
    bid_markup: Annotated[float, Field(ge=0.0, le=1.0)]
    imbalance_penalty_bps: Annotated[int, Field(ge=0, le=10_000)]
    emergency_loading: Annotated[float, Field(gt=0.0)]
    """Transformer loading above which nobody trades (emergency mode)."""
    flexible_share: Annotated[float, Field(ge=0.0, le=1.0)]
    """Curtailable plus shiftable share of a household's load (what demand response reaches)."""
    rebound_per_step: Annotated[float, Field(ge=0.0, le=1.0)]
    dr_loading: Annotated[float, Field(gt=0.0)] = 0.9
    """Transformer loading above which a slot is a demand-response event (GridBalance's rule,
    as the env's gate), as is a voltage deviation beyond `dr_voltage_pu`."""
    dr_voltage_pu: Annotated[float, Field(ge=0.0)] = 0.05
    dr_incentive_per_wh: Annotated[int, Field(ge=0)] = 0
    """Reward per Wh of demand-response reduction in an event (money units); 0 grants none."""


class SiteManifest(BaseModel):
    """Everything about the site the bridge and the device simulator agree on."""

    model_config = _CONFIG
    site: DeviceId
    grid_code: str
    steps_per_day: Annotated[int, Field(gt=0)]
    n_days: Annotated[int, Field(gt=0)]
    dt_h: Positive
    horizon: Annotated[int, Field(gt=0)]
    import_price: list[float]
    """Per slot of the day (currency/kWh)."""
    feed_in_price: float
    demand_reference_kw: Positive
    seed_price: SeedPrice | None = None
    """None (a manifest from before it was recorded): the bridge observes the tariff instead."""
    market: SiteMarket | None = None
    """None: the bridge submits no orders (a manifest from before the market was recorded)."""
    codec: dict[str, Any]
    batteries: BatterySpec
    prosumers: list[Prosumer]
    community_battery: DeviceId | None = None
    grid_sensor: DeviceId
    devices: list[SiteDevice]
    _index: dict[str, SiteDevice] = PrivateAttr(default_factory=dict)

    def model_post_init(self, context: Any, /) -> None:
        self._index.update({d.id: d for d in self.devices})

    @model_validator(mode="after")
    def _consistent(self) -> SiteManifest:
        ids = [d.id for d in self.devices]
        if len(set(ids)) != len(ids):
            dup = sorted({i for i in ids if ids.count(i) > 1})
            raise ValueError(f"devices: expected unique ids, got duplicates {dup}")
        kinds = {d.id: d.kind for d in self.devices}
        wanted: list[tuple[str, str, DeviceKind]] = []
        for p in self.prosumers:
            wanted += [
                (f"prosumers[{p.name}].meter", p.meter, DeviceKind.METER),
                (f"prosumers[{p.name}].pv", p.pv, DeviceKind.PV),
                (f"prosumers[{p.name}].battery", p.battery, DeviceKind.BATTERY),
                (f"prosumers[{p.name}].appliance", p.appliance, DeviceKind.APPLIANCE),
            ]
        if self.community_battery is not None:
            wanted.append(("community_battery", self.community_battery, DeviceKind.BATTERY))
        wanted.append(("grid_sensor", self.grid_sensor, DeviceKind.GRID_SENSOR))
        for where, device, kind in wanted:
            if kinds.get(device) != kind:
                raise ValueError(
                    f"{where}: expected the id of a {kind.value} in devices, got {device!r}"
                )
        if (
            self.seed_price is not None
            and len(self.seed_price.time_of_day_multiplier) != self.steps_per_day
        ):
            raise ValueError(
                f"seed_price.time_of_day_multiplier: expected {self.steps_per_day} values (one "
                f"per slot of the day), got {len(self.seed_price.time_of_day_multiplier)}"
            )
        if len(self.import_price) != self.steps_per_day:
            raise ValueError(
                f"import_price: expected {self.steps_per_day} values (one per slot of the day), "
                f"got {len(self.import_price)}"
            )
        n_bat = len(self.batteries.power_kw)
        expected = len(self.prosumers) + (self.community_battery is not None)
        if n_bat != expected:
            raise ValueError(f"batteries: expected {expected} entries, got {n_bat}")
        return self

    # ---- derived views --------------------------------------------------------------------
    def device(self, device_id: str) -> SiteDevice | None:
        return self._index.get(device_id)

    def battery_devices(self) -> list[str]:
        """In the codec's battery order: prosumers' first, then the community battery."""
        ids = [p.battery for p in self.prosumers]
        return ids + ([self.community_battery] if self.community_battery else [])

    def make_codec(self) -> Codec:
        return Codec.from_dict(self.codec)

    def save(self, path: Path) -> None:
        path.write_text(self.model_dump_json(indent=1))


def load_site(path: str | Path) -> SiteManifest:
    """Read and validate a site manifest; errors name the field and the expected value."""
    p = Path(path)
    try:
        raw = json.loads(p.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{p}: expected a readable JSON site manifest ({exc})") from None
    try:
        return SiteManifest.model_validate(raw)
    except ValidationError as exc:
        err = exc.errors(include_url=False)[0]
        where = ".".join(str(x) for x in err["loc"]) or "<manifest>"
        raise ConfigError(f"{p}: {where}: {err['msg']}") from None
