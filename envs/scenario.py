"""Scenario files: what grid, which prosumers, which devices, prices, data split and reward.

A scenario is YAML validated by the pydantic models below. Every field has a default, so
`Scenario()` is the default scenario (simbench `1-LV-rural1--2-sw`) and works offline; a YAML
file only states what differs. A bad file fails with `ScenarioError` naming the field and the
allowed values, never with a half-built environment.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from envs.errors import ScenarioError

#: simbench's low-voltage grid codes: the six feeders, three PV/storage expansion stages
#: (0 = today, 1 and 2 = future scenarios) and with or without switches.
LV_GRID_CODES: tuple[str, ...] = tuple(
    f"1-LV-{feeder}--{stage}-{sw}"
    for feeder in ("rural1", "rural2", "rural3", "semiurb4", "semiurb5", "urban6")
    for stage in (0, 1, 2)
    for sw in ("sw", "no_sw")
)

Fraction = Annotated[float, Field(ge=0.0, le=1.0)]
Positive = Annotated[float, Field(gt=0.0)]
NonNegative = Annotated[float, Field(ge=0.0)]


class _Strict(BaseModel):
    """Unknown keys are errors: a typo in a scenario must not silently fall back to a default."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class BatteryConfig(_Strict):
    """Prosumer batteries. Sizes come from the simbench storage at the prosumer's bus."""

    default_capacity_kwh: NonNegative = 10.0
    """Capacity given to a prosumer whose bus has no simbench storage unit (0 = no battery)."""
    c_rate: Positive = 0.5
    """Power rating as a multiple of capacity per hour, used when simbench gives none."""
    efficiency_charge: Annotated[float, Field(gt=0.0, le=1.0)] = 0.95
    efficiency_discharge: Annotated[float, Field(gt=0.0, le=1.0)] = 0.95
    soc_min: Fraction = 0.1
    soc_max: Fraction = 0.9
    soc_initial: Fraction = 0.5
    fade_per_full_cycle: Annotated[float, Field(ge=0.0, le=0.01)] = 2e-4
    """Capacity fraction lost per equivalent full cycle (a 5,000-cycle, 80 %-EoL cell: 4e-5)."""
    replacement_cost_per_kwh: NonNegative = 300.0
    """Cost of lost capacity, currency per kWh: turns capacity fade into a degradation cost."""

    @model_validator(mode="after")
    def _soc_window(self) -> BatteryConfig:
        if not self.soc_min < self.soc_max:
            raise ValueError(f"soc_min ({self.soc_min}) must be below soc_max ({self.soc_max})")
        if not self.soc_min <= self.soc_initial <= self.soc_max:
            raise ValueError(
                f"soc_initial ({self.soc_initial}) must lie in [soc_min, soc_max] = "
                f"[{self.soc_min}, {self.soc_max}]"
            )
        return self


class CommunityBatteryConfig(BatteryConfig):
    """The community battery at the transformer's low-voltage bus, dispatched by the operator."""

    enabled: bool = True
    capacity_kwh: NonNegative = 100.0
    power_kw: NonNegative = 50.0


class FlexibleLoadConfig(_Strict):
    """Demand response: a share of each prosumer's load can be dropped or deferred."""

    curtailable_share: Fraction = 0.1
    """Share of load that a DR signal of 1 drops for good (e.g. comfort heating set-back)."""
    shiftable_share: Fraction = 0.2
    """Share of load that a DR signal of 1 defers into a backlog served later."""
    rebound_per_step: Fraction = 0.25
    """Share of the backlog served per step once the DR signal is released."""
    discomfort_cost_per_kwh: NonNegative = 0.30
    unserved_penalty_per_kwh: NonNegative = 0.50
    """Charged on backlog still unserved when the episode ends."""

    @model_validator(mode="after")
    def _shares(self) -> FlexibleLoadConfig:
        if self.curtailable_share + self.shiftable_share > 1.0:
            raise ValueError("curtailable_share + shiftable_share must not exceed 1")
        return self


class TouPeriod(_Strict):
    """One time-of-use band: [start_hour, end_hour) at `price_per_kwh`."""

    start_hour: Annotated[int, Field(ge=0, le=23)]
    end_hour: Annotated[int, Field(ge=1, le=24)]
    price_per_kwh: NonNegative


class TariffConfig(_Strict):
    """What the community pays the upstream grid per kWh imported and earns per kWh exported."""

    import_periods: list[TouPeriod] = Field(
        default_factory=lambda: [
            TouPeriod(start_hour=0, end_hour=7, price_per_kwh=0.22),
            TouPeriod(start_hour=7, end_hour=17, price_per_kwh=0.30),
            TouPeriod(start_hour=17, end_hour=21, price_per_kwh=0.42),
            TouPeriod(start_hour=21, end_hour=24, price_per_kwh=0.26),
        ]
    )
    feed_in_price_per_kwh: NonNegative = 0.08

    @field_validator("import_periods")
    @classmethod
    def _cover_day(cls, periods: list[TouPeriod]) -> list[TouPeriod]:
        hours = sorted(h for p in periods for h in range(p.start_hour, p.end_hour))
        if hours != list(range(24)):
            raise ValueError("import periods must cover hours 0-23 exactly once each")
        return periods


class SeedPriceConfig(_Strict):
    """The seed's community price: baseRate * (demandFactor + gridStressFactor) * timeOfDay."""

    base_rate: NonNegative = 0.25
    stress_threshold: Fraction = 0.8
    """Transformer loading above which gridStressFactor grows from 0 (1 at 100 % loading)."""
    time_of_day_multiplier: list[NonNegative] = Field(
        default_factory=lambda: [0.8] * 7 + [1.0] * 10 + [1.3] * 4 + [0.9] * 3
    )
    """One multiplier per hour of the day (24 values)."""
    signal_range: Annotated[float, Field(ge=1.0, le=10.0)] = 2.0
    """The action's price signal scales the price by a factor in [1/range, range]."""

    @field_validator("time_of_day_multiplier")
    @classmethod
    def _hours(cls, v: list[float]) -> list[float]:
        if len(v) != 24:
            raise ValueError(f"expected 24 hourly values, got {len(v)}")
        return v


class SplitConfig(_Strict):
    """How the year's days are divided; test days never reach training."""

    validation_fraction: Annotated[float, Field(gt=0.0, lt=0.5)] = 0.15
    test_fraction: Annotated[float, Field(gt=0.0, lt=0.5)] = 0.15
    seed: int = 0
    """Seed of the day permutation: fixed, so a split is the same on every machine."""


class ForecastConfig(_Strict):
    """Forecasts of load and PV that the agent sees for the next `horizon_steps` slots.

    Eight hours by default: the evening peak must be in sight by the early afternoon, when the
    batteries decide how much PV to keep. With two hours even MPC on *perfect* forecasts reached
    only 0.87 of the optimum's savings; with eight noisy hours it reaches 0.93 (docs/training.md).
    """

    horizon_steps: Annotated[int, Field(ge=1, le=96)] = 32
    mode: Literal["perfect", "noisy", "persistence"] = "noisy"
    noise_std: Annotated[float, Field(ge=0.0, le=2.0)] = 0.15
    """Relative error standard deviation at the horizon; it grows with sqrt(lead)."""


class RewardWeights(_Strict):
    """reward = -(cost + voltage + thermal + degradation + discomfort penalties), weighted."""

    cost: NonNegative = 1.0
    voltage_violation: NonNegative = 50.0
    """Per pu of voltage outside the band, summed over buses, per step."""
    thermal_violation: NonNegative = 5.0
    """Per unit of overload (loading - 1) summed over lines and transformers, per step."""
    degradation: NonNegative = 1.0
    discomfort: NonNegative = 1.0
    divergence_penalty: NonNegative = 100.0
    """Charged once when the power flow diverges and the episode is truncated."""


class MarketConfig(_Strict):
    """The peer-to-peer market inside each step, and the ledger that settles it."""

    enabled: bool = True
    ledger: Literal["mirror", "evm", "rpc"] = "mirror"
    """Which ledger settles trades: `mirror` (the contracts' rules in numpy, for training),
    `evm` (the contracts on an in-process EVM, see `evm_engine`) or `rpc` (the contracts on the
    node at `rpc_url`). The chain ledgers settle one grid each: single envs only."""
    evm_engine: Literal["revm", "py-evm"] = "revm"
    """What runs the contracts of the `evm` ledger in process: `revm` (Rust, through pyrevm:
    training speed; its gas figures read low, see docs/trading.md) or `py-evm` (pure Python,
    exact gas, about a second a slot)."""
    rpc_url: str = "http://127.0.0.1:8545"
    """JSON-RPC node for the `rpc` ledger (e.g. anvil); the suite is deployed there at env build."""
    fee_bps: Annotated[int, Field(ge=0, le=1_000)] = 50
    """Trading fee on each sale, to the treasury (EnergyTrading's cap is 1,000 bps)."""
    imbalance_penalty_bps: Annotated[int, Field(ge=0, le=10_000)] = 2_000
    """Traded vs metered differences settle at the reference price, worse by this much."""
    band_low_bps: Annotated[int, Field(ge=0, le=10_000)] = 2_000
    band_high_bps: Annotated[int, Field(ge=10_000, le=100_000)] = 30_000
    """Limit prices must lie in [low, high] x the reference price, as EnergyTrading's band."""
    bid_markup: Annotated[float, Field(ge=0.0, le=1.0)] = 0.1
    """Default bidding rule: buyers bid reference x (1 + markup), sellers ask x (1 - markup)."""
    initial_credit: NonNegative = 100.0
    """Each prosumer's deposit (currency) when an episode starts; buy orders need the escrow."""
    treasury_credit: NonNegative = 100_000.0
    """The treasury's deposit (currency): it pays imbalance surpluses out of it."""
    dr_loading: Annotated[float, Field(gt=0.0, le=3.0)] = 0.9
    """Transformer loading that starts a demand-response event for the next slot."""
    dr_voltage_pu: Annotated[float, Field(ge=0.0, le=0.2)] = 0.05
    """|v - 1| beyond which a demand-response event starts, whatever the loading."""
    emergency_loading: Annotated[float, Field(gt=0.0, le=5.0)] = 1.2
    """Transformer loading that puts the market in emergency mode (no trading) for a slot."""
    dr_incentive_per_kwh: NonNegative = 0.10
    """RewardSystem tokens per kWh a prosumer's demand response removes during an event."""
    renewable_reward_per_kwh: NonNegative = 0.02
    """RewardSystem tokens per kWh a prosumer's meter exports (from its signed reading)."""

    @model_validator(mode="after")
    def _thresholds(self) -> MarketConfig:
        if not self.dr_loading < self.emergency_loading:
            raise ValueError(
                f"dr_loading ({self.dr_loading}) must be below emergency_loading "
                f"({self.emergency_loading})"
            )
        return self


class ProsumerConfig(_Strict):
    """Which buses are controllable prosumers: `auto` or an explicit list of bus indices."""

    mode: Literal["auto", "buses"] = "auto"
    buses: list[int] = Field(default_factory=list)
    """pandapower bus indices (mode `buses`): each prosumer owns all loads, PV and storage there."""
    max_prosumers: Annotated[int, Field(ge=1, le=512)] = 64

    @model_validator(mode="after")
    def _explicit(self) -> ProsumerConfig:
        if self.mode == "buses" and not self.buses:
            raise ValueError("mode 'buses' needs a non-empty list of bus indices in 'buses'")
        return self


class Scenario(_Strict):
    """A complete, validated scenario; `Scenario()` is the default one."""

    name: str = "rural1"
    grid: str = "1-LV-rural1--2-sw"
    prosumers: ProsumerConfig = Field(default_factory=ProsumerConfig)
    battery: BatteryConfig = Field(default_factory=BatteryConfig)
    community_battery: CommunityBatteryConfig = Field(default_factory=CommunityBatteryConfig)
    flexible_load: FlexibleLoadConfig = Field(default_factory=FlexibleLoadConfig)
    tariff: TariffConfig = Field(default_factory=TariffConfig)
    seed_price: SeedPriceConfig = Field(default_factory=SeedPriceConfig)
    time_step_minutes: Literal[15] = 15
    """The simbench profiles are 15-minute data; other steps would need resampling."""
    episode_steps: Annotated[int, Field(ge=1, le=96 * 7)] = 96
    split: SplitConfig = Field(default_factory=SplitConfig)
    forecast: ForecastConfig = Field(default_factory=ForecastConfig)
    reward: RewardWeights = Field(default_factory=RewardWeights)
    market: MarketConfig = Field(default_factory=MarketConfig)

    @field_validator("grid")
    @classmethod
    def _grid_code(cls, code: str) -> str:
        if code not in LV_GRID_CODES:
            raise ValueError(
                f"unknown simbench LV grid code {code!r}; allowed: {', '.join(LV_GRID_CODES)}"
            )
        return code


def _format(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        field = ".".join(str(p) for p in e["loc"]) or "<root>"
        lines.append(f"{field}: {e['msg']} (got {e.get('input')!r})")
    return "; ".join(lines)


def parse_scenario(data: object, source: str = "<scenario>") -> Scenario:
    """Validate a mapping (as read from YAML) into a `Scenario`, or raise `ScenarioError`."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ScenarioError(f"{source}: expected a mapping of scenario fields, got {type(data)}")
    try:
        return Scenario.model_validate(data)
    except ValidationError as err:
        raise ScenarioError(f"{source}: {_format(err)}") from None


def load_scenario(path: str | Path | None = None) -> Scenario:
    """Read and validate a scenario YAML file; `None` gives the default scenario."""
    if path is None:
        return Scenario()
    p = Path(path)
    if not p.is_file():
        raise ScenarioError(f"scenario file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as err:
        raise ScenarioError(f"{p}: not valid YAML: {err}") from None
    return parse_scenario(data, str(p))
