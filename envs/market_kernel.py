"""Compiled kernels of the market step: gate closure, clearing and mirror settlement.

The market runs every step of every grid, so it is compiled like the physics (`envs.kernel`):
numpy on arrays of 13 prosumers spends its time in call overhead, not arithmetic. Each kernel
loops over the batch rows; rows are independent. The rules are documented where they are used
(`envs.exchange`, `envs.ledger`, `contracts.clearing`); tests hold these kernels equal to
`contracts.clearing.clear_book` and `contracts.model.MarketModel`.

numba's on-disk cache (`cache=True`) stores the fused step with the code of every function it
calls from `envs.kernel` compiled in, but decides whether the cache is stale from this file
alone: a change to `envs.kernel` reaches the fused step only once this file changes too (or
`envs/__pycache__/*.nb[ci]` is removed). A stale cache of a change that kept the argument
layout computes the old code's (equal) results; one that changed the layout (the padded
power-flow arrays, say) can fail or read past an array.
"""

from __future__ import annotations

import numba
import numpy as np

from contracts.model import READING_HISTORY_SLOTS
from envs.claim import claim
from envs.kernel import block_scaling, forecast_value, observe_rows, step_rows, step_scratch
from envs.prefetch import prefetch

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
    # The sums below are written without branches on the book's contents (an order's side
    # and price are a coin toss to the branch predictor; clearing 1,024 books took ~0.55 ms,
    # ~8 % of a batched step), and a price that was a candidate already is not tried again
    # (the rule's books hold two prices, so most candidates repeat one): the same integers.
    for k in range(n):
        if q[k] <= 0:
            continue
        c = p[k]
        seen = False
        for j in range(k):
            seen |= q[j] > 0 and p[j] == c
        if seen:
            continue
        bid_at = 0
        bid_above = 0
        ask_at = 0
        ask_below = 0
        for j in range(n):
            qj = q[j] if q[j] > 0 else 0
            buy = s[j] == BUY
            qb = qj if buy else 0
            qs = 0 if buy else qj
            pj = p[j]
            bid_at += qb if pj >= c else 0
            bid_above += qb if pj > c else 0
            ask_at += qs if pj <= c else 0
            ask_below += qs if pj < c else 0
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
        qj = q[j] if q[j] > 0 else 0
        buy = s[j] == BUY
        qb = qj if buy else 0
        qs = 0 if buy else qj
        pj = p[j]
        d_at += qb if pj >= price else 0
        d_above += qb if pj > price else 0
        m_bid += qb if pj == price else 0
        s_at += qs if pj <= price else 0
        s_below += qs if pj < price else 0
        m_ask += qs if pj == price else 0
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
    reference, emergency, qty, limit, side,
):  # fmt: skip
    """Gate closure of every row: reference price, emergency mode and the rule's book.

    mcfg: band_low_bps, band_high_bps, markup, dr_loading, dr_voltage_pu, emergency_loading.
    The book is written only when `use_rule` (otherwise the caller supplies it). Demand
    response is not decided here: GridBalance announces an event two slots ahead, from the
    state the slot leaves (`announce_range`, after the physics).
    """
    gate_range(
        0, slot.shape[0], mcfg, sc, bat, mode, lead0, noise, stride, h, load_prof, pv_prof,
        slot, step, soc, cap, backlog, grid, last_load, last_pv, community_price, noise_offset,
        battery_kw, curtail, dr, use_rule, reference, emergency, qty, limit, side,
        np.empty((1, 3), dtype=np.int64), np.empty((1, 1), dtype=np.float64), False,
    )  # fmt: skip


@numba.njit(cache=True, nogil=True)
def gate_range(
    lo, hi, mcfg, sc, bat, mode, lead0, noise, stride, h, load_prof, pv_prof,
    slot, step, soc, cap, backlog, grid, last_load, last_pv, community_price, noise_offset,
    battery_kw, curtail, dr, use_rule,
    reference, emergency, qty, limit, side, fkey, fval, cached,
):  # fmt: skip
    """`gate_rows` for rows [lo, hi): the action and every output are indexed from `lo`.

    With `cached` (the fused step), a row whose `fkey` (slot, step, noise offset; by row) is
    its own takes its lead-0 load and PV forecasts from `fval` (by row: loads then PV), which
    the last fused step's observation of that row left there (`observe_rows` with `keep`):
    the same values, computed from the same slot, step and offset, without the 26 scattered
    noise and profile reads a row. In persistence mode the forecast is the state's own last
    reading, so the cache is not consulted.
    """
    n = load_prof.shape[1]
    dt = sc[0]
    share = sc[1] + sc[2]
    noise_size = noise.shape[0] - stride
    cached = cached and mode != 2
    for i in range(lo, hi):
        if use_rule and not cached and i + 1 < slot.shape[0]:
            # The next row's lead-0 noise (one line a block) and profile rows: see envs.prefetch.
            nxt = (noise_offset[i + 1] + step[i + 1] * stride) % noise_size
            for k in range(2 * n):
                prefetch(noise, nxt + k * h)
            for x in (slot[i + 1] * n, slot[i + 1] * n + n - 1):
                prefetch(load_prof, x)
                prefetch(pv_prof, x)
        r = i - lo
        t = slot[i]
        ref = max(np.int64(np.rint(community_price[i] * _PRICE_UNITS_PER_KWH)), np.int64(1))
        reference[r] = ref
        emergency[r] = grid_events(grid[i, 0], grid[i, 1], grid[i, 3], mcfg[3], mcfg[4], mcfg[5])[1]
        if not use_rule:
            continue
        low, high = price_band(ref, mcfg[0], mcfg[1])
        off = (noise_offset[i] + step[i] * stride) % noise_size
        hit = cached and fkey[i, 0] == t and fkey[i, 1] == step[i] and fkey[i, 2] == noise_offset[i]
        for k in range(n):
            if hit:
                load = fval[i, k]
                pv = fval[i, n + k]
            else:
                load = forecast_value(
                    load_prof[t, k], last_load[i, k], mode, lead0, noise[off + k * h]
                )  # fmt: skip
                pv = forecast_value(
                    pv_prof[t, k], last_pv[i, k], mode, lead0, noise[off + (n + k) * h]
                )  # fmt: skip
            q, p, sd = rule_order(
                load, pv, dr[r, k], curtail[r, k], backlog[i, k], soc[i, k], cap[i, k],
                battery_kw[r, k], bat[1, k], bat[2, k], bat[3, k], bat[4, k], bat[5, k], dt,
                share, sc[3], ref, mcfg[2], low, high,
            )  # fmt: skip
            qty[r, k] = q
            limit[r, k] = p
            side[r, k] = sd


@numba.njit(cache=True, nogil=True)
def grid_events(v_min, v_max, trafo_loading, dr_loading, dr_voltage_pu, emergency_loading):
    """(demand response, emergency) for a slot's grid state: transformer loading above
    `dr_loading` or a bus voltage further than `dr_voltage_pu` from 1 pu calls demand
    response; loading above `emergency_loading` is an emergency. One rule for the env's gate
    and the bridge's slot rows, so what the chain is told cannot differ between them."""
    deviation = max(abs(v_min - 1.0), abs(v_max - 1.0))
    dr = trafo_loading > dr_loading or deviation > dr_voltage_pu
    return dr, trafo_loading > emergency_loading


@numba.njit(cache=True, nogil=True)
def price_band(ref, low_bps, high_bps):  # fmt: skip
    """EnergyTrading's price band around the reference price: [low (>= 1), high], in money
    units per Wh, from the band's bps."""
    low = max(ref * np.int64(low_bps) // 10_000, np.int64(1))
    return low, ref * np.int64(high_bps) // 10_000


@numba.njit(cache=True, nogil=True)
def rule_order(
    load, pv, d, curtail, backlog, soc, cap, battery_kw, power, eff_ch, eff_dis, soc_min,
    soc_max, dt, share, rebound, ref, markup, low, high,
):  # fmt: skip
    """The default bidding rule for one prosumer: (quantity Wh, limit price, side).

    Its expected net position = forecast load (less demand response, plus the backlog's
    rebound) - forecast PV after curtailment + the battery set-point within what SoC allows;
    buyers bid the reference x (1 + markup), sellers ask x (1 - markup), inside [low, high].
    The env's gate (`gate_range`) and the bridge (`envs.market.rule_book`) both call it.
    """
    served = load * (1.0 - d * share) + (1.0 - d) * rebound * backlog / dt
    # The battery set-point within what SoC allows, as the device model limits it.
    cp = cap if cap > 1e-12 else 1e-12
    max_ch = min(power, (soc_max - soc) * cp / (eff_ch * dt))
    max_dis = min(power, (soc - soc_min) * cp * eff_dis / dt)
    lo_k = -max_dis if max_dis > 0.0 else 0.0
    hi_k = max_ch if max_ch > 0.0 else 0.0
    pw = min(max(battery_kw, lo_k), hi_k)
    net = served - pv * (1.0 - curtail) + pw
    qty = np.int64(np.rint(abs(net) * dt * 1000.0))
    if net > 0.0:
        side = BUY
        price = np.int64(np.rint(ref * (1.0 + markup)))
    else:
        side = SELL
        price = np.int64(np.rint(ref * (1.0 - markup)))
    return qty, min(max(price, low), high), np.int64(side)


@numba.njit(cache=True, nogil=True)
def rule_book_row(
    load, pv, dr, curtail, backlog, soc, cap, battery_kw, bat, dt, share, rebound, ref, markup,
    low_bps, high_bps, qty, limit, side,
):  # fmt: skip
    """`rule_order` for every prosumer of one grid, the band from the reference as at the gate."""
    low, high = price_band(ref, low_bps, high_bps)
    for k in range(load.shape[0]):
        qty[k], limit[k], side[k] = rule_order(
            load[k], pv[k], dr[k], curtail[k], backlog[k], soc[k], cap[k], battery_kw[k],
            bat[1, k], bat[2, k], bat[3, k], bat[4, k], bat[5, k], dt, share, rebound, ref,
            markup, low, high,
        )  # fmt: skip


#: `drq` (the mirror's GridBalance state, (B, DR_ROWS, n + 1) int64) rows: the event announced
#: for the coming slot and the one after it (baselines in Wh per prosumer, 0 for a prosumer
#: that does not take part, and in column n whether there is an event), then `DR_HELD` rows
#: from `DR_OWED` on, one per event already metered but not yet settled: what it owes each
#: prosumer and, in column n, 1 + the transactions since it was metered (0: no event). Each
#: event is held apart because one held too long by an emergency is forfeited alone
#: (`dr_settle_row`).
DR_NOW = 0
DR_NEXT = 1
DR_OWED = 2
#: Metered events held at most: a calm transaction settles every held event, and an event
#: covers a slot only if a calm transaction announced it two slots before, so the events held
#: are those of the last calm transaction's slot and the two after it.
DR_HELD = 3
DR_ROWS = DR_OWED + DR_HELD
#: An event metered by transaction e is settled by transaction u only while u - e is below
#: this (`contracts.slot_batch.settles`: DeviceRegistry keeps 32 slots of readings).
DR_SETTLE_SLOTS = READING_HISTORY_SLOTS
#: `dr_out` columns: an event covers the slot, events announced, events settled.
DR_OUT = 3


@numba.njit(cache=True, nogil=True)
def announce_range(
    lo, hi, mcfg, dt, mode, lead, noise, stride, grid, load_prof, pv_prof, slot, step,
    last_load, last_pv, noise_offset, announce, baseline,
):  # fmt: skip
    """What each row's slot transaction would announce, from the grid state the slot just left
    (`grid` after the physics; `slot` and `step` already advanced to the next slot): a
    demand-response event for the slot after the next one (GridBalance's events must start
    after the block's slot) when `grid_events` calls for demand response and not for an
    emergency (the next slot is one: no event is announced from an emergency state, so the live
    bridge, which announces one row later, right after declaring that emergency, announces the
    same events), with each prosumer's baseline its expected import of that slot (Wh, 0 for an
    expected exporter, who does not take part). No prosumer expected to import: no event
    (GridBalance refuses an empty list). Outputs are indexed from `lo`; that an emergency in
    force refuses it too is the ledger's to say.

    The expected import is what the operator knows when it announces: the forecast of that
    slot the next observation carries (its second lead, load less PV, by the scenario's
    forecast mode: `forecast_value` on the same noise-table entries `observe_rows` reads), not
    the profile's truth. It is the quantity the live bridge announces (`bridge.settlement`:
    the observation's forecast of slot n + 1), so a policy trained here is paid live what it
    was paid in training, whatever the forecast mode. `lead` is the per-lead error scale
    (`envs.forecast.lead_scale`); a one-step horizon forecasts the next slot itself (lead 0),
    as the bridge does.
    """
    n = load_prof.shape[1]
    h = lead.shape[0]
    q = 1 if h > 1 else 0
    scale = lead[q]
    last = load_prof.shape[0] - 1
    noise_size = noise.shape[0] - stride
    for i in range(lo, hi):
        r = i - lo
        t = min(slot[i] + q, last)
        off = (noise_offset[i] + step[i] * stride) % noise_size + q
        dr, emergency = grid_events(grid[i, 0], grid[i, 1], grid[i, 3], mcfg[3], mcfg[4], mcfg[5])
        anyone = False
        for k in range(n):
            load = forecast_value(load_prof[t, k], last_load[i, k], mode, scale, noise[off + k * h])
            pv = forecast_value(pv_prof[t, k], last_pv[i, k], mode, scale, noise[off + (n + k) * h])
            wh = np.int64(np.rint((load - pv) * dt * 1000.0))
            baseline[r, k] = wh if wh > 0 else 0
            anyone = anyone or wh > 0
        announce[r] = dr and not emergency and anyone


@numba.njit(cache=True, nogil=True)
def announce_forecast(lo, hi, mcfg, dt, grid, fc, announce, baseline):
    """`announce_range` for rows [lo, hi) from forecasts already made: `fc` as
    `observe_rows` keeps them (indexed from `lo`), whose columns [2 n, 3 n) and [3 n, 4 n) are
    the load and PV forecasts of the lead `announce_range` reads, the same values."""
    n = baseline.shape[1]
    for i in range(lo, hi):
        r = i - lo
        dr, emergency = grid_events(grid[i, 0], grid[i, 1], grid[i, 3], mcfg[3], mcfg[4], mcfg[5])
        anyone = False
        for k in range(n):
            wh = np.int64(np.rint((fc[r, 2 * n + k] - fc[r, 3 * n + k]) * dt * 1000.0))
            baseline[r, k] = wh if wh > 0 else 0
            anyone = anyone or wh > 0
        announce[r] = dr and not emergency and anyone


@numba.njit(cache=True, nogil=True)
def dr_settle_row(i, r, rate, metered, emergency, announce, baseline, drq, dr_out, dr_paid):
    """GridBalance's demand response in row `i`'s slot transaction (`r` indexes the slot's
    arrays), after the slot's readings: unless the slot is an emergency (GridBalance paused),
    settle every event whose slot is metered (`settleEvent`: each participant earns `rate` per
    Wh metered below its baseline) and announce the event `announce` asks for; the event that
    covered this slot is then metered, to be settled by a later transaction. An event no
    prosumer takes part in (every baseline 0) is not announced: GridBalance refuses an empty
    list. An event an emergency held for `DR_SETTLE_SLOTS` transactions is forfeited, unpaid:
    the registry no longer holds its slot's readings, so GridBalance could not settle it
    (`contracts.slot_batch.settles`, the rule the chain ledger and the bridge leave it out
    by). `dr_paid[r]` gets what the settlements paid, `dr_out[r]` (event covered the slot,
    announced, settled)."""
    n = metered.shape[1]
    calm = not emergency[r]
    settled = 0
    for k in range(n):
        dr_paid[r, k] = 0
    for j in range(DR_OWED, DR_OWED + DR_HELD):
        if drq[i, j, n] == 0:
            continue
        drq[i, j, n] += 1
        forfeit = drq[i, j, n] > DR_SETTLE_SLOTS
        if calm and not forfeit:
            settled += 1
            for k in range(n):
                dr_paid[r, k] += drq[i, j, k]
        if calm or forfeit:
            for k in range(n + 1):
                drq[i, j, k] = 0
    covered = drq[i, DR_NOW, n] != 0
    if covered:
        held = DR_OWED  # the first free row (there is one: see DR_HELD)
        while held < DR_ROWS - 1 and drq[i, held, n] != 0:
            held += 1
        for k in range(n):
            base = drq[i, DR_NOW, k]
            saved = base - metered[r, k]
            drq[i, held, k] = saved * rate if base > 0 and saved > 0 else 0
        drq[i, held, n] = 1
    created = False
    if calm and announce[r]:
        for k in range(n):
            created = created or baseline[r, k] > 0
    for k in range(n + 1):
        drq[i, DR_NOW, k] = drq[i, DR_NEXT, k]
    for k in range(n):
        drq[i, DR_NEXT, k] = baseline[r, k] if created else 0
    drq[i, DR_NEXT, n] = 1 if created else 0
    dr_out[r, 0] = 1 if covered else 0
    dr_out[r, 1] = 1 if created else 0
    dr_out[r, 2] = settled


@numba.njit(cache=True, nogil=True)
def settle_rows(
    rates, order, qty, limit, side, reference, metered, announce, baseline, emergency, credit,
    treasury, drq, price, volume, fills, cash, fees, imbalance, unpaid, refused, rewards,
    dr_out, dr_paid,
):  # fmt: skip
    """Mirror settlement of every row (see envs.ledger); `credit`, `treasury` and the demand-
    response state `drq` change in place.

    rates: fee_bps, imbalance_penalty_bps, DR incentive and renewable rate (reward units per
    Wh: below a DR baseline, as GridBalance pays it, and on metered exported energy, as
    RewardSystem grants it). `order` is the batch order (prosumers sorted by account address),
    which decides pro-rata rounding. `announce` and `baseline` are `announce_range`'s.
    Returns the index of the first row whose treasury could not pay the surpluses, or -1.
    """
    return settle_range(
        0, qty.shape[0], rates, order, qty, limit, side, reference, metered, announce,
        baseline, emergency, credit, treasury, drq, price, volume, fills, cash, fees, imbalance,
        unpaid, refused, rewards, dr_out, dr_paid, np.empty((5, qty.shape[1]), dtype=np.int64),
    )  # fmt: skip


@numba.njit(cache=True, nogil=True)
def settle_range(
    lo, hi, rates, order, qty, limit, side, reference, metered, announce, baseline, emergency,
    credit, treasury, drq, price, volume, fills, cash, fees, imbalance, unpaid, refused, rewards,
    dr_out, dr_paid, work,
):  # fmt: skip
    """`settle_rows` for rows [lo, hi): `credit`, `treasury` and `drq` are indexed by row,
    every other array from `lo`. `work` is a (5, n) int64 scratch, written before it is read
    in every row (one book's quantities, prices, sides, fills and held proceeds)."""
    n = qty.shape[1]
    fee_bps = rates[0]
    penalty = rates[1]
    bq = work[0]
    bp = work[1]
    bs = work[2]
    bf = work[3]
    held = work[4]
    short_row = -1
    for i in range(lo, hi):
        r = i - lo
        # Orders the contract would refuse never reach the batch: escrow beyond credit, or a
        # paused market.
        n_refused = 0
        for j in range(n):
            k = order[j]
            q = qty[r, k]
            ok = q > 0 and not emergency[r]
            if ok and side[r, k] == BUY and q * limit[r, k] > credit[i, k]:
                ok = False
            if q > 0 and not ok:
                n_refused += 1
            bq[j] = q if ok else 0
            bp[j] = limit[r, k]
            bs[j] = side[r, k]
            bf[j] = 0
        refused[r] = n_refused
        p, v = clear_row(bq, bp, bs, bf)
        price[r] = p
        volume[r] = v
        # settleSignedBatch: buyers pay at once, sellers' proceeds net of fee are held.
        fee_sum = 0
        for j in range(n):
            k = order[j]
            fills[r, k] = bf[j]
            value = bf[j] * p
            cash[r, k] = credit[i, k]  # the credit before the slot, for the change below
            if side[r, k] == BUY:
                credit[i, k] -= value
                held[k] = 0
                imbalance[r, k] = metered[r, k] - bf[j]
            else:
                fee = value * fee_bps // 10_000
                fee_sum += fee
                held[k] = value - fee
                imbalance[r, k] = metered[r, k] + bf[j]
        fees[r] = fee_sum
        treasury[i] += fee_sum
        # reconcileSlot: a shortfall pays the short price from credit + held proceeds as far as
        # they go (the rest is recorded unpaid); a surplus is paid the long price by the treasury.
        # Both from the worse, for the account, of the grid and clearing prices (when energy
        # traded): selling beyond one's metered export never pays (`imbalancePrices`).
        high = reference[r]
        low = high
        if v > 0:
            high = max(high, p)
            low = min(low, p)
        short_price = high * (10_000 + penalty) // 10_000
        long_price = low * (10_000 - penalty) // 10_000
        charged = 0
        paid = 0
        for k in range(n):
            imb = imbalance[r, k]
            charge = imb * short_price if imb > 0 else 0
            payout = -imb * long_price if imb < 0 else 0
            funds = credit[i, k] + held[k] + payout
            collected = min(charge, funds)
            credit[i, k] = funds - collected
            unpaid[r, k] = charge - collected
            charged += collected
            paid += payout
            cash[r, k] = credit[i, k] - cash[r, k]
            rewards[r, k] = -metered[r, k] * rates[3] if metered[r, k] < 0 else 0
        dr_settle_row(i, r, rates[2], metered, emergency, announce, baseline, drq, dr_out, dr_paid)
        for k in range(n):
            rewards[r, k] += dr_paid[r, k]
        if treasury[i] + charged < paid and short_row < 0:
            short_row = i
        treasury[i] += charged - paid
    return short_row


@numba.njit(cache=True, nogil=True)
def summarise_rows(
    price, volume, fees, imbalance, refused, rewards, gas, txs, dr_out, dr_paid, emergency, out
):  # fmt: skip
    """The slot's market figures per row in `MARKET_INFO` order (currency, kWh, counts)."""
    for i in range(price.shape[0]):
        imb = 0
        rew = 0
        paid = 0
        for k in range(imbalance.shape[1]):
            imb += abs(imbalance[i, k])
            rew += rewards[i, k]
            paid += dr_paid[i, k]
        out[i, 0] = price[i] * (1000.0 / MONEY_UNITS)
        out[i, 1] = volume[i] / 1000.0
        out[i, 2] = fees[i] / MONEY_UNITS
        out[i, 3] = imb / 1000.0
        out[i, 4] = refused[i]
        out[i, 5] = rew / MONEY_UNITS
        out[i, 6] = gas[i]
        out[i, 7] = txs[i]
        out[i, 8] = dr_out[i, 0]
        out[i, 9] = 1.0 if emergency[i] else 0.0
        out[i, 10] = dr_out[i, 1]
        out[i, 11] = dr_out[i, 2]
        out[i, 12] = paid / MONEY_UNITS


# ---- the fused step ------------------------------------------------------------------------
# The environments step through one compiled call: decode the action, close the gate (market
# on), advance the physics, meter and settle on the mirror ledger, add the step to the episode
# totals and encode the next observation. It runs the same range functions as the separate
# kernels above (which tests hold equal to the numpy references), chunk by chunk of rows, so it
# computes exactly what calling them in turn computes. Rows are independent: a large batch
# shares its chunks out to threads (`envs.engine`); a row's arithmetic does not depend on its
# chunk, so a batched row equals the single environment bit for bit.

#: Rows per chunk: the chunk's scratch stays in cache, and 1,024 rows give 32 chunks to share
#: (threads claim them inside the compiled code, `fused_chunks`, so a chunk costs no dispatch).
CHUNK_ROWS = 32


@numba.njit(cache=True, nogil=True)
def _pairwise_sum(x):
    """numpy's sum of a short contiguous row (8 partial sums below 128 entries), same rounding."""
    n = x.shape[0]
    if n < 8:
        res = 0.0
        for j in range(n):
            res += x[j]
        return res
    # Eight scalars, not an 8-entry array: this runs once a row and an array was a heap
    # allocation each time. The same additions in the same order.
    r0, r1, r2, r3, r4, r5, r6, r7 = x[0], x[1], x[2], x[3], x[4], x[5], x[6], x[7]
    j = 8
    while j < n - (n % 8):
        r0 += x[j]
        r1 += x[j + 1]
        r2 += x[j + 2]
        r3 += x[j + 3]
        r4 += x[j + 4]
        r5 += x[j + 5]
        r6 += x[j + 6]
        r7 += x[j + 7]
        j += 8
    res = ((r0 + r1) + (r2 + r3)) + ((r4 + r5) + (r6 + r7))
    while j < n:
        res += x[j]
        j += 1
    return res


@numba.njit(cache=True, nogil=True)
def decode_range(
    lo, hi, actions, power, signal_range, n_b, n_p, bkw, curt, drs, mult, clip, work
):  # fmt: skip
    """`Codec.decode_action` for rows [lo, hi): the decoded parts are indexed from `lo`, the
    actions and `clip` (components clipped, summed clip distance) by row. `work` is a
    (2, action dim) float64 scratch, written before it is read in every row."""
    n_a = actions.shape[1]
    clipped = work[0]
    diff = work[1]
    for i in range(lo, hi):
        r = i - lo
        n_clipped = 0
        for j in range(n_a):
            x = np.float64(actions[i, j])
            c = min(max(x, -1.0), 1.0)
            clipped[j] = c
            diff[j] = abs(x - c)
            if diff[j] > 0.0:
                n_clipped += 1
        clip[i, 0] = n_clipped
        clip[i, 1] = _pairwise_sum(diff)
        for k in range(n_b):
            bkw[r, k] = clipped[k] * power[k]
        for k in range(n_p):
            curt[r, k] = max(clipped[n_b + k], 0.0)
            drs[r, k] = max(clipped[n_b + n_p + k], 0.0)
        mult[r] = signal_range ** clipped[n_a - 1]


@numba.njit(cache=True, nogil=True)
def fused_chunk(
    lo, hi, sc, bat, base_mva, zt_re, zt_im, w_re, w_im, y_re, y_im, y_out_ref, v_ref, i_scale,
    sizes,
    v_lim, lead, lead0, mode, noise, stride, n_days, power, signal_range, starts, scaling,
    bscale, uniform,
    load, kvar, pv, bg_s, bg_load, bg_pv, bg_sto, bg_load_pv, prosumer_pq, battery_pq,
    import_price, tod,
    slot, step, soc, cap, backlog, v_pq, grid, last_load, last_pv, last_net, community_price,
    noise_offset,
    market, mcfg, rates, order, credit, treasury, tokens, drq, ksum, peak, steps, msum, priced,
    fkey, fval, actions, out, mout, obs, clip, short, work,
):  # fmt: skip
    """Rows [lo, hi) of `fused_step` (arguments as there), actions assumed finite; `work` is
    `chunk_work` for at least `hi - lo` rows.

    Rows are independent and a row's arithmetic does not depend on `lo` or `hi`, so any split
    of the batch into chunks, on any threads, gives the one-call result bit for bit. Nothing in
    `work` is read before this chunk wrote it, so one `work` serves every chunk of a thread.
    """
    n_b = bat.shape[1]
    n_p = load.shape[1]
    dt = sc[0]
    (
        bkw, curt, drs, mult, reference, emerg, books, price, volume, fees, refused, announce,
        dr_out, dwork, swork, owork, pwork, fc,
    ) = work  # fmt: skip
    decode_range(
        lo, hi, actions, power, signal_range, n_b, n_p, bkw, curt, drs, mult, clip, dwork
    )  # fmt: skip
    if market:
        qty, limit, side = books[1], books[2], books[3]
        gate_range(
            lo, hi, mcfg, sc, bat, mode, lead0, noise, stride, sizes[2], load, pv, slot, step,
            soc, cap, backlog, grid, last_load, last_pv, community_price, noise_offset, bkw,
            curt, drs, True, reference, emerg, qty, limit, side, fkey, fval, True,
        )  # fmt: skip
    step_rows(
        lo, hi, sc, bat, zt_re, zt_im, w_re, w_im, y_re, y_im, y_out_ref, v_ref, i_scale,
        sizes, v_lim, base_mva, load, kvar, pv, bg_s, bg_load, bg_pv, bg_sto, prosumer_pq,
        battery_pq, import_price, tod, slot, step, soc, cap, backlog, v_pq, grid, last_load,
        last_pv, last_net, community_price, bkw, curt, drs, mult, out, pwork,
    )  # fmt: skip
    for i in range(lo, hi):
        for j in range(out.shape[1]):
            ksum[i, j] += out[i, j]
        peak[i] = max(peak[i], out[i, 6])
        steps[i] += 1.0
    # The observation before the settlement (neither reads what the other writes): with the
    # market it keeps its lead-0 and lead-1 forecasts in `fc`, for the announcement below and,
    # through `fkey`/`fval`, for the next step's gate.
    observe_rows(
        lo, hi, sizes, lead, mode, noise, stride, sc, load, pv, bg_load_pv, import_price,
        bat[0], n_days, slot, step, soc, cap, backlog, grid, last_load, last_pv,
        community_price, noise_offset, starts, scaling, bscale, uniform, obs, owork, fc, market,
    )  # fmt: skip
    if market:
        n2 = 2 * n_p
        for i in range(lo, hi):
            fkey[i, 0] = slot[i]
            fkey[i, 1] = step[i]
            fkey[i, 2] = noise_offset[i]
            for k in range(n2):
                fval[i, k] = fc[i - lo, k]
        baseline, metered, fills, cash, imbalance, unpaid, rewards, paid = (
            books[0],
            books[4],
            books[5],
            books[6],
            books[7],
            books[8],
            books[9],
            books[10],
        )
        for i in range(lo, hi):
            for k in range(n_p):
                metered[i - lo, k] = np.int64(np.rint(last_net[i, k] * dt * 1000.0))
        announce_forecast(lo, hi, mcfg, dt, grid, fc, announce, baseline)
        first_short = settle_range(
            lo, hi, rates, order, qty, limit, side, reference, metered, announce, baseline,
            emerg, credit, treasury, drq, price, volume, fills, cash, fees, imbalance, unpaid,
            refused, rewards, dr_out, paid, swork,
        )  # fmt: skip
        if first_short >= 0:
            short[first_short] = True
        for i in range(lo, hi):
            r = i - lo
            for k in range(n_p):
                tokens[i, k] += rewards[r, k]
            imb = 0
            rew = 0
            dr_paid = 0
            for k in range(n_p):
                imb += abs(imbalance[r, k])
                rew += rewards[r, k]
                dr_paid += paid[r, k]
            o = mout[i]
            o[0] = price[r] * (1000.0 / MONEY_UNITS)
            o[1] = volume[r] / 1000.0
            o[2] = fees[r] / MONEY_UNITS
            o[3] = imb / 1000.0
            o[4] = refused[r]
            o[5] = rew / MONEY_UNITS
            o[6] = 0.0
            o[7] = 0.0
            o[8] = dr_out[r, 0]
            o[9] = 1.0 if emerg[r] else 0.0
            o[10] = dr_out[r, 1]
            o[11] = dr_out[r, 2]
            o[12] = dr_paid / MONEY_UNITS
            for j in range(o.shape[0]):
                msum[i, j] += o[j]
            priced[i] += o[0] * o[1]


@numba.njit(cache=True, nogil=True)
def chunk_work(m, n_b, n_p, n_a, n_pq, n_out, h):
    """The scratch `fused_chunk` works in, for chunks of up to `m` rows: the decoded action,
    the gate's reference prices, emergencies and books, the clearing's figures, the
    demand-response announcements, the row functions' own scratch and the forecasts the
    observation keeps. A thread allocates it once per step and reuses it chunk after chunk
    (~25 allocations a chunk before, ~800 a step of 1,024 rows). `n_pq` and `n_out` are the
    padded bus and branch-end sizes (`CompiledParams.w_re`, `y_re` columns).
    """
    return (
        np.empty((m, n_b), dtype=np.float64),
        np.empty((m, n_p), dtype=np.float64),
        np.empty((m, n_p), dtype=np.float64),
        np.empty(m, dtype=np.float64),
        np.empty(m, dtype=np.int64),
        np.empty(m, dtype=np.bool_),
        np.empty((11, m, n_p), dtype=np.int64),
        np.empty(m, dtype=np.int64),
        np.empty(m, dtype=np.int64),
        np.empty(m, dtype=np.int64),
        np.empty(m, dtype=np.int64),
        np.empty(m, dtype=np.bool_),
        np.empty((m, DR_OUT), dtype=np.int64),
        np.empty((2, n_a), dtype=np.float64),
        np.empty((5, n_p), dtype=np.int64),
        np.empty((3, h), dtype=np.float64),
        step_scratch(n_pq, n_out, n_b),
        np.empty((m, 4 * n_p), dtype=np.float64),
    )


@numba.njit(cache=True, nogil=True)
def all_finite(actions):
    """Whether every action is finite: x - x is 0 for finite x and NaN for inf or NaN. One
    branch-free pass (vectorised) rather than a test per entry: it runs before the threads
    share the step, so its time is not shared."""
    bad = False
    for i in range(actions.shape[0]):
        row = actions[i]
        for j in range(row.shape[0]):
            x = row[j]
            bad |= (x - x) != 0.0
    return not bad


@numba.njit(cache=True, nogil=True)
def fused_chunks(
    counter, sc, bat, base_mva, zt_re, zt_im, w_re, w_im, y_re, y_im, y_out_ref, v_ref, i_scale,
    sizes,
    v_lim, lead, lead0, mode, noise, stride, n_days, power, signal_range, starts, scaling,
    load, kvar, pv, bg_s, bg_load, bg_pv, bg_sto, bg_load_pv, prosumer_pq, battery_pq,
    import_price, tod,
    slot, step, soc, cap, backlog, v_pq, grid, last_load, last_pv, last_net, community_price,
    noise_offset,
    market, mcfg, rates, order, credit, treasury, tokens, drq, ksum, peak, steps, msum, priced,
    fkey, fval, actions, out, mout, obs, clip, short,
):  # fmt: skip
    """`fused_chunk` over chunks of `CHUNK_ROWS` rows claimed one at a time from `counter[0]`
    until none are left; `counter[1]` counts the chunks finished (by every caller). Every
    thread of a threaded step calls this once with the same arguments: the chunks are taken
    first come, first served, with no dispatch per chunk. Actions assumed finite."""
    b = actions.shape[0]
    n_chunks = (b + CHUNK_ROWS - 1) // CHUNK_ROWS
    bscale, uniform = block_scaling(starts, scaling, load.shape[1], sizes[2])
    work = chunk_work(
        CHUNK_ROWS, bat.shape[1], load.shape[1], actions.shape[1], w_re.shape[0], y_re.shape[1],
        sizes[2],
    )  # fmt: skip
    while True:
        c = claim(counter, 0)
        if c >= n_chunks:
            return
        fused_chunk(
            c * CHUNK_ROWS, min(b, (c + 1) * CHUNK_ROWS),
            sc, bat, base_mva, zt_re, zt_im, w_re, w_im, y_re, y_im, y_out_ref, v_ref, i_scale,
            sizes,
            v_lim, lead, lead0, mode, noise, stride, n_days, power, signal_range, starts, scaling,
            bscale, uniform,
            load, kvar, pv, bg_s, bg_load, bg_pv, bg_sto, bg_load_pv, prosumer_pq, battery_pq,
            import_price, tod,
            slot, step, soc, cap, backlog, v_pq, grid, last_load, last_pv, last_net,
            community_price, noise_offset,
            market, mcfg, rates, order, credit, treasury, tokens, drq, ksum, peak, steps, msum,
            priced, fkey, fval, actions, out, mout, obs, clip, short, work,
        )  # fmt: skip
        claim(counter, 1)


@numba.njit(cache=True, nogil=True)
def fused_step(
    sc, bat, base_mva, zt_re, zt_im, w_re, w_im, y_re, y_im, y_out_ref, v_ref, i_scale, sizes,
    v_lim, lead, lead0, mode, noise, stride, n_days, power, signal_range, starts, scaling,
    load, kvar, pv, bg_s, bg_load, bg_pv, bg_sto, bg_load_pv, prosumer_pq, battery_pq,
    import_price, tod,
    slot, step, soc, cap, backlog, v_pq, grid, last_load, last_pv, last_net, community_price,
    noise_offset,
    market, mcfg, rates, order, credit, treasury, tokens, drq, ksum, peak, steps, msum, priced,
    fkey, fval, actions, out, mout, obs, clip, short,
):  # fmt: skip
    """One step of every row, on one core. Returns False, having changed nothing, when an
    action is not finite.

    Parameters: the compiled params, profiles and state `Engine.step_fused` passes; `market`
    (bool) with the mirror ledger's arrays (`credit`, `treasury`, reward `tokens` and the
    demand-response state `drq` change in place); the episode totals (`ksum`, `peak`, `steps`,
    `msum`, `priced`, in place); the actions, and outputs `out` (outcome matrix), `mout`
    (market matrix), `obs`, `clip` and `short` (the treasury could not pay the row's surpluses).
    """
    if not all_finite(actions):
        return False
    bscale, uniform = block_scaling(starts, scaling, load.shape[1], sizes[2])
    b = actions.shape[0]
    work = chunk_work(
        b, bat.shape[1], load.shape[1], actions.shape[1], w_re.shape[0], y_re.shape[1], sizes[2]
    )  # fmt: skip
    fused_chunk(
        0, b,
        sc, bat, base_mva, zt_re, zt_im, w_re, w_im, y_re, y_im, y_out_ref, v_ref, i_scale, sizes,
        v_lim, lead, lead0, mode, noise, stride, n_days, power, signal_range, starts, scaling,
        bscale, uniform,
        load, kvar, pv, bg_s, bg_load, bg_pv, bg_sto, bg_load_pv, prosumer_pq, battery_pq,
        import_price, tod,
        slot, step, soc, cap, backlog, v_pq, grid, last_load, last_pv, last_net, community_price,
        noise_offset,
        market, mcfg, rates, order, credit, treasury, tokens, drq, ksum, peak, steps, msum, priced,
        fkey, fval, actions, out, mout, obs, clip, short, work,
    )  # fmt: skip
    return True
