"""EnergyTrading's signed-order batches and metering reconciliation, call by call.

Prosumer keys here only sign: an operator funds them with ``depositFor`` and the solver submits
their orders, so none of them needs gas. Every test compares the chain with
``contracts.model.MarketModel`` driven through the same operations where money moves.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import pytest
from eth_account import Account
from web3.types import Wei

from contracts.client import (
    DeviceType,
    OrderSignature,
    order_digest,
    order_domain,
    sign_order,
)
from contracts.model import (
    MarketModel,
    ReconciliationPart,
    SignedOrder,
    Trade,
    imbalance_prices,
    reconciliation_args,
    reconciliation_parts,
    trade_commitment,
)
from contracts.model import Side as S
from tests.contracts.helpers import World, events

FUNDS = 10**20


@dataclass
class Prosumer:
    key: bytes
    address: str
    meter_key: bytes


@dataclass
class Batch:
    slot: int
    orders: list[SignedOrder]
    signatures: list[OrderSignature]


def _prosumers(world: World, count: int = 4) -> list[Prosumer]:
    suite = world.suite
    suite.chain.transact(suite.payment_token, "mint", world.admin, 10**25, sender=world.admin)
    suite.chain.transact(
        suite.payment_token, "approve", suite.trading.address, 10**25, sender=world.admin
    )
    people = []
    for i in range(count):
        key = bytes.fromhex(f"{0x5EED00 + i:064x}")
        meter = bytes.fromhex(f"{0x3E7E00 + i:064x}")
        address = Account.from_key(key).address
        suite.deposit_for(world.admin, address, FUNDS)
        suite.register_device(Account.from_key(meter).address, address, DeviceType.METER, 20_000)
        people.append(Prosumer(key, address, meter))
    return people


def _model(world: World, people: list[Prosumer]) -> MarketModel:
    suite = world.suite
    model = MarketModel(genesis=suite.genesis, treasury=world.treasury)
    for p in people:
        model.deposit(p.address, FUNDS)
    credits, _ = suite.ledger_totals()
    assert credits == len(people) * FUNDS  # nobody else holds credit: totals must agree
    return model


def _batch(world: World, people: list[Prosumer], sides: list[S], qty: list[int]) -> Batch:
    suite = world.suite
    slot = suite.current_slot() + 2
    low, high = suite.price_band(slot)
    orders = [
        SignedOrder(p.address, slot, side, q, high if side == S.BUY else low, 0)
        for p, side, q in zip(people, sides, qty, strict=True)
    ]
    keys = {p.address: p.key for p in people}
    orders.sort(key=lambda o: o.key)
    return Batch(slot, orders, [suite.sign_order(keys[o.owner], o) for o in orders])


def _trades(batch: Batch, fills: list[int]) -> list[Trade]:
    return [Trade(o.owner, o.side, f) for o, f in zip(batch.orders, fills, strict=True)]


@pytest.fixture
def people(world: World) -> list[Prosumer]:
    return _prosumers(world)


def test_digest_and_signature_match_the_contract(world: World, people: list[Prosumer]) -> None:
    suite = world.suite
    order = SignedOrder(people[0].address, 12, S.SELL, 250, 10**14, 7)
    onchain = world.chain.call(suite.trading, "signedOrderDigest", order.as_tuple())
    assert bytes(onchain) == order_digest(suite.order_domain, order)
    signature = sign_order(people[0].key, suite.order_domain, order)
    assert len(signature.r) == len(signature.vs) == 32
    assert int.from_bytes(signature.vs, "big") >> 255 in (0, 1)


def test_a_batch_settles_like_the_model(world: World, people: list[Prosumer]) -> None:
    suite = world.suite
    model = _model(world, people)
    batch = _batch(world, people, [S.BUY, S.SELL, S.BUY, S.SELL], [400, 300, 200, 500])
    world.chain.travel_to(suite.gate_closes_at(batch.slot))
    expected = model.settle_signed_batch(batch.slot, batch.orders, world.chain.timestamp() + 1)
    result, receipt = suite.settle_signed_batch(
        world.solver, batch.slot, batch.orders, batch.signatures
    )
    assert result.price == expected.price and result.volume == expected.volume == 600
    (event,) = events(suite.trading, "SignedBatchSettled", receipt)
    fees = model.results[batch.slot].fee
    assert event["fee"] == fees > 0
    assert event["held"] == result.volume * result.price - fees  # sellers wait for metering
    assert event["batchHash"] == suite.trade_commitment(batch.slot)
    assert suite.trade_commitment(batch.slot) == trade_commitment(model.trades[batch.slot])
    stored = suite.slot_result(batch.slot)
    assert stored.signed_batch and not stored.reconciled and stored.fee_bps == 50
    for p in people:
        assert suite.credit_of(p.address) == model.credit_of(p.address)
    assert suite.ledger_totals() == model.totals()
    credits, escrow = suite.ledger_totals()
    assert credits + escrow == suite.token_balance(suite.trading.address)


def test_a_batch_settles_only_once_and_only_after_gate_closure(
    world: World, people: list[Prosumer], reverts: Any
) -> None:
    suite = world.suite
    batch = _batch(world, people[:2], [S.BUY, S.SELL], [100, 100])
    closes = suite.gate_closes_at(batch.slot)
    with reverts("EnergyTradingGateOpen", slot=batch.slot, closesAt=closes):
        suite.settle_signed_batch(world.solver, batch.slot, batch.orders, batch.signatures)
    world.chain.travel_to(closes)
    with reverts("AccessControlUnauthorizedAccount"):
        suite.settle_signed_batch(world.stranger, batch.slot, batch.orders, batch.signatures)
    suite.settle_signed_batch(world.solver, batch.slot, batch.orders, batch.signatures)
    with reverts("EnergyTradingSlotAlreadyCleared", slot=batch.slot):
        suite.settle_signed_batch(world.solver, batch.slot, batch.orders, batch.signatures)


def test_signatures_bind_owner_chain_and_contract(
    world: World, people: list[Prosumer], reverts: Any
) -> None:
    suite = world.suite
    batch = _batch(world, people[:2], [S.BUY, S.SELL], [100, 100])
    world.chain.travel_to(suite.gate_closes_at(batch.slot))
    chain_id = int(world.chain.w3.eth.chain_id)
    first = batch.orders[0]
    owner_key = next(p.key for p in people if p.address == first.owner)
    foreign = {
        "other chain": sign_order(
            owner_key, order_domain(chain_id + 1, suite.trading.address), first
        ),
        "other contract": sign_order(
            owner_key, order_domain(chain_id, suite.registry.address), first
        ),
        "other key": sign_order(people[3].key, suite.order_domain, first),
        "other order": sign_order(owner_key, suite.order_domain, replace(first, energy_wh=101)),
    }
    for signature in foreign.values():
        with reverts("EnergyTradingInvalidSignature", index=0, owner=first.owner) as err:
            suite.settle_signed_batch(
                world.solver, batch.slot, batch.orders, [signature, *batch.signatures[1:]]
            )
        assert err.error is not None and err.error.args_by_name["recovered"] != first.owner


def test_a_malformed_signature_never_passes_for_the_zero_owner(
    world: World, people: list[Prosumer], reverts: Any
) -> None:
    suite = world.suite
    batch = _batch(world, people[:2], [S.BUY, S.SELL], [100, 100])
    world.chain.travel_to(suite.gate_closes_at(batch.slot))
    zero = "0x" + "00" * 20
    ghost = replace(next(o for o in batch.orders if o.side == S.SELL), owner=zero)
    buy = next(o for o in batch.orders if o.side == S.BUY)
    junk = OrderSignature(bytes(32), bytes(32))  # ecrecover yields address(0) for this
    with reverts("EnergyTradingInvalidSignature", index=0, owner=zero, recovered=zero):
        suite.settle_signed_batch(
            world.solver,
            batch.slot,
            [ghost, buy],
            [junk, batch.signatures[batch.orders.index(buy)]],
        )


def test_each_order_rule_has_its_error(world: World, people: list[Prosumer], reverts: Any) -> None:
    suite = world.suite
    batch = _batch(world, people[:2], [S.BUY, S.SELL], [100, 100])
    slot, (a, b), (sa, sb) = batch.slot, batch.orders, batch.signatures
    low, high = suite.price_band(slot)
    world.chain.travel_to(suite.gate_closes_at(slot))
    keys = {p.address: p.key for p in people}

    def resigned(order: SignedOrder) -> OrderSignature:
        return suite.sign_order(keys[order.owner], order)

    def settle(orders: list[SignedOrder], sigs: list[OrderSignature], **kw: Any) -> None:
        suite.settle_signed_batch(world.solver, slot, orders, sigs, **kw)

    with reverts("EnergyTradingBatchNotSorted", index=1):
        settle([b, a], [sb, sa])
    with reverts("EnergyTradingBatchNotSorted", index=1):  # a replay inside one batch
        settle([a, a], [sa, sa])
    wrong_slot = replace(a, slot=slot + 1)
    with reverts("EnergyTradingOrderSlotMismatch", index=0, orderSlot=slot + 1, slot=slot):
        settle([wrong_slot, b], [resigned(wrong_slot), sb])
    zero = replace(a, energy_wh=0)
    with reverts("EnergyTradingZeroAmount"):
        settle([zero, b], [resigned(zero), sb])
    dear = replace(a, limit_price=high + 1)
    with reverts("EnergyTradingPriceOutOfBand", limitPrice=high + 1, low=low, high=high):
        settle([dear, b], [resigned(dear), sb])
    greedy = replace(a, energy_wh=FUNDS // high + 1)
    with reverts("EnergyTradingBatchInsufficientCredit", index=0, owner=a.owner):
        settle([greedy, b], [resigned(greedy), sb])
    with reverts("EnergyTradingWrongFill", index=1):
        settle([a, b], [sa, sb], fills=[100, 99])
    big = [replace(o, energy_wh=300) if o.side == S.SELL else o for o in (a, b)]
    with reverts("EnergyTradingNotClearingPrice", price=high):  # supply below high exceeds demand
        settle(big, [resigned(o) for o in big], price=high, fills=[100, 100])
    with reverts("EnergyTradingBatchLengthMismatch", orders=2, signatures=1, fills=2):
        settle([a, b], [sa])
    too_many = [a] * 1_001
    with reverts("EnergyTradingBatchTooLarge", count=1_001, max=1_000):
        settle(too_many, [sa] * 1_001, price=0, fills=[0] * 1_001)
    with reverts("EnergyTradingPriceOutOfRange"):
        settle([a, b], [sa, sb], price=high + 1, fills=[100, 100])


def test_cancelled_nonces_refuse_the_order_until_gate_closure(
    world: World, people: list[Prosumer], reverts: Any
) -> None:
    suite = world.suite
    batch = _batch(world, people[:2], [S.BUY, S.SELL], [100, 100])
    buyer = batch.orders[0].owner if batch.orders[0].side == S.BUY else batch.orders[1].owner
    buyer_index = 0 if batch.orders[0].owner == buyer else 1
    buyer_key = next(p.key for p in people if p.address == buyer)
    # the buyer's account has no gas: give it some to send the cancellation itself
    tester = world.chain.w3.provider.ethereum_tester  # type: ignore[attr-defined]
    tester.add_account("0x" + buyer_key.hex())
    world.chain.w3.eth.send_transaction(
        {"from": world.admin, "to": buyer, "value": Wei(10**17), "gas": 21_000}
    )
    with reverts("EnergyTradingZeroAmount"):
        suite.cancel_signed_orders(buyer, batch.slot, 0)
    receipt = suite.cancel_signed_orders(buyer, batch.slot, 1 << 0 | 1 << 9)
    (event,) = events(suite.trading, "SignedOrdersCancelled", receipt)
    assert event == {"owner": buyer, "slot": batch.slot, "mask": 1 << 0 | 1 << 9}
    assert world.chain.call(suite.trading, "cancelledNonces", buyer, batch.slot) == 513
    closes = suite.gate_closes_at(batch.slot)
    world.chain.travel_to(closes)
    with reverts("EnergyTradingGateClosed", slot=batch.slot, closedAt=closes):
        suite.cancel_signed_orders(buyer, batch.slot, 1 << 1)
    with reverts("EnergyTradingSignedOrderCancelled", index=buyer_index, owner=buyer, nonce=0):
        suite.settle_signed_batch(world.solver, batch.slot, batch.orders, batch.signatures)


def test_a_slot_with_book_orders_is_not_settled_from_signatures(
    world: World, people: list[Prosumer], reverts: Any
) -> None:
    suite = world.suite
    batch = _batch(world, people[:2], [S.BUY, S.SELL], [100, 100])
    suite.fund_account(world.users[0], 10**20)
    low, _ = suite.price_band(batch.slot)
    suite.create_order(
        world.users[0], start_slot=batch.slot, energy_wh=5, limit_price=low, side=S.SELL
    )
    world.chain.travel_to(suite.gate_closes_at(batch.slot))
    with reverts("EnergyTradingSlotHasBookOrders", slot=batch.slot, count=1):
        suite.settle_signed_batch(world.solver, batch.slot, batch.orders, batch.signatures)


def test_deposit_for_credits_the_named_account(world: World, reverts: Any) -> None:
    suite = world.suite
    target = Account.from_key(bytes.fromhex(f"{0xFEED:064x}")).address
    world.chain.transact(suite.payment_token, "mint", world.admin, 516, sender=world.admin)
    world.chain.transact(
        suite.payment_token, "approve", suite.trading.address, 516, sender=world.admin
    )
    before = suite.credit_of(world.admin)
    receipt = suite.deposit_for(world.admin, target, 500)
    assert events(suite.trading, "Deposited", receipt) == [{"account": target, "amount": 500}]
    assert suite.credit_of(target) == 500 and suite.credit_of(world.admin) == before
    with reverts("EnergyTradingZeroAddress"):
        suite.deposit_for(world.admin, "0x" + "00" * 20, 1)
    with reverts("EnergyTradingZeroAmount"):
        suite.deposit_for(world.admin, target, 0)
    with reverts("EnergyTradingDepositLengthMismatch", accounts=1, amounts=2):
        world.chain.transact(suite.trading, "depositFor", [target], [1, 2], sender=world.admin)
    receipt = suite.deposit_for_many(world.admin, [target, world.stranger], [7, 9])
    assert [e["amount"] for e in events(suite.trading, "Deposited", receipt)] == [7, 9]
    assert suite.credit_of(target) == 507 and suite.credit_of(world.stranger) == 9


# ---------------------------------------------------------------- metering reconciliation


def _read(world: World, people: list[Prosumer], slot: int, wh: list[int]) -> None:
    world.chain.travel_to(max(world.suite.slot_start(slot + 1) + 1, world.chain.timestamp() + 1))
    for p, value in zip(people, wh, strict=True):
        world.suite.submit_reading(p.meter_key, slot, value, sender=world.admin)


def _settled(world: World, people: list[Prosumer]) -> tuple[Batch, list[Trade], MarketModel]:
    suite = world.suite
    model = _model(world, people)
    batch = _batch(world, people, [S.BUY, S.SELL, S.BUY, S.SELL], [400, 300, 200, 500])
    world.chain.travel_to(suite.gate_closes_at(batch.slot))
    model.settle_signed_batch(batch.slot, batch.orders, world.chain.timestamp() + 1)
    result, _ = suite.settle_signed_batch(world.solver, batch.slot, batch.orders, batch.signatures)
    return batch, _trades(batch, result.fills.tolist()), model


def test_reconciliation_settles_imbalances_like_the_model(
    world: World, people: list[Prosumer], reverts: Any
) -> None:
    suite = world.suite
    batch, trades, model = _settled(world, people)
    slot = batch.slot
    by_owner = {o.owner: o for o in batch.orders}
    # buyers consume more than they bought, sellers export less than they sold: both short;
    # the last seller over-delivers (long) and is paid for the surplus.
    metered = {p.address: 0 for p in people}
    for t in trades:
        metered[t.owner] = t.fill_wh + 50 if t.side == S.BUY else -t.fill_wh + 20
    last_seller = max((o for o in batch.orders if o.side == S.SELL), key=lambda o: o.key).owner
    metered[last_seller] -= 120
    _read(world, people, slot, [metered[p.address] for p in people])
    assert suite.net_metered_wh([p.address for p in people], slot) == [
        metered[p.address] for p in people
    ]
    final_at = suite.slot_start(slot + 1) + 600
    with reverts("EnergyTradingReadingsNotFinal", slot=slot, finalAt=final_at):
        suite.reconcile_slot(world.solver, slot, trades)
    world.chain.travel_to(final_at)
    with reverts("AccessControlUnauthorizedAccount"):
        suite.reconcile_slot(world.stranger, slot, trades)
    outcome = model.reconcile_slot(slot, world.chain.timestamp() + 1, metered)
    (receipt,) = suite.reconcile_slot(world.solver, slot, trades)
    logged = {e["account"]: e for e in events(suite.trading, "AccountReconciled", receipt)}
    short, long = model.imbalance_prices(slot)
    for owner, order in by_owner.items():
        imbalance = outcome.imbalance_wh[owner]
        assert logged[owner]["imbalanceWh"] == imbalance
        assert logged[owner]["credited"] == outcome.credited[owner]
        assert suite.credit_of(owner) == model.credit_of(owner)
        if owner == last_seller:
            assert imbalance == -100  # 120 over-delivered, 20 short
        else:
            assert imbalance == (50 if order.side == S.BUY else 20)
    (total,) = events(suite.trading, "SlotReconciled", receipt)
    assert total["charged"] == outcome.charged == (50 + 20 + 50) * short
    assert total["paid"] == outcome.paid == 100 * long
    assert suite.credit_of(world.treasury) == model.credit_of(world.treasury)
    credits, escrow = suite.ledger_totals()
    assert escrow == 0 and credits == suite.token_balance(suite.trading.address)
    assert suite.slot_result(slot).reconciled
    # The reconciliation deleted the commitment (and wrote no cursor): the slot's result is the
    # guard that refuses a replay, on the contract and on the mirror alike.
    assert suite.trade_commitment(slot) == bytes(32)
    with reverts("EnergyTradingSlotAlreadyReconciled", slot=slot):
        suite.reconcile_slot(world.solver, slot, trades)
    with reverts("EnergyTradingSlotAlreadyReconciled", slot=slot):
        model.reconcile_slot(slot, world.chain.timestamp() + 1, metered)


def test_selling_beyond_the_metered_export_never_pays(world: World, people: list[Prosumer]) -> None:
    """Property 2 in money: two sellers with the same order; one exports what it sold, the
    other half of it. At a clearing price far above the grid price (the band allows up to
    its high end), the short seller must still earn less per Wh it delivered: the shortfall is
    charged from the clearing price, not from the grid price alone."""
    suite = world.suite
    batch = _batch(world, people, [S.BUY, S.SELL, S.BUY, S.SELL], [900, 400, 900, 400])
    world.chain.travel_to(suite.gate_closes_at(batch.slot))
    result, _ = suite.settle_signed_batch(world.solver, batch.slot, batch.orders, batch.signatures)
    trades = _trades(batch, result.fills.tolist())
    short, _ = world.chain.call(suite.trading, "imbalancePrices", batch.slot)
    grid = world.chain.call(suite.trading, "gridPrice", batch.slot)
    penalty = world.chain.call(suite.trading, "priceParams")[0][5]
    assert result.price > grid * (10_000 + penalty) // 10_000  # the old rule's loophole
    assert short == result.price * (10_000 + penalty) // 10_000
    sellers = sorted(t.owner for t in trades if t.side == S.SELL and t.fill_wh == 400)
    honest, short_seller = sellers
    metered = {p.address: 0 for p in people}
    for t in trades:
        if t.side == S.BUY:
            metered[t.owner] = t.fill_wh
    metered[honest], metered[short_seller] = -400, -200
    _read(world, people, batch.slot, [metered[p.address] for p in people])
    world.chain.travel_to(suite.slot_start(batch.slot + 1) + 600)
    suite.reconcile_slot(world.solver, batch.slot, trades)
    gain = {a: suite.credit_of(a) - FUNDS for a in (honest, short_seller)}
    assert gain[honest] > 0
    assert gain[short_seller] / 200 < gain[honest] / 400  # less per delivered Wh
    assert gain[short_seller] < gain[honest] / 2


def test_reconciliation_refuses_a_tampered_trade_list(
    world: World, people: list[Prosumer], reverts: Any
) -> None:
    suite = world.suite
    batch, trades, _ = _settled(world, people)
    slot = batch.slot
    world.chain.travel_to(suite.slot_start(slot + 1) + 600)
    tampered = [replace(trades[0], fill_wh=trades[0].fill_wh - 1), *trades[1:]]
    with reverts("EnergyTradingTradesMismatch", slot=slot):
        suite.reconcile_slot(world.solver, slot, tampered)
    with reverts("EnergyTradingTradesMismatch", slot=slot):
        suite.reconcile_slot(world.solver, slot, trades[:-1])
    accounts, rows = reconciliation_args(trades)
    filled = next(i for i, r in enumerate(rows) if r[2])
    rows[filled] = (rows[filled][0], rows[filled][1], rows[filled][2], len(accounts))
    with reverts("EnergyTradingTradeAccountMismatch", index=filled, owner=trades[filled].owner):
        world.chain.transact(
            suite.trading, "reconcileSlot", slot, rows, accounts, bytes(32), sender=world.solver
        )
    _, rows = reconciliation_args(trades)
    with reverts("EnergyTradingAccountsNotSorted", index=1):
        world.chain.transact(
            suite.trading,
            "reconcileSlot",
            slot,
            rows,
            accounts[::-1],
            bytes(32),
            sender=world.solver,
        )
    with reverts("EnergyTradingSlotNotCleared", slot=slot + 5):
        suite.reconcile_slot(world.solver, slot + 5, [])


def test_unfunded_charges_stay_unpaid_and_surplus_needs_the_treasury(
    world: World, people: list[Prosumer], reverts: Any
) -> None:
    suite = world.suite
    batch, trades, model = _settled(world, people)
    slot = batch.slot
    # a member without credit and without a trade, who imported 1,000 Wh
    member_meter = bytes.fromhex(f"{0x3E7E80:064x}")
    member = Account.from_key(bytes.fromhex(f"{0x5EED80:064x}")).address
    suite.register_device(Account.from_key(member_meter).address, member, DeviceType.METER, 20_000)
    # sellers over-deliver by 100 Wh each, buyers take exactly what they bought
    metered = {t.owner: t.fill_wh if t.side == S.BUY else -t.fill_wh - 100 for t in trades}
    _read(world, people, slot, [metered[p.address] for p in people])
    suite.submit_reading(member_meter, slot, 1_000, sender=world.admin)
    metered[member] = 1_000
    world.chain.travel_to(suite.slot_start(slot + 1) + 600)
    short, long = model.imbalance_prices(slot)
    suite.withdraw(world.treasury, suite.credit_of(world.treasury))
    model.withdraw(world.treasury, model.credit_of(world.treasury))
    with reverts("EnergyTradingTreasuryShort", needed=200 * long, available=0):
        suite.reconcile_slot(world.solver, slot, trades)
    with pytest.raises(Exception, match="EnergyTradingTreasuryShort"):
        model.reconcile_slot(slot, world.chain.timestamp() + 1, metered)
    # with the member in the list, its (unpayable) shortfall does not fund the surplus either
    with reverts("EnergyTradingTreasuryShort", needed=200 * long, available=0):
        suite.reconcile_slot(world.solver, slot, trades, members=[member])
    suite.deposit_for(world.admin, world.treasury, 200 * long)
    model.deposit(world.treasury, 200 * long)
    outcome = model.reconcile_slot(slot, world.chain.timestamp() + 1, metered, [member])
    (receipt,) = suite.reconcile_slot(world.solver, slot, trades, members=[member])
    logged = {e["account"]: e for e in events(suite.trading, "AccountReconciled", receipt)}
    assert logged[member]["unpaid"] == outcome.unpaid[member] == 1_000 * short
    assert logged[member]["credited"] == 0 and suite.credit_of(member) == 0
    assert suite.credit_of(world.treasury) == model.credit_of(world.treasury) == 0
    for p in people:
        assert suite.credit_of(p.address) == model.credit_of(p.address)
    assert suite.ledger_totals() == model.totals()


def test_a_large_slot_reconciles_in_parts_checked_one_by_one(
    world: World, people: list[Prosumer], reverts: Any
) -> None:
    suite = world.suite
    batch, trades, model = _settled(world, people)
    slot = batch.slot
    metered = {t.owner: (t.fill_wh + 7 if t.side == S.BUY else -t.fill_wh + 3) for t in trades}
    _read(world, people, slot, [metered[p.address] for p in people])
    world.chain.travel_to(suite.slot_start(slot + 1) + 600)
    parts = reconciliation_parts(trades, max_accounts=1)
    assert len(parts) == 4 and parts[-1].rest == bytes(32)
    assert [len(p.accounts) for p in parts] == [1, 1, 1, 1]

    def send(part: ReconciliationPart) -> Any:
        return world.chain.transact(
            suite.trading,
            "reconcileSlot",
            slot,
            part.trades,
            part.accounts,
            part.rest,
            sender=world.solver,
        )

    with reverts("EnergyTradingTradesMismatch", slot=slot):
        send(parts[1])  # out of turn: it does not continue where the slot stands
    receipts = [send(parts[0])]
    with reverts("EnergyTradingTradesMismatch", slot=slot):
        send(parts[0])  # the same part twice
    with reverts("EnergyTradingAccountsNotSorted", index=0):  # an account settled again
        send(ReconciliationPart([], parts[0].accounts, parts[0].rest))
    receipts += [send(p) for p in parts[1:]]
    flags = [events(suite.trading, "SlotReconciled", r)[0]["complete"] for r in receipts]
    assert flags == [False, False, False, True]
    model.reconcile_slot(slot, world.chain.timestamp() + 1, metered)
    for p in people:
        assert suite.credit_of(p.address) == model.credit_of(p.address)
    assert suite.ledger_totals() == model.totals()
    assert suite.slot_result(slot).reconciled
    # The last part deleted the cursor and the commitment; no part, first or last, comes back.
    assert suite.trade_commitment(slot) == bytes(32)
    for part in (parts[0], parts[-1]):
        with reverts("EnergyTradingSlotAlreadyReconciled", slot=slot):
            send(part)
    with reverts("EnergyTradingSlotAlreadyReconciled", slot=slot):
        model.reconcile_slot(slot, world.chain.timestamp() + 1, metered)


def test_a_book_slot_reconciles_against_its_committed_trades(
    world: World, people: list[Prosumer]
) -> None:
    suite = world.suite
    buyer, seller = world.users[0], world.users[1]
    suite.fund_account(buyer, 10**20)
    slot = suite.current_slot() + 2
    low, high = suite.price_band(slot)
    suite.create_order(buyer, start_slot=slot, energy_wh=300, limit_price=high, side=S.BUY)
    suite.create_order(seller, start_slot=slot, energy_wh=300, limit_price=low, side=S.SELL)
    world.chain.travel_to(suite.gate_closes_at(slot))
    result, _ = suite.solve_and_clear(world.solver, slot)
    trades = suite.book_trades(slot, result.fills.tolist())
    assert suite.trade_commitment(slot) == trade_commitment(trades)
    seller_before = suite.credit_of(seller)
    assert seller_before > 0  # a book slot pays sellers at clearing, as before
    world.chain.travel_to(suite.slot_start(slot + 1) + 600)
    (receipt,) = suite.reconcile_slot(world.solver, slot, trades)
    short, long = imbalance_prices(
        MarketModel(suite.genesis, world.treasury).price, slot, result.price, result.volume
    )
    # no meters: the seller delivered nothing (short), the buyer took nothing (long)
    # The shortfall costs more than the sale earned (the short price starts from the clearing
    # price when that is above the grid's): what the credit cannot cover is recorded unpaid.
    logged = {e["account"]: e for e in events(suite.trading, "AccountReconciled", receipt)}
    assert 300 * short > 300 * result.price
    assert suite.credit_of(seller) == max(seller_before - 300 * short, 0)
    assert logged[seller]["unpaid"] == max(300 * short - seller_before, 0)
    assert logged[buyer]["credited"] == 300 * long
    assert not suite.slot_result(slot).signed_batch


def test_registry_lists_meters_and_nets_their_readings(
    world: World, people: list[Prosumer], reverts: Any
) -> None:
    suite = world.suite
    owner = people[0].address
    second = bytes.fromhex(f"{0x3E7F00:064x}")
    suite.register_device(Account.from_key(second).address, owner, DeviceType.METER, 20_000)
    inverter = Account.from_key(bytes.fromhex(f"{0x3E8000:064x}")).address
    suite.register_device(inverter, owner, DeviceType.INVERTER, 20_000)
    meters = world.chain.call(suite.registry, "metersOf", owner)
    assert meters == [
        Account.from_key(people[0].meter_key).address,
        Account.from_key(second).address,
    ]
    slot = suite.current_slot()
    world.chain.travel_to(suite.slot_start(slot + 1) + 1)
    suite.submit_reading(people[0].meter_key, slot, 700, sender=world.admin)
    receipt = suite.submit_readings([(second, slot, -1_000, 0)], sender=world.admin)
    assert len(events(suite.registry, "ReadingRecorded", receipt)) == 1
    assert suite.net_metered_wh([owner, people[1].address], slot) == [-300, 0]
    with reverts("DeviceRegistryLengthMismatch", readings=0, signatures=1):
        world.chain.transact(suite.registry, "submitReadings", [], [b"\x00"], sender=world.admin)
