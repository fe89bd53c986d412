"""One slot's ``SlotSettler.run`` step, built by one piece of code for every operator.

The env's chain ledger (``envs.ledger_chain``) and the live bridge (``bridge.settlement``)
settle a slot the same way: the prosumers' orders in batch order (by owner address), the ones
the contract would refuse left out, the rest signed with the owners' keys (EIP-712) and cleared
with ``contracts.clearing`` (the solver's function, whose fills the contract re-checks), the
reference price posted as ``PriceParams`` and, when due, an earlier slot's reconciliation
first. Both build the step here, so the transaction the env tests against py-evm and anvil is
the transaction the bridge sends.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from coincurve import PrivateKey

from contracts.clearing import clear_book
from contracts.model import (
    READING_HISTORY_SLOTS,
    DrParticipant,
    LoadType,
    PriceParams,
    Side,
    SignedOrder,
)
from contracts.settler import (
    PART_DEMAND_RESPONSE,
    PART_EMERGENCY,
    PART_PRICE,
    PART_READINGS,
    PART_RECONCILE,
    PART_RECOVER,
    PART_SETTLE,
    DemandResponse,
    OrderSigner,
    SlotStep,
)

#: The posted reference price is the demand factor: baseRate 1e4 x bps x 1e4 / 1e8 = bps.
BASE_RATE = 10_000
FLAT_TOD = (10_000,) * 24


def price_params(
    reference: int, band_low_bps: int, band_high_bps: int, imbalance_penalty_bps: int
) -> PriceParams:
    """The price parameters that make the contract's reference price `reference` (money units
    per Wh): band and imbalance settlement then follow the scenario's bps."""
    return PriceParams(
        base_rate=BASE_RATE,
        demand_factor_bps=int(reference),
        grid_stress_factor_bps=0,
        band_low_bps=band_low_bps,
        band_high_bps=band_high_bps,
        imbalance_penalty_bps=imbalance_penalty_bps,
        tod_multiplier_bps=FLAT_TOD,
    )


@dataclass(frozen=True)
class Bid:
    """One prosumer's order for the slot: side (0 buy, 1 sell), Wh (0: none), limit price."""

    owner: str
    side: int
    energy_wh: int
    limit_price: int


@dataclass(frozen=True)
class SignedBatch:
    """A slot's accepted orders, signed and cleared (what ``settleSignedBatch`` takes)."""

    slot: int
    submitted: list[int]
    """Indices (into the bids given) of the orders in the batch, in batch order."""
    orders: list[SignedOrder]
    signatures: list[tuple[bytes, bytes]]
    price: int
    fills: list[int]

    def trades(self, accounts: Sequence[str]) -> list[tuple[str, int, int, int]]:
        """What reconciling the slot restates (see `trade_list`)."""
        return trade_list([(o.owner, int(o.side)) for o in self.orders], self.fills, accounts)


def trade_list(
    bids: Sequence[tuple[str, int]], fills: Sequence[int], accounts: Sequence[str]
) -> list[tuple[str, int, int, int]]:
    """(owner, side, fill, index in `accounts`) of every (owner, side) order of a settled
    batch: its committed trade list (``accounts`` sorted by address, as ``reconcileSlot``
    takes them)."""
    index = {a: j for j, a in enumerate(accounts)}
    return [
        (owner, side, int(f), index[owner]) for (owner, side), f in zip(bids, fills, strict=True)
    ]


def step_trades(step: SlotStep, accounts: Sequence[str]) -> list[tuple[str, int, int, int]]:
    """The committed trade list of a stored step's settlement (its orders are ABI tuples)."""
    return trade_list([(str(o[0]), int(o[2])) for o in step.orders], step.fills, accounts)


def signed_batch(
    slot: int,
    bids: Sequence[Bid],
    credit: Sequence[int],
    emergency: bool,
    keys: Sequence[PrivateKey],
    signer: OrderSigner,
) -> SignedBatch:
    """The slot's batch from `bids` in batch order (owners by increasing address), `credit` and
    `keys` index-aligned with them.

    Left out, as the contract would refuse them: empty orders, every order in emergency mode,
    and buy orders whose escrow (Wh x limit) exceeds the owner's free `credit`.
    """
    submitted = [
        j
        for j, b in enumerate(bids)
        if b.energy_wh > 0
        and not emergency
        and not (b.side == int(Side.BUY) and b.energy_wh * b.limit_price > credit[j])
    ]
    orders = [
        SignedOrder(bids[j].owner, slot, Side(bids[j].side), bids[j].energy_wh, bids[j].limit_price)
        for j in submitted
    ]
    solved = clear_book(
        [o.energy_wh for o in orders], [o.limit_price for o in orders],
        [int(o.side) for o in orders],
    )  # fmt: skip
    signatures = [signer.sign(keys[j], o) for j, o in zip(submitted, orders, strict=True)]
    return SignedBatch(
        slot, submitted, orders, signatures, int(solved.price), [int(f) for f in solved.fills]
    )


def emergency_parts(emergency: bool, paused: bool) -> tuple[bool, bool]:
    """(declare_emergency, recover) for a slot whose grid is stressed (`emergency`: transformer
    loading above the scenario's limit) while the chain's market is `paused` or not: an
    emergency is declared when stress begins and ended in the first slot without it, the env's
    rule and GridBalance's (declaring twice or recovering while running would revert)."""
    change = emergency != paused
    return change and emergency, change and not emergency


def settles(event_slot: int, slot: int) -> bool:
    """Whether slot `slot`'s transaction may settle the one-slot event of `event_slot`:
    GridBalance reads the participants' readings of the event's slot from DeviceRegistry, which
    keeps the last ``READING_HISTORY_SLOTS`` (32) slots of them. The env's transaction of slot s
    relays the readings of slot s before its demand-response part, so the reading of
    `event_slot` is gone (``DeviceRegistryReadingEvicted``, the whole transaction reverts) once
    `slot` - `event_slot` >= 32; the bridge's row of slot n, mined inside n before n's readings
    arrive, could still read it at 32, but settling by the same rule keeps the mirror's
    incentives (`envs.market_kernel.dr_settle_row`) the chain's. Only an emergency
    holds an event that long: GridBalance settles nothing while paused, and the first calm
    transaction settles every open event."""
    return slot - event_slot < READING_HISTORY_SLOTS


@dataclass
class DemandResponseQueue:
    """The GridBalance events one operator announced and has not settled, and the id the next
    announcement will get: what a slot transaction's demand-response part settles and announces.

    Each operator's transaction, when it is not in an emergency (GridBalance refuses both
    while paused), settles every open event whose slot is over and whose readings are final
    and announces, when the grid state calls for demand response, a one-slot event for the
    first slot after the block's own that no transaction has announced yet. The env's chain
    ledger, whose slot s transaction is mined at the start of slot s + 1, settles up to slot
    s - 1 and announces slot s + 2; the live bridge, whose slot n row is mined inside slot n,
    settles up to n - 1 and announces n + 1 (`bridge.settlement`). Event ids are the
    contract's counter (1, 2, ...), predicted here: an operator that announces every event
    knows them before its transaction is mined, and checks the emitted ids.
    """

    open: list[tuple[int, int]] = field(default_factory=list)
    """(event id, slot) of every announced event not yet settled, in announcement order."""
    next_id: int = 1

    def forfeited(self, settle_through: int) -> list[tuple[int, int]]:
        """The open events the transaction that settles through `settle_through` may no
        longer settle (`settles`): their readings are gone from the registry."""
        return [(e, s) for e, s in self.open if not settles(s, settle_through + 1)]

    def part(
        self,
        settle_through: int,
        start_slot: int,
        incentive_per_wh: int,
        baselines: Sequence[tuple[str, int]] = (),
    ) -> DemandResponse | None:
        """The part of a transaction that settles the open events of slots up to
        `settle_through` and announces `baselines` (meter device, baseline Wh; empty: nothing)
        for `start_slot` (None: nothing to do). It takes what it settles off the queue and adds
        what it announces; an event held so long (by an emergency) that its readings are gone
        from the registry (`forfeited`) is taken off unsettled: it pays nothing. Meters with
        a baseline above 0 take part, each earning `incentive_per_wh` per Wh it reads below
        its baseline (no target, bonus or participation reward). Call only for a transaction
        that is not in an emergency; the transaction is that of slot `settle_through` + 1."""
        slot = settle_through + 1
        settle = [e for e, s in self.open if s <= settle_through and settles(s, slot)]
        self.open = [(event_id, s) for event_id, s in self.open if s > settle_through]
        participants = [
            DrParticipant(device, LoadType.CURTAILABLE, 0, int(wh)).as_tuple()
            for device, wh in baselines
            if wh > 0
        ]
        if not settle and not participants:
            return None
        if not participants:
            return DemandResponse(settle=settle)
        self.open.append((self.next_id, start_slot))
        self.next_id += 1
        return DemandResponse(
            settle=settle, start_slot=start_slot, duration_slots=1,
            incentive_per_wh=incentive_per_wh, participants=participants,
        )  # fmt: skip


@dataclass(frozen=True)
class Reconciliation:
    """An earlier slot's reconciliation and its rewards (``SlotStep``'s first part)."""

    slot: int
    trades: Sequence[tuple[str, int, int, int]]
    accounts: Sequence[str]
    """Every account to reconcile, by increasing address."""
    exporters: Sequence[str] = ()
    grants: Sequence[tuple[str, int, int]] = field(default_factory=list)


def slot_step(
    params: PriceParams | None = None,
    batch: SignedBatch | None = None,
    readings: Sequence[tuple[str, int, int, int]] = (),
    reading_signatures: Sequence[bytes] = (),
    reconcile: Reconciliation | None = None,
    *,
    declare_emergency: bool = False,
    recover: bool = False,
    demand_response: DemandResponse | None = None,
) -> SlotStep:
    """The ``run`` step of the parts given: end an emergency (`recover`), reconcile, declare an
    emergency (`declare_emergency`: the batch must then be empty), post prices, settle, relay
    readings, settle and announce demand-response events (`demand_response`, refused by
    GridBalance while in an emergency)."""
    parts = (
        (PART_RECOVER if recover else 0)
        | (PART_EMERGENCY if declare_emergency else 0)
        | (PART_RECONCILE if reconcile is not None else 0)
        | (PART_PRICE if params is not None else 0)
        | (PART_SETTLE if batch is not None else 0)
        | (PART_READINGS if readings else 0)
        | (PART_DEMAND_RESPONSE if demand_response is not None else 0)
    )
    fields: dict[str, object] = {"parts": parts}
    if reconcile is not None:
        fields |= {
            "reconcile_slot": reconcile.slot,
            "trades": list(reconcile.trades),
            "accounts": list(reconcile.accounts),
            "exporters": list(reconcile.exporters),
            "grants": list(reconcile.grants),
        }
    if params is not None:
        fields["price_params"] = params.as_args()
    if batch is not None:
        fields |= {
            "settle_slot": batch.slot,
            "price": batch.price,
            "orders": [o.as_tuple() for o in batch.orders],
            "signatures": batch.signatures,
            "fills": batch.fills,
        }
    if readings:
        fields |= {"readings": list(readings), "reading_signatures": list(reading_signatures)}
    if demand_response is not None:
        fields["demand_response"] = demand_response
    return SlotStep(**fields)  # type: ignore[arg-type]
