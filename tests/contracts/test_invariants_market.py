"""Differential, stateful test of the market: the real EnergyTrading (py-evm) against
``contracts.model.MarketModel``, the pure-Python mirror the environment trains on.

Each example replays a random sequence of deposits, withdrawals, orders, cancellations,
clearings, signed-order batches (with cancelled nonces and broken batches), metering
reconciliations and pauses on both. Every operation must succeed on both or fail on both with
the same custom error and the same arguments; order ids, clearing results, totals and every
account's credit must agree. On top of that equality the issue's properties are checked:

1. credits + escrow = the market's token balance;
2. no fill exceeds its order; per slot bought = sold; after metering, every account has paid
   for exactly its metered energy (traded at the clearing price, the imbalance at the grid
   price made worse by the penalty);
3. one price per slot, within every matched party's limit;
4. no orders after gate closure; a slot clears once; a slot reconciles once, only after its
   readings are final;
6. only the solver clears, only the pauser pauses; pausing stops trading but not withdrawals.

HYPOTHESIS_PROFILE=nightly runs twenty times as many sequences (600 here by default).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest
from eth_account import Account
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from contracts import clearing
from contracts.errors import ContractRevert
from contracts.model import (
    MarketModel,
    PriceParams,
    Side,
    SignedOrder,
    reconciliation_args,
)
from tests.contracts.helpers import (
    CONTRACT_SETTINGS,
    STATEFUL_STEPS,
    sequences,
    shared_deployment,
)

users = st.integers(0, 3)


pytestmark = pytest.mark.usefixtures("deployed_before_hypothesis")


class MarketMachine(RuleBasedStateMachine):
    """The contract and the model, driven in lockstep."""

    def __init__(self) -> None:
        super().__init__()
        self.d = shared_deployment()
        self.d.chain.revert(self.d.snapshot)
        self.suite = self.d.suite
        self.model = MarketModel(
            genesis=self.suite.genesis, treasury=self.d.treasury, price=PriceParams()
        )
        self.model.credits[self.d.treasury] = self.d.treasury_credit
        self.unreconcilable: set[int] = set()
        # Start 5 s into a slot ahead of the wall clock: from there every block is its parent
        # + 1 s, so the model's "now" (latest + 1) is the next transaction's timestamp. Left at
        # the snapshot's time, a long run let the wall clock carry transactions past a gate
        # closure the model had not seen coming.
        now = max(self.d.chain.timestamp(), int(time.time()))
        genesis = self.suite.genesis
        self.d.chain.travel_to(self.suite.slot_start((now - genesis) // 900 + 1) + 5)
        self.next_clear = self.suite.current_slot() + 2
        self.first_slot = self.next_clear
        low, high = self.d.band
        # A few distinct prices inside the band make ties at the margin common.
        self.prices = [low, low + (high - low) // 4, (low + high) // 2, high]

    def _now(self) -> int:
        # The next transaction's timestamp; operations stay far from gate boundaries.
        return self.d.chain.timestamp() + 1

    def _lockstep(
        self, model_op: Callable[[], Any], fn: str, *args: object, sender: str
    ) -> tuple[bool, Any]:
        """Run ``model_op``; if the model refuses, the contract must refuse identically."""
        try:
            outcome = model_op()
        except ContractRevert as expected:
            with pytest.raises(ContractRevert) as got:
                self.d.chain.call(self.suite.trading, fn, *args, sender=sender)
            assert (got.value.name, got.value.args_by_name) == (
                expected.name,
                expected.args_by_name,
            )
            return False, None
        return True, outcome

    # ------------------------------------------------------------ ledger

    @rule(user=users, amount=st.integers(0, 10**6))
    def deposit(self, user: int, amount: int) -> None:
        account = self.d.users[user]
        ok, _ = self._lockstep(
            lambda: self.model.deposit(account, amount), "deposit", amount, sender=account
        )
        if ok:
            self.suite.deposit(account, amount)

    @rule(user=users, amount=st.integers(0, 2 * 10**6))
    def withdraw(self, user: int, amount: int) -> None:
        account = self.d.users[user]
        ok, _ = self._lockstep(
            lambda: self.model.withdraw(account, amount), "withdraw", amount, sender=account
        )
        if ok:
            self.suite.withdraw(account, amount)  # works paused or not (property 6)

    # ------------------------------------------------------------ orders

    @rule(
        user=users,
        side=st.sampled_from([Side.BUY, Side.SELL]),
        offset=st.integers(-1, 2),
        qty=st.integers(0, 40),
        price=st.integers(0, 3),
        duration=st.integers(0, 3),
    )
    def create_order(
        self, user: int, side: Side, offset: int, qty: int, price: int, duration: int
    ) -> None:
        account = self.d.users[user]
        slot, limit = self.next_clear + offset, self.prices[price]
        args = (slot, qty, limit, duration, int(side))
        ok, order_id = self._lockstep(
            lambda: self.model.create_order(
                account,
                self._now(),
                start_slot=slot,
                energy_wh=qty,
                limit_price=limit,
                side=side,
                duration_slots=duration,
            ),
            "createOrder",
            *args,
            sender=account,
        )
        if ok:
            on_chain = self.suite.create_order(
                account,
                start_slot=slot,
                energy_wh=qty,
                limit_price=limit,
                side=side,
                duration_slots=duration,
            )
            assert on_chain == order_id

    @precondition(lambda self: bool(self.model.orders))
    @rule(data=st.data(), by_owner=st.booleans())
    def cancel_order(self, data: st.DataObject, by_owner: bool) -> None:
        order_id = data.draw(st.sampled_from(sorted(self.model.orders)))
        owner = self.model.orders[order_id].owner
        caller = owner if by_owner else self.d.stranger
        ok, _ = self._lockstep(
            lambda: self.model.cancel_order(caller, order_id, self._now()),
            "cancelOrder",
            order_id,
            sender=caller,
        )
        if ok:
            self.suite.cancel_order(caller, order_id)

    # ------------------------------------------------------------ clearing

    @precondition(lambda self: not self.model.paused)
    @rule()
    def clear_next_slot(self) -> None:
        slot = self.next_clear
        self.d.chain.travel_to(max(self.suite.gate_closes_at(slot), self.d.chain.timestamp() + 1))
        with pytest.raises(ContractRevert, match="AccessControlUnauthorizedAccount"):
            self.d.chain.call(self.suite.trading, "clearSlot", slot, 0, [], sender=self.d.stranger)
        ids = self.d.chain.call(self.suite.trading, "slotOrders", slot)
        assert ids == self.model.books.get(slot, [])
        result = self.model.clear_slot(slot, self._now())
        fills = result.fills.tolist()
        self.suite.clear_slot(self.d.solver, slot, result.price, fills)
        bought = sold = 0
        for order_id, fill in zip(ids, fills, strict=True):
            order = self.model.orders[order_id]
            assert 0 <= fill <= order.energy_wh  # property 2
            if fill and order.side == Side.BUY:
                assert order.limit_price >= result.price  # property 3
                bought += fill
            elif fill:
                assert order.limit_price <= result.price
                sold += fill
            assert fill == 0 or not order.cancelled
        assert bought == sold == result.volume  # property 2
        stored = self.suite.slot_result(slot)
        assert stored.cleared and (stored.price, stored.volume_wh) == (result.price, result.volume)
        ok, _ = self._lockstep(  # property 4: once only
            lambda: self.model.clear_slot(slot, self._now()),
            "clearSlot",
            slot,
            result.price,
            fills,
            sender=self.d.solver,
        )
        assert not ok
        self.next_clear += 1

    # ------------------------------------------------------------ signed batches

    @precondition(lambda self: not self.model.paused)
    @rule(data=st.data())
    def settle_signed_batch(self, data: st.DataObject) -> None:
        slot = self.next_clear
        orders = [
            SignedOrder(
                self.d.users[data.draw(users)],
                slot + data.draw(st.sampled_from([0] * 12 + [1])),  # now and then a wrong slot
                data.draw(st.sampled_from([Side.BUY, Side.SELL])),
                data.draw(st.integers(0, 40)),
                self.prices[data.draw(st.integers(0, 3))],
                data.draw(st.integers(0, 3)),
            )
            for _ in range(data.draw(st.integers(0, 6)))
        ]
        if data.draw(st.integers(0, 4)):  # mostly in the required order
            orders.sort(key=lambda o: o.key)
        keys = dict(zip(self.d.users, self.d.user_keys, strict=True))
        signatures = [self.suite.sign_order(keys[o.owner], o) for o in orders]
        self.d.chain.travel_to(max(self.suite.gate_closes_at(slot), self.d.chain.timestamp() + 1))
        solved = clearing.clear_book(
            [o.energy_wh for o in orders], [o.limit_price for o in orders], [o.side for o in orders]
        )
        args = (
            slot,
            solved.price,
            [o.as_tuple() for o in orders],
            [s.as_tuple() for s in signatures],
            solved.fills.tolist(),
        )
        ok, result = self._lockstep(
            lambda: self.model.settle_signed_batch(slot, orders, self._now()),
            "settleSignedBatch",
            *args,
            sender=self.d.solver,
        )
        if not ok:
            return
        with pytest.raises(ContractRevert, match="AccessControlUnauthorizedAccount"):
            self.d.chain.call(
                self.suite.trading, "settleSignedBatch", *args, sender=self.d.stranger
            )
        on_chain, _ = self.suite.settle_signed_batch(self.d.solver, slot, orders, signatures)
        assert (on_chain.price, on_chain.volume) == (result.price, result.volume)
        bought = sum(f for o, f in zip(orders, result.fills.tolist(), strict=True) if o.side == 0)
        assert bought == result.volume  # property 2: bought = sold = volume
        for order, fill in zip(orders, result.fills.tolist(), strict=True):
            assert 0 <= fill <= order.energy_wh  # property 2
            if fill:  # property 3
                assert (order.limit_price - result.price) * (1 if order.side == 0 else -1) >= 0
        self.next_clear += 1

    @rule(user=users, nonce=st.integers(0, 3), offset=st.integers(0, 1))
    def cancel_signed_order(self, user: int, nonce: int, offset: int) -> None:
        account, slot = self.d.users[user], self.next_clear + offset
        ok, _ = self._lockstep(
            lambda: self.model.cancel_signed_orders(account, slot, 1 << nonce, self._now()),
            "cancelSignedOrders",
            slot,
            1 << nonce,
            sender=account,
        )
        if ok:
            self.suite.cancel_signed_orders(account, slot, 1 << nonce)

    # ------------------------------------------------------------ metering

    def _unreconciled(self) -> list[int]:
        return sorted(set(self.model.results) - set(self.model.reconciled) - self.unreconcilable)

    @precondition(lambda self: bool(self._unreconciled()))
    @rule(data=st.data())
    def meter_and_reconcile(self, data: st.DataObject) -> None:
        chain, suite = self.d.chain, self.suite
        slot = self._unreconciled()[0]
        trades = self.model.trades[slot]
        final_at = self.model.readings_final_at(slot)
        members = data.draw(st.lists(st.sampled_from(self.d.users), max_size=2, unique=True))
        accounts, rows = reconciliation_args(trades, members)
        metered: dict[str, int] = {}
        if chain.timestamp() + 1 < final_at:
            with pytest.raises(ContractRevert, match=r"ReadingsNotFinal|EnforcedPause"):  # prop. 4
                chain.call(
                    suite.trading,
                    "reconcileSlot",
                    slot,
                    rows,
                    accounts,
                    bytes(32),
                    sender=self.d.solver,
                )
            chain.travel_to(max(suite.slot_start(slot + 1) + 1, chain.timestamp() + 1))
            if chain.timestamp() + 5 < final_at:
                readings = []
                for user, key in zip(self.d.users, self.d.meter_keys, strict=True):
                    if data.draw(st.integers(0, 4)):  # now and then a meter stays silent
                        metered[user] = data.draw(st.integers(-150, 150))
                        nonce = int(
                            chain.call(suite.registry, "nonces", Account.from_key(key).address)
                        )
                        readings.append((key, slot, metered[user], nonce))
                if readings:
                    suite.submit_readings(readings, sender=self.d.admin)
            chain.travel_to(max(final_at, chain.timestamp() + 1))
        ok, outcome = self._lockstep(
            lambda: self.model.reconcile_slot(slot, self._now(), metered, members),
            "reconcileSlot",
            slot,
            rows,
            accounts,
            bytes(32),
            sender=self.d.solver,
        )
        if not ok:
            self.unreconcilable.add(slot)  # e.g. paused or a poor treasury: leave it be
            return
        suite.reconcile_slot(self.d.solver, slot, trades, members)
        assert suite.slot_result(slot).reconciled
        short, long = self.model.imbalance_prices(slot)
        for account in accounts:  # property 2: money follows metered energy
            net_bought = sum(
                t.fill_wh if t.side == Side.BUY else -t.fill_wh
                for t in trades
                if t.owner == account
            )
            imbalance = outcome.imbalance_wh[account]
            assert imbalance == metered.get(account, 0) - net_bought
            assert suite.credit_of(account) == self.model.credit_of(account)
        assert suite.credit_of(self.d.treasury) == self.model.credit_of(self.d.treasury)
        assert outcome.charged <= sum(max(i, 0) for i in outcome.imbalance_wh.values()) * short
        assert outcome.paid == sum(max(-i, 0) for i in outcome.imbalance_wh.values()) * long
        with pytest.raises(ContractRevert, match="EnergyTradingSlotAlreadyReconciled"):
            chain.call(
                suite.trading,
                "reconcileSlot",
                slot,
                rows,
                accounts,
                bytes(32),
                sender=self.d.solver,
            )

    @precondition(lambda self: self.next_clear > self.first_slot)
    @rule(user=users)
    def order_after_gate_closure_fails(self, user: int) -> None:
        closed = self.next_clear - 1  # the last cleared slot's gate is closed (property 4)
        with pytest.raises(ContractRevert, match=r"EnergyTradingGateClosed|EnforcedPause"):
            self.d.chain.call(
                self.suite.trading,
                "createOrder",
                closed,
                1,
                self.prices[0],
                1,
                int(Side.SELL),
                sender=self.d.users[user],
            )

    # ------------------------------------------------------------ pausing

    @rule()
    def toggle_pause(self) -> None:
        trading = self.suite.trading
        with pytest.raises(ContractRevert, match="AccessControlUnauthorizedAccount"):
            self.d.chain.call(trading, "pause", sender=self.d.stranger)
        fn = "unpause" if self.model.paused else "pause"
        self.d.chain.transact(trading, fn, sender=self.d.admin)
        self.model.paused = not self.model.paused

    # ------------------------------------------------------------ invariants

    @invariant()
    def books_close(self) -> None:
        credits, escrow = self.suite.ledger_totals()
        balance = self.suite.token_balance(self.suite.trading.address)
        assert credits + escrow == balance  # property 1
        assert (credits, escrow) == self.model.totals()

    def teardown(self) -> None:
        # Each account's credit once per sequence: every read is a py-evm call.
        for account in [*self.d.users, self.d.treasury]:
            assert self.suite.credit_of(account) == self.model.credit_of(account)


TestMarket = MarketMachine.TestCase
# 600 of the 1,000 default sequences: the market machine has the most rules to cover.
TestMarket.settings = settings(
    CONTRACT_SETTINGS, max_examples=sequences(0.6), stateful_step_count=STATEFUL_STEPS
)
