"""contracts.model: the pricing formula against the contract, and the mirror's own bookkeeping.

The stateful differential test (test_invariants_market.py) covers the ledger against the chain;
these tests pin what it does not reach.
"""

from __future__ import annotations

import pytest

from contracts.errors import ContractRevert
from contracts.model import (
    READING_HISTORY_SLOTS,
    DrParticipant,
    GridBalanceModel,
    LoadType,
    MarketModel,
    PriceParams,
    Side,
    grid_price,
    price_band,
)
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


def test_grid_mirror_refuses_an_event_whose_reading_was_evicted() -> None:
    """GridBalance reads its readings from DeviceRegistry, which keeps 32 slots: once a meter's
    reading of slot s + 32 took the entry of slot s, settling an event over s reverts on chain
    (`DeviceRegistryReadingEvicted`), and the mirror refuses alike, leaving the event open."""
    device, owner = "0x" + "a" * 40, "0x" + "b" * 40
    model = GridBalanceModel(genesis=0, meters={device: owner})
    people = [DrParticipant(device, LoadType.CURTAILABLE, 1, 500)]
    event_id = model.create_event(0, 2, 1, 100, 1, 0, 0, people)
    readings = {(device, 2): 300, (device, 3 + READING_HISTORY_SLOTS): 200}
    now = (4 + READING_HISTORY_SLOTS) * 900 + 600
    assert model.settle_event(event_id, now, {(device, 2): 300}).reductions == [200]
    model.events[event_id].settled = False
    with pytest.raises(ContractRevert) as got:
        model.settle_event(event_id, now, {**readings, (device, 2 + READING_HISTORY_SLOTS): 1})
    assert got.value.name == "DeviceRegistryReadingEvicted"
    assert got.value.args_by_name == {
        "device": device,
        "slot": 2,
        "heldSlot": 2 + READING_HISTORY_SLOTS,
    }
    assert not model.events[event_id].settled
