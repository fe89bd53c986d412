"""The peer-to-peer market of one slot, for a whole batch of grids at once.

Each step every prosumer may place one order for the slot about to be simulated: a quantity in
Wh, a limit price and a side. The book of each grid is cleared with the uniform-price rule of
``contracts.clearing`` (the function the solver role submits on chain), here compiled with numba
so that 1,024 books clear in one call; ``tests/envs/test_market.py`` holds the two equal on
random books. All market arithmetic is integer, in the contract's own units: energy in Wh, money
in units of 1e-9 currency (:data:`MONEY_UNITS`), prices in money units per Wh.

Order of a slot: gate closure (orders fixed from forecasts) -> clearing -> physics (what really
flowed) -> meter readings -> settlement of fills, then of the difference between traded and
metered energy at the reference price plus a penalty. The ledger (``envs.ledger``) does the
settlement; this module only builds and clears books.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from envs.market_kernel import BUY, MONEY_UNITS, SELL, clear_rows, rule_book_row
from envs.params import BatteryParams, FloatArray, IntArray


@dataclass(frozen=True)
class Book:
    """One order per prosumer and grid, batch axis first; a zero quantity means no order."""

    qty_wh: IntArray
    """(B, n) order energy in Wh (>= 0)."""
    limit: IntArray
    """(B, n) limit price in units per Wh."""
    side: IntArray
    """(B, n) BUY (0) or SELL (1)."""

    @property
    def live(self) -> np.ndarray:
        return self.qty_wh > 0


@dataclass(frozen=True)
class Cleared:
    """The clearing of every grid's book."""

    price: IntArray
    """(B,) the uniform price (units per Wh); 0 for an empty book."""
    volume_wh: IntArray
    """(B,) energy bought = energy sold."""
    fill_wh: IntArray
    """(B, n) each order's fill, in book (prosumer) order."""


def to_units(price_per_kwh: FloatArray) -> IntArray:
    """Currency per kWh -> integer price units per Wh (rounded to nearest)."""
    return np.rint(np.asarray(price_per_kwh) * (MONEY_UNITS / 1000)).astype(np.int64)


__all__ = [
    "BUY", "MONEY_UNITS", "SELL", "Book", "Cleared", "band", "clear_books", "rule_book", "to_units",
]  # fmt: skip


def band(reference: IntArray, low_bps: int, high_bps: int) -> tuple[IntArray, IntArray]:
    """The allowed limit-price band around each reference price, as EnergyTrading's priceBand."""
    ref = np.asarray(reference, dtype=np.int64)
    return ref * low_bps // 10_000, ref * high_bps // 10_000


def clear_books(book: Book) -> Cleared:
    """Clear every row of `book` with ``contracts.clearing``'s rules (exactly, in integers)."""
    qty = np.ascontiguousarray(book.qty_wh, dtype=np.int64)
    limit = np.ascontiguousarray(book.limit, dtype=np.int64)
    side = np.ascontiguousarray(book.side, dtype=np.int64)
    if qty.ndim != 2 or qty.shape != limit.shape or qty.shape != side.shape:
        raise ValueError(
            f"book: qty_wh, limit and side must share one (B, n) shape, got "
            f"{qty.shape}, {limit.shape}, {side.shape}"
        )
    if (qty < 0).any() or (limit < 0).any():
        raise ValueError("book: quantities and limit prices must be >= 0")
    b = qty.shape[0]
    price = np.zeros(b, dtype=np.int64)
    volume = np.zeros(b, dtype=np.int64)
    fills = np.zeros_like(qty)
    clear_rows(qty, limit, side, price, volume, fills)
    return Cleared(price=price, volume_wh=volume, fill_wh=fills)


@dataclass(frozen=True)
class RuleInputs:
    """What the default bidding rule of one grid reads at gate closure, per prosumer (n,)."""

    load_kw: FloatArray
    """Forecast load of the coming slot (the first lead)."""
    pv_kw: FloatArray
    """Forecast available PV of the coming slot."""
    dr_share: FloatArray
    curtailment: FloatArray
    backlog_kwh: FloatArray
    soc: FloatArray
    capacity_kwh: FloatArray
    battery_kw: FloatArray
    """The decided set-points (the rule holds them within what SoC allows)."""


def rule_book(
    inputs: RuleInputs,
    reference: int,
    *,
    batteries: BatteryParams,
    dt_h: float,
    flexible_share: float,
    rebound_per_step: float,
    bid_markup: float,
    band_low_bps: int,
    band_high_bps: int,
) -> Book:
    """One grid's book by the env's default bidding rule (`market_kernel.rule_order`, the code
    `Exchange.open` runs at every gate): for a caller that holds the inputs itself rather than
    an env's state, such as the bridge with live telemetry. `flexible_share` is the curtailable
    plus the shiftable share of the load; `batteries` may hold more entries than prosumers (the
    community battery last), only the first n are read."""
    n = np.asarray(inputs.load_kw).shape[0]
    bat = np.ascontiguousarray(
        np.stack(
            [
                batteries.capacity_kwh[:n],
                batteries.power_kw[:n],
                batteries.efficiency_charge[:n],
                batteries.efficiency_discharge[:n],
                batteries.soc_min[:n],
                batteries.soc_max[:n],
            ]
        ),
        dtype=np.float64,
    )
    qty = np.zeros(n, dtype=np.int64)
    limit = np.zeros(n, dtype=np.int64)
    side = np.zeros(n, dtype=np.int64)
    f = [
        np.ascontiguousarray(getattr(inputs, k), dtype=np.float64)
        for k in (
            "load_kw", "pv_kw", "dr_share", "curtailment", "backlog_kwh", "soc", "capacity_kwh",
            "battery_kw",
        )
    ]  # fmt: skip
    for name, a in zip(RuleInputs.__dataclass_fields__, f, strict=True):
        if a.shape != (n,):
            raise ValueError(f"rule inputs: {name}: expected shape ({n},), got {a.shape}")
    rule_book_row(  # type: ignore[call-arg]
        *f, bat, float(dt_h), float(flexible_share), float(rebound_per_step), int(reference),
        float(bid_markup), int(band_low_bps), int(band_high_bps), qty, limit, side,
    )  # fmt: skip
    return Book(qty[None], limit[None], side[None])
