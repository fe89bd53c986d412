"""Differential, stateful test of the market: the real EnergyTrading (py-evm) against
``contracts.model.MarketModel``, the pure-Python mirror the environment trains on.

Each example replays a random sequence of deposits, withdrawals, orders, cancellations,
clearings and pauses on both. Every operation must succeed on both or fail on both with the same
custom error and the same arguments; order ids, clearing results, totals and every account's
credit must agree. On top of that equality the issue's properties are checked:

1. credits + escrow = the market's token balance;
2. no fill exceeds its order; per slot bought = sold;
3. one price per slot, within every matched party's limit;
4. no orders after gate closure; a slot clears once;
6. only the solver clears, only the pauser pauses; pausing stops trading but not withdrawals.

HYPOTHESIS_PROFILE=nightly runs twenty times as many sequences.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from contracts.errors import ContractRevert
from contracts.model import MarketModel, PriceParams, Side
from tests.contracts.helpers import CONTRACT_SETTINGS, shared_deployment

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
        # Two slots ahead of the chain's clock, which keeps moving between examples.
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
# 1.2 x the profile's examples: 120 sequences here by default (240 with the other machine).
TestMarket.settings = settings(
    CONTRACT_SETTINGS, max_examples=CONTRACT_SETTINGS.max_examples * 6 // 5, stateful_step_count=10
)
