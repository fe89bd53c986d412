"""The reference clearing against a brute-force restatement of the market rules."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from contracts.clearing import BUY, SELL, clear, clear_book, is_valid_price
from tests.contracts.helpers import CONTRACT_SETTINGS

# Quantities start at 1 Wh: the contract refuses empty orders.
orders = st.lists(st.tuples(st.integers(1, 2_000), st.integers(1, 40)), max_size=12)


def _brute_valid_prices(bids: list[tuple[int, int]], asks: list[tuple[int, int]]) -> list[int]:
    limits = [p for _, p in bids + asks]
    valid = []
    for p in range(min(limits), max(limits) + 1):
        d_at = sum(q for q, b in bids if b >= p)
        d_above = sum(q for q, b in bids if b > p)
        s_at = sum(q for q, a in asks if a <= p)
        s_below = sum(q for q, a in asks if a < p)
        if d_at >= s_below and s_at >= d_above:
            valid.append(p)
    return valid


def _volume_at(p: int, bids: list[tuple[int, int]], asks: list[tuple[int, int]]) -> int:
    return min(sum(q for q, b in bids if b >= p), sum(q for q, a in asks if a <= p))


@CONTRACT_SETTINGS
@given(bids=orders, asks=orders)
def test_clearing_follows_the_market_rules(
    bids: list[tuple[int, int]], asks: list[tuple[int, int]]
) -> None:
    result = clear(
        [q for q, _ in bids], [p for _, p in bids], [q for q, _ in asks], [p for _, p in asks]
    )
    bid_fill, ask_fill = result.bid_fill.tolist(), result.ask_fill.tolist()
    # bought = sold = volume, and no fill exceeds its order
    assert sum(bid_fill) == sum(ask_fill) == result.volume
    assert all(0 <= f <= q for f, (q, _) in zip(bid_fill, bids, strict=True))
    assert all(0 <= f <= q for f, (q, _) in zip(ask_fill, asks, strict=True))
    if not bids and not asks:
        assert result.price == 0
        return
    valid = _brute_valid_prices(bids, asks)
    # one price, a valid one, the midpoint of the valid interval, and volume-maximising
    assert valid == list(range(valid[0], valid[-1] + 1))
    assert result.price == (valid[0] + valid[-1]) // 2
    limits = [p for _, p in bids + asks]
    best = max(_volume_at(p, bids, asks) for p in range(min(limits), max(limits) + 1))
    assert result.volume == best
    # limits respected: only orders at or inside the price trade
    for f, (_, limit) in zip(bid_fill, bids, strict=True):
        assert f == 0 or limit >= result.price
    for f, (_, limit) in zip(ask_fill, asks, strict=True):
        assert f == 0 or limit <= result.price
    # strictly in-the-money orders fill completely; marginal ones share pro rata within 1 Wh
    for fills, side, strictly_in in ((bid_fill, bids, int.__gt__), (ask_fill, asks, int.__lt__)):
        marginal = [(f, q) for f, (q, p) in zip(fills, side, strict=True) if p == result.price]
        for f, (q, p) in zip(fills, side, strict=True):
            if strictly_in(p, result.price):
                assert f == q
        total = sum(q for _, q in marginal)
        shared = sum(f for f, _ in marginal)
        for f, q in marginal:
            assert abs(Fraction(f) - Fraction(q * shared, total)) < 1


@CONTRACT_SETTINGS
@given(bids=orders, asks=orders)
def test_the_chosen_price_passes_the_contracts_check(
    bids: list[tuple[int, int]], asks: list[tuple[int, int]]
) -> None:
    bq, bp = [q for q, _ in bids], [p for _, p in bids]
    aq, ap = [q for q, _ in asks], [p for _, p in asks]
    result = clear(bq, bp, aq, ap)
    assert is_valid_price(result.price, bq, bp, aq, ap)


@CONTRACT_SETTINGS
@given(
    book=st.lists(
        st.tuples(
            st.integers(0, 500), st.integers(1, 20), st.sampled_from([BUY, SELL]), st.booleans()
        )
    )
)
def test_clear_book_matches_clear_on_the_live_orders(
    book: list[tuple[int, int, int, bool]],
) -> None:
    qty, price, side, live = (
        (list(col) for col in zip(*book, strict=True)) if book else ([], [], [], [])
    )
    result = clear_book(qty, price, side, live)
    bids = [(q, p) for q, p, s, ok in book if ok and s == BUY]
    asks = [(q, p) for q, p, s, ok in book if ok and s == SELL]
    reference = clear(
        [q for q, _ in bids], [p for _, p in bids], [q for q, _ in asks], [p for _, p in asks]
    )
    assert result.price == reference.price and result.volume == reference.volume
    fills = result.fills.tolist()
    assert [
        f for f, (_, _, s, ok) in zip(fills, book, strict=True) if ok and s == BUY
    ] == reference.bid_fill.tolist()
    assert [
        f for f, (_, _, s, ok) in zip(fills, book, strict=True) if ok and s == SELL
    ] == reference.ask_fill.tolist()
    assert all(f == 0 for f, (_, _, _, ok) in zip(fills, book, strict=True) if not ok)


def test_worked_example() -> None:
    # Bids 100 Wh @30, 50 @20, 70 @25; asks 80 @18, 60 @25. Only 25 clears; 140 Wh trade, the
    # marginal bid (70 @25) gets what the 100 Wh bid leaves: 40 Wh.
    result = clear([100, 50, 70], [30, 20, 25], [80, 60], [18, 25])
    assert result.price == 25 and result.volume == 140
    assert result.bid_fill.tolist() == [100, 0, 40]
    assert result.ask_fill.tolist() == [80, 60]


def test_cumulative_rounding_is_in_book_order() -> None:
    # Three equal marginal asks share 10 Wh: 3.33 each, the rounding goes down the book.
    result = clear([10], [5], [10, 10, 10], [5, 5, 5])
    assert result.ask_fill.tolist() == [3, 3, 4]
    assert result.bid_fill.tolist() == [10]


def test_no_crossing_trades_nothing_at_a_price_between_the_books() -> None:
    result = clear([100], [10], [100], [20])
    assert result.volume == 0 and result.price == 15


def test_one_sided_books_trade_nothing() -> None:
    assert clear([5, 6], [3, 9], [], []).price == 9
    assert clear([], [], [5, 6], [3, 9]).price == 3
    assert clear([], [], [], []).volume == 0


def test_large_quantities_stay_exact() -> None:
    big = 2**62
    result = clear([big, big - 1], [7, 7], [big], [7])
    assert result.volume == big
    assert int(result.bid_fill.sum()) == big  # Python-int pro rata: no int64 overflow
    first = big * big // (2 * big - 1)
    assert result.bid_fill.tolist() == [first, big - first]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (([-1], [5], [], []), "bid_qty"),
        (([1], [5.5], [], []), "bid_price"),
        (([1, 2], [5], [], []), "same length"),
        (([[1]], [[5]], [], []), "one-dimensional"),
        (([2**62, 2**62], [5, 5], [], []), "total bid"),
    ],
)
def test_bad_inputs_name_the_field(args: tuple[list[int], ...], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        clear(*args)


def test_clear_book_rejects_unknown_sides() -> None:
    with pytest.raises(ValueError, match="side"):
        clear_book([1], [1], [2])
    assert clear_book(np.array([], dtype=np.int64), [], []).fills.size == 0


def test_zero_quantity_orders_trade_nothing() -> None:
    result = clear([0, 5], [4, 4], [0], [4])
    assert result.volume == 0
    assert result.bid_fill.tolist() == [0, 0] and result.ask_fill.tolist() == [0]
