"""A pure-Python mirror of EnergyTrading's ledger: the fast ``mirror`` backend of the environment.

The market rules live in Solidity; this module restates them so that a simulation can trade
thousands of slots per second without an EVM. It keeps the same state (free credit, escrow,
orders, slot books, results), applies the same checks in the same order and raises the same
custom errors (as :class:`~contracts.errors.ContractRevert` with ``contract="EnergyTrading"``),
so callers handle both backends alike. The differential test
(tests/contracts/test_invariants_market.py) drives this model and the real contract with the same
random operations and requires identical outcomes, errors included.

Signed batches (``settleSignedBatch``) and metering reconciliation (``reconcileSlot``) are
mirrored too, with the helpers both backends share: :class:`SignedOrder` (what a prosumer signs),
:class:`Trade` and :func:`trade_commitment` (the hash chain a settlement commits to) and
:func:`reconciliation_args` (the account list and indices ``reconcileSlot`` takes).
DeviceRegistry's reading rules (:class:`DeviceRegistryModel`: nonces may skip but never go
back, slots only move forward) are mirrored for its differential test
(tests/contracts/test_device_registry.py).

Not mirrored: access control (the model has no callers' roles) and signatures (the model takes
signed orders as valid; :mod:`contracts.client` signs and the contract verifies).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import IntEnum

from eth_utils import keccak

from contracts import clearing
from contracts.errors import ContractRevert

SLOT_SECONDS = 900
MAX_ORDERS_PER_SLOT = 450
MAX_DURATION_SLOTS = 8
MAX_FEE_BPS = 1_000
MAX_SIGNED_BATCH = 1_000
#: Seconds after a slot's end until its readings are final (DeviceRegistry's ``readingWindow``).
READING_WINDOW_SECONDS = 600
#: Slots of readings DeviceRegistry keeps (``READING_HISTORY_SLOTS``, its ``HISTORY_SLOTS``):
#: a device's reading of slot s + 32 takes the place of its reading of s.
READING_HISTORY_SLOTS = 32


class LoadType(IntEnum):
    """Load kind of a demand-response participant, as ``IGridBalance.LoadType``."""

    CURTAILABLE = 0
    SHIFTABLE = 1


class RewardKind(IntEnum):
    """Why a reward was granted, as ``IRewardSystem.RewardKind``."""

    ENERGY_SAVING = 0
    PEAK_REDUCTION = 1
    DEMAND_RESPONSE = 2
    RENEWABLE = 3


class Side(IntEnum):
    """Order side, as ``IEnergyTrading.Side``."""

    BUY = clearing.BUY
    SELL = clearing.SELL


@dataclass(frozen=True)
class PriceParams:
    """The seed formula in fixed point: ``gridPrice = baseRate * (demand + stress) * tod / 1e8``.

    ``base_rate`` is in token base units per Wh; the factors and the band are basis points.
    ``imbalance_penalty_bps`` worsens the grid price for metering imbalances (at most 10,000).
    """

    base_rate: int = 250_000_000_000_000  # 0.25 token/kWh for an 18-decimal token
    demand_factor_bps: int = 5_000
    grid_stress_factor_bps: int = 5_000
    band_low_bps: int = 2_000
    band_high_bps: int = 30_000
    tod_multiplier_bps: tuple[int, ...] = (10_000,) * 24
    imbalance_penalty_bps: int = 2_000

    def as_args(self) -> tuple[tuple[int, int, int, int, int, int], list[int]]:
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
                self.imbalance_penalty_bps,
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


def imbalance_prices(
    params: PriceParams, slot: int, cleared_price: int = 0, volume_wh: int = 0
) -> tuple[int, int]:
    """Per-Wh (shortfall, surplus) prices of a metering imbalance, as ``imbalancePrices``: from
    the worse, for the account, of the grid price and the slot's clearing price (when energy
    traded), so selling beyond one's metered export never pays."""
    high = low = grid_price(params, slot)
    if volume_wh:
        high, low = max(high, cleared_price), min(low, cleared_price)
    penalty = params.imbalance_penalty_bps
    return high * (10_000 + penalty) // 10_000, low * (10_000 - penalty) // 10_000


@dataclass(frozen=True)
class SignedOrder:
    """An order a prosumer signs off-chain (EIP-712 ``SignedOrder``) for one slot.

    ``nonce`` (0-255) tells one owner's orders in a slot apart and is the bit
    ``cancelSignedOrders`` sets. A batch lists orders by :attr:`key`, strictly increasing.
    """

    owner: str
    slot: int
    side: Side
    energy_wh: int
    limit_price: int
    nonce: int = 0

    @property
    def key(self) -> int:
        """Sort key of the batch: owner address, then nonce."""
        return int(self.owner, 16) << 8 | self.nonce

    def as_tuple(self) -> tuple[str, int, int, int, int, int]:
        """The ABI tuple of ``IEnergyTrading.SignedOrder``."""
        return (self.owner, self.slot, int(self.side), self.energy_wh, self.limit_price, self.nonce)


@dataclass(frozen=True)
class Trade:
    """One line of a slot's committed trade list: an order's owner, side and fill."""

    owner: str
    side: Side
    fill_wh: int


def trade_commitment(trades: Sequence[Trade]) -> bytes:
    """The commitment a settlement stores over its trades (``tradeCommitment``).

    Built from the end: ``h_i = keccak(owner << 96 | side << 64 | fill, h_{i+1})``, ``h_n = 0``,
    so that a reconciliation part can be checked given the hash of the trades after it.
    """
    chain = bytes(32)
    for trade in reversed(trades):
        word = int(trade.owner, 16) << 96 | int(trade.side) << 64 | trade.fill_wh
        chain = keccak(word.to_bytes(32, "big") + chain)
    return chain


@dataclass(frozen=True)
class ReconciliationPart:
    """The arguments of one ``reconcileSlot`` transaction."""

    trades: list[tuple[str, int, int, int]]
    accounts: list[str]
    rest: bytes


def _address(account: str) -> int:
    return int(account, 16)


def reconciliation_parts(
    trades: Sequence[Trade], members: Iterable[str] = (), max_accounts: int | None = None
) -> list[ReconciliationPart]:
    """Split a slot's reconciliation into ``reconcileSlot`` calls of at most ``max_accounts``.

    The accounts are every owner with a fill plus ``members`` (metered accounts without a fill),
    in increasing address order within and across parts, as the contract requires. A part may
    end only where every owner before the cut is below every owner after it (a signed batch,
    sorted by owner, can be cut between any two owners; a book slot usually not at all).
    """
    n = len(trades)
    owners = [_address(t.owner) if t.fill_wh else None for t in trades]
    suffix_min = [2**160] * (n + 1)
    for i in range(n - 1, -1, -1):
        own = owners[i]
        suffix_min[i] = min(suffix_min[i + 1], own if own is not None else 2**160)
    cuts: list[int] = []
    seen: set[int] = set()
    prefix_max = -1
    for i, own in enumerate(owners):
        if own is None:
            continue
        full = bool(max_accounts) and own not in seen and len(seen) >= (max_accounts or 0)
        if full and prefix_max < suffix_min[i]:
            cuts.append(i)
            seen = set()
        seen.add(own)
        prefix_max = max(prefix_max, own)
    bounds = [0, *cuts, n]
    extra = sorted(set(members), key=_address)
    parts: list[ReconciliationPart] = []
    for k in range(len(bounds) - 1):
        chunk = trades[bounds[k] : bounds[k + 1]]
        mine = {t.owner for t in chunk if t.fill_wh}
        top = max((_address(a) for a in mine), default=-1)
        last = k == len(bounds) - 2
        take = [m for m in extra if last or _address(m) <= top]
        extra = [m for m in extra if m not in take]
        accounts = sorted(mine | set(take), key=_address)
        index = {a: i for i, a in enumerate(accounts)}
        rows = [
            (t.owner, int(t.side), t.fill_wh, index.get(t.owner, len(accounts)) if t.fill_wh else 0)
            for t in chunk
        ]
        parts.append(ReconciliationPart(rows, accounts, trade_commitment(trades[bounds[k + 1] :])))
    return parts


def reconciliation_args(
    trades: Sequence[Trade], members: Iterable[str] = ()
) -> tuple[list[str], list[tuple[str, int, int, int]]]:
    """``reconcileSlot``'s ``accounts`` and ``trades`` for the whole slot in one part."""
    (part,) = reconciliation_parts(trades, members)
    return part.accounts, part.trades


@dataclass(frozen=True)
class ModelReconciliation:
    """What reconciling a slot did: per account imbalance (Wh) and credit change, and totals."""

    imbalance_wh: dict[str, int]
    credited: dict[str, int]
    unpaid: dict[str, int]
    charged: int
    paid: int


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
    signed_batch: bool = False
    fee_bps: int = 0


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
    reading_window_seconds: int = READING_WINDOW_SECONDS
    trades: dict[int, list[Trade]] = field(default_factory=dict)
    """Each settled slot's committed trade list, in settlement order."""
    cancelled_nonces: dict[tuple[str, int], int] = field(default_factory=dict)
    reconciled: dict[int, ModelReconciliation] = field(default_factory=dict)

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
        """``deposit(amount)`` or ``depositFor(account, amount)`` (the token transfer itself is
        the caller's business)."""
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
        self.results[slot] = ModelSlotResult(
            result.price, result.volume, len(ids), fees, fee_bps=self.fee_bps
        )
        self.trades[slot] = [
            Trade(self.orders[i].owner, self.orders[i].side, f)
            for i, f in zip(ids, result.fills.tolist(), strict=True)
        ]
        return result

    # ------------------------------------------------------------------ signed batches

    def cancel_signed_orders(self, account: str, slot: int, mask: int, now: int) -> None:
        """``cancelSignedOrders(slot, mask)``: allowed while paused, only before gate closure."""
        if mask == 0:
            raise self._revert("EnergyTradingZeroAmount")
        self._require_gate_open(slot, now)
        self.cancelled_nonces[account, slot] = self.cancelled_nonces.get((account, slot), 0) | mask

    def settle_signed_batch(
        self, slot: int, orders: Sequence[SignedOrder], now: int
    ) -> clearing.BookClearing:
        """``settleSignedBatch`` with the reference solver's clearing of ``orders`` (in batch
        order, which must be strictly increasing by :attr:`SignedOrder.key`); returns it.

        Buyers pay at once; sellers' proceeds net of fee wait in escrow for
        :meth:`reconcile_slot`. Checks run in the contract's order, so the first broken rule
        raises the contract's error.
        """
        n = len(orders)
        if n:  # an empty batch closes the slot even while paused (its meters go on)
            self._require_not_paused()
        if n > MAX_SIGNED_BATCH:
            raise self._revert("EnergyTradingBatchTooLarge", count=n, max=MAX_SIGNED_BATCH)
        on_book = len(self.books.get(slot, []))
        if on_book:
            raise self._revert("EnergyTradingSlotHasBookOrders", slot=slot, count=on_book)
        closes_at = self.gate_closes_at(slot)
        if now < closes_at:
            raise self._revert("EnergyTradingGateOpen", slot=slot, closesAt=closes_at)
        if slot in self.results:
            raise self._revert("EnergyTradingSlotAlreadyCleared", slot=slot)
        low, high = price_band(self.price, slot)
        previous = -1
        for i, order in enumerate(orders):
            if order.slot != slot:
                raise self._revert(
                    "EnergyTradingOrderSlotMismatch", index=i, orderSlot=order.slot, slot=slot
                )
            if order.energy_wh == 0:
                raise self._revert("EnergyTradingZeroAmount")
            limit = order.limit_price
            if limit < low or limit > high or limit == 0:
                raise self._revert(
                    "EnergyTradingPriceOutOfBand", limitPrice=limit, low=low, high=high
                )
            if order.key <= previous:
                raise self._revert("EnergyTradingBatchNotSorted", index=i)
            previous = order.key
            if self.cancelled_nonces.get((order.owner, slot), 0) >> order.nonce & 1:
                raise self._revert(
                    "EnergyTradingSignedOrderCancelled",
                    index=i,
                    owner=order.owner,
                    nonce=order.nonce,
                )
        result = clearing.clear_book(
            [o.energy_wh for o in orders],
            [o.limit_price for o in orders],
            [int(o.side) for o in orders],
        )
        fills = result.fills.tolist()
        credits = dict(self.credits)  # the batch is atomic: commit only when every check passed
        paid = fees = 0
        for i, (order, fill) in enumerate(zip(orders, fills, strict=True)):
            value = fill * result.price
            if order.side == Side.BUY:
                escrow = order.energy_wh * order.limit_price
                available = credits.get(order.owner, 0)
                if escrow > available:
                    raise self._revert(
                        "EnergyTradingBatchInsufficientCredit",
                        index=i,
                        owner=order.owner,
                        needed=escrow,
                        available=available,
                    )
                credits[order.owner] = available - value
                paid += value
            else:
                fees += value * self.fee_bps // 10_000
        self.credits = credits
        if fees:
            self.credits[self.treasury] = self.credit_of(self.treasury) + fees
        self.total_escrow += paid - fees
        self.results[slot] = ModelSlotResult(
            result.price, result.volume, n, fees, signed_batch=True, fee_bps=self.fee_bps
        )
        self.trades[slot] = [Trade(o.owner, o.side, f) for o, f in zip(orders, fills, strict=True)]
        return result

    # ------------------------------------------------------------------ metering

    def imbalance_prices(self, slot: int) -> tuple[int, int]:
        """``imbalancePrices(slot)``: the current price parameters and the slot's clearing."""
        result = self.results.get(slot)
        if result is None:
            return imbalance_prices(self.price, slot)
        return imbalance_prices(self.price, slot, result.price, result.volume_wh)

    def readings_final_at(self, slot: int) -> int:
        """Timestamp from which ``slot``'s readings are final (``readingsFinalAt``)."""
        return self.slot_start(slot + 1) + self.reading_window_seconds

    def reconcile_slot(
        self,
        slot: int,
        now: int,
        metered_wh: Mapping[str, int],
        members: Iterable[str] = (),
    ) -> ModelReconciliation:
        """``reconcileSlot``: settle traded against metered energy once readings are final.

        ``metered_wh`` is each account's net metered consumption in the slot (Wh, export < 0;
        missing = 0, as a meter without a reading). The accounts are every owner with a fill
        plus ``members``. Imbalance = metered - net bought; a shortfall pays the shortfall price
        to the treasury from credit + held proceeds + surplus payment as far as they go, a
        surplus is paid the surplus price by the treasury (which must afford it). Allowed while
        paused: an emergency stops trading, not the settlement of what was metered.
        """
        if slot not in self.results:
            raise self._revert("EnergyTradingSlotNotCleared", slot=slot)
        if slot in self.reconciled:
            raise self._revert("EnergyTradingSlotAlreadyReconciled", slot=slot)
        final_at = self.readings_final_at(slot)
        if now < final_at:
            raise self._revert("EnergyTradingReadingsNotFinal", slot=slot, finalAt=final_at)
        result = self.results[slot]
        trades = self.trades[slot]
        accounts, _ = reconciliation_args(trades, members)
        imbalance = {a: metered_wh.get(a, 0) for a in accounts}
        held = dict.fromkeys(accounts, 0)
        for trade in trades:
            if not trade.fill_wh:
                continue
            if trade.side == Side.BUY:
                imbalance[trade.owner] -= trade.fill_wh
            else:
                imbalance[trade.owner] += trade.fill_wh
                if result.signed_batch:
                    value = trade.fill_wh * result.price
                    held[trade.owner] += value - value * result.fee_bps // 10_000
        short_price, long_price = self.imbalance_prices(slot)
        credits = dict(self.credits)
        credited: dict[str, int] = {}
        unpaid: dict[str, int] = {}
        charged = paid = held_total = 0
        for account in accounts:
            imb, h = imbalance[account], held[account]
            if imb == 0 and h == 0:
                continue
            credit = credits.get(account, 0)
            charge = imb * short_price if imb > 0 else 0
            payout = -imb * long_price if imb < 0 else 0
            funds = credit + h + payout
            collected = min(charge, funds)
            credits[account] = funds - collected
            credited[account] = funds - collected - credit
            unpaid[account] = charge - collected
            charged += collected
            paid += payout
            held_total += h
        treasury_credit = credits.get(self.treasury, 0)
        if treasury_credit + charged < paid:
            raise self._revert(
                "EnergyTradingTreasuryShort", needed=paid, available=treasury_credit + charged
            )
        credits[self.treasury] = treasury_credit + charged - paid
        self.credits = credits
        self.total_escrow -= held_total
        outcome = ModelReconciliation(imbalance, credited, unpaid, charged, paid)
        self.reconciled[slot] = outcome
        return outcome


def evicted_by(readings: Readings, device: str, slot: int, current_slot: int) -> int | None:
    """The slot whose reading took the registry entry of `device`'s reading of `slot` (its
    latest reading of slot + 32k, k >= 1, see ``READING_HISTORY_SLOTS``), or None while the
    entry still holds `slot` or nothing later: ``DeviceRegistry.readingOf`` reverts with
    ``DeviceRegistryReadingEvicted`` in the first case."""
    later = range(slot + READING_HISTORY_SLOTS, current_slot + 1, READING_HISTORY_SLOTS)
    return next((s for s in reversed(later) if (device, s) in readings), None)


# ---------------------------------------------------------------------- DeviceRegistry

#: The largest reading nonce + 1 the registry can store (it keeps nonces in 64 bits).
NONCE_LIMIT = 2**64 - 1


@dataclass
class ModelDevice:
    """A registered device as ``IDeviceRegistry.Device`` keeps it (owner and type reduced to
    what the readings need)."""

    capacity_w: int
    meter: bool
    last_slot: int
    active: bool = True
    readings: int = 0
    missed_slots: int = 0
    next_nonce: int = 0
    """The lowest nonce the next reading may carry (``nonces``): the last used + 1."""


@dataclass
class DeviceRegistryModel:
    """DeviceRegistry's reading rules in Python: which signed reading it takes, and what it keeps.

    Same checks in the same order and the same custom errors (contract ``DeviceRegistry``) as
    ``_submit``; signatures are not mirrored (the model takes a reading as signed by its
    device). A reading's nonce must be at least the device's ``next_nonce`` (its last used + 1):
    gaps are allowed, so a reading that never reached the chain costs only itself, while a
    replayed or older nonce is refused (``DeviceRegistryNonceTooLow``); its slot must come
    after the device's last. ``readings`` holds every accepted reading, (device, slot) -> Wh,
    as :class:`GridBalanceModel` reads them; ``totals`` the meters' totals ring (entry ->
    (slot, import Wh, export Wh)).
    """

    genesis: int
    reading_window_seconds: int = READING_WINDOW_SECONDS
    devices: dict[str, ModelDevice] = field(default_factory=dict)
    readings: dict[tuple[str, int], int] = field(default_factory=dict)
    totals: dict[int, tuple[int, int, int]] = field(default_factory=dict)

    @staticmethod
    def _revert(name: str, **args: object) -> ContractRevert:
        return ContractRevert("DeviceRegistry", name, dict(args))

    def current_slot(self, now: int) -> int:
        """``currentSlot()`` at block time ``now``."""
        return (now - self.genesis) // SLOT_SECONDS

    def register(self, device: str, capacity_w: int, now: int, *, meter: bool = True) -> None:
        """``registerDevice`` at ``now`` (arguments taken as valid)."""
        self.devices[device] = ModelDevice(capacity_w, meter, self.current_slot(now))

    def submit_reading(self, device: str, slot: int, energy_wh: int, nonce: int, now: int) -> None:
        """``submitReading`` of a validly signed reading at block time ``now``."""
        d = self.devices.get(device)
        if d is None:
            raise self._revert("DeviceRegistryUnknownDevice", device=device)
        if not d.active:
            raise self._revert("DeviceRegistryInactiveDevice", device=device)
        if nonce < d.next_nonce:
            raise self._revert(
                "DeviceRegistryNonceTooLow", device=device, nonce=nonce, nextNonce=d.next_nonce
            )
        if nonce >= NONCE_LIMIT:
            raise self._revert("DeviceRegistryNonceTooHigh", device=device, nonce=nonce)
        now_slot = self.current_slot(now)
        if slot >= now_slot:
            raise self._revert("DeviceRegistrySlotNotEnded", slot=slot, currentSlot=now_slot)
        closes_at = self.genesis + (slot + 1) * SLOT_SECONDS + self.reading_window_seconds
        if now >= closes_at:
            raise self._revert("DeviceRegistryReadingTooLate", slot=slot, closedAt=closes_at)
        first_allowed = d.last_slot if d.readings == 0 else d.last_slot + 1
        if slot < first_allowed:
            raise self._revert(
                "DeviceRegistrySlotNotAfterLast", device=device, slot=slot, lastSlot=d.last_slot
            )
        cap = d.capacity_w * SLOT_SECONDS // 3600
        if abs(energy_wh) > cap:
            raise self._revert(
                "DeviceRegistryCapacityExceeded", device=device, energyWh=energy_wh, maxWh=cap
            )
        entry = slot % READING_HISTORY_SLOTS
        held = self.totals.get(entry)
        if d.meter and held is not None and held[0] > slot:
            raise self._revert("DeviceRegistrySlotTotalsEvicted", slot=slot, heldSlot=held[0])
        d.missed_slots += slot - first_allowed
        d.last_slot = slot
        d.readings += 1
        d.next_nonce = nonce + 1
        self.readings[device, slot] = energy_wh
        if d.meter:
            _, imported, exported = held if held is not None and held[0] == slot else (slot, 0, 0)
            if energy_wh >= 0:
                imported += energy_wh
            else:
                exported -= energy_wh
            self.totals[entry] = (slot, imported, exported)

    def slot_totals(self, slot: int) -> tuple[int, int]:
        """``slotTotals(slot)``: the meters' (import, export) Wh of ``slot``."""
        held = self.totals.get(slot % READING_HISTORY_SLOTS)
        if held is None or held[0] < slot:
            return (0, 0)
        if held[0] > slot:
            raise self._revert("DeviceRegistrySlotTotalsEvicted", slot=slot, heldSlot=held[0])
        return held[1], held[2]


# ---------------------------------------------------------------------- GridBalance

#: Longest demand-response event, in slots (``GridBalance.MAX_EVENT_SLOTS``).
MAX_EVENT_SLOTS = 16
#: Most participants of one event (``GridBalance.MAX_PARTICIPANTS``).
MAX_PARTICIPANTS = 100


@dataclass(frozen=True)
class DrParticipant:
    """One participant of a demand-response event, as ``IGridBalance.Participant``: its
    baseline (Wh per slot) is fixed when the event is announced."""

    device: str
    load_type: LoadType
    priority: int
    baseline_wh: int

    def as_tuple(self) -> tuple[str, int, int, int]:
        """The ABI tuple."""
        return (self.device, int(self.load_type), self.priority, self.baseline_wh)


@dataclass
class ModelDrEvent:
    """A demand-response event as GridBalance stores it."""

    start_slot: int
    duration_slots: int
    target_reduction_wh: int
    incentive_per_wh: int
    peak_bonus: int
    participation_reward: int
    participants: list[DrParticipant]
    cancelled: bool = False
    settled: bool = False


#: Meter readings by (device, slot), in Wh (export < 0); a missing key is a reading never sent.
Readings = Mapping[tuple[str, int], int]


@dataclass(frozen=True)
class DrSettlement:
    """What ``settleEvent`` did: per participant (list order) the reduction and the reward, and
    the ``grantReward`` calls in the order GridBalance makes them."""

    event_id: int
    reductions: list[int]
    rewards: list[int]
    total_reduction_wh: int
    target_met: bool
    grants: list[tuple[str, int, RewardKind]]
    """(owner, amount, kind)."""


@dataclass
class GridBalanceModel:
    """GridBalance's demand-response events and emergency pause in Python.

    Same state, same checks in the same order, same custom errors (contract ``GridBalance``,
    and OpenZeppelin's ``EnforcedPause`` / ``ExpectedPause``); times are block timestamps the
    caller supplies. ``meters`` are the active registered meters (device -> owner): only they
    may take part, and rewards go to their owners. Readings come to :meth:`settle_event` as a
    mapping (device, slot) -> Wh; a missing key is a meter that never reported. Not mirrored:
    roles, the transformer limit and the market pause that ``declareEmergency`` also sets
    (:class:`MarketModel.paused`).
    """

    genesis: int
    meters: dict[str, str] = field(default_factory=dict)
    min_emergency_seconds: int = 900
    reading_window_seconds: int = READING_WINDOW_SECONDS
    paused: bool = False
    emergency_since: int = 0
    events: dict[int, ModelDrEvent] = field(default_factory=dict)
    next_event_id: int = 1

    @staticmethod
    def _revert(name: str, **args: object) -> ContractRevert:
        return ContractRevert("GridBalance", name, dict(args))

    def current_slot(self, now: int) -> int:
        """``currentSlot()`` at block time ``now``."""
        return (now - self.genesis) // SLOT_SECONDS

    def readings_final(self, slot: int, now: int) -> bool:
        """``DeviceRegistry.readingsFinal(slot)`` at ``now``."""
        return now >= self.genesis + (slot + 1) * SLOT_SECONDS + self.reading_window_seconds

    def _require_not_paused(self) -> None:
        if self.paused:
            raise self._revert("EnforcedPause")

    def _open(self, event_id: int) -> ModelDrEvent:
        event = self.events.get(event_id)
        if event is None:
            raise self._revert("GridBalanceUnknownEvent", eventId=event_id)
        if event.cancelled or event.settled:
            raise self._revert("GridBalanceEventClosed", eventId=event_id)
        return event

    def create_event(
        self,
        now: int,
        start_slot: int,
        duration_slots: int,
        target_reduction_wh: int,
        incentive_per_wh: int,
        peak_bonus: int,
        participation_reward: int,
        participants: Sequence[DrParticipant],
    ) -> int:
        """``createEvent``; returns the event id the contract assigns."""
        self._require_not_paused()
        now_slot = self.current_slot(now)
        if start_slot <= now_slot:
            raise self._revert(
                "GridBalanceEventNotInFuture", startSlot=start_slot, currentSlot=now_slot
            )
        if not 1 <= duration_slots <= MAX_EVENT_SLOTS:
            raise self._revert(
                "GridBalanceInvalidDuration", durationSlots=duration_slots, max=MAX_EVENT_SLOTS
            )
        if not 1 <= len(participants) <= MAX_PARTICIPANTS:
            raise self._revert(
                "GridBalanceInvalidParticipants", count=len(participants), max=MAX_PARTICIPANTS
            )
        for i, p in enumerate(participants):
            if i > 0 and p.priority < participants[i - 1].priority:
                raise self._revert("GridBalanceUnsortedPriorities", index=i)
            if p.device not in self.meters:
                raise self._revert("GridBalanceNotActiveMeter", device=p.device)
        event_id = self.next_event_id
        self.next_event_id += 1
        self.events[event_id] = ModelDrEvent(
            start_slot, duration_slots, target_reduction_wh, incentive_per_wh, peak_bonus,
            participation_reward, list(participants),
        )  # fmt: skip
        return event_id

    def cancel_event(self, event_id: int, now: int) -> None:
        """``cancelEvent``: only before the event starts (allowed while paused)."""
        event = self._open(event_id)
        if self.current_slot(now) >= event.start_slot:
            raise self._revert("GridBalanceEventStarted", eventId=event_id)
        event.cancelled = True

    def reduction(
        self, p: DrParticipant, event: ModelDrEvent, readings: Readings, now: int | None = None
    ) -> int:
        """``_reduction``: baseline x duration - metered import over the window, 0 if any slot
        of the window has no reading (a silent meter earns nothing) or nothing was saved. With
        `now`, a reading the registry has evicted (see `evicted_by`) reverts, as on chain."""
        metered = 0
        for slot in range(event.start_slot, event.start_slot + event.duration_slots):
            if now is not None:
                held = evicted_by(readings, p.device, slot, self.current_slot(now))
                if held is not None:
                    raise self._revert(
                        "DeviceRegistryReadingEvicted", device=p.device, slot=slot, heldSlot=held
                    )
            wh = readings.get((p.device, slot))
            if wh is None:
                return 0
            metered += wh
        baseline = p.baseline_wh * event.duration_slots
        return baseline - metered if metered < baseline else 0

    def settle_event(self, event_id: int, now: int, readings: Readings) -> DrSettlement:
        """``settleEvent`` once the readings of the event's last slot are final: every
        participant's reduction pays ``incentivePerWh`` per Wh (EnergySaving) and, having saved
        anything, the participation reward (DemandResponse) and, when the reductions together
        met the target, the peak bonus (PeakReduction)."""
        self._require_not_paused()
        event = self._open(event_id)
        last = event.start_slot + event.duration_slots - 1
        if not self.readings_final(last, now):
            raise self._revert("GridBalanceReadingsNotFinal", slot=last)
        reductions = [self.reduction(p, event, readings, now) for p in event.participants]
        event.settled = True
        total = sum(reductions)
        target_met = total >= event.target_reduction_wh
        rewards: list[int] = []
        grants: list[tuple[str, int, RewardKind]] = []
        for p, reduction in zip(event.participants, reductions, strict=True):
            if reduction == 0:
                rewards.append(0)
                continue
            owner = self.meters[p.device]
            saving = reduction * event.incentive_per_wh
            bonus = event.peak_bonus if target_met else 0
            for amount, kind in (
                (saving, RewardKind.ENERGY_SAVING),
                (event.participation_reward, RewardKind.DEMAND_RESPONSE),
                (bonus, RewardKind.PEAK_REDUCTION),
            ):
                if amount:
                    grants.append((owner, amount, kind))
            rewards.append(saving + event.participation_reward + bonus)
        return DrSettlement(event_id, reductions, rewards, total, target_met, grants)

    def declare_emergency(self, now: int) -> None:
        """``declareEmergency``: pauses new and settled events (and the market)."""
        self._require_not_paused()
        self.paused = True
        self.emergency_since = now

    def recover(self, now: int) -> None:
        """``recover``, once ``min_emergency_seconds`` have passed."""
        if not self.paused:
            raise self._revert("ExpectedPause")
        allowed_at = self.emergency_since + self.min_emergency_seconds
        if now < allowed_at:
            raise self._revert("GridBalanceRecoveryTooEarly", allowedAt=allowed_at)
        self.paused = False
