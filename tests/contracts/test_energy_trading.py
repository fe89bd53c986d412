"""EnergyTrading: ledger, orders, gate closure, verified clearing, fees, pausing, parameters."""

from __future__ import annotations

from typing import Any

import pytest

from contracts.client import Side, role_id
from tests.contracts.helpers import World, events

FUNDS = 10**21  # 1,000 tokens of 18 decimals each
WH = 1_000


@pytest.fixture
def market(world: World) -> tuple[World, int, int, int]:
    """Funded users and an open slot two slots ahead: (world, slot, band low, band high)."""
    for user in world.users[:4]:
        world.suite.fund_account(user, FUNDS)
    slot = world.suite.current_slot() + 2
    low, high = world.suite.price_band(slot)
    return world, slot, low, high


def _order(
    world: World, user: str, slot: int, price: int, side: Side, wh: int = WH, duration: int = 1
) -> int:
    return world.suite.create_order(
        user, start_slot=slot, energy_wh=wh, limit_price=price, side=side, duration_slots=duration
    )


def _close_gate(world: World, slot: int) -> None:
    world.chain.travel_to(world.suite.gate_closes_at(slot))


def _books_balance(world: World) -> None:
    credits, escrow = world.suite.ledger_totals()
    assert credits + escrow == world.suite.token_balance(world.suite.trading.address)


# ---------------------------------------------------------------- ledger


def test_deposit_and_withdraw_move_tokens_and_credit(world: World) -> None:
    user = world.users[0]
    world.suite.fund_account(user, 500)
    assert world.suite.credit_of(user) == 500 and world.suite.ledger_totals() == (500, 0)
    receipt = world.suite.withdraw(user, 200)
    assert events(world.suite.trading, "Withdrawn", receipt)[0]["amount"] == 200
    assert world.suite.credit_of(user) == 300 and world.suite.token_balance(user) == 200
    _books_balance(world)


def test_zero_amounts_are_refused(world: World, reverts: Any) -> None:
    with reverts("EnergyTradingZeroAmount"):
        world.suite.deposit(world.users[0], 0)
    with reverts("EnergyTradingZeroAmount"):
        world.suite.withdraw(world.users[0], 0)


def test_withdraw_more_than_credit_is_refused(world: World, reverts: Any) -> None:
    world.suite.fund_account(world.users[0], 10)
    with reverts("EnergyTradingInsufficientCredit", needed=11, available=10):
        world.suite.withdraw(world.users[0], 11)


def test_deposit_without_allowance_reverts_in_the_token(world: World, reverts: Any) -> None:
    with reverts("ERC20InsufficientAllowance"):
        world.suite.deposit(world.users[0], 5)


# ---------------------------------------------------------------- orders


def test_buy_order_locks_escrow_sell_order_does_not(market: tuple[World, int, int, int]) -> None:
    world, slot, low, high = market
    buyer, seller = world.users[0], world.users[1]
    buy = _order(world, buyer, slot, high, Side.BUY, duration=2)
    sell = _order(world, seller, slot, low, Side.SELL)
    assert world.suite.credit_of(buyer) == FUNDS - 2 * WH * high
    assert world.suite.credit_of(seller) == FUNDS
    assert world.suite.ledger_totals()[1] == 2 * WH * high
    assert [o.order_id for o in world.suite.slot_book(slot)] == [buy, sell]
    assert [o.order_id for o in world.suite.slot_book(slot + 1)] == [buy]
    order = world.suite.order(buy)
    assert (order.owner, order.energy_wh, order.limit_price, order.duration_slots) == (
        buyer,
        WH,
        high,
        2,
    )
    _books_balance(world)


@pytest.mark.parametrize(
    ("wh", "price_at", "duration", "error"),
    [
        (0, "low", 1, "EnergyTradingZeroAmount"),
        (WH, "low", 0, "EnergyTradingInvalidDuration"),
        (WH, "low", 9, "EnergyTradingInvalidDuration"),
        (WH, "below", 1, "EnergyTradingPriceOutOfBand"),
        (WH, "above", 1, "EnergyTradingPriceOutOfBand"),
    ],
)
def test_bad_orders_are_refused(
    market: tuple[World, int, int, int],
    reverts: Any,
    wh: int,
    price_at: str,
    duration: int,
    error: str,
) -> None:
    world, slot, low, high = market
    price = {"low": low, "below": low - 1, "above": high + 1}[price_at]
    with reverts(error):
        _order(world, world.users[0], slot, price, Side.SELL, wh=wh, duration=duration)


def test_buy_beyond_credit_is_refused(market: tuple[World, int, int, int], reverts: Any) -> None:
    world, slot, _, high = market
    with reverts("EnergyTradingInsufficientCredit", needed=WH * high, available=0):
        _order(world, world.stranger, slot, high, Side.BUY)


def test_no_orders_after_gate_closure(market: tuple[World, int, int, int], reverts: Any) -> None:
    world, slot, low, _ = market
    closes = world.suite.gate_closes_at(slot)
    assert closes == world.suite.slot_start(slot) - 300
    world.chain.travel_to(closes - 5)
    _order(world, world.users[0], slot, low, Side.SELL)  # still open
    world.chain.travel_to(closes + 1)
    with reverts("EnergyTradingGateClosed", slot=slot, closedAt=closes):
        _order(world, world.users[0], slot, low, Side.SELL)


def test_cancel_refunds_escrow_and_only_the_owner_may(
    market: tuple[World, int, int, int], reverts: Any
) -> None:
    world, slot, _, high = market
    buyer = world.users[0]
    order_id = _order(world, buyer, slot, high, Side.BUY, duration=3)
    with reverts("EnergyTradingNotOrderOwner", orderId=order_id, caller=world.users[1]):
        world.suite.cancel_order(world.users[1], order_id)
    receipt = world.suite.cancel_order(buyer, order_id)
    assert events(world.suite.trading, "OrderCancelled", receipt)[0]["refund"] == 3 * WH * high
    assert world.suite.credit_of(buyer) == FUNDS and world.suite.ledger_totals()[1] == 0
    with reverts("EnergyTradingOrderCancelled", orderId=order_id):
        world.suite.cancel_order(buyer, order_id)
    with reverts("EnergyTradingUnknownOrder", orderId=999):
        world.suite.cancel_order(buyer, 999)


def test_cancel_after_gate_closure_is_refused(
    market: tuple[World, int, int, int], reverts: Any
) -> None:
    world, slot, low, _ = market
    order_id = _order(world, world.users[0], slot, low, Side.SELL)
    _close_gate(world, slot)
    with reverts("EnergyTradingGateClosed"):
        world.suite.cancel_order(world.users[0], order_id)


# ---------------------------------------------------------------- clearing


def test_clearing_settles_buyers_sellers_and_treasury(market: tuple[World, int, int, int]) -> None:
    world, slot, low, high = market
    buyer, seller_a, seller_b = world.users[0], world.users[1], world.users[2]
    mid = (low + high) // 2
    _order(world, buyer, slot, high, Side.BUY, wh=1_000)
    _order(world, seller_a, slot, low, Side.SELL, wh=600)
    _order(world, seller_b, slot, mid, Side.SELL, wh=800)
    _close_gate(world, slot)
    result, receipt = world.suite.solve_and_clear(world.solver, slot)
    assert result.price == mid and result.fills.tolist() == [1_000, 600, 400]
    value_a, value_b = 600 * mid, 400 * mid
    fee_a, fee_b = value_a * 50 // 10_000, value_b * 50 // 10_000
    assert world.suite.credit_of(buyer) == FUNDS - 1_000 * mid
    assert world.suite.credit_of(seller_a) == FUNDS + value_a - fee_a
    assert world.suite.credit_of(seller_b) == FUNDS + value_b - fee_b
    assert world.suite.credit_of(world.treasury) == fee_a + fee_b
    assert world.suite.ledger_totals()[1] == 0
    cleared = events(world.suite.trading, "SlotCleared", receipt)[0]
    assert (cleared["price"], cleared["volumeWh"], cleared["fee"]) == (mid, 1_000, fee_a + fee_b)
    filled = events(world.suite.trading, "OrderFilled", receipt)
    assert [e["fillWh"] for e in filled] == [1_000, 600, 400]
    stored = world.suite.slot_result(slot)
    assert (
        stored.cleared
        and stored.price == mid
        and stored.volume_wh == 1_000
        and stored.order_count == 3
    )
    _books_balance(world)


def test_only_the_solver_clears(market: tuple[World, int, int, int], reverts: Any) -> None:
    world, slot, _, _ = market
    _close_gate(world, slot)
    with reverts(
        "AccessControlUnauthorizedAccount",
        account=world.stranger,
        neededRole=role_id("SOLVER_ROLE"),
    ):
        world.suite.clear_slot(world.stranger, slot, 0, [])


def test_clearing_waits_for_gate_closure_and_happens_once(
    market: tuple[World, int, int, int], reverts: Any
) -> None:
    world, slot, _, _ = market
    with reverts("EnergyTradingGateOpen", slot=slot):
        world.suite.clear_slot(world.solver, slot, 0, [])
    _close_gate(world, slot)
    world.suite.clear_slot(world.solver, slot, 0, [])  # an empty slot clears at any price
    with reverts("EnergyTradingSlotAlreadyCleared", slot=slot):
        world.suite.clear_slot(world.solver, slot, 0, [])


@pytest.mark.parametrize(
    "tamper", ["count", "range", "not_crossing", "fill_high", "fill_low", "shift"]
)
def test_a_wrong_clearing_reverts(
    market: tuple[World, int, int, int], reverts: Any, tamper: str
) -> None:
    world, slot, low, high = market
    mid = (low + high) // 2
    _order(world, world.users[0], slot, high, Side.BUY, wh=1_000)
    _order(world, world.users[1], slot, mid, Side.SELL, wh=500)
    _order(world, world.users[2], slot, mid, Side.SELL, wh=700)
    _close_gate(world, slot)
    good = world.suite.solve(slot)
    assert good.price == mid and good.fills.tolist() == [1_000, 416, 584]
    price, fills = good.price, good.fills.tolist()
    error = "EnergyTradingWrongFill"
    if tamper == "count":
        fills, error = [*fills, 0], "EnergyTradingFillCountMismatch"
    elif tamper == "range":
        price, error = high + 1, "EnergyTradingPriceOutOfRange"
    elif tamper == "not_crossing":
        price, error = mid + 1, "EnergyTradingNotClearingPrice"  # supply at mid+1 > demand above
    elif tamper == "fill_high":
        fills[0] += 1
    elif tamper == "fill_low":
        fills[1] -= 1
        fills[2] += 1  # same volume, wrong pro-rata split
    elif tamper == "shift":
        fills = [1_000, 500, 500]
    with reverts(error):
        world.suite.clear_slot(world.solver, slot, price, fills)
    world.suite.clear_slot(world.solver, slot, good.price, good.fills.tolist())


def test_cancelled_orders_take_no_part(market: tuple[World, int, int, int], reverts: Any) -> None:
    world, slot, low, high = market
    dropped = _order(world, world.users[0], slot, high, Side.BUY)
    _order(world, world.users[1], slot, high, Side.BUY, wh=300)
    _order(world, world.users[2], slot, low, Side.SELL, wh=500)
    world.suite.cancel_order(world.users[0], dropped)
    _close_gate(world, slot)
    result = world.suite.solve(slot)
    assert result.fills.tolist() == [0, 300, 300]
    with reverts("EnergyTradingWrongFill", index=0, orderId=dropped, expected=0, got=1):
        world.suite.clear_slot(world.solver, slot, result.price, [1, 300, 301])
    world.suite.clear_slot(world.solver, slot, result.price, result.fills.tolist())
    assert world.suite.credit_of(world.users[0]) == FUNDS  # refunded once, at cancellation
    _books_balance(world)


def test_multi_slot_orders_clear_slot_by_slot(market: tuple[World, int, int, int]) -> None:
    world, slot, low, high = market
    buyer = world.users[0]
    _order(world, buyer, slot, high, Side.BUY, wh=100, duration=2)
    _order(world, world.users[1], slot, low, Side.SELL, wh=100)
    _close_gate(world, slot + 1)
    first, _ = world.suite.solve_and_clear(world.solver, slot)
    world.suite.solve_and_clear(world.solver, slot + 1)  # nobody sells in the second slot
    assert world.suite.slot_result(slot).volume_wh == 100
    assert world.suite.slot_result(slot + 1).volume_wh == 0
    assert world.suite.ledger_totals()[1] == 0
    assert low < first.price < high  # the midpoint of the crossing interval
    assert world.suite.credit_of(buyer) == FUNDS - 100 * first.price
    _books_balance(world)


# ---------------------------------------------------------------- pausing


def test_pause_stops_trading_but_not_withdrawals(
    market: tuple[World, int, int, int], reverts: Any
) -> None:
    world, slot, low, _ = market
    suite = world.suite
    order_id = _order(world, world.users[1], slot, low, Side.SELL)
    with reverts("AccessControlUnauthorizedAccount", neededRole=role_id("PAUSER_ROLE")):
        world.chain.transact(suite.trading, "pause", sender=world.admin)
    world.chain.transact(
        suite.trading, "grantRole", role_id("PAUSER_ROLE"), world.admin, sender=world.admin
    )
    world.chain.transact(suite.trading, "pause", sender=world.admin)
    with reverts("EnforcedPause"):
        _order(world, world.users[0], slot, low, Side.SELL)
    with reverts("EnforcedPause"):
        suite.deposit(world.users[0], 1)
    suite.withdraw(world.users[0], 5)  # withdrawals never stop
    suite.cancel_order(world.users[1], order_id)  # neither does withdrawing an offer
    _close_gate(world, slot)
    with reverts("EnforcedPause"):
        suite.clear_slot(world.solver, slot, 0, [0])
    # Nor do the meters: an empty signed batch still closes a slot, which then reconciles.
    quiet = slot + 1
    world.chain.travel_to(suite.gate_closes_at(quiet))
    suite.settle_signed_batch(world.solver, quiet, [], [])
    world.chain.travel_to(suite.slot_start(quiet + 1) + 601)  # the reading window has closed
    suite.reconcile_slot(world.solver, quiet, [], [world.users[0]])
    assert suite.slot_result(quiet).reconciled
    world.chain.transact(suite.trading, "unpause", sender=world.admin)
    suite.clear_slot(world.solver, slot, low, [0])


# ---------------------------------------------------------------- parameters


def test_fee_changes_are_bounded_and_governed(world: World, reverts: Any) -> None:
    trading = world.suite.trading
    with reverts("AccessControlUnauthorizedAccount", neededRole=role_id("PARAMETER_ROLE")):
        world.chain.transact(trading, "setFee", 10, world.treasury, sender=world.stranger)
    with reverts("EnergyTradingFeeTooHigh", feeBps=1_001, max=1_000):
        world.chain.transact(trading, "setFee", 1_001, world.treasury, sender=world.admin)
    with reverts("EnergyTradingZeroAddress"):
        world.chain.transact(trading, "setFee", 10, "0x" + "00" * 20, sender=world.admin)
    world.chain.transact(trading, "setFee", 10, world.users[5], sender=world.admin)
    assert tuple(world.chain.call(trading, "fee")) == (10, world.users[5])


def test_gate_closure_is_governed(world: World, reverts: Any) -> None:
    trading = world.suite.trading
    with reverts("AccessControlUnauthorizedAccount"):
        world.chain.transact(trading, "setGateClosure", 60, sender=world.stranger)
    world.chain.transact(trading, "setGateClosure", 60, sender=world.admin)
    assert world.suite.gate_closes_at(10) == world.suite.slot_start(10) - 60


def test_price_formula_and_band(world: World, reverts: Any) -> None:
    trading = world.suite.trading
    tod = [10_000] * 24
    tod[18] = 15_000  # evening peak
    params = (2 * 10**14, 6_000, 2_000, 5_000, 20_000, 1_000)
    with reverts("AccessControlUnauthorizedAccount"):
        world.chain.transact(trading, "setPriceParams", params, tod, sender=world.stranger)
    with reverts("EnergyTradingInvalidPriceParams"):
        world.chain.transact(trading, "setPriceParams", (0, 1, 1, 1, 1, 0), tod, sender=world.admin)
    with reverts("EnergyTradingInvalidPriceParams"):
        world.chain.transact(trading, "setPriceParams", (1, 1, 1, 3, 2, 0), tod, sender=world.admin)
    with reverts("EnergyTradingInvalidPriceParams"):  # a penalty above 100 % of the grid price
        world.chain.transact(
            trading, "setPriceParams", (1, 1, 1, 1, 2, 10_001), tod, sender=world.admin
        )
    world.chain.transact(trading, "setPriceParams", params, tod, sender=world.admin)
    # price = baseRate * (demand + stress) * tod / 1e8
    assert world.chain.call(trading, "gridPrice", 0) == 2 * 10**14 * 8_000 * 10_000 // 10**8
    evening = 18 * 4 + 96 * 3  # 18:00 on day 3
    ref = 2 * 10**14 * 8_000 * 15_000 // 10**8
    assert world.chain.call(trading, "gridPrice", evening) == ref
    assert world.suite.price_band(evening) == (ref * 5_000 // 10_000, ref * 20_000 // 10_000)
    assert world.chain.call(trading, "imbalancePrices", evening) == [
        ref * 11_000 // 10_000,
        ref * 9_000 // 10_000,
    ]
