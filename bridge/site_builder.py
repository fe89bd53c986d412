"""Build a site manifest from a scenario's GridParams: one device of each kind per prosumer.

The simulator and the tests need a site that matches a scenario exactly (same codec, same
batteries); an installer writes the manifest by hand or from their asset register instead.
Device keys are derived from a seed so a simulated site is reproducible; real devices make
their own keys and only their addresses enter the manifest.
"""

from __future__ import annotations

from eth_utils import keccak

from bridge.messages import DeviceKind
from bridge.signing import address_of
from bridge.site import BatterySpec, Prosumer, SeedPrice, SiteDevice, SiteManifest, SiteMarket
from envs.codec import Codec
from envs.ledger import per_wh
from envs.params import GridParams
from envs.scenario import MarketConfig

#: Headroom of a meter's registered capacity over the prosumer's peak net flow.
METER_HEADROOM = 1.5


def device_key(seed: str, device_id: str) -> bytes:
    """A reproducible private key for a simulated device (never for a real one)."""
    return keccak(text=f"microgrid-sim:{seed}:{device_id}")


def build_site(
    params: GridParams,
    *,
    site: str = "site1",
    seed: str = "0",
    market: MarketConfig | None = None,
) -> SiteManifest:
    """The site of `params`: devices ``<prosumer>-{meter,pv,battery,appliance}``, a community
    battery ``community-battery`` if the scenario has one, and one ``feeder-sensor``; the
    scenario's `market` (default: `MarketConfig()`) for the bridge's orders."""
    codec = Codec.from_params(params)
    b = params.batteries
    devices: list[SiteDevice] = []
    prosumers: list[Prosumer] = []

    def add(device_id: str, kind: DeviceKind, capacity_kw: float, **extra: object) -> str:
        devices.append(
            SiteDevice(
                id=device_id,
                kind=kind,
                address=address_of(device_key(seed, device_id)),
                capacity_w=max(1, round(capacity_kw * 1000)),
                **extra,  # type: ignore[arg-type]
            )
        )
        return device_id

    for i, name in enumerate(params.prosumer_names):
        load = float(params.load_scale_kw[i])
        pv = float(params.pv_scale_kw[i])
        power = float(b.power_kw[i])
        meter_kw = METER_HEADROOM * (max(load, pv) + power) + 1.0
        prosumers.append(
            Prosumer(
                name=name,
                meter=add(f"{name}-meter", DeviceKind.METER, meter_kw, prosumer=name),
                pv=add(f"{name}-pv", DeviceKind.PV, max(pv, 0.001), prosumer=name),
                battery=add(
                    f"{name}-battery",
                    DeviceKind.BATTERY,
                    max(power, 0.001),
                    prosumer=name,
                    power_kw=power,
                    capacity_kwh=float(b.capacity_kwh[i]),
                ),
                appliance=add(f"{name}-appliance", DeviceKind.APPLIANCE, load, prosumer=name),
            )
        )
    community = None
    if params.has_community_battery:
        k = params.n_prosumer
        community = add(
            "community-battery",
            DeviceKind.BATTERY,
            float(b.power_kw[k]),
            power_kw=float(b.power_kw[k]),
            capacity_kwh=float(b.capacity_kwh[k]),
        )
    sensor = add("feeder-sensor", DeviceKind.GRID_SENSOR, 1.0)
    return SiteManifest(
        site=site,
        grid_code=params.grid_code,
        steps_per_day=params.steps_per_day,
        n_days=params.n_days,
        dt_h=params.dt_h,
        horizon=params.horizon,
        import_price=[float(x) for x in params.import_price],
        feed_in_price=float(params.feed_in_price),
        demand_reference_kw=float(params.demand_reference_kw),
        seed_price=SeedPrice(
            base_rate=float(params.base_rate),
            stress_threshold=float(params.stress_threshold),
            time_of_day_multiplier=[float(x) for x in params.tod_multiplier],
        ),
        market=_market(params, market or MarketConfig()),
        codec=codec.to_dict(),
        batteries=BatterySpec.of(b),
        prosumers=prosumers,
        community_battery=community,
        grid_sensor=sensor,
        devices=devices,
    )


def _market(params: GridParams, m: MarketConfig) -> SiteMarket | None:
    """The manifest's market section; None for a stand-in without the flexible load's
    parameters (the ingest benchmark's tiny site, which trades nothing)."""
    if not hasattr(params, "rebound_per_step"):
        return None
    return SiteMarket(
        band_low_bps=m.band_low_bps,
        band_high_bps=m.band_high_bps,
        bid_markup=m.bid_markup,
        imbalance_penalty_bps=m.imbalance_penalty_bps,
        emergency_loading=m.emergency_loading,
        flexible_share=float(params.curtailable_share + params.shiftable_share),
        rebound_per_step=float(params.rebound_per_step),
        dr_loading=m.dr_loading,
        dr_voltage_pu=m.dr_voltage_pu,
        dr_incentive_per_wh=per_wh(m.dr_incentive_per_kwh),
    )
