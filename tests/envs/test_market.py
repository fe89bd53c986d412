"""The market in the step: compiled clearing and mirror settlement equal the contracts' rules.

`contracts.clearing` and `contracts.model.MarketModel` are held equal to the Solidity contracts
by tests/contracts; here the environment's compiled market is held equal to them, and the
market invariants are checked on whole episodes.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from contracts import clearing
from contracts.model import MarketModel, PriceParams, Side, SignedOrder
from envs import MicrogridEnv, Scenario
from envs.accounts import prosumer_addresses
from envs.ledger import MirrorLedger, SlotInput, units
from envs.market import BUY, MONEY_UNITS, SELL, Book, RuleInputs, clear_books, rule_book
from envs.scenario import MarketConfig
from envs.vector_env import MicrogridVectorEnv

order = st.tuples(
    st.integers(0, 5_000),  # Wh (0 = no order)
    st.integers(1, 40),  # limit, few distinct values so ties and marginal sharing are common
    st.sampled_from([BUY, SELL]),
)
books = st.lists(st.lists(order, min_size=1, max_size=14), min_size=1, max_size=6).map(
    lambda rows: [r + [(0, 1, BUY)] * (14 - len(r)) for r in rows]
)


def _book(rows: list[list[tuple[int, int, int]]]) -> Book:
    arr = np.array(rows, dtype=np.int64)
    return Book(qty_wh=arr[:, :, 0], limit=arr[:, :, 1], side=arr[:, :, 2])


@settings(max_examples=300, deadline=None)
@given(books)
def test_compiled_clearing_equals_contracts_clearing(
    rows: list[list[tuple[int, int, int]]],
) -> None:
    book = _book(rows)
    got = clear_books(book)
    for i in range(book.qty_wh.shape[0]):
        live = book.qty_wh[i] > 0
        ref = clearing.clear_book(book.qty_wh[i], book.limit[i], book.side[i], live)
        if not live.any():
            assert got.price[i] == 0 and got.volume_wh[i] == 0
            continue
        assert got.price[i] == ref.price, f"row {i}"
        assert got.volume_wh[i] == ref.volume
        assert np.array_equal(got.fill_wh[i], ref.fills)


@settings(max_examples=150, deadline=None)
@given(
    books,
    st.integers(0, 200_000),
    st.integers(0, 1_000),
    st.integers(0, 10_000),
    st.integers(0, 2**32 - 1),
)
def test_mirror_settlement_equals_market_model(
    rows: list[list[tuple[int, int, int]]], credit: int, fee_bps: int, penalty_bps: int, seed: int
) -> None:
    """Fills, prices, credits, fees and imbalances as EnergyTrading (through its model) gives them.

    Each row is one slot on its own model: the signed batch (sorted by owner address) settles,
    then the meters reconcile it. Buy orders the mirror refuses are exactly those whose escrow
    exceeds the buyer's credit, which would make `settleSignedBatch` revert.
    """
    book = _book(rows)
    b, n = book.qty_wh.shape
    cfg = MarketConfig(
        fee_bps=fee_bps,
        imbalance_penalty_bps=penalty_bps,
        initial_credit=credit / MONEY_UNITS,
        treasury_credit=10**6,
    )
    ledger = MirrorLedger(b, n, cfg)
    rng = np.random.default_rng(seed)
    metered = rng.integers(-3_000, 3_000, (b, n))
    reference = rng.integers(1, 40, b)
    before = ledger.credits()
    treasury_before = ledger.treasury.copy()
    s = ledger.settle(
        SlotInput(
            slot=np.zeros(b, dtype=np.int64),
            book=book,
            reference=reference,
            metered_wh=metered,
            dr_announce=np.zeros(b, dtype=bool),
            dr_baseline_wh=np.zeros((b, n), dtype=np.int64),
            emergency=np.zeros(b, dtype=bool),
        )
    )
    owners = prosumer_addresses(n)
    treasury = "0x" + "ee" * 20
    for i in range(b):
        # The contract's reference price is the posted demand factor: baseRate 1e4 x bps / 1e8.
        params = PriceParams(
            base_rate=10_000,
            demand_factor_bps=int(reference[i]),
            grid_stress_factor_bps=0,
            band_low_bps=0,
            band_high_bps=10**6,
            imbalance_penalty_bps=penalty_bps,
        )
        model = MarketModel(genesis=10_000, treasury=treasury, fee_bps=fee_bps, price=params)
        model.deposit(treasury, units(10**6))
        for a in owners:
            if credit:
                model.deposit(a, credit)
        orders = []
        refused = 0
        for k in range(n):
            q, limit, side = (
                int(x) for x in (book.qty_wh[i, k], book.limit[i, k], book.side[i, k])
            )
            if q == 0:
                continue
            if side == BUY and q * limit > credit:
                refused += 1
                continue
            orders.append(SignedOrder(owners[k], 20, Side(side), q, limit))
        orders.sort(key=lambda o: o.key)
        result = model.settle_signed_batch(20, orders, now=model.gate_closes_at(20))
        meters = {owners[k]: int(metered[i, k]) for k in range(n)}
        outcome = model.reconcile_slot(20, model.readings_final_at(20), meters, members=owners)
        assert s.refused[i] == refused
        assert s.price[i] == result.price and s.volume_wh[i] == result.volume
        fills = np.zeros(n, dtype=np.int64)
        for o, f in zip(orders, result.fills.tolist(), strict=True):
            fills[owners.index(o.owner)] = f
        assert np.array_equal(s.fill_wh[i], fills)
        assert s.fees[i] == model.results[20].fee
        assert [outcome.imbalance_wh[a] for a in owners] == s.imbalance_wh[i].tolist()
        assert [outcome.unpaid.get(a, 0) for a in owners] == s.unpaid[i].tolist()
        assert [model.credit_of(a) - credit for a in owners] == s.cash[i].tolist()
        assert model.credit_of(treasury) == ledger.treasury[i]
    assert np.array_equal(ledger.credits(), before + s.cash)
    assert np.array_equal(s.cash.sum(1) + ledger.treasury - treasury_before, np.zeros(b))


@pytest.mark.parametrize("mode", ["noisy", "perfect"])
def test_market_invariants_over_an_episode(mode: str) -> None:
    """Money is conserved, bought = sold, no fill beyond its order or its limit price."""
    venv = MicrogridVectorEnv(3, Scenario(forecast={"mode": mode}))
    venv.reset(seed=5)
    ex = venv.exchange
    assert ex is not None
    rng = np.random.default_rng(1)
    traded = 0.0
    for _ in range(96):
        state = venv.state
        decoded = venv.engine.decode(rng.uniform(-1, 1, (3, venv.codec.act_dim)))
        gate = ex.open(state, decoded)
        treasury = ex.ledger.treasury.copy()
        venv.engine.step(state, decoded)
        s = ex.close(gate, state)
        book = gate.book
        buy = book.side == BUY
        assert np.array_equal((s.fill_wh * buy).sum(1), s.volume_wh)
        assert np.array_equal((s.fill_wh * ~buy).sum(1), s.volume_wh)
        assert (s.fill_wh <= book.qty_wh).all() and (s.fill_wh >= 0).all()
        filled = s.fill_wh > 0
        assert (book.limit[filled & buy] >= np.repeat(s.price, 13)[(filled & buy).ravel()]).all()
        sell_f = (filled & ~buy).ravel()
        assert (book.limit[filled & ~buy] <= np.repeat(s.price, 13)[sell_f]).all()
        # Every unit of money that leaves a prosumer reaches the treasury, and back.
        moved = s.cash.sum(1) + (ex.ledger.treasury - treasury)
        assert np.array_equal(moved, np.zeros(3, dtype=np.int64))
        low, high = ex.band(gate.reference)
        live = book.qty_wh > 0
        assert (book.limit[live] >= np.repeat(low, 13)[live.ravel()]).all()
        assert (book.limit[live] <= np.repeat(high, 13)[live.ravel()]).all()
        traded += s.volume_wh.sum()
        if mode == "perfect":
            # The rule orders what the meters then read: only rounding separates the two.
            metered = s.imbalance_wh + np.where(buy, s.fill_wh, -s.fill_wh)
            ordered = np.where(buy, book.qty_wh, -book.qty_wh)
            assert np.abs(metered - ordered).max() <= 1
    assert traded > 0


def test_emergency_stops_trading_but_not_metering() -> None:
    """Above the emergency loading no order is accepted; imbalances still settle. GridBalance,
    paused, announces no demand-response event either, however stressed the grid."""
    env = MicrogridEnv(Scenario(market={"dr_loading": 0.001, "emergency_loading": 0.002}))
    env.reset(seed=0)
    for _ in range(4):
        _, _, _, _, info = env.step(env.action_space.sample())
        assert info["emergency"] == 1.0 and info["dr_event"] == 0.0
        assert info["dr_events_created"] == 0.0
        assert info["market_traded_kwh"] == 0.0
        assert info["market_refused_orders"] > 0
        assert info["market_imbalance_kwh"] > 0


def test_demand_response_earns_rewards_only_during_events() -> None:
    """A stressed grid announces an event two slots on; the slot's transaction after the event
    settles it and pays the incentive for the Wh metered below the baselines. A calm grid
    announces nothing and pays no DR reward."""
    action_dr = np.zeros(MicrogridEnv().codec.act_dim, dtype=np.float32)
    env = MicrogridEnv(Scenario(market={"dr_loading": 0.001, "renewable_reward_per_kwh": 0.0}))
    calm = MicrogridEnv(
        Scenario(
            market={
                "dr_loading": 2.9,
                "emergency_loading": 3.0,
                "dr_voltage_pu": 0.2,
                "renewable_reward_per_kwh": 0.0,
            }
        )
    )
    names = env.codec.action_names()
    action_dr[[i for i, nm in enumerate(names) if nm.startswith("demand_response")]] = 1.0
    env.reset(seed=0, options={"day": int(env.engine.split_days[0])})
    calm.reset(seed=0, options={"day": int(env.engine.split_days[0])})
    infos = [env.step(action_dr)[4] for _ in range(4)]
    calm_infos = [calm.step(action_dr)[4] for _ in range(4)]
    assert [i["dr_events_created"] for i in infos] == [1.0] * 4
    assert [i["dr_event"] for i in infos] == [0.0, 0.0, 1.0, 1.0]
    assert [i["dr_events_settled"] for i in infos] == [0.0, 0.0, 0.0, 1.0]
    assert infos[3]["dr_incentives"] > 0 and infos[3]["market_rewards"] == infos[3]["dr_incentives"]
    assert all(i["dr_incentives"] == i["market_rewards"] == 0.0 for i in infos[:3])
    for i in calm_infos:
        assert i["dr_event"] == i["dr_events_created"] == i["market_rewards"] == 0.0


def test_episode_kpis_total_the_market() -> None:
    env = MicrogridEnv()
    env.reset(seed=2)
    traded = fees = 0.0
    truncated = False
    while not truncated:
        _, _, _, truncated, info = env.step(env.action_space.sample())
        traded += info["market_traded_kwh"]
        fees += info["market_fees"]
    kpis = info["episode_kpis"]
    assert kpis["market_traded_kwh"] == pytest.approx(traded)
    assert kpis["market_fees"] == pytest.approx(fees)
    assert kpis["market_traded_kwh"] > 0 and kpis["market_mean_price"] > 0


def test_market_can_be_switched_off() -> None:
    env = MicrogridEnv(Scenario(market={"enabled": False}))
    env.reset(seed=0)
    _, _, _, _, info = env.step(env.action_space.sample())
    assert env.exchange is None and "market_price" not in info


def test_rule_book_is_the_gates_book() -> None:
    """`rule_book` (what the bridge calls with live telemetry) gives the book the env's gate
    builds with its default rule, slot after slot, under random actions and a persistence
    forecast (the last slot's load and PV, which the bridge also holds)."""
    s = Scenario()
    env = MicrogridEnv(
        s.model_copy(update={"forecast": s.forecast.model_copy(update={"mode": "persistence"})})
    )
    ex = env.exchange
    assert ex is not None
    p, n = env.params, env.params.n_prosumer
    rng = np.random.default_rng(7)
    env.reset(seed=3)
    compared = 0
    for _ in range(40):
        action = rng.uniform(-1, 1, env.action_space.shape).astype(np.float32)
        state = env.state
        decoded = env.codec.decode_action(action[None])
        want = ex.open(state, decoded).book
        got = rule_book(
            RuleInputs(
                load_kw=state.last_load_kw[0], pv_kw=state.last_pv_kw[0],
                dr_share=decoded.dr_share[0], curtailment=decoded.pv_curtailment[0],
                backlog_kwh=state.backlog_kwh[0], soc=state.soc[0, :n],
                capacity_kwh=state.capacity_kwh[0, :n], battery_kw=decoded.battery_kw[0, :n],
            ),
            int(ex.reference(state)[0]),
            batteries=p.batteries, dt_h=p.dt_h,
            flexible_share=p.curtailable_share + p.shiftable_share,
            rebound_per_step=p.rebound_per_step, bid_markup=s.market.bid_markup,
            band_low_bps=s.market.band_low_bps, band_high_bps=s.market.band_high_bps,
        )  # fmt: skip
        for field in ("qty_wh", "limit", "side"):
            assert np.array_equal(getattr(got, field), getattr(want, field)), field
        compared += int(want.live.sum())
        env.step(action)
    assert compared > 0
