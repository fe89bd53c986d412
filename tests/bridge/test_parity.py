"""Sim to live parity: one test day in the env, and the same day through the device simulator, a
real mosquitto (TLS, a password per device, the ACL), the bridge's run loop and anvil with the
suite deployed, with the same frozen policy, gives the same commands and the same settlements.

Both paths start from the same state (the env's state at the first slot compared; the devices
idle in the slot before) and run the same deterministic policy behind the same shield: the
bridge's `builtin:rule-based` controller for the whole day, and for the default run that
controller plus a demand-response call and PV curtailment, so that every kind of command and the
flexible loads' backlog and rebound are compared too. Per slot, in order, the test compares:

* how the bridge decided: by the policy, with every device's telemetry (a fallback is a
  divergence: the env never falls back);
* the observation, field by field (`envs.codec` names), the grid state included, and the
  community price where the community exports (below): a divergence here names the input that
  went wrong before any command does;
* the grid events (demand response, emergency, `envs.market_kernel.grid_events`) the bridge's
  observed grid state calls for against the env's gate;
* every command the bridge published (read off the broker by a second client with the bridge's
  rights) against the env's shielded action: battery set-points in kW, PV curtailment and
  demand-response shares;
* every household's reading as the registry recorded it on chain (its meter's
  ``ReadingRecorded``: the registry holds only the last 32 slots' readings) against the Wh the
  env's market meters for that prosumer;
* the slot's settlement: each household's order as the bridge signed and the chain settled it
  (side, Wh, limit price; the bridge bids by the env's own rule, `envs.market.rule_book`)
  against the order the env's gate fixed (`Exchange.open`), then the clearing price, volume and
  order count of the chain's `SignedBatchSettled` and every fill (which the contract re-checks)
  against the env's book cleared by the same solver function in the chain's batch order;
* the slot's reconciliation, by the next slot's row: every household's renewable reward and
  demand-response incentive as RewardSystem granted them (``RewardGranted`` in the
  ``SlotSettler.run`` that reconciled the slot) against what the env's ledger granted for the
  step, and whether the slot's row declared or ended an emergency (GridBalance's events)
  against the env's gate;
* GridBalance's demand-response events: the slots announced, each household's baseline (exact)
  and what settling each event paid each household, against the env's mirror of GridBalance.
  The chain's clock follows the accelerated slots (`_chain_clock`:
  past each slot's end when it ends, past its 600 s reading window once its readings are
  recorded), so each row reconciles the slot before it as on a real-time chain, and the suite
  is deployed with the env's renewable rate.

Tolerances. Commands: 1e-6 x the battery's rating (kW) and 1e-6 for the shares. The policy reads
a float32 observation (relative resolution 2**-24, ~6e-8); the two paths compute the same
float64 physics in a different order (the env's compiled kernel, the simulator's numpy; JSON
carries float64 exactly), so an input may land one float32 step apart, which moves a
set-point by ~1e-7 of its scale. Observations: 1e-5 on the scaled value, for the same reason.
Readings: 0 Wh, except 1 Wh where the env's unrounded energy lies within 1e-3 Wh of a half Wh,
where float64 noise of that size may round either way. Orders and settlements: exact.

Made to agree by construction, and why:

* forecasts: the bridge has no forecast service and decides on persistence of the last slot's
  telemetry; the parity scenario sets `forecast.mode: persistence`, the env's same rule, so both
  see the same forecast (a noisy forecast is a draw the bridge cannot reproduce);
* battery set-points: the commands carry the shield's float64 kW; the env path steps with the
  same kW (the float32 action would round them by up to 2**-24 of the rating);
* time: slot `s` stands for the quarter hour at the deployment's genesis + 900 s x s
  (`SlotClock.stands_for`), for the bridge's time features and the simulator's profile row
  alike; the deployment's genesis is chosen so that the first slot is the test day's 00:00 UTC
  (in the first leap year after anvil's clock, like the profiles' 366 days, so the registration
  comes first and every slot has ended when the chain is moved to the day's end).

* the grid: the simulator's grid sensor solves the env's power flow (`bridge.grid_sensor`,
  `envs.powerflow`) on the env's injections, so the bridge observes the env's voltages,
  loadings (to the fixed point's tolerance, ~1e-9 pu) and calls the same grid events;
* demand-response baselines: the env announces each household's expected import of the
  event's slot as its observation forecasts it (`announce_range`), the bridge as its own
  observation does (`SlotSettlement.book`): under persistence the same numbers.

The parity scenario calls demand response on any voltage deviation (`market.dr_voltage_pu: 0`),
so an event is announced for every slot someone is expected to import in and the policy's
demand-response calls move the incentives compared, and sets `market.emergency_loading` to
`EMERGENCY_LOADING`, which the morning's transformer loading crosses: the default run sees an
emergency declared (07:30), recovered (08:00) and declared again (08:15), the events it held
back settled by the recovering row, and no event announced from an emergency state
(`assert_covers_events`).

Different by design: the community price where the community imports. The bridge computes the
env's seed formula (`test_community_price_is_the_envs_seed_formula`) from the sensor's
transformer flow, which the sensor reports lossless (so that the bridge's persistence of the
uncontrolled load, flow less meters, is the env's: `bridge.grid_sensor`), the env from the flow
with the feeder's losses. Where the community exports (the demand factor at its floor: every
slot of the default run, which compares it) the two agree; the whole day leaves it out
(`IMPORTING`), and the orders' limit prices with it where the references differ.

The default run covers 16 slots (05:00-09:00 of the sunniest test day; the devices start from the
env's state at 05:00), ~2 minutes with imports on a loaded machine; `--runslow` also runs the
whole day from 00:00, ~7-14 minutes: an emergency from 08:00 to 17:30, longer than the 32 slots
of readings DeviceRegistry keeps, so the recovering row forfeits the two events it held, as the
env's mirror does (`contracts.slot_batch.settles`, docs/iot.md).
"""

from __future__ import annotations

import asyncio
import calendar
import contextlib
import datetime
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import yaml

from agents.baselines import RuleBasedPolicy
from agents.shield import Shield
from bridge.clock import SlotClock
from bridge.config import load_bridge_config, load_deployment
from bridge.messages import (
    Ack,
    BatterySetpoint,
    Command,
    DemandResponse,
    PvCurtailment,
    Telemetry,
    decode,
)
from bridge.mqtt import MqttLink
from bridge.observation import Observation, ObservationBuilder, SiteState
from bridge.outbox import Outbox
from bridge.policy_source import LoadedPolicy
from bridge.registration import owner_of
from bridge.runner import BridgeRunner
from bridge.settlement import step_of_args
from bridge.signing import ReadingDomain
from bridge.simulator import Profiles, StartState, simulate
from bridge.site import SiteManifest, load_site
from bridge.site_builder import build_site
from contracts import clearing
from contracts.client import Chain, RewardKind
from contracts.settler import PART_RECONCILE
from contracts.slot_batch import settles
from envs import MicrogridEnv, load_scenario
from envs.grid import build_grid
from envs.ledger import MirrorLedger, per_wh
from envs.market import BUY, Book, to_units
from envs.market_kernel import (
    DR_NEXT,
    DR_NOW,
    DR_OWED,
    DR_ROWS,
    grid_events,
)
from envs.params import GridParams
from envs.pricing import seed_price
from envs.scenario import Scenario
from tests.bridge.broker import Broker
from tests.bridge.services import ANVIL_KEYS
from tests.bridge.stack import bridge_config, live_stack

#: Wall-clock seconds per slot: long enough for 54 devices' telemetry, the decision and the
#: commands to cross the broker inside one slot on a loaded 2-core machine.
SLOT_S = 2.0
FAST_BEGIN = 20
"""05:00 UTC."""
FAST_SLOTS = 16
DAY_SLOTS = 96
#: Wall seconds between starting the run and the first slot: the bridge subscribes and every
#: device connects (TLS) before it (~4 s on a quiet machine, 3x that for `make test`'s two
#: workers; `simulate` fails loudly if they were late).
LEAD_S = 12.0
#: The parity scenario's emergency loading: 05:00-09:00 of the test day the transformer's
#: loading crosses it at 07:30 (0.146; 07:00 read 0.121), falls back below it at 08:00 (0.119)
#: and crosses it again at 08:15 (0.24): an emergency declared, recovered and declared again,
#: the demand-response events held back by it settled by the row that recovers.
EMERGENCY_LOADING = 0.13
#: The community price the bridge computes from the sensor's lossless transformer flow differs
#: from the env's (with the feeder's losses) where the community imports; 05:00-09:00 it
#: exports (the seed formula's demand factor at its floor), so the default run compares it.
IMPORTING = ("community_price",)
#: The chain's reading window: shorter than a slot, so the bridge reconciles (`_chain_clock`).
WINDOW_S = 600
#: Wall seconds the chain's clock waits at a slot's end for the slot's row (`_chain_clock`):
#: bounded, so that a row waiting on the chain (an emergency's recovery) does not stop it.
ROW_WAIT_S = 3 * SLOT_S
KW_TOL = 1e-6
SHARE_TOL = 1e-6
OBS_TOL = 1e-5


class CallsEveryAction(RuleBasedPolicy):
    """The rule-based controller, plus a demand-response call (06:00-07:30), PV curtailment
    (07:00-08:00) on every prosumer and a raised price signal (06:30-08:00), read from the
    observation's time of day: deterministic, and it moves every command the bridge sends, the
    flexible loads' backlog and rebound, and the community price."""

    name = "rule-based+dr"

    def predict(self, obs: np.ndarray) -> np.ndarray:
        a = np.array(super().predict(obs), dtype=np.float32)
        raw = self.codec.decode_observation(obs)
        sin, cos = raw["time_of_day"][0]
        hour = (np.arctan2(sin, cos) / (2 * np.pi) * 24.0) % 24.0
        n = self.n_prosumer
        pv = slice(self.n_battery, self.n_battery + n)
        dr = slice(self.n_battery + n, self.n_battery + 2 * n)
        a[dr] = 0.6 if 6.0 - 1e-6 <= hour < 7.5 - 1e-6 else 0.0
        a[pv] = 0.25 if 7.0 - 1e-6 <= hour < 8.0 - 1e-6 else 0.0
        a[-1] = 0.5 if 6.5 - 1e-6 <= hour < 8.0 - 1e-6 else 0.0
        return a


def parity_scenario() -> Scenario:
    """The default scenario with the forecast the bridge has, persistence of the last slot, a
    demand-response event called in every slot (any voltage deviation calls one: the power
    flow's voltages are never exactly 1 pu), so that the incentives of the policy's
    demand-response calls are compared, and an emergency loading the test day's morning
    crosses (`EMERGENCY_LOADING`)."""
    s = load_scenario()
    market = {"dr_voltage_pu": 0.0, "emergency_loading": EMERGENCY_LOADING}
    return s.model_copy(
        update={
            "forecast": s.forecast.model_copy(update={"mode": "persistence"}),
            "market": s.market.model_copy(update=market),
        }
    )


def sunniest_test_day(params: GridParams) -> int:
    """The sunniest day of the test split: the batteries charge, the community battery works."""
    days = params.days("test")
    spd = params.steps_per_day
    pv = [float(params.prosumer_pv_kw[d * spd : (d + 1) * spd].sum()) for d in days]
    day = int(days[int(np.argmax(pv))])
    assert day > 0, "the slot before the day must lie in the same year"
    return day


# ---- the env path --------------------------------------------------------------------------
@dataclass
class EnvDay:
    """Per step of the env: what the policy saw, what was commanded and what was metered."""

    obs: list[np.ndarray] = field(default_factory=list)
    battery_kw: list[np.ndarray] = field(default_factory=list)
    pv_curtailment: list[np.ndarray] = field(default_factory=list)
    dr_share: list[np.ndarray] = field(default_factory=list)
    metered_wh: list[np.ndarray] = field(default_factory=list)
    exact_wh: list[np.ndarray] = field(default_factory=list)
    """The metered energy before rounding to Wh."""
    start: StartState | None = None
    """The state at the first recorded step: where the devices start."""
    books: list[Book] = field(default_factory=list)
    """The orders the env's gate fixed (its default bidding rule) for each recorded step."""
    references: list[int] = field(default_factory=list)
    """The market's reference price at each recorded gate (money units per Wh)."""
    rewards: list[np.ndarray] = field(default_factory=list)
    """Reward units the env's ledger granted each prosumer for the step (renewable + DR)."""
    dr_paid: list[np.ndarray] = field(default_factory=list)
    """Per prosumer, the demand-response incentives the step's transaction paid (the events
    it settled): the rest of `rewards` is the renewable reward."""
    dr_call: list[bool] = field(default_factory=list)
    """The grid state the gate read (the one the step before left) calls for demand response
    (`grid_events`): what the bridge's row of the slot announces an event by."""
    emergency: list[bool] = field(default_factory=list)
    emergency_before: bool = False
    """The emergency of the step before the first recorded one."""
    announced: dict[int, np.ndarray] = field(default_factory=dict)
    """Day slot -> each prosumer's baseline (Wh) in the event the ledger announced for it
    (GridBalance's model in the mirror, `envs.market_kernel.DR_NEXT`), from the steps
    `begin` - 1 on: the events the bridge's rows of the recorded slots announce."""
    incentives: dict[int, np.ndarray] = field(default_factory=dict)
    """Day slot -> per prosumer, what the event that covered it earns (the mirror's held row
    from `DR_OWED` on that the step added): paid by the first calm transaction after it,
    unless an emergency held it 32 slots (`contracts.slot_batch.settles`)."""
    settled: set[int] = field(default_factory=set)
    """The day slots whose events the recorded steps' transactions settled."""


def run_env(
    scenario: Scenario, day: int, begin: int, steps: int, policy_class: type[RuleBasedPolicy]
) -> EnvDay:
    """The day from 00:00 in the env; records steps `begin` .. `begin` + `steps` - 1 (and the
    demand-response event the step before announces)."""
    env = MicrogridEnv(scenario, split="test")
    codec, params = env.codec, env.params
    policy = policy_class(codec)
    shield = Shield.from_params(params, codec)
    n, n_bat = params.n_prosumer, params.batteries.n
    m = scenario.market
    power = np.asarray(codec.battery_power_kw)
    out = EnvDay()
    pending: list[int] = []  # the day slots of metered events not settled yet
    owes: dict[int, np.ndarray] = {}  # day slot -> what its metered event owes each prosumer
    obs, _ = env.reset(seed=0, options={"day": day})
    for k in range(begin + steps):
        state = env.state
        if k == begin:
            out.start = StartState(
                state.soc[0].copy(), state.capacity_kwh[0].copy(), state.backlog_kwh[0].copy()
            )
        action, report = shield.project(
            policy.predict(obs), state.soc[0], None, state.capacity_kwh[0]
        )
        decoded = codec.decode_action(action)
        # The commands carry the shield's float64 kW: step with exactly those.
        stepped = action.astype(np.float64)
        stepped[:n_bat] = np.asarray(report.applied_kw) / power
        assert env.exchange is not None
        gate = env.exchange.open(state, codec.decode_action(stepped[None]))
        g = state.grid[0]
        dr_call, _ = grid_events(
            g[0], g[1], g[3], m.dr_loading, m.dr_voltage_pu, m.emergency_loading
        )  # fmt: skip
        if k == begin - 1:
            out.emergency_before = bool(gate.emergency[0])
        if k >= begin:
            out.books.append(gate.book)
            out.references.append(int(gate.reference[0]))
            out.dr_call.append(bool(dr_call))
            out.emergency.append(bool(gate.emergency[0]))
            out.obs.append(obs)
            out.battery_kw.append(np.asarray(report.applied_kw, dtype=np.float64))
            out.pv_curtailment.append(np.asarray(decoded.pv_curtailment, dtype=np.float64))
            out.dr_share.append(np.asarray(decoded.dr_share, dtype=np.float64))
        ledger = env.exchange.ledger
        assert isinstance(ledger, MirrorLedger)
        granted = ledger.reward_tokens[0].copy()
        drq = ledger.demand_response[0]
        covered = bool(drq[DR_NOW, n])
        calm = not bool(gate.emergency[0])
        # A calm transaction settles the metered events the registry still holds the readings
        # of; one an emergency held longer is forfeited (`contracts.slot_batch.settles`).
        paying = [e for e in pending if settles(e, k)] if calm else []
        obs, _, _, _, info = env.step(stepped)
        if k >= begin - 1 and info["dr_events_created"]:
            out.announced[k + 2] = drq[DR_NEXT, :n].copy()
        if k >= begin:
            out.rewards.append(ledger.reward_tokens[0] - granted)
            out.dr_paid.append(sum((owes[e] for e in paying), np.zeros(n, np.int64)))
            # What the env's market meters for each prosumer (`Exchange.close`): its net
            # consumption in the slot just simulated, in whole Wh.
            exact = env.state.last_net_kw[0] * params.dt_h * 1000.0
            out.exact_wh.append(exact)
            out.metered_wh.append(np.rint(exact).astype(np.int64))
            out.settled.update(e for e in paying if e >= begin)
        if calm:
            pending.clear()
        if covered:  # the event just metered: the held row one transaction old
            held = [j for j in range(DR_OWED, DR_ROWS) if drq[j, n] == 1]
            assert len(held) == 1, drq
            owes[k] = drq[held[0], :n].copy()
            pending.append(k)
            if k >= begin:
                out.incentives[k] = owes[k]
    return out


# ---- the live path -------------------------------------------------------------------------
@dataclass
class Stack:
    site: SiteManifest
    broker: Broker
    chain: Chain
    registry: str
    trading: str
    files: Path
    first: int
    """The bridge slot that stands for the test day's 00:00 UTC."""
    day: int
    scenario: Scenario
    addresses: dict[str, str] = field(default_factory=dict)
    chain_genesis: int = 0
    """The deployment's genesis: slot `s` starts on chain at chain_genesis + 900 s x s."""


def day_start(day: int, now: int) -> int:
    """00:00 UTC of `day` in the first leap year (the profiles' 366 days) after `now`."""
    year = datetime.datetime.fromtimestamp(now, tz=datetime.UTC).year + 1
    while not calendar.isleap(year):
        year += 1
    return calendar.timegm(datetime.date(year, 1, 1).timetuple()) + day * 86_400


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    scenario = parity_scenario()
    params = build_grid(scenario)
    day = sunniest_test_day(params)
    build_site(params, site="site1", seed="0", market=scenario.market).save(tmp_path / "site.json")
    site = load_site(tmp_path / "site.json")

    def genesis(now: int) -> int:
        """Slot `first` stands for the day's 00:00; the registration (now) falls ~10 slots
        after genesis, well before it."""
        start = day_start(day, now)
        return start - (-(-(start - now) // 900) + 10) * 900

    # The env's reward rate (the budget funded) and a reading window shorter than a slot:
    # each slot's row reconciles the slot before it and grants its rewards, as the env's
    # ledger does.
    with live_stack(
        tmp_path, site, [d.id for d in site.devices], genesis, reading_window_seconds=WINDOW_S,
        renewable_rate_per_wh=per_wh(scenario.market.renewable_reward_per_kwh),
        fund_rewards=10**30,
    ) as live:  # fmt: skip
        dep = live.deployment
        start = day_start(day, live.deployed_at)
        first = (start - dep.genesis) // 900
        registry, trading = dep.addresses["DeviceRegistry"], dep.addresses["EnergyTrading"]
        yield Stack(
            site, live.broker, live.chain, registry, trading, tmp_path, first, day, scenario,
            dict(dep.addresses), dep.genesis,
        )  # fmt: skip


@dataclass
class LiveDay:
    commands: dict[tuple[int, str, str], Command] = field(default_factory=dict)
    """By (slot, device, action kind), as read off the broker."""
    acks: dict[str, Ack] = field(default_factory=dict)
    """Final acknowledgements (applied / rejected) by command id."""
    observations: dict[int, Observation] = field(default_factory=dict)
    """By the slot decided."""
    decisions: dict[int, tuple[str, str]] = field(default_factory=dict)
    """Slot -> (policy or fallback, why)."""
    summary: dict[str, object] = field(default_factory=dict)
    clock: SlotClock | None = None


def write_config(s: Stack, genesis: float) -> Path:
    # Decide when every device has reported; the deadline only for a device far too late.
    cfg = bridge_config(
        s.files, s.broker, s.chain, slot_seconds=SLOT_S, genesis=genesis, decide_deadline=0.9
    )
    path = s.files / "bridge.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


async def _observe(link: MqttLink, live: LiveDay, stop: asyncio.Event) -> None:
    while not stop.is_set():
        msg = await link.receive(0.2)
        if msg is None:
            continue
        if "/DCMD/" in msg.topic:
            cmd = decode(Command, msg.payload)
            live.commands[(cmd.slot, cmd.device, cmd.action.kind)] = cmd
        elif "/DACK/" in msg.topic:
            ack = decode(Ack, msg.payload)
            if ack.status.value != "accepted":
                live.acks[ack.command_id] = ack


def recorded_readings(s: Stack, slots: range) -> int:
    registry = s.chain.contract("DeviceRegistry", s.registry)
    logs = registry.events.ReadingRecorded().get_logs(from_block=0)
    return sum(1 for e in logs if e["args"]["slot"] in slots)


def settled(s: Stack, slots: range) -> dict[int, dict[str, int]]:
    """The SignedBatchSettled event of each slot in `slots` settled on chain (a slot settled
    twice fails here)."""
    trading = s.chain.contract("EnergyTrading", s.trading)
    out: dict[int, dict[str, int]] = {}
    for e in trading.events.SignedBatchSettled().get_logs(from_block=0):
        slot = int(e["args"]["slot"])
        assert slot not in out, f"slot {slot} settled twice"
        if slot in slots:
            out[slot] = {k: int(v) for k, v in e["args"].items() if k != "batchHash"}
    return out


def reconciled(s: Stack, slots: range) -> set[int]:
    """The slots in `slots` reconciled on chain."""
    trading = s.chain.contract("EnergyTrading", s.trading)
    logs = trading.events.SlotReconciled().get_logs(from_block=0)
    return {int(e["args"]["slot"]) for e in logs} & set(slots)


@dataclass(frozen=True)
class ClockPlan:
    """What `_chain_clock` does for a run of the slots `first` .. `first + steps - 1`."""

    reported: range
    """The slots whose meters report (the slot before the run, then the run's): the clock
    closes their reading windows only once their readings are recorded."""
    rows: range
    """The slots whose row the clock waits for before it ends the slot."""
    last: int
    """The last slot the clock ends: the one after the run, whose row reconciles the run's
    last slot."""


def clock_plan(first: int, steps: int) -> ClockPlan:
    """Every slot the clock ends from `first` on, `last` included, waits for its row: the row
    of slot n announces the demand-response event of n + 1, which GridBalance takes only from
    a block of slot n or earlier (``GridBalanceEventNotInFuture``). The run waits to see the
    row of `last` mined (it reconciles the run's last slot); a clock that ended `last` without
    waiting for it had that row mined late, its announcement refused and repaired away, in
    every whole-day run (the one repair of those runs, docs/iot.md)."""
    last = first + steps
    return ClockPlan(range(first - 1, last), range(first, last + 1), last)


async def _chain_clock(
    s: Stack, clock: SlotClock, reported: range, rows: range, last: int, stop: asyncio.Event
) -> None:
    """The chain's time follows the bridge's accelerated slots as it follows real ones: at the
    end of each slot it moves just past the slot (its readings are taken), and once the meters'
    readings of a slot the devices report (`reported`) are all recorded, past the slot's reading
    window, so the next slot's row may reconcile it; up to the end of slot `last`. It never
    closes a window on a reading still on its way (a loaded machine's outbox may fall behind
    the 2 s slots): the chain's clock waits for it, and the rows that wait on the chain
    ("gate open", "readings not final") wait with it, as they would for a slow node. Nor does
    it end a slot of `rows` before the slot's row is mined (for up to `ROW_WAIT_S`): on a
    real-time chain the row of slot n is mined minutes into n, and its demand-response event
    for n + 1 must start after the block's slot (``GridBalanceEventNotInFuture``; a row that
    lost its announcement so leaves the next rows' predicted event ids wrong until every row
    is mined)."""
    chain, meters = s.chain, len(s.site.prosumers)
    registry = chain.contract("DeviceRegistry", s.registry)
    trading = chain.contract("EnergyTrading", s.trading)

    def recorded(slot: int) -> int:
        logs = registry.events.ReadingRecorded().get_logs(
            from_block=0, argument_filters={"slot": slot}
        )
        return len(logs)

    def mined(slot: int) -> bool:
        logs = trading.events.SignedBatchSettled().get_logs(
            from_block=0, argument_filters={"slot": slot}
        )
        return bool(logs)

    slot = clock.slot(time.time())
    await asyncio.to_thread(chain.travel_to, s.chain_genesis + slot * 900 + 1)
    while slot <= last and not stop.is_set():
        await asyncio.sleep(max(0.0, clock.start(slot + 1) - time.time()))
        end = s.chain_genesis + (slot + 1) * 900
        if slot in rows:  # the slot's row is mined inside the slot, as on a real-time chain
            deadline = time.monotonic() + ROW_WAIT_S
            while not stop.is_set() and time.monotonic() < deadline:
                if await asyncio.to_thread(mined, slot):
                    break
                await asyncio.sleep(0.1)
        await asyncio.to_thread(chain.travel_to, end + 1)
        if slot in reported:
            deadline = time.monotonic() + 600
            while not stop.is_set() and time.monotonic() < deadline:
                if await asyncio.to_thread(recorded, slot) >= meters:
                    break
                await asyncio.sleep(0.1)
        await asyncio.to_thread(chain.travel_to, end + WINDOW_S + 1)
        slot += 1


async def run_live(
    s: Stack,
    begin: int,
    steps: int,
    start: StartState | None,
    policy_class: type[RuleBasedPolicy],
) -> LiveDay:
    """The bridge in process, the simulated devices beside it: the day's slots `begin` ..
    `begin` + `steps` - 1, the devices starting from `start`."""
    first = s.first + begin
    wall = time.time()
    genesis = wall + LEAD_S - first * SLOT_S
    cfg = load_bridge_config(write_config(s, genesis))
    dep = load_deployment(cfg.chain.deployment)
    codec = s.site.make_codec()
    policy = policy_class(codec)
    runner = BridgeRunner(cfg, s.site, dep, LoadedPolicy(policy, policy.name))
    live = LiveDay()
    build = runner.core.builder.build

    def recording(state, slot, t, community_price, forecast=None):  # type: ignore[no-untyped-def]
        o = build(state, slot, t, community_price, forecast)
        live.observations[slot + 1] = o
        return o

    runner.core.builder.build = recording  # type: ignore[method-assign]
    stop = asyncio.Event()
    observer = MqttLink(
        s.broker.url,
        client_id="parity-observer",
        username="bridge",
        password=s.broker.passwords["bridge"],
        ca_file=s.broker.ca_file,
    )
    await observer.connect([f"mgv1/{s.site.site}/DCMD/+", f"mgv1/{s.site.site}/DACK/+"])
    watching = asyncio.create_task(_observe(observer, live, stop))
    serving = asyncio.create_task(runner.run())
    await asyncio.sleep(1.0)  # subscribed before the devices' births
    # Retries at the pace of the accelerated slots (the default backoff, up to a minute, is
    # sized for 15-minute slots): a row waiting on the chain's clock goes soon after it moved.
    assert runner.worker is not None
    runner.worker.backoff_max_s = SLOT_S
    params = build_grid(s.scenario)
    clock = SlotClock(genesis, SLOT_S, float(dep.genesis), float(dep.slot_seconds))
    live.clock = clock
    plan = clock_plan(first, steps)
    slots = plan.reported
    ticking = asyncio.create_task(_chain_clock(s, clock, plan.reported, plan.rows, plan.last, stop))
    fleet = await simulate(
        s.site,
        Profiles.of(params),
        ReadingDomain(dep.chain_id, dep.addresses["DeviceRegistry"]),
        broker_url=s.broker.url,
        passwords=s.broker.passwords,
        ca_file=s.broker.ca_file,
        clock=clock,
        seed="0",
        slots=steps + 1,  # the slot before (history), then the `steps` slots compared
        first_slot=first,
        start=start,
    )
    assert fleet.limit_violations == 0
    # Every signed reading on chain, every slot settled and reconciled (its rewards granted)
    # before the bridge stops (its shutdown drain is short).
    expected = len(s.site.prosumers) * len(slots)
    # The chain's clock waits for each slot's readings, so a loaded machine's outbox, slower
    # than the 2 s slots (~50 rows a slot), ends behind: give it time by the slot.
    deadline = time.monotonic() + 120 + 5 * steps
    settle = range(first, first + steps)
    while time.monotonic() < deadline and (
        recorded_readings(s, slots) < expected
        or len(settled(s, settle)) < len(settle)
        or len(reconciled(s, settle)) < len(settle)
    ):
        await asyncio.sleep(0.5)
    ticking.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await ticking
    runner.stop.set()
    live.summary = await serving
    live.decisions = {k: (d.source.value, d.detail) for k, d in runner.core.decisions}
    stop.set()
    await watching
    await observer.close()
    return live


# ---- the comparison ------------------------------------------------------------------------
def when(s: Stack, k: int) -> str:
    minutes = k * 15
    return f"slot {s.first + k} (test day {s.day} {minutes // 60:02d}:{minutes % 60:02d} UTC)"


def compare(
    s: Stack, begin: int, env: EnvDay, live: LiveDay, excluded: tuple[str, ...] = ()
) -> tuple[list[str], list[str]]:
    """Every divergence, in slot order (the first names the slot, device and field), notes
    of commands applied after their slot ended (a machine too slow for `SLOT_S`, which makes
    the next slots diverge without any fault of the bridge's logic), and the slots whose grid
    events the stand-in sensor decides otherwise than the env's power flow (by design)."""
    site, codec = s.site, s.site.make_codec()
    names = codec.obs_names()
    compared = np.ones(codec.obs_dim, dtype=bool)
    for f in excluded:
        compared[codec.obs_slice(f)] = False
    # The first observation's grid state is the slot before's, which the devices spend idle
    # and the env (from 00:00) under the policy: compared only from the day's start.
    first = compared.copy()
    if begin > 0:
        first[codec.obs_slice("grid")] = False
    registry = s.chain.contract("DeviceRegistry", s.registry)
    owners = [owner_of(site, p.name, s.chain.accounts[0]) for p in site.prosumers]
    # Each household's reading as the registry recorded it (one meter each): from its
    # ``ReadingRecorded`` events, as the registry keeps only the last 32 slots' readings.
    meters = []
    for p in site.prosumers:
        spec = site.device(p.meter)
        assert spec is not None and spec.address is not None
        meters.append(spec.address.lower())
    recorded = {
        (str(e["args"]["device"]).lower(), int(e["args"]["slot"])): int(e["args"]["energyWh"])
        for e in registry.events.ReadingRecorded().get_logs(from_block=0)
    }
    batches = settled(s, range(s.first + begin, s.first + begin + len(env.obs)))
    outbox = Outbox(s.files / "outbox.db", s.chain, {}, ANVIL_KEYS[1])
    power = np.asarray(codec.battery_power_kw)
    out: list[str] = []
    notes: list[str] = []
    for k in range(len(env.obs)):
        slot, at = s.first + begin + k, when(s, begin + k)
        source = live.decisions.get(slot)
        if source is None or source[0] != "policy":
            out.append(f"{at}: bridge decision: expected the policy, got {source}")
        o = live.observations.get(slot)
        if o is None:
            out.append(f"{at}: bridge observation: none built")
        else:
            diff = np.abs(o.obs.astype(np.float64) - env.obs[k].astype(np.float64))
            for j in np.flatnonzero((diff > OBS_TOL) & (first if k == 0 else compared)):
                raw_env = codec.decode_observation(env.obs[k])
                raw_live = codec.decode_observation(o.obs)
                fname = names[j].split("[")[0]
                idx = j - codec.obs_slice(fname).start
                out.append(
                    f"{at}: observation {names[j]}: env {float(raw_env[fname][0, idx])!r}, "
                    f"bridge {float(raw_live[fname][0, idx])!r}"
                )
        wanted: list[tuple[str, str, float, float]] = []
        for b, device in enumerate(site.battery_devices()):
            wanted.append((device, "battery_setpoint", env.battery_kw[k][b], KW_TOL * power[b]))
        for i, p in enumerate(site.prosumers):
            wanted.append((p.pv, "pv_curtailment", env.pv_curtailment[k][i], SHARE_TOL))
            wanted.append((p.appliance, "demand_response", env.dr_share[k][i], SHARE_TOL))
        for device, kind, expected, tol in wanted:
            cmd = live.commands.get((slot, device, kind))
            if cmd is None:
                out.append(f"{at}: {device} {kind}: env {float(expected)!r}, bridge published none")
                continue
            a = cmd.action
            value = (
                a.power_kw if isinstance(a, BatterySetpoint)
                else a.fraction if isinstance(a, PvCurtailment)
                else a.share if isinstance(a, DemandResponse)
                else float("nan")
            )  # fmt: skip
            if not abs(value - expected) <= tol:
                out.append(f"{at}: {device} {kind}: env {float(expected)!r}, bridge {value!r}")
            ack = live.acks.get(cmd.command_id)
            if ack is None or ack.applied is None or not abs(ack.applied - value) <= tol:
                got = None if ack is None else (ack.status.value, ack.applied, ack.reason)
                out.append(f"{at}: {device} {kind}: commanded {value!r}, device answered {got}")
            elif live.clock is not None and ack.ts > live.clock.start(slot + 1) * 1000:
                late = ack.ts / 1000 - live.clock.start(slot + 1)
                notes.append(f"{at}: {device} {kind} applied {late:.2f} s after the slot ended")
        for i, p in enumerate(site.prosumers):
            c = recorded.get((meters[i], slot))
            if c is None:
                out.append(f"{at}: {p.meter} reading: none recorded on chain")
                continue
            e = int(env.metered_wh[k][i])
            exact = float(env.exact_wh[k][i])
            near_half = abs(abs(exact - np.floor(exact)) - 0.5) < 1e-3
            if c != e and not (near_half and abs(c - e) == 1):
                out.append(f"{at}: {p.meter} reading: env {e} Wh, chain {c} Wh")
        # The limit prices follow the observed community price: where the two references differ
        # (the observation's divergence says why), the orders' sides and Wh are compared and the
        # prices not. An emergency slot trades nothing: the env's ledger refuses its book, the
        # bridge's row settles an empty batch.
        priced = o is not None and reference(o.raw["community_price"]) == env.references[k]
        book = env.books[k]
        if env.emergency[k]:
            empty = np.zeros_like(book.qty_wh)
            book = Book(empty, empty.copy(), empty.copy())
        out += compare_settlement(s, at, slot, book, owners, batches, outbox, priced)
    out += compare_events(s, begin, env, live)
    out += compare_rewards(s, begin, env, owners)
    out += compare_demand_response(s, begin, env, owners)
    return out, notes


def compare_events(s: Stack, begin: int, env: EnvDay, live: LiveDay) -> list[str]:
    """Per slot, the (demand response, emergency) the bridge's grid sensor reading calls for
    (`grid_events` of its observation's grid state) against the env's (of the state its gate
    read): the simulator's sensor solves the env's power flow (`bridge.grid_sensor`), so they
    must agree, and the run must have seen an emergency begin and end."""
    m = s.site.market
    assert m is not None
    out = []
    for k in range(len(env.obs)):
        at = when(s, begin + k)
        o = live.observations.get(s.first + begin + k)
        if o is None:
            continue  # reported with the observation
        g = np.asarray(o.raw["grid"])[0]
        got = grid_events(
            float(g[0]), float(g[1]), float(g[3]),
            m.dr_loading, m.dr_voltage_pu, m.emergency_loading,
        )  # fmt: skip
        want = (env.dr_call[k], env.emergency[k])
        if (bool(got[0]), bool(got[1])) != want:
            out.append(f"{at}: grid events (demand response, emergency): env {want}, bridge {got}")
    return out


def compare_rewards(s: Stack, begin: int, env: EnvDay, owners: list[str]) -> list[str]:
    """Per slot, the renewable rewards its reconciliation granted on chain (the ``RewardGranted``
    events of kind RENEWABLE of the ``SlotSettler.run`` that reconciled it) against what the
    env's ledger granted for the step less the demand-response incentives its transaction paid
    (`compare_demand_response` compares those), and whether the slot's row declared or ended
    an emergency (GridBalance's events in the row that settled it) against the env's gate. The
    renewable reward may differ by one Wh's worth where the
    reading may (a Wh within 1e-3 of a half, see the readings' tolerance)."""
    chain, a = s.chain, s.addresses
    settler = chain.contract("SlotSettler", a["SlotSettler"])
    rewards = chain.contract("RewardSystem", a["RewardSystem"])
    grid = chain.contract("GridBalance", a["GridBalance"])
    runs = {
        bytes(e["transactionHash"]): (
            int(e["args"]["parts"]), int(e["args"]["settledSlot"]),
            int(e["args"]["reconciledSlot"]),
        )
        for e in settler.events.SlotStepRun().get_logs(from_block=0)
    }  # fmt: skip
    granted: dict[tuple[int, str, int], int] = {}
    for e in rewards.events.RewardGranted().get_logs(from_block=0):
        parts, _, slot = runs[bytes(e["transactionHash"])]
        assert parts & PART_RECONCILE, "a reward outside a reconciliation"
        key = (slot, str(e["args"]["account"]), int(e["args"]["kind"]))
        granted[key] = granted.get(key, 0) + int(e["args"]["amount"])
    declared = {runs[bytes(e["transactionHash"])][1] for e in
                grid.events.EmergencyDeclared().get_logs(from_block=0)}  # fmt: skip
    recovered = {runs[bytes(e["transactionHash"])][1] for e in
                 grid.events.Recovered().get_logs(from_block=0)}  # fmt: skip
    done = reconciled(s, range(s.first + begin, s.first + begin + len(env.obs)))
    rate = per_wh(s.scenario.market.renewable_reward_per_kwh)
    renewable = int(RewardKind.RENEWABLE)
    out: list[str] = []
    before = env.emergency_before
    for k in range(len(env.obs)):
        slot, at = s.first + begin + k, when(s, begin + k)
        if slot not in done:
            out.append(f"{at}: reconciliation: the slot was not reconciled on chain")
            continue
        for i, p in enumerate(s.site.prosumers):
            want = int(env.rewards[k][i] - env.dr_paid[k][i])
            got = granted.get((slot, owners[i], renewable), 0)
            exact = float(env.exact_wh[k][i])
            slack = rate if abs(abs(exact - np.floor(exact)) - 0.5) < 1e-3 else 0
            if abs(got - want) > slack:
                out.append(f"{at}: renewable reward of {p.name}: env {want}, chain {got}")
        emergency = env.emergency[k]
        for what, env_did, chain_did in (
            ("declared", emergency and not before, slot in declared),
            ("ended", before and not emergency, slot in recovered),
        ):
            if env_did != chain_did:
                out.append(f"{at}: emergency {what}: env {env_did}, chain {chain_did}")
        before = emergency
    return out


def compare_demand_response(s: Stack, begin: int, env: EnvDay, owners: list[str]) -> list[str]:
    """GridBalance's demand-response events against the env's mirror of GridBalance: which
    slots the chain announced an event for (``DemandResponseCreated``: the row of slot s
    announces slot s + 1, the env's transaction of slot s - 1 the same slot, both from the
    grid state slot s - 1 left), each household's baseline in it (``participants``, 0: not
    taking part) and what settling each event paid each household (``ParticipantSettled``)
    against what the env's mirror ledger announced and paid (`EnvDay.announced`,
    `EnvDay.incentives`), for the events of the recorded slots' rows. The baselines are exact:
    both sides announce the observation's forecast of the event's slot (the env's
    `announce_range`, the bridge's `SlotSettlement.book`)."""
    chain, a = s.chain, s.addresses
    grid = chain.contract("GridBalance", a["GridBalance"])
    meter: dict[str, int] = {}
    for i, p in enumerate(s.site.prosumers):
        device = s.site.device(p.meter)
        assert device is not None and device.address is not None
        meter[device.address.lower()] = i
    slot_of: dict[int, int] = {}
    for e in grid.events.DemandResponseCreated().get_logs(from_block=0):
        slot_of[int(e["args"]["eventId"])] = int(e["args"]["startSlot"]) - s.first
    n = len(owners)
    chain_baseline = {}
    for event_id, day_slot in slot_of.items():
        b = np.zeros(n, dtype=np.int64)
        for device, _, _, wh in grid.functions.participants(event_id).call():
            b[meter[str(device).lower()]] = int(wh)
        chain_baseline[day_slot] = b
    chain_paid: dict[int, np.ndarray] = {}
    for e in grid.events.ParticipantSettled().get_logs(from_block=0):
        day_slot = slot_of[int(e["args"]["eventId"])]
        row = chain_paid.setdefault(day_slot, np.zeros(n, dtype=np.int64))
        row[meter[str(e["args"]["device"]).lower()]] += int(e["args"]["reward"])
    out: list[str] = []
    steps = len(env.obs)
    for k in range(steps):
        e = begin + k + 1  # the event row k announces
        if e < 2:
            continue  # the env's transaction of the slot before the day would announce it: none
        at = when(s, e)
        base, got = env.announced.get(e), chain_baseline.get(e)
        if (base is None) != (got is None):
            out.append(
                f"{at}: demand-response event announced: env {base is not None}, chain "
                f"{got is not None}"
            )
            continue
        if base is None or got is None:
            continue
        if not np.array_equal(base, got):
            out.append(
                f"{at}: demand-response baselines (Wh): env {[int(x) for x in base]}, chain "
                f"{[int(x) for x in got]}"
            )
            continue
        if e + 1 >= begin + steps:
            # Settled by row e + 1, after the env's last transaction: the row after the day
            # settles the day's last event, which the env never does. (Once that row's whole
            # demand-response part was repaired away, which hid this: `clock_plan`.)
            continue
        want, paid = env.incentives.get(e), chain_paid.get(e)
        if (paid is not None) != (e in env.settled) or (paid is not None and want is None):
            out.append(
                f"{at}: demand-response event settled: env {e in env.settled}, chain "
                f"{paid is not None}"
            )
            continue
        if paid is None or want is None:
            continue
        for i, p in enumerate(s.site.prosumers):
            if int(paid[i]) != int(want[i]):
                out.append(
                    f"{at}: demand-response incentive of {p.name}: env {int(want[i])}, chain "
                    f"{int(paid[i])}"
                )
    return out


def reference(community_price: np.ndarray) -> int:
    """The market's reference price (money units per Wh) of an observed community price."""
    return max(int(to_units(np.asarray(community_price).reshape(-1)[0])), 1)


def compare_settlement(
    s: Stack,
    at: str,
    slot: int,
    book: Book,
    owners: list[str],
    batches: dict[int, dict[str, int]],
    outbox: Outbox,
    priced: bool = True,
) -> list[str]:
    """The slot's settlement on chain against the env's: the same orders (each household's side,
    Wh and limit price by the env's bidding rule), cleared at the same price with the same
    fills, volume and order count; the chain checked the fills itself (a wrong one reverts).
    Without `priced` (the references differ) only the orders' sides and Wh."""
    event = batches.get(slot)
    args = outbox.args(f"slot:{slot}")
    if event is None or args is None:
        return [f"{at}: settlement: the slot was not settled on chain"]
    step = step_of_args(args)
    prosumer = {o: i for i, o in enumerate(owners)}
    chain_orders = {prosumer[o[0]]: (int(o[2]), int(o[3]), int(o[4])) for o in step.orders}
    out = []
    live = [i for i in range(len(owners)) if book.qty_wh[0, i] > 0]
    for i in sorted(set(live) | set(chain_orders)):
        want: tuple[int, ...] = (int(book.side[0, i]), int(book.qty_wh[0, i]))
        want += (int(book.limit[0, i]),) if priced else ()
        found = chain_orders.get(i)
        got = None if found is None else found[: len(want)]
        if got != want:
            out.append(f"{at}: order of {s.site.prosumers[i].name}: env {want}, chain {got}")
    if out or not priced:
        return out
    # The env's book cleared by the solver's function, in the chain's batch order.
    batch = sorted(live, key=lambda i: int(owners[i], 16))
    solved = clearing.clear_book(
        [int(book.qty_wh[0, i]) for i in batch], [int(book.limit[0, i]) for i in batch],
        [int(book.side[0, i]) for i in batch],
    )  # fmt: skip
    fills = [int(f) for f in solved.fills]
    volume = sum(f for i, f in zip(batch, fills, strict=True) if book.side[0, i] == BUY)
    for name, env_value, chain_value in (
        ("clearing price", int(solved.price), event["price"]),
        ("fills", fills, list(step.fills)),
        ("volume", volume, event["volumeWh"]),
        ("orders", len(batch), event["orderCount"]),
    ):
        if env_value != chain_value:
            out.append(f"{at}: settlement {name}: env {env_value}, chain {chain_value}")
    return out


def check_parity(
    s: Stack,
    begin: int,
    steps: int,
    policy_class: type[RuleBasedPolicy] = RuleBasedPolicy,
    excluded: tuple[str, ...] = (),
) -> EnvDay:
    env = run_env(s.scenario, s.day, begin, steps, policy_class)
    live = asyncio.run(run_live(s, begin, steps, env.start, policy_class))
    problems, late = compare(s, begin, env, live, excluded)
    print("\n".join(problems + late))  # shown in full when the test fails
    timing = (
        f"\n{len(late)} command(s) came too late for their slot (the machine was too slow for "
        f"{SLOT_S} s slots), the first: {late[0]}"
        if late
        else ""
    )
    assert not problems, (
        f"{len(problems)} divergence(s) between env and bridge; the first: {problems[0]}{timing}\n"
        + "\n".join(problems[1:20])
    )
    assert live.summary["rejected"] == {}, live.summary
    # Every row went out as built: a repair means the chain refused part of one (a row mined
    # after its slot ended, whose announcement GridBalance refuses, was the last such).
    outbox = Outbox(s.files / "outbox.db", s.chain, {}, ANVIL_KEYS[1])
    try:
        assert outbox.repairs() == {}, outbox.db.execute("SELECT * FROM repairs").fetchall()
    finally:
        outbox.close()
    return env


def assert_covers_events(env: EnvDay, begin: int) -> None:
    """The run compared an emergency declared and one recovered, and demand-response events
    announced, settled (one held back by the emergency) and paying someone."""
    before = [env.emergency_before, *env.emergency[:-1]]
    assert any(e and not b for e, b in zip(env.emergency, before, strict=True)), "no declaration"
    assert any(b and not e for e, b in zip(env.emergency, before, strict=True)), "no recovery"
    recorded = range(begin + 1, begin + len(env.obs))
    assert any(e in env.announced for e in recorded), "no demand-response event announced"
    assert env.settled, "no demand-response event settled"
    assert any(v.any() for v in env.incentives.values()), "no demand-response incentive paid"


def test_the_chain_clock_ends_no_slot_before_its_row_is_mined() -> None:
    """The whole-day run's one repair (`GridBalanceEventNotInFuture`, in the row of the slot
    after the day): the clock ended that slot without waiting for its row, though the run
    waits for that row (it reconciles the day's last slot), so the row was mined in the next
    slot and its announcement of that slot refused. Each slot the clock ends, from the run's
    first to the one after it, now waits for its row (`clock_plan`)."""
    for first, steps in ((FAST_BEGIN + 117, FAST_SLOTS), (117, DAY_SLOTS)):
        plan = clock_plan(first, steps)
        ended = range(first, plan.last + 1)  # the slots the clock ends that have a row
        assert [n for n in ended if n not in plan.rows] == []
        assert plan.reported == range(first - 1, first + steps)  # the readings it waits for


def test_community_price_is_the_envs_seed_formula(params: GridParams, site: SiteManifest) -> None:
    """The bridge's `community_price` is `envs.pricing.seed_price` of what the grid sensor
    measured, under the price signal decided for the slot: floor, stress and time of day."""
    builder = ObservationBuilder(site)
    for net_kw, loading, t, multiplier in [
        (-30.0, 0.2, 10, 1.0),  # an exporting community: the demand factor's floor
        (25.0, 0.5, 70, 1.0),  # evening band of the time-of-day multiplier
        (60.0, 0.95, 75, 2.0**0.5),  # stressed transformer, raised price signal
    ]:
        state = SiteState()
        reading = {"v_min_pu": 0.97, "v_max_pu": 1.01, "line_loading": loading}
        metrics = {"kind": "grid_sensor", **reading, "trafo_loading": loading}
        state.update(
            Telemetry.model_validate(
                {
                    "device": site.grid_sensor, "bd_seq": 1, "seq": 1, "ts": 0, "slot": 7,
                    "metrics": {**metrics, "trafo_net_kw": net_kw},
                }
            )
        )  # fmt: skip
        expected = seed_price(
            params, np.array([t % 96]), np.array([net_kw]), np.array([loading]),
            np.array([multiplier]),
        )[0]  # fmt: skip
        assert builder.community_price(state, 7, t, multiplier) == pytest.approx(expected)


def test_parity_four_hours_of_a_test_day(stack: Stack) -> None:
    """05:00-09:00 of the sunniest test day: household batteries turn from discharging to
    charging, the community battery takes the community's surplus until its SoC limit stops it
    (08:30); the devices start from the env's state at 05:00."""
    env = check_parity(stack, FAST_BEGIN, FAST_SLOTS, CallsEveryAction)
    assert_covers_events(env, FAST_BEGIN)


@pytest.mark.slow
def test_parity_whole_test_day(stack: Stack) -> None:
    assert_covers_events(check_parity(stack, 0, DAY_SLOTS, excluded=IMPORTING), 0)
