"""A pure-Python mirror of EnergyTrading's ledger: the fast ``mirror`` backend of the environment.

The market rules live in Solidity; this module restates them so that a simulation can trade
thousands of slots per second without an EVM. It keeps the same state (free credit, escrow,
orders, slot books, results), applies the same checks in the same order and raises the same
custom errors (as :class:`~contracts.errors.ContractRevert` with ``contract="EnergyTrading"``),
so callers handle both backends alike. The differential test
(tests/contracts/test_invariants_market.py) drives this model and the real contract with the same
random operations and requires identical outcomes, errors included.

Not mirrored: access control (the model has no callers' roles) and the price band, which the
caller supplies per slot (:func:`price_band` computes it from :class:`PriceParams`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum

from contracts import clearing
from contracts.errors import ContractRevert

SLOT_SECONDS = 900
MAX_ORDERS_PER_SLOT = 450
MAX_DURATION_SLOTS = 8
MAX_FEE_BPS = 1_000


class Side(IntEnum):
    """Order side, as ``IEnergyTrading.Side``."""

    BUY = clearing.BUY
    SELL = clearing.SELL


@dataclass(frozen=True)
class PriceParams:
    """The seed formula in fixed point: ``gridPrice = baseRate * (demand + stress) * tod / 1e8``.

    ``base_rate`` is in token base units per Wh; the factors and the band are basis points.
    """

    base_rate: int = 250_000_000_000_000  # 0.25 token/kWh for an 18-decimal token
    demand_factor_bps: int = 5_000
    grid_stress_factor_bps: int = 5_000
    band_low_bps: int = 2_000
    band_high_bps: int = 30_000
    tod_multiplier_bps: tuple[int, ...] = (10_000,) * 24

    def as_args(self) -> tuple[tuple[int, int, int, int, int], list[int]]:
        """The constructor / ``setPriceParams`` arguments."""
        if len(self.tod_multiplier_bps) != 24:
            raise ValueError("tod_multiplier_bps needs 24 hourly values")
        return (
            (
                self.base_rate,
                self.demand_factor_bps,
                self.grid_stress_factor_bps,
                self.band_low_bps,
                self.band_high_bps,
            ),
            list(self.tod_multiplier_bps),
        )


def grid_price(params: PriceParams, slot: int) -> int:
    """Reference grid price of ``slot`` (token base units per Wh), as ``gridPrice``."""
    hour = (slot % 96) // 4
    factors = params.demand_factor_bps + params.grid_stress_factor_bps
    return params.base_rate * factors * params.tod_multiplier_bps[hour] // 10**8


def price_band(params: PriceParams, slot: int) -> tuple[int, int]:
    """Allowed limit-price band of ``slot``, as ``priceBand``."""
    ref = grid_price(params, slot)
    return ref * params.band_low_bps // 10_000, ref * params.band_high_bps // 10_000


@dataclass
class ModelOrder:
    """An order as the contract stores it."""

    owner: str
    energy_wh: int
    duration_slots: int
    side: Side
    limit_price: int
    start_slot: int
    cancelled: bool = False


@dataclass(frozen=True)
class ModelSlotResult:
    """Outcome of a cleared slot."""

    price: int
    volume_wh: int
    order_count: int
    fee: int


@dataclass
class MarketModel:
    """EnergyTrading's ledger in Python. Times are block timestamps the caller supplies."""

    genesis: int
    treasury: str
    fee_bps: int = 50
    gate_closure_seconds: int = 300
    price: PriceParams = field(default_factory=PriceParams)
    paused: bool = False
    credits: dict[str, int] = field(default_factory=dict)
    total_escrow: int = 0
    orders: dict[int, ModelOrder] = field(default_factory=dict)
    books: dict[int, list[int]] = field(default_factory=dict)
    results: dict[int, ModelSlotResult] = field(default_factory=dict)
    next_order_id: int = 1

    # ------------------------------------------------------------------ helpers

    @staticmethod
    def _revert(name: str, **args: object) -> ContractRevert:
        return ContractRevert("EnergyTrading", name, dict(args))

    def slot_start(self, slot: int) -> int:
        """Start timestamp of ``slot``."""
        return self.genesis + slot * SLOT_SECONDS

    def gate_closes_at(self, slot: int) -> int:
        """Timestamp at which the gate of ``slot`` closes."""
        start = self.slot_start(slot)
        return start - self.gate_closure_seconds if start > self.gate_closure_seconds else 0

    def credit_of(self, account: str) -> int:
        """Free credit of ``account``."""
        return self.credits.get(account, 0)

    def totals(self) -> tuple[int, int]:
        """(sum of credits, sum of escrow), as ``totals()``."""
        return sum(self.credits.values()), self.total_escrow

    def _require_gate_open(self, slot: int, now: int) -> None:
        closes_at = self.gate_closes_at(slot)
        if now >= closes_at:
            raise self._revert("EnergyTradingGateClosed", slot=slot, closedAt=closes_at)

    def _require_not_paused(self) -> None:
        if self.paused:
            raise ContractRevert("EnergyTrading", "EnforcedPause", {})

    # ------------------------------------------------------------------ ledger

    def deposit(self, account: str, amount: int) -> None:
        """``deposit(amount)`` (the token transfer itself is the caller's business)."""
        self._require_not_paused()
        if amount == 0:
            raise self._revert("EnergyTradingZeroAmount")
        self.credits[account] = self.credit_of(account) + amount

    def withdraw(self, account: str, amount: int) -> None:
        """``withdraw(amount)``: allowed while paused."""
        if amount == 0:
            raise self._revert("EnergyTradingZeroAmount")
        available = self.credit_of(account)
        if amount > available:
            raise self._revert(
                "EnergyTradingInsufficientCredit", needed=amount, available=available
            )
        self.credits[account] = available - amount

    # ------------------------------------------------------------------ orders

    def create_order(
        self,
        account: str,
        now: int,
        *,
        start_slot: int,
        energy_wh: int,
        limit_price: int,
        side: Side,
        duration_slots: int = 1,
    ) -> int:
        """``createOrder``; returns the order id the contract would assign."""
        self._require_not_paused()
        if energy_wh == 0:
            raise self._revert("EnergyTradingZeroAmount")
        if not 1 <= duration_slots <= MAX_DURATION_SLOTS:
            raise self._revert(
                "EnergyTradingInvalidDuration", durationSlots=duration_slots, max=MAX_DURATION_SLOTS
            )
        self._require_gate_open(start_slot, now)
        low, high = price_band(self.price, start_slot)
        if limit_price < low or limit_price > high or limit_price == 0:
            raise self._revert(
                "EnergyTradingPriceOutOfBand", limitPrice=limit_price, low=low, high=high
            )
        escrow = energy_wh * limit_price * duration_slots if side == Side.BUY else 0
        available = self.credit_of(account)
        if escrow > available:
            raise self._revert(
                "EnergyTradingInsufficientCredit", needed=escrow, available=available
            )
        slots = range(start_slot, start_slot + duration_slots)
        for slot in slots:
            if len(self.books.get(slot, [])) >= MAX_ORDERS_PER_SLOT:
                raise self._revert("EnergyTradingSlotFull", slot=slot, max=MAX_ORDERS_PER_SLOT)
        order_id = self.next_order_id
        self.next_order_id += 1
        self.credits[account] = available - escrow
        self.total_escrow += escrow
        self.orders[order_id] = ModelOrder(
            account, energy_wh, duration_slots, side, limit_price, start_slot
        )
        for slot in slots:
            self.books.setdefault(slot, []).append(order_id)
        return order_id

    def cancel_order(self, account: str, order_id: int, now: int) -> int:
        """``cancelOrder``: allowed while paused; returns the refund."""
        order = self.orders.get(order_id)
        if order is None:
            raise self._revert("EnergyTradingUnknownOrder", orderId=order_id)
        if order.owner != account:
            raise self._revert("EnergyTradingNotOrderOwner", orderId=order_id, caller=account)
        if order.cancelled:
            raise self._revert("EnergyTradingOrderCancelled", orderId=order_id)
        self._require_gate_open(order.start_slot, now)
        order.cancelled = True
        refund = 0
        if order.side == Side.BUY:
            refund = order.energy_wh * order.limit_price * order.duration_slots
            self.total_escrow -= refund
            self.credits[account] = self.credit_of(account) + refund
        return refund

    # ------------------------------------------------------------------ clearing

    def solve(self, slot: int) -> clearing.BookClearing:
        """The reference clearing of ``slot``'s current book (what the solver submits)."""
        book = [self.orders[i] for i in self.books.get(slot, [])]
        return clearing.clear_book(
            [o.energy_wh for o in book],
            [o.limit_price for o in book],
            [int(o.side) for o in book],
            [not o.cancelled for o in book],
        )

    def clear_slot(self, slot: int, now: int) -> clearing.BookClearing:
        """``clearSlot`` with the reference solver's clearing; returns that clearing."""
        self._require_not_paused()
        closes_at = self.gate_closes_at(slot)
        if now < closes_at:
            raise self._revert("EnergyTradingGateOpen", slot=slot, closesAt=closes_at)
        if slot in self.results:
            raise self._revert("EnergyTradingSlotAlreadyCleared", slot=slot)
        result = self.solve(slot)
        ids = self.books.get(slot, [])
        fees = 0
        for order_id, fill in zip(ids, result.fills.tolist(), strict=True):
            order = self.orders[order_id]
            if order.cancelled:
                continue
            value = fill * result.price
            if order.side == Side.BUY:
                escrow = order.energy_wh * order.limit_price
                self.total_escrow -= escrow
                self.credits[order.owner] = self.credit_of(order.owner) + escrow - value
            elif fill:
                fee = value * self.fee_bps // 10_000
                fees += fee
                self.credits[order.owner] = self.credit_of(order.owner) + value - fee
        if fees:
            self.credits[self.treasury] = self.credit_of(self.treasury) + fees
        self.results[slot] = ModelSlotResult(result.price, result.volume, len(ids), fees)
        return result
