"""The reference uniform-price clearing of one market slot, exactly as EnergyTrading verifies it.

The environment clears every step with this function and the solver role submits its result on
chain, so it must agree with the contract to the last Wh: all arithmetic is integer (Wh and token
base units per Wh, the contract's own units) and the rules are the contract's, restated.

Rules at a price ``p`` (D = demand of buy orders, S = supply of sell orders, by limit price):

* ``p`` is a *valid* uniform clearing price iff ``D(>=p) >= S(<p)`` and ``S(<=p) >= D(>p)``; the
  traded volume is then ``V = min(D(>=p), S(<=p))``, which is the largest volume any single price
  can trade. The valid prices form an interval; this module picks its midpoint (rounded down),
  restricted to ``[lowest limit, highest limit]``, so neither side is systematically favoured. The
  contract accepts any valid price in that range; the midpoint is this solver's choice.
* Orders strictly in the money fill completely, orders out of the money not at all.
* The marginal orders of a side (limit == ``p``) share the side's remainder ``R`` pro rata by
  *cumulative rounding* in book order: ``fill_i = floor(C_i R / M) - floor(C_{i-1} R / M)`` with
  ``C_i`` the running sum of marginal quantities and ``M`` their total. It is deterministic, needs
  one pass (so the contract checks it in O(n)), sums to exactly ``R`` and never exceeds an order.

Inputs must be non-negative and below 2**63 (numpy int64), with each side's total below 2**63;
this is far above any feeder's energy in a slot and lets numpy do the sums exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike, NDArray

#: Side codes as in the contract's ``IEnergyTrading.Side`` enum.
BUY = 0
SELL = 1

_INT64_MAX = np.iinfo(np.int64).max

IntArray = NDArray[np.int64]


@dataclass(frozen=True)
class Clearing:
    """Result of clearing one slot.

    ``price`` is in token base units per Wh, ``volume`` in Wh; ``bid_fill`` and ``ask_fill`` follow
    the order of the input arrays. ``sum(bid_fill) == sum(ask_fill) == volume``.
    """

    price: int
    volume: int
    bid_fill: IntArray
    ask_fill: IntArray


@dataclass(frozen=True)
class BookClearing:
    """Result of :func:`clear_book`: one fill per order, in the slot's book order."""

    price: int
    volume: int
    fills: IntArray


def _as_int64(values: ArrayLike, name: str) -> IntArray:
    arr = np.asarray(values)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{name} must hold integers (Wh or base units per Wh), got {arr.dtype}")
    if arr.size and (int(arr.min()) < 0 or int(arr.max()) > _INT64_MAX):
        raise ValueError(f"{name} must lie in [0, 2**63 - 1]")
    return arr.astype(np.int64, copy=False)


def _side_total(qty: IntArray, name: str) -> int:
    total = int(sum(qty.tolist()))  # Python ints: exact even where int64 would overflow
    if total > _INT64_MAX:
        raise ValueError(f"total {name} exceeds 2**63 - 1 Wh")
    return total


def _pro_rata(qty: IntArray, marginal: NDArray[np.bool_], remainder: int) -> IntArray:
    """Share ``remainder`` among the ``marginal`` orders by cumulative rounding (book order)."""
    fills = np.zeros(qty.shape, dtype=np.int64)
    idx = np.flatnonzero(marginal)
    if idx.size == 0:
        return fills
    quantities = qty[idx].tolist()
    total = sum(quantities)
    if total == 0:  # only zero-quantity orders at the margin (the contract refuses those)
        return fills
    cum = 0
    before = 0
    shares = []
    for q in quantities:
        cum += q
        after = cum * remainder // total
        shares.append(after - before)
        before = after
    fills[idx] = shares
    return fills


def clear(
    bid_qty: ArrayLike, bid_price: ArrayLike, ask_qty: ArrayLike, ask_price: ArrayLike
) -> Clearing:
    """Clear one slot: buy orders ``(bid_qty, bid_price)`` against sells ``(ask_qty, ask_price)``.

    Quantities are Wh, prices token base units per Wh (integers). The relative order of orders
    within each side is the book order that decides pro-rata rounding, so pass them in the order
    the contract lists them (:func:`clear_book` does that for a mixed book). Orders with zero
    quantity take part with nothing to trade. With no orders at all the price is 0.
    """
    bq = _as_int64(bid_qty, "bid_qty")
    bp = _as_int64(bid_price, "bid_price")
    aq = _as_int64(ask_qty, "ask_qty")
    ap = _as_int64(ask_price, "ask_price")
    if bq.shape != bp.shape or aq.shape != ap.shape:
        raise ValueError("quantity and price arrays of a side must have the same length")
    total_bid = _side_total(bq, "bid quantity")
    _side_total(aq, "ask quantity")  # validates the bound; supply sums come from a_cum
    if bq.size + aq.size == 0:
        empty = np.zeros(0, dtype=np.int64)
        return Clearing(price=0, volume=0, bid_fill=empty, ask_fill=empty)

    # Demand and supply at every distinct limit price; the valid interval's ends are among them.
    candidates = np.unique(np.concatenate([bp, ap]))
    b_order = np.argsort(bp, kind="stable")
    a_order = np.argsort(ap, kind="stable")
    b_sorted, a_sorted = bp[b_order], ap[a_order]
    b_cum = np.concatenate([[0], np.cumsum(bq[b_order])])
    a_cum = np.concatenate([[0], np.cumsum(aq[a_order])])
    bid_at = total_bid - b_cum[np.searchsorted(b_sorted, candidates, side="left")]
    bid_above = total_bid - b_cum[np.searchsorted(b_sorted, candidates, side="right")]
    ask_at = a_cum[np.searchsorted(a_sorted, candidates, side="right")]
    ask_below = a_cum[np.searchsorted(a_sorted, candidates, side="left")]

    lower_ok = ask_at >= bid_above  # holds from the interval's low end upwards
    upper_ok = bid_at >= ask_below  # holds up to the interval's high end
    low = int(candidates[np.argmax(lower_ok)])
    high = int(candidates[len(candidates) - 1 - np.argmax(upper_ok[::-1])])
    price = (low + high) // 2

    d_at = int(bq[bp >= price].sum())
    d_above = int(bq[bp > price].sum())
    s_at = int(aq[ap <= price].sum())
    s_below = int(aq[ap < price].sum())
    volume = min(d_at, s_at)
    bid_fill = np.where(bp > price, bq, 0) + _pro_rata(bq, bp == price, volume - d_above)
    ask_fill = np.where(ap < price, aq, 0) + _pro_rata(aq, ap == price, volume - s_below)
    return Clearing(price=price, volume=volume, bid_fill=bid_fill, ask_fill=ask_fill)


#: Books of up to this many orders clear in plain Python integers (`_clear_small`): on a few
#: dozen orders numpy's per-call overhead outweighs the arithmetic (the environment's 13-order
#: book took ~0.5 ms through `clear`, a share of every chain-ledger step).
SMALL_BOOK = 64


def _clear_small(
    bq: list[int], bp: list[int], aq: list[int], ap: list[int]
) -> tuple[int, int, list[int], list[int]]:
    """`clear`'s rules on Python lists: (price, volume, bid fills, ask fills), the same to the
    Wh (`test_clear_book_matches_clear_on_the_live_orders` holds them equal)."""
    if not bq and not aq:
        return 0, 0, [], []
    candidates = sorted({*bp, *ap})
    # The valid interval's low end: the lowest candidate where supply at or below covers demand
    # strictly above; its high end: the highest where demand at or above covers supply strictly
    # below. Where none qualifies, numpy's argmax in `clear` picks the first (last) candidate.
    low = candidates[0]
    for c in candidates:
        if sum(q for q, p in zip(aq, ap, strict=True) if p <= c) >= sum(
            q for q, p in zip(bq, bp, strict=True) if p > c
        ):
            low = c
            break
    high = candidates[-1]
    for c in reversed(candidates):
        if sum(q for q, p in zip(bq, bp, strict=True) if p >= c) >= sum(
            q for q, p in zip(aq, ap, strict=True) if p < c
        ):
            high = c
            break
    price = (low + high) // 2
    d_at = sum(q for q, p in zip(bq, bp, strict=True) if p >= price)
    d_above = sum(q for q, p in zip(bq, bp, strict=True) if p > price)
    s_at = sum(q for q, p in zip(aq, ap, strict=True) if p <= price)
    s_below = sum(q for q, p in zip(aq, ap, strict=True) if p < price)
    volume = min(d_at, s_at)
    bid_fill = _fill_side(bq, [p > price for p in bp], [p == price for p in bp], volume - d_above)
    ask_fill = _fill_side(aq, [p < price for p in ap], [p == price for p in ap], volume - s_below)
    return price, volume, bid_fill, ask_fill


def _fill_side(
    qty: list[int], in_money: list[bool], marginal: list[bool], remainder: int
) -> list[int]:
    """Orders in the money fill whole; the marginal ones share `remainder` as `_pro_rata` does."""
    fills = [q if m else 0 for q, m in zip(qty, in_money, strict=True)]
    idx = [i for i, m in enumerate(marginal) if m]
    total = sum(qty[i] for i in idx)
    if total == 0:  # no marginal order, or only zero-quantity ones
        return fills
    cum = before = 0
    for i in idx:
        cum += qty[i]
        after = cum * remainder // total
        fills[i] += after - before
        before = after
    return fills


def clear_book(
    qty: ArrayLike, limit_price: ArrayLike, side: ArrayLike, live: ArrayLike | None = None
) -> BookClearing:
    """Clear a slot given as the contract lists it: one mixed book of buy and sell orders.

    ``side`` uses the contract's codes (:data:`BUY` = 0, :data:`SELL` = 1); ``live`` marks orders
    that take part (cancelled orders are ``False`` and get a zero fill). The fills come back in
    book order, ready for ``EnergyTrading.clearSlot``. Books of up to `SMALL_BOOK` orders clear
    in plain integers, larger ones through `clear`.
    """
    q = _as_int64(qty, "qty")
    p = _as_int64(limit_price, "limit_price")
    s = np.asarray(side)
    if not (q.shape == p.shape == s.shape):
        raise ValueError("qty, limit_price and side must have the same length")
    if s.size and not np.isin(s, (BUY, SELL)).all():
        raise ValueError("side must hold 0 (buy) or 1 (sell)")
    mask = np.ones(q.shape, dtype=bool) if live is None else np.asarray(live, dtype=bool)
    if mask.shape != q.shape:
        raise ValueError("live must have the same length as qty")
    bids = mask & (s == BUY)
    asks = mask & (s == SELL)
    if q.size <= SMALL_BOOK:
        _side_total(q[bids], "bid quantity")
        _side_total(q[asks], "ask quantity")
        ql, pl = q.tolist(), p.tolist()
        bi, ai = np.flatnonzero(bids).tolist(), np.flatnonzero(asks).tolist()
        price, volume, bid_fill, ask_fill = _clear_small(
            [ql[i] for i in bi], [pl[i] for i in bi], [ql[i] for i in ai], [pl[i] for i in ai]
        )
        filled = [0] * q.size
        for i, f in zip(bi, bid_fill, strict=True):
            filled[i] = f
        for i, f in zip(ai, ask_fill, strict=True):
            filled[i] = f
        return BookClearing(price=price, volume=volume, fills=np.array(filled, dtype=np.int64))
    result = clear(q[bids], p[bids], q[asks], p[asks])
    fills = np.zeros(q.shape, dtype=np.int64)
    fills[bids] = result.bid_fill
    fills[asks] = result.ask_fill
    return BookClearing(price=result.price, volume=result.volume, fills=fills)


def is_valid_price(
    price: int, bid_qty: ArrayLike, bid_price: ArrayLike, ask_qty: ArrayLike, ask_price: ArrayLike
) -> bool:
    """Whether ``price`` passes the contract's price checks (range and crossing) for this book."""
    bq, bp = np.asarray(bid_qty, dtype=object), np.asarray(bid_price, dtype=np.int64)
    aq, ap = np.asarray(ask_qty, dtype=object), np.asarray(ask_price, dtype=np.int64)
    if bp.size + ap.size == 0:
        return True
    limits = np.concatenate([bp, ap])
    if not int(limits.min()) <= price <= int(limits.max()):
        return False
    d_at, d_above = sum(bq[bp >= price]), sum(bq[bp > price])
    s_at, s_below = sum(aq[ap <= price]), sum(aq[ap < price])
    return bool(d_at >= s_below and s_at >= d_above)
