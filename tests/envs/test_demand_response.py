"""The mirror's demand response is GridBalance's, slot by slot, on every path the env steps.

Random slots (grid stress calling for an event or not, emergencies, baselines, meter readings)
go through `MirrorLedger` and through `contracts.model.GridBalanceModel` (held to the contract
by tests/contracts/test_invariants_grid_balance.py) driven by `DemandResponseQueue`, the rule
the chain ledger and the bridge build their slot transactions with. Both must announce, cover,
settle and pay the same events in the same slots; emergencies hold settlements back until the
first calm slot and announce nothing. The fused compiled step (single and batched envs) and
the staged one (gate, physics, ledger in turn, as chain ledgers run) give the same figures.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from contracts.model import DrParticipant, GridBalanceModel, LoadType
from contracts.slot_batch import DemandResponseQueue
from envs import MicrogridEnv, Scenario
from envs.dynamics import observe
from envs.kpis import MARKET_INFO
from envs.ledger import MirrorLedger, SlotInput
from envs.market import Book
from envs.market_kernel import DR_NEXT
from envs.scenario import MarketConfig
from envs.vector_env import MicrogridVectorEnv

SLOT = 900
#: A small feeder whose stress crosses both thresholds all day.
STRESSED = Scenario(
    prosumers={"mode": "buses", "buses": [1, 2, 3, 5]},
    market={"dr_loading": 0.1, "emergency_loading": 0.15},
)


@st.composite
def days(draw: st.DrawFn) -> tuple[int, int, list[tuple[bool, bool, list[int], list[int]]]]:
    """(prosumers, incentive per Wh, slots of (announce, emergency, baselines, metered))."""
    n = draw(st.integers(1, 4))
    rate = draw(st.integers(0, 400))
    slot = st.tuples(
        st.booleans(),
        st.booleans(),
        st.lists(st.integers(-200, 3_000).map(lambda x: max(x, 0)), min_size=n, max_size=n),
        st.lists(st.integers(-2_000, 4_000), min_size=n, max_size=n),
    )
    return n, rate, draw(st.lists(slot, min_size=1, max_size=30))


Day = tuple[int, int, list[tuple[bool, bool, list[int], list[int]]]]


@settings(max_examples=150, deadline=None)
@given(days())
def test_mirror_demand_response_is_grid_balances(day: Day) -> None:
    check_day(day)


def test_an_emergency_longer_than_the_registrys_history_forfeits_the_events_it_held() -> None:
    """Events metered before an emergency are settled by the first calm transaction, but
    DeviceRegistry keeps only 32 slots of readings: an emergency that lasts longer leaves
    GridBalance unable to read the events' slots (``DeviceRegistryReadingEvicted``, the whole
    transaction would revert). The queue leaves such an event out and the mirror forfeits it,
    alike, one event at a time: of the events of the slots 2 and 3 (announced by the calm
    slots 0 and 1) held by an emergency from slot 2, a recovery at slot 33 still pays both, at
    34 only slot 3's, at 35 none."""
    n, rate = 2, 300
    base, low = [1_000, 400], [100, 100]
    for recovery, paid_events in ((33, 2), (34, 1), (35, 0)):
        slots = [(True, False, base, low)] * 2
        slots += [(True, True, base, low)] * (recovery - 2)
        slots += [(False, False, base, low)] * 2
        settled = check_day((n, rate, slots))
        assert settled == paid_events, (recovery, settled)


def check_day(day: Day) -> int:
    """The mirror against GridBalance's model driven by the queue, slot by slot; returns the
    events settled."""
    n, rate, slots = day
    config = MarketConfig(dr_incentive_per_kwh=rate / 1e6, renewable_reward_per_kwh=0.0)
    mirror = MirrorLedger(1, n, config)
    devices = [f"0x{k + 1:040x}" for k in range(n)]
    model = GridBalanceModel(genesis=0, meters={d: d for d in devices})
    queue = DemandResponseQueue()
    readings: dict[tuple[str, int], int] = {}
    empty = Book(*(np.zeros((3, 1, n), dtype=np.int64)))
    total = 0
    for s, (announce, emergency, baselines, metered) in enumerate(slots):
        got = mirror.settle(
            SlotInput(
                slot=np.array([s]), book=empty, reference=np.array([1]),
                metered_wh=np.array([metered], dtype=np.int64), dr_announce=np.array([announce]),
                dr_baseline_wh=np.array([baselines], dtype=np.int64),
                emergency=np.array([emergency]),
            )
        )  # fmt: skip
        # Slot s's transaction, mined at the start of slot s + 1, after the slot's readings.
        now = SLOT * (s + 1)
        if emergency and not model.paused:
            model.declare_emergency(now)
        elif not emergency and model.paused:
            model.recover(now)
        for k, d in enumerate(devices):
            readings[(d, s)] = metered[k]
        covered = any(e.start_slot == s for e in model.events.values())
        paid = np.zeros(n, dtype=np.int64)
        settled = created = 0
        if not model.paused:
            asked = [(d, baselines[k]) for k, d in enumerate(devices)] if announce else []
            part = queue.part(s - 1, s + 2, rate, asked)
            for event_id in part.settle if part is not None else ():
                for owner, amount, _ in model.settle_event(event_id, now, readings).grants:
                    paid[devices.index(owner)] += amount
                settled += 1
            if part is not None and part.participants:
                event_id = model.create_event(
                    now, part.start_slot, 1, 0, rate, 0, 0,
                    [DrParticipant(d, LoadType(t), p, b) for d, t, p, b in part.participants],
                )  # fmt: skip
                assert event_id == queue.next_id - 1
                created = 1
        where = f"slot {s}"
        assert bool(got.dr_event[0]) == covered, where
        assert int(got.dr_created[0]) == created, where
        assert int(got.dr_settled[0]) == settled, where
        assert got.dr_paid[0].tolist() == paid.tolist(), where
        assert got.rewards[0].tolist() == paid.tolist(), where
        total += settled
    return total


def test_fused_batched_and_staged_steps_give_the_same_demand_response() -> None:
    """A batched env, single envs and a single env stepped stage by stage (`Engine.advance`
    without the fused kernel, the chain ledgers' path) report the same DR figures and hold
    the same GridBalance state every step, across an automatic reset."""
    n = 2
    venv = MicrogridVectorEnv(n, STRESSED)
    singles = [MicrogridEnv(STRESSED) for _ in range(n)]
    staged = MicrogridEnv(STRESSED)
    staged.engine.fuses = lambda exchange: False  # type: ignore[method-assign]
    venv.reset(seed=7)
    for i, env in enumerate(singles):
        env.reset(seed=7 + i)
    staged.reset(seed=7)
    rng = np.random.default_rng(1)
    seen = dict.fromkeys(("dr_event", "dr_events_created", "dr_events_settled"), 0.0)
    for t in range(100):
        actions = rng.uniform(-1.0, 1.0, (n, venv.codec.act_dim)).astype(np.float32)
        _, _, _, truncated, info = venv.step(actions)
        staged_info = staged.step(actions[0])[4]
        for i, env in enumerate(singles):
            single: dict[str, Any] = env.step(actions[i])[4]
            for key in MARKET_INFO:
                assert info[key][i] == single[key], f"{key} differs at step {t}, env {i}"
                if i == 0:
                    assert staged_info[key] == single[key], f"staged {key} differs at step {t}"
            if truncated[i]:
                env.reset()
        if truncated[0]:
            staged.reset()
        for key in seen:
            seen[key] += float(info[key].sum())
        batched = venv.exchange.ledger.demand_response  # type: ignore[union-attr]
        for i, env in enumerate(singles):
            assert np.array_equal(batched[i], env.exchange.ledger.demand_response[0])  # type: ignore[union-attr]
    assert min(seen.values()) > 0, seen


@pytest.mark.parametrize("mode", ["noisy", "persistence", "perfect"])
@pytest.mark.parametrize("fused", [True, False])
def test_baselines_are_the_observations_forecast(mode: str, fused: bool) -> None:
    """Each event's baselines are what the operator knew when announcing it: the expected
    import (load less PV forecast, Wh, 0 for an exporter) of the event's slot in the
    observation handed out with the announcement (its second lead), the quantity the live
    bridge announces; under a noisy or persistence forecast that is not the profile's truth.
    Both the fused step and the staged one (the chain ledgers' path)."""
    scenario = STRESSED.model_copy(
        update={
            "forecast": STRESSED.forecast.model_copy(update={"mode": mode}),
            # An event every slot: no emergency ever pauses GridBalance.
            "market": STRESSED.market.model_copy(update={"emergency_loading": 100.0}),
        }
    )
    env = MicrogridEnv(scenario)
    if not fused:
        env.engine.fuses = lambda exchange: False  # type: ignore[method-assign]
    env.reset(seed=3)
    p = env.params
    n, h = p.n_prosumer, p.horizon
    rng = np.random.default_rng(2)
    announced = differs = 0
    for _ in range(40):
        action = rng.uniform(-1.0, 1.0, env.codec.act_dim).astype(np.float32)
        _, _, _, truncated, info = env.step(action)
        assert not truncated
        if not info["dr_events_created"]:
            continue
        announced += 1
        baseline = env.exchange.ledger.demand_response[0][DR_NEXT, :n]  # type: ignore[union-attr]
        raw = observe(p, env.state)
        net = raw["load_forecast"].reshape(n, h)[:, 1] - raw["pv_forecast"].reshape(n, h)[:, 1]
        forecast = np.maximum(np.rint(net * p.dt_h * 1000.0), 0).astype(np.int64)
        assert baseline.tolist() == forecast.tolist()
        t = int(env.state.slot[0]) + 1
        truth = np.rint((p.prosumer_load_kw[t] - p.prosumer_pv_kw[t]) * p.dt_h * 1000.0)
        differs += int(not np.array_equal(baseline, np.maximum(truth, 0)))
    assert announced > 10
    if mode == "perfect":
        assert differs == 0
    else:
        assert differs > 0
