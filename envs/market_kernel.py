"""Compiled kernels of the market step: gate closure, clearing and mirror settlement.

The market runs every step of every grid, so it is compiled like the physics (`envs.kernel`):
numpy on arrays of 13 prosumers spends its time in call overhead, not arithmetic. Each kernel
loops over the batch rows; rows are independent. The rules are documented where they are used
(`envs.exchange`, `envs.ledger`, `contracts.clearing`); tests hold these kernels equal to
`contracts.clearing.clear_book` and `contracts.model.MarketModel`.
"""

from __future__ import annotations

import numba
import numpy as np

from envs.kernel import forecast_value

BUY = 0
SELL = 1
#: Money units per currency unit (a 9-decimal payment token): 0.25 currency/kWh is a price of
#: 250,000 units per Wh, and a feeder's largest balances stay far inside int64.
MONEY_UNITS = 1_000_000_000
_PRICE_UNITS_PER_KWH = MONEY_UNITS / 1000


@numba.njit(cache=True, nogil=True)
def clear_row(q, p, s, fills):
    """Uniform-price clearing of one book (contracts.clearing's rules); returns (price, volume).

    Orders with q <= 0 take no part. `fills` (zeroed by the caller) receives each order's fill.
    """
    n = q.shape[0]
    any_live = False
    lo_all = np.iinfo(np.int64).max
    hi_all = -1
    for k in range(n):
        if q[k] > 0:
            any_live = True
            lo_all = min(lo_all, p[k])
            hi_all = max(hi_all, p[k])
    if not any_live:
        return 0, 0
    # The valid prices form an interval whose ends are among the limit prices: the lowest
    # candidate where supply at-or-below covers demand strictly above, and the highest where
    # demand at-or-above covers supply strictly below. None valid: the limits' extremes.
    low = -1
    high = -1
    for k in range(n):
        if q[k] <= 0:
            continue
        c = p[k]
        bid_at = 0
        bid_above = 0
        ask_at = 0
        ask_below = 0
        for j in range(n):
            if q[j] <= 0:
                continue
            if s[j] == BUY:
                if p[j] >= c:
                    bid_at += q[j]
                if p[j] > c:
                    bid_above += q[j]
            else:
                if p[j] <= c:
                    ask_at += q[j]
                if p[j] < c:
                    ask_below += q[j]
        if ask_at >= bid_above and (low < 0 or c < low):
            low = c
        if bid_at >= ask_below and c > high:
            high = c
    if low < 0:
        low = lo_all
    if high < 0:
        high = hi_all
    price = (low + high) // 2
    d_at = 0
    d_above = 0
    s_at = 0
    s_below = 0
    m_bid = 0
    m_ask = 0
    for j in range(n):
        if q[j] <= 0:
            continue
        if s[j] == BUY:
            if p[j] >= price:
                d_at += q[j]
            if p[j] > price:
                d_above += q[j]
            if p[j] == price:
                m_bid += q[j]
        else:
            if p[j] <= price:
                s_at += q[j]
            if p[j] < price:
                s_below += q[j]
            if p[j] == price:
                m_ask += q[j]
    volume = min(d_at, s_at)
    # Marginal orders share their side's remainder by cumulative rounding in book order.
    rem_bid = volume - d_above
    rem_ask = volume - s_below
    cum_b = 0
    before_b = 0
    cum_a = 0
    before_a = 0
    for j in range(n):
        if q[j] <= 0:
            continue
        if s[j] == BUY:
            if p[j] > price:
                fills[j] = q[j]
            elif p[j] == price and m_bid > 0:
                cum_b += q[j]
                after = cum_b * rem_bid // m_bid
                fills[j] = after - before_b
                before_b = after
        else:
            if p[j] < price:
                fills[j] = q[j]
            elif p[j] == price and m_ask > 0:
                cum_a += q[j]
                after = cum_a * rem_ask // m_ask
                fills[j] = after - before_a
                before_a = after
    return price, volume


@numba.njit(cache=True, nogil=True)
def clear_rows(qty, limit, side, price_out, volume_out, fills):
    for i in range(qty.shape[0]):
        price, volume = clear_row(qty[i], limit[i], side[i], fills[i])
        price_out[i] = price
        volume_out[i] = volume


@numba.njit(cache=True, nogil=True)
def gate_rows(
    mcfg, sc, bat, mode, lead0, noise, stride, h, load_prof, pv_prof,
    slot, step, soc, cap, backlog, grid, last_load, last_pv, community_price, noise_offset,
    battery_kw, curtail, dr, use_rule,
    reference, dr_event, emergency, reduction, qty, limit, side,
):  # fmt: skip
    """Gate closure of every row: reference price, events, DR reduction and the rule's book.

    mcfg: band_low_bps, band_high_bps, markup, dr_loading, dr_voltage_pu, emergency_loading.
    The book is written only when `use_rule` (otherwise the caller supplies it).
    """
    n = load_prof.shape[1]
    dt = sc[0]
    share = sc[1] + sc[2]
    noise_size = noise.shape[0] - stride
    for i in range(slot.shape[0]):
        t = slot[i]
        ref = max(np.int64(np.rint(community_price[i] * _PRICE_UNITS_PER_KWH)), np.int64(1))
        reference[i] = ref
        dev = max(abs(grid[i, 0] - 1.0), abs(grid[i, 1] - 1.0))
        dr_event[i] = grid[i, 3] > mcfg[3] or dev > mcfg[4]
        emergency[i] = grid[i, 3] > mcfg[5]
        for k in range(n):
            reduction[i, k] = np.int64(np.rint(dr[i, k] * share * load_prof[t, k] * dt * 1000.0))
        if not use_rule:
            continue
        low = max(ref * np.int64(mcfg[0]) // 10_000, np.int64(1))
        high = ref * np.int64(mcfg[1]) // 10_000
        off = (noise_offset[i] + step[i] * stride) % noise_size
        for k in range(n):
            d = dr[i, k]
            load = forecast_value(load_prof[t, k], last_load[i, k], mode, lead0, noise[off + k * h])
            pv = forecast_value(pv_prof[t, k], last_pv[i, k], mode, lead0, noise[off + (n + k) * h])
            served = load * (1.0 - d * share) + (1.0 - d) * sc[3] * backlog[i, k] / dt
            # The battery set-point within what SoC allows, as the device model limits it.
            cp = cap[i, k] if cap[i, k] > 1e-12 else 1e-12
            max_ch = min(bat[1, k], (bat[5, k] - soc[i, k]) * cp / (bat[2, k] * dt))
            max_dis = min(bat[1, k], (soc[i, k] - bat[4, k]) * cp * bat[3, k] / dt)
            lo = -max_dis if max_dis > 0.0 else 0.0
            hi = max_ch if max_ch > 0.0 else 0.0
            pw = min(max(battery_kw[i, k], lo), hi)
            net = served - pv * (1.0 - curtail[i, k]) + pw
            qty[i, k] = np.int64(np.rint(abs(net) * dt * 1000.0))
            if net > 0.0:
                side[i, k] = BUY
                price = np.int64(np.rint(ref * (1.0 + mcfg[2])))
            else:
                side[i, k] = SELL
                price = np.int64(np.rint(ref * (1.0 - mcfg[2])))
            limit[i, k] = min(max(price, low), high)


@numba.njit(cache=True, nogil=True)
def settle_rows(
    rates, order, qty, limit, side, reference, metered, dr_event, reduction, emergency, credit,
    treasury, price, volume, fills, cash, fees, imbalance, unpaid, refused, rewards,
):  # fmt: skip
    """Mirror settlement of every row (see envs.ledger); `credit` and `treasury` change in place.

    rates: fee_bps, imbalance_penalty_bps, DR rate and renewable rate (reward units per Wh, on
    reduced and on metered exported energy, as RewardSystem grants them). `order`
    is the batch order (prosumers sorted by account address), which decides pro-rata rounding.
    Returns the index of the first row whose treasury could not pay the surpluses, or -1.
    """
    n = qty.shape[1]
    fee_bps = rates[0]
    penalty = rates[1]
    bq = np.empty(n, dtype=np.int64)
    bp = np.empty(n, dtype=np.int64)
    bs = np.empty(n, dtype=np.int64)
    bf = np.empty(n, dtype=np.int64)
    held = np.empty(n, dtype=np.int64)
    short_row = -1
    for i in range(qty.shape[0]):
        # Orders the contract would refuse never reach the batch: escrow beyond credit, or a
        # paused market.
        n_refused = 0
        for j in range(n):
            k = order[j]
            q = qty[i, k]
            ok = q > 0 and not emergency[i]
            if ok and side[i, k] == BUY and q * limit[i, k] > credit[i, k]:
                ok = False
            if q > 0 and not ok:
                n_refused += 1
            bq[j] = q if ok else 0
            bp[j] = limit[i, k]
            bs[j] = side[i, k]
            bf[j] = 0
        refused[i] = n_refused
        p, v = clear_row(bq, bp, bs, bf)
        price[i] = p
        volume[i] = v
        # settleSignedBatch: buyers pay at once, sellers' proceeds net of fee are held.
        fee_sum = 0
        for j in range(n):
            k = order[j]
            fills[i, k] = bf[j]
            value = bf[j] * p
            cash[i, k] = credit[i, k]  # the credit before the slot, for the change below
            if side[i, k] == BUY:
                credit[i, k] -= value
                held[k] = 0
                imbalance[i, k] = metered[i, k] - bf[j]
            else:
                fee = value * fee_bps // 10_000
                fee_sum += fee
                held[k] = value - fee
                imbalance[i, k] = metered[i, k] + bf[j]
        fees[i] = fee_sum
        treasury[i] += fee_sum
        # reconcileSlot: a shortfall pays the short price from credit + held proceeds as far as
        # they go (the rest is recorded unpaid); a surplus is paid the long price by the treasury.
        ref = reference[i]
        short_price = ref * (10_000 + penalty) // 10_000
        long_price = ref * (10_000 - penalty) // 10_000
        charged = 0
        paid = 0
        for k in range(n):
            imb = imbalance[i, k]
            charge = imb * short_price if imb > 0 else 0
            payout = -imb * long_price if imb < 0 else 0
            funds = credit[i, k] + held[k] + payout
            collected = min(charge, funds)
            credit[i, k] = funds - collected
            unpaid[i, k] = charge - collected
            charged += collected
            paid += payout
            cash[i, k] = credit[i, k] - cash[i, k]
            r = -metered[i, k] * rates[3] if metered[i, k] < 0 else 0
            if dr_event[i]:
                r += reduction[i, k] * rates[2]
            rewards[i, k] = r
        if treasury[i] + charged < paid and short_row < 0:
            short_row = i
        treasury[i] += charged - paid
    return short_row


@numba.njit(cache=True, nogil=True)
def summarise_rows(
    price, volume, fees, imbalance, refused, rewards, gas, txs, dr_event, emergency, out
):  # fmt: skip
    """The slot's market figures per row in `MARKET_INFO` order (currency, kWh, counts)."""
    for i in range(price.shape[0]):
        imb = 0
        rew = 0
        for k in range(imbalance.shape[1]):
            imb += abs(imbalance[i, k])
            rew += rewards[i, k]
        out[i, 0] = price[i] * (1000.0 / MONEY_UNITS)
        out[i, 1] = volume[i] / 1000.0
        out[i, 2] = fees[i] / MONEY_UNITS
        out[i, 3] = imb / 1000.0
        out[i, 4] = refused[i]
        out[i, 5] = rew / MONEY_UNITS
        out[i, 6] = gas[i]
        out[i, 7] = txs[i]
        out[i, 8] = 1.0 if dr_event[i] else 0.0
        out[i, 9] = 1.0 if emergency[i] else 0.0
