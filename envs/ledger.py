"""Ledgers: who settles a slot's trades, meter readings, demand response and rewards.

The environment talks to a `Ledger`; the scenario chooses which. `MirrorLedger` restates the
contract suite's settlement rules in integer numpy over the whole batch (what training runs on);
chain-backed ledgers run the same slots through the deployed contracts. Every ledger takes the
same `SlotInput` and returns the same `Settlement`, in the contracts' units (Wh, money units of
``envs.market.MONEY_UNITS`` per currency, prices in money units per Wh), so the environment
cannot tell them apart except by speed and the gas they report.

Settlement rules of one slot (EnergyTrading, GridBalance and RewardSystem, restated):

* buy orders whose escrow (qty x limit) exceeds the buyer's free credit are refused, as
  ``createOrder`` reverts; in emergency mode no order is accepted at all;
* the book clears at one uniform price (``envs.market.clear_books``), in the signed batch's
  order (prosumers sorted by address, ``envs.accounts.batch_order``);
* buyers pay fill x price at once; sellers' proceeds less ``fee_bps`` (to the treasury) are
  held until the meter readings are final;
* reconciliation then settles the difference between metered and traded energy at the
  reference price, worse by ``imbalance_penalty_bps`` either way, with the treasury: a shortfall
  is paid from credit and held proceeds as far as they go (the rest is recorded unpaid), a
  surplus is paid by the treasury, which must afford it (`LedgerError` otherwise);
* every kWh a prosumer's meter exports earns the renewable reward (RewardSystem.rewardRenewable,
  from the signed reading);
* demand response is GridBalance's: a slot whose grid state (after the physics) calls for it
  announces an event for the slot after the next (``createEvent`` must start after the block's
  slot), with each prosumer expected to import taking part at a baseline of its expected import
  (the forecast of that slot the observation carries, as the live bridge announces it); the
  event's slot is metered as any other, and the first transaction after it that is not in an
  emergency settles it (``settleEvent``): ``dr_incentive`` per Wh metered below the baseline.
  An emergency slot (GridBalance paused) neither announces nor settles: its events wait for the
  first calm slot. `Settlement.rewards` holds what the slot's transaction paid: the slot's
  renewable reward and the events it settled.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np
from numpy.typing import NDArray

from envs.accounts import batch_order
from envs.errors import LedgerError
from envs.market import MONEY_UNITS, Book
from envs.market_kernel import DR_OUT, DR_ROWS, settle_rows
from envs.params import IntArray
from envs.scenario import MarketConfig

BoolArray = NDArray[np.bool_]


@dataclass(frozen=True)
class SlotInput:
    """What a ledger needs to settle one slot of every grid in the batch."""

    slot: IntArray
    """(B,) absolute slot of the year."""
    book: Book
    reference: IntArray
    """(B,) reference (grid) price, money units per Wh: imbalances settle at it."""
    metered_wh: IntArray
    """(B, n) each prosumer's metered net consumption (export < 0)."""
    dr_announce: BoolArray
    """(B,) the grid state this slot left calls for a demand-response event two slots on
    (`envs.market_kernel.announce_range`); the ledger announces it unless in an emergency."""
    dr_baseline_wh: IntArray
    """(B, n) each prosumer's baseline in that event (its expected import, 0: not taking part)."""
    emergency: BoolArray
    """(B,) emergency mode: trading stops, meters and settlement go on."""


@dataclass(frozen=True)
class Settlement:
    """What a ledger did for one slot of every grid."""

    price: IntArray
    """(B,) clearing price (money units per Wh), 0 where nothing traded."""
    volume_wh: IntArray
    fill_wh: IntArray
    """(B, n) fill of each prosumer's order."""
    cash: IntArray
    """(B, n) change of each prosumer's credit this slot (trading, fees and imbalance)."""
    fees: IntArray
    imbalance_wh: IntArray
    """(B, n) metered minus traded energy (bought > 0, sold < 0)."""
    unpaid: IntArray
    """(B, n) shortfall charges the prosumer's credit could not cover (recorded as debt)."""
    refused: IntArray
    """(B,) orders refused: escrow beyond credit, or emergency mode."""
    rewards: IntArray
    """(B, n) reward-token units (1e-9 token) the slot's transaction paid: the slot's renewable
    reward and the demand-response events it settled (`dr_paid`)."""
    gas_used: IntArray
    """(B,) gas the slot's transactions used (0 off chain)."""
    transactions: IntArray
    dr_event: BoolArray
    """(B,) a demand-response event (announced two slots before) covered this slot."""
    dr_created: IntArray
    """(B,) events the slot's transaction announced (0 or 1)."""
    dr_settled: IntArray
    """(B,) events the slot's transaction settled."""
    dr_paid: IntArray
    """(B, n) what those settlements paid each prosumer (reward units)."""


class Ledger(Protocol):
    """A settlement backend for a batch of `batch` grids with `n` prosumers each."""

    name: str
    treasury: IntArray
    """(B,) the treasury's credit: fees and shortfall charges in, surplus payments out."""

    def reset(self, rows: IntArray) -> None:
        """Start the accounts of `rows` afresh (a new episode)."""

    def settle(self, slot: SlotInput) -> Settlement:
        """Settle one slot of every grid."""

    def credits(self) -> IntArray:
        """(B, n) free credit of every prosumer."""


def treasury_short(row: int) -> LedgerError:
    """The error of a slot whose surpluses the treasury of grid `row` cannot pay."""
    return LedgerError(
        f"market.treasury_credit: the treasury of grid {row} cannot pay this slot's "
        f"surpluses (EnergyTradingTreasuryShort); raise treasury_credit"
    )


def units(amount: float) -> int:
    """Currency (or tokens) -> integer money units."""
    return round(amount * MONEY_UNITS)


def per_wh(rate_per_kwh: float) -> int:
    """A rate per kWh -> money units per Wh."""
    return round(rate_per_kwh * MONEY_UNITS / 1000)


class MirrorLedger:
    """The suite's settlement rules in integer numpy: the fast ledger training runs on."""

    name = "mirror"

    def __init__(self, batch: int, n: int, config: MarketConfig) -> None:
        self.batch = batch
        self.n = n
        self.config = config
        self._initial = units(config.initial_credit)
        self._treasury0 = units(config.treasury_credit)
        self._credit = np.full((batch, n), self._initial, dtype=np.int64)
        self.treasury = np.full(batch, self._treasury0, dtype=np.int64)
        """The treasury's credit per grid: fees and shortfall charges in, surplus payments out."""
        self.reward_tokens = np.zeros((batch, n), dtype=np.int64)
        self.demand_response = np.zeros((batch, DR_ROWS, n + 1), dtype=np.int64)
        """GridBalance's state per grid (`envs.market_kernel.DR_NOW` ...): the events announced
        for the next two slots, the rewards of metered events not yet settled."""
        self.order = batch_order(n)
        self._rates = np.array(
            [
                config.fee_bps,
                config.imbalance_penalty_bps,
                per_wh(config.dr_incentive_per_kwh),
                per_wh(config.renewable_reward_per_kwh),
            ],
            dtype=np.int64,
        )

    def reset(self, rows: IntArray) -> None:
        self._credit[rows] = self._initial
        self.treasury[rows] = self._treasury0
        self.reward_tokens[rows] = 0
        self.demand_response[rows] = 0

    def credits(self) -> IntArray:
        return self._credit.copy()

    def accounts(self) -> tuple[IntArray, IntArray, IntArray, IntArray, IntArray, IntArray]:
        """(rates, batch order, credit, treasury, reward tokens, demand-response state): the
        arrays the fused step (`envs.market_kernel.fused_step`) settles on in place, exactly as
        `settle` does."""
        return (
            self._rates, self.order, self._credit, self.treasury, self.reward_tokens,
            self.demand_response,
        )  # fmt: skip

    def settle(self, slot: SlotInput) -> Settlement:
        b, n = self.batch, self.n
        keys = ("fill", "cash", "imb", "unp", "rew", "paid")
        out = {k: np.zeros((b, n), dtype=np.int64) for k in keys}
        row = {k: np.zeros(b, dtype=np.int64) for k in ("price", "vol", "fees", "ref")}
        dr = np.zeros((b, DR_OUT), dtype=np.int64)
        short = settle_rows(
            self._rates, self.order, slot.book.qty_wh, slot.book.limit, slot.book.side,
            slot.reference, slot.metered_wh, np.ascontiguousarray(slot.dr_announce, np.bool_),
            np.ascontiguousarray(slot.dr_baseline_wh, np.int64), slot.emergency, self._credit,
            self.treasury, self.demand_response, row["price"], row["vol"], out["fill"],
            out["cash"], row["fees"], out["imb"], out["unp"], row["ref"], out["rew"], dr,
            out["paid"],
        )  # fmt: skip
        if short >= 0:
            raise treasury_short(short)
        self.reward_tokens += out["rew"]
        zeros = np.zeros(b, dtype=np.int64)
        return Settlement(
            price=row["price"],
            volume_wh=row["vol"],
            fill_wh=out["fill"],
            cash=out["cash"],
            fees=row["fees"],
            imbalance_wh=out["imb"],
            unpaid=out["unp"],
            refused=row["ref"],
            rewards=out["rew"],
            gas_used=zeros,
            transactions=zeros.copy(),
            dr_event=dr[:, 0] != 0,
            dr_created=dr[:, 1].copy(),
            dr_settled=dr[:, 2].copy(),
            dr_paid=out["paid"],
        )
