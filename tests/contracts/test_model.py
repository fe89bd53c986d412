"""contracts.model: the pricing formula against the contract, and the mirror's own bookkeeping.

The stateful differential test (test_invariants_market.py) covers the ledger against the chain;
these tests pin what it does not reach.
"""

from __future__ import annotations

import pytest

from contracts.errors import ContractRevert
from contracts.model import MarketModel, PriceParams, Side, grid_price, price_band
from tests.contracts.helpers import World


def test_grid_price_and_band_match_the_contract_in_every_hour(world: World) -> None:
    tod = tuple(8_000 + 500 * h for h in range(24))
    params = PriceParams(base_rate=3 * 10**14 + 7, demand_factor_bps=6_100, tod_multiplier_bps=tod)
    world.chain.transact(
        world.suite.trading, "setPriceParams", *params.as_args(), sender=world.admin
    )
    for slot in range(0, 96 * 2, 3):
        assert world.chain.call(world.suite.trading, "gridPrice", slot) == grid_price(params, slot)
        assert world.suite.price_band(slot) == price_band(params, slot)


def test_mirror_trades_and_closes_its_books() -> None:
    model = MarketModel(genesis=0, treasury="T")
    now = 1_000
    slot = 5
    low, high = price_band(model.price, slot)
    model.deposit("B", 10**21)
    buy = model.create_order(
        "B", now, start_slot=slot, energy_wh=100, limit_price=high, side=Side.BUY
    )
    sell = model.create_order(
        "S", now, start_slot=slot, energy_wh=60, limit_price=low, side=Side.SELL
    )
    assert (buy, sell) == (1, 2) and model.books[slot] == [1, 2]
    with pytest.raises(ContractRevert) as err:
        model.clear_slot(slot, now)
    assert err.value.name == "EnergyTradingGateOpen"
    result = model.clear_slot(slot, model.gate_closes_at(slot))
    assert result.volume == 60 and result.fills.tolist() == [60, 60]
    fee = 60 * result.price * 50 // 10_000
    assert model.credit_of("S") == 60 * result.price - fee and model.credit_of("T") == fee
    assert model.totals() == (10**21, 0)  # all escrow released: refund plus payments
    with pytest.raises(ContractRevert, match="EnergyTradingSlotAlreadyCleared"):
        model.clear_slot(slot, model.gate_closes_at(slot))


def test_mirror_refuses_like_the_contract() -> None:
    model = MarketModel(genesis=0, treasury="T")
    low, _ = price_band(model.price, 5)
    cases = [
        (lambda: model.withdraw("A", 1), "EnergyTradingInsufficientCredit"),
        (lambda: model.deposit("A", 0), "EnergyTradingZeroAmount"),
        (lambda: model.cancel_order("A", 9, 0), "EnergyTradingUnknownOrder"),
        (
            lambda: model.create_order(
                "A", 0, start_slot=5, energy_wh=1, limit_price=low - 1, side=Side.SELL
            ),
            "EnergyTradingPriceOutOfBand",
        ),
        (
            lambda: model.create_order(
                "A", 5 * 900, start_slot=5, energy_wh=1, limit_price=low, side=Side.SELL
            ),
            "EnergyTradingGateClosed",
        ),
    ]
    for operation, error in cases:
        with pytest.raises(ContractRevert) as err:
            operation()
        assert err.value.name == error and err.value.contract == "EnergyTrading"
    model.paused = True
    with pytest.raises(ContractRevert, match="EnforcedPause"):
        model.deposit("A", 1)
