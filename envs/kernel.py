"""The compiled fast path: one numba kernel per step and one per observation, for any batch.

`envs.dynamics` states the model in readable, vectorised numpy and is the reference (it also
accepts any power-flow solver, e.g. pandapower's for benchmarks). Calling ~100 numpy functions
on arrays of a dozen entries costs ~1 ms of interpreter overhead per step, though, so the
environments run this kernel instead: the same equations as explicit loops compiled by numba,
~20 µs for a single grid and linear in the batch. `tests/envs/test_kernel.py` holds the two
equal to 1e-9 on random actions, so the reference stays the specification.

The power flow here is the Z-bus fixed point of `envs.powerflow` without the Newton-Raphson
fallback: a row whose fixed point does not settle is reported as diverged and the environment
truncates it with a bounded penalty.
"""

from __future__ import annotations

import math
from typing import Any

import numba
import numpy as np

from envs.dynamics import GridState, StepOutcome
from envs.forecast import NOISE_TABLE_SIZE, lead_scale, noise_table
from envs.kpis import OUTCOME_FIELDS
from envs.params import FloatArray, GridParams
from envs.powerflow import STEP_TOLERANCE_PU
from envs.prefetch import prefetch
from envs.pricing import DEMAND_FACTOR_FLOOR

_COL = {name: i for i, name in enumerate(OUTCOME_FIELDS)}
MAX_ITER = 60

# Scalar parameters packed into one float array (numba dispatch cost grows with argument count).
_SCALARS = (
    "dt_h",
    "curtailable_share",
    "shiftable_share",
    "rebound_per_step",
    "discomfort_cost_per_kwh",
    "unserved_penalty_per_kwh",
    "feed_in_price",
    "base_rate",
    "stress_threshold",
    "demand_reference_kw",
    "w_cost",
    "w_voltage",
    "w_thermal",
    "w_degradation",
    "w_discomfort",
    "divergence_penalty",
    "episode_steps",
    "steps_per_day",
)


#: Entries of one SIMD register (AVX-512: 8 float64), which the padded axes are a multiple of.
PAD = 8


def _padded(a: np.ndarray, fill: float = 0.0) -> np.ndarray:
    """`a` with its last axis padded with `fill` to a multiple of `PAD`, C-contiguous.

    The power flow's inner loops run over a bus or branch-end axis of a dozen or two entries.
    LLVM vectorises them 8 float64 at a time and does the rest one by one: 14 buses were one
    vector step and 6 scalar ones, at every bus of every fixed-point iteration. Over the padded
    axis the loops are whole vector steps; a padded lane computes a value nothing reads (the
    fixed point's stay at v = 1, w being padded with 1), and each real lane runs the same
    operations in the same order as before, so every result is bit for bit the same.
    """
    n = a.shape[-1]
    out = np.full((*a.shape[:-1], -(-n // PAD) * PAD), fill, dtype=a.dtype)
    out[..., :n] = a
    return out


class CompiledParams:
    """GridParams re-packed into the flat arrays the kernels take (built once per env)."""

    def __init__(self, p: GridParams) -> None:
        n = p.network
        bat = p.batteries
        self.scalars = np.array([float(getattr(p, k)) for k in _SCALARS], dtype=np.float64)
        self.battery = np.ascontiguousarray(
            np.stack(
                [
                    bat.capacity_kwh,
                    bat.power_kw,
                    bat.efficiency_charge,
                    bat.efficiency_discharge,
                    bat.soc_min,
                    bat.soc_max,
                    bat.fade_per_full_cycle,
                    bat.replacement_cost_per_kwh,
                ]
            )
        )
        # zt[q, j] = z[j, q]: the kernel walks rows of zt, contiguous in memory. The bus axis
        # of zt and w, and the branch-end axis of the y rows, are padded with zeros to whole
        # vectors (`_padded`): see `step_rows`.
        self.zt_re = _padded(n.z_pq.T.real)
        self.zt_im = _padded(n.z_pq.T.imag)
        self.w_re = _padded(n.w_pq.real, 1.0)
        self.w_im = _padded(n.w_pq.imag)
        # Rows of y_out_t that multiply pq and ref voltages, so the kernel never builds V_full.
        self.y_re = _padded(n.y_out_t[n.pq].real)
        self.y_im = _padded(n.y_out_t[n.pq].imag)
        self.y_out_ref = _padded(n.y_out_t[n.ref])
        self.v_ref = np.ascontiguousarray(n.v_ref)
        self.i_scale = np.ascontiguousarray(n.i_scale)
        self.sizes = np.array([n.n_line, n.n_trafo, p.horizon], dtype=np.int64)
        self.v_lim = np.ascontiguousarray(np.stack([n.v_min_pu, n.v_max_pu]))
        self.base_mva = n.base_mva
        self.lead_scale = lead_scale(p.horizon, p.forecast_noise_std)
        self.forecast_mode = {"perfect": 0, "noisy": 1, "persistence": 2}[p.forecast_mode]
        self.stride = (2 * p.n_prosumer + 2) * p.horizon
        table = noise_table()
        self.noise = np.concatenate([table, table[: self.stride]])


def step_kernel(
    c: CompiledParams, p: GridParams, s: GridState, battery_kw: FloatArray,
    curtail: FloatArray, dr: FloatArray, price_mult: FloatArray,
) -> tuple[FloatArray, np.ndarray]:  # fmt: skip
    """Advance `s` in place by one slot; returns (outcome matrix, diverged mask)."""
    b = s.slot.shape[0]
    out = np.empty((b, len(OUTCOME_FIELDS)), dtype=np.float64)
    _step_batch(
        c.scalars, c.battery, c.zt_re, c.zt_im, c.w_re, c.w_im, c.y_re, c.y_im, c.y_out_ref,
        c.v_ref, c.i_scale, c.sizes, c.v_lim, c.base_mva,
        p.prosumer_load_kw, p.prosumer_load_kvar, p.prosumer_pv_kw, p.background_s_pu,
        p.background_load_kw, p.background_pv_kw, p.background_storage_kw,
        p.prosumer_pq, p.battery_pq, p.import_price, p.tod_multiplier,
        s.slot, s.step, s.soc, s.capacity_kwh, s.backlog_kwh, s.v_pq, s.grid,
        s.last_load_kw, s.last_pv_kw, s.last_net_kw, s.community_price,
        battery_kw, curtail, dr, price_mult, out,
    )  # fmt: skip
    return out, out[:, _COL["diverged"]] > 0.5


def outcome_from_matrix(out: FloatArray) -> StepOutcome:
    """View the kernel's outcome matrix as a StepOutcome (columns, no copies)."""
    cols: dict[str, Any] = {name: out[:, i] for i, name in enumerate(OUTCOME_FIELDS)}
    cols["truncated"] = cols["truncated"] > 0.5
    cols["diverged"] = cols["diverged"] > 0.5
    return StepOutcome(**cols)


@numba.njit(cache=True, nogil=True)
def _step_batch(
    sc, bat, zt_re, zt_im, w_re, w_im, y_re, y_im, y_out_ref, v_ref, i_scale, sizes, v_lim,
    base_mva, load_prof, kvar_prof, pv_prof, bg_s, bg_load_prof, bg_pv_prof, bg_sto_prof,
    prosumer_pq, battery_pq, import_price, tod,
    slot, step, soc, cap, backlog, v_pq, grid, last_load, last_pv, last_net, community_price,
    battery_kw, curtail, dr, price_mult, out,
):  # fmt: skip
    step_rows(
        0, slot.shape[0], sc, bat, zt_re, zt_im, w_re, w_im, y_re, y_im, y_out_ref, v_ref,
        i_scale, sizes, v_lim, base_mva, load_prof, kvar_prof, pv_prof, bg_s, bg_load_prof,
        bg_pv_prof, bg_sto_prof, prosumer_pq, battery_pq, import_price, tod, slot, step, soc,
        cap, backlog, v_pq, grid, last_load, last_pv, last_net, community_price, battery_kw,
        curtail, dr, price_mult, out, step_scratch(w_re.shape[0], y_re.shape[1], bat.shape[1]),
    )  # fmt: skip


@numba.njit(cache=True, nogil=True)
def step_scratch(n_pq, m, n_b):
    """`step_rows`' scratch for one row, reused row after row: the pq injections and voltages
    (complex), the slack voltages' share of the branch currents (complex, written once a call)
    and eight float rows for the fixed point and the
    currents split into real and imaginary parts (two of them hold the batteries' set-points
    and fades before the fixed point). `n_pq` and `m` are the padded sizes
    (`CompiledParams.w_re`, `y_re` columns), `n_b` the batteries. A caller that steps many
    chunks (a thread of the fused step) allocates it once for all of them."""
    return (
        np.empty((2, n_pq), dtype=np.complex128),
        np.empty(m, dtype=np.complex128),
        np.empty((8, max(n_pq, m, n_b)), dtype=np.float64),
    )


#: Relative margins inside which two squared magnitudes are taken as possibly equal (their
#: rounding error is ~1e-16): outside them, the order of the squares is the order of the
#: magnitudes themselves.
_NEAR_ABOVE = 1.0 + 1e-6
_NEAR_BELOW = 1.0 - 1e-6


@numba.njit(cache=True, nogil=True, inline="always")
def _end_loading(o_re, o_im, i_scale, a, b):
    """max(|I_a| s_a, |I_b| s_b), a branch's loading from its two ends, with one hypot where
    the squares tell the ends apart (a libm call each; ~40 a row were a fifth of the physics).
    Exactly the value of taking both magnitudes: near a tie (or NaN) it does take both."""
    sa = i_scale[a]
    sb = i_scale[b]
    ua = (o_re[a] * o_re[a] + o_im[a] * o_im[a]) * (sa * sa)
    ub = (o_re[b] * o_re[b] + o_im[b] * o_im[b]) * (sb * sb)
    if ua > ub * _NEAR_ABOVE:
        return math.hypot(o_re[a], o_im[a]) * sa
    if ub > ua * _NEAR_ABOVE:
        return math.hypot(o_re[b], o_im[b]) * sb
    return max(math.hypot(o_re[a], o_im[a]) * sa, math.hypot(o_re[b], o_im[b]) * sb)


@numba.njit(cache=True, nogil=True, error_model="numpy")
def step_rows(
    lo, hi, sc, bat, zt_re, zt_im, w_re, w_im, y_re, y_im, y_out_ref, v_ref, i_scale, sizes,
    v_lim, base_mva, load_prof, kvar_prof, pv_prof, bg_s, bg_load_prof, bg_pv_prof,
    bg_sto_prof, prosumer_pq, battery_pq, import_price, tod,
    slot, step, soc, cap, backlog, v_pq, grid, last_load, last_pv, last_net, community_price,
    battery_kw, curtail, dr, price_mult, out, work,
):  # fmt: skip
    """Advance rows [lo, hi) of the state by one slot.

    The decoded action (`battery_kw`, `curtail`, `dr`, `price_mult`) is indexed from `lo`
    (row i at i - lo), so a caller can decode one chunk of rows at a time; the state and
    `out` are indexed by row. `work` is `step_scratch(n_pq, m, n_b)`: every entry is written before
    it is read within a row, so its contents never reach a result.
    """
    dt = sc[0]
    n_b = bat.shape[1]
    n_p = load_prof.shape[1]
    n_pq = v_pq.shape[1]
    # The padded bus and branch-end axes (`CompiledParams`): whole vectors for the mat-vecs.
    n_pqp = w_re.shape[0]
    mp = y_re.shape[1]
    n_line = sizes[0]
    n_trafo = sizes[1]
    n_br = i_scale.shape[0]
    base_kw = base_mva * 1000.0
    episode_steps = int(sc[16])
    spd = int(sc[17])
    # One row's scratch, reused: rows are independent and this stays in cache.
    scratch, i_ref, rs = work
    # The slack voltages' share of every branch-end current: the same for every row, so
    # computed once a call (the same operations the rows made each).
    for col in range(mp):
        acc = 0.0j
        for j in range(v_ref.shape[0]):
            acc += v_ref[j] * y_out_ref[j, col]
        i_ref[col] = acc
    n_bs = bg_s.shape[1] * 2  # float64 per complex row
    for i in range(lo, hi):
        if i + 1 < slot.shape[0]:
            # The next row's profile rows, a row ahead (see envs.prefetch).
            t1 = slot[i + 1]
            for x in (t1 * n_p, t1 * n_p + n_p - 1):  # a row may straddle two lines
                prefetch(load_prof, x)
                prefetch(kvar_prof, x)
                prefetch(pv_prof, x)
            for x in range(0, n_bs, 8):
                prefetch(bg_s, t1 * (n_bs // 2) + x // 2)
        r = i - lo
        s_pq = scratch[0]
        v = scratch[1]
        t = slot[i]
        # Demand response, PV and the prosumers' injections.
        for j in range(n_pq):
            s_pq[j] = bg_s[t, j]
        served_sum = 0.0
        pv_sum = 0.0
        pv_cut = 0.0
        curt_sum = 0.0
        backlog_sum = 0.0
        for k in range(n_p):
            load = load_prof[t, k]
            d = dr[r, k]
            curtailed = d * sc[1] * load
            deferred = d * sc[2] * load
            rebound = (1.0 - d) * sc[3] * backlog[i, k] / dt
            served = load - curtailed - deferred + rebound
            backlog[i, k] = backlog[i, k] + (deferred - rebound) * dt
            backlog_sum += backlog[i, k]
            q_ratio = served / load if load > 0.0 else 1.0
            pv = pv_prof[t, k] * (1.0 - curtail[r, k])
            pv_cut += pv_prof[t, k] - pv
            served_sum += served
            pv_sum += pv
            curt_sum += curtailed
            s_pq[prosumer_pq[k]] += complex(pv - served, -kvar_prof[t, k] * q_ratio) / base_kw
            last_load[i, k] = load
            last_pv[i, k] = pv_prof[t, k]
            last_net[i, k] = served - pv
        # Batteries: first every battery's set-point within its limits, its SoC and its fade,
        # elementwise (LLVM vectorises the divisions), then the sums and the injections battery
        # by battery, in the same order as ever: the same operations, the same results.
        bpw = rs[6]
        bfade = rs[7]
        for k in range(n_b):
            c0 = cap[i, k]
            cp = c0 if c0 > 1e-12 else 1e-12
            eta_c = bat[2, k]
            eta_d = bat[3, k]
            max_ch = min(bat[1, k], (bat[5, k] - soc[i, k]) * cp / (eta_c * dt))
            max_dis = min(bat[1, k], (soc[i, k] - bat[4, k]) * cp * eta_d / dt)
            lo_k = -max_dis if max_dis > 0.0 else 0.0
            hi_k = max_ch if max_ch > 0.0 else 0.0
            pw = min(max(battery_kw[r, k], lo_k), hi_k)
            cell = (pw * eta_c if pw > 0.0 else pw / eta_d) * dt
            new_soc = soc[i, k] + cell / cp
            soc[i, k] = min(max(new_soc, bat[4, k]), bat[5, k]) if c0 > 0.0 else soc[i, k]
            nominal = bat[0, k]
            fade = bat[6, k] * abs(cell) / max(2.0 * nominal, 1e-12) * nominal
            cap[i, k] = max(c0 - fade, 0.0)
            bpw[k] = pw
            bfade[k] = fade
        charge = 0.0
        discharge = 0.0
        fade_sum = 0.0
        deg_cost = 0.0
        limited = 0.0
        for k in range(n_b):
            pw = bpw[k]
            fade = bfade[k]
            limited += abs(battery_kw[r, k] - pw)
            fade_sum += fade
            deg_cost += fade * bat[7, k]
            if pw > 0.0:
                charge += pw
            else:
                discharge -= pw
            s_pq[battery_pq[k]] -= pw / base_kw
            if k < n_p:
                last_net[i, k] += pw
        bg_sto = bg_sto_prof[t]
        if bg_sto > 0.0:
            charge += bg_sto
        else:
            discharge -= bg_sto
        # Z-bus fixed point, warm-started from the last solution. Real and imaginary parts are kept
        # apart and the mat-vec is written as axpy over contiguous rows so LLVM vectorises it.
        sr = rs[0]
        si = rs[1]
        vr = rs[2]
        vi = rs[3]
        nr = rs[4]
        ni = rs[5]
        # conj(s / v) of every bus, then the mat-vec: the divisions of all buses in one
        # vectorised pass. Padded lanes carry s = 0 at v = 1 (a zero, never a division by 0).
        ca = rs[6]
        cb = rs[7]
        for j in range(n_pq):
            sr[j] = s_pq[j].real
            si[j] = s_pq[j].imag
            vr[j] = v_pq[i, j].real
            vi[j] = v_pq[i, j].imag
        for j in range(n_pq, n_pqp):
            sr[j] = 0.0
            si[j] = 0.0
            vr[j] = 1.0
            vi[j] = 0.0
        ok = False
        tol2 = STEP_TOLERANCE_PU * STEP_TOLERANCE_PU
        for _ in range(MAX_ITER):
            for q in range(n_pqp):
                d = vr[q] * vr[q] + vi[q] * vi[q]
                ca[q] = (sr[q] * vr[q] + si[q] * vi[q]) / d
                cb[q] = (sr[q] * vi[q] - si[q] * vr[q]) / d
            for j in range(n_pqp):
                nr[j] = w_re[j]
                ni[j] = w_im[j]
            for q in range(n_pq):
                a = ca[q]
                b = cb[q]
                for j in range(n_pqp):
                    nr[j] += zt_re[q, j] * a - zt_im[q, j] * b
                    ni[j] += zt_re[q, j] * b + zt_im[q, j] * a
            # The squared steps and the copy as vector passes over the padded lanes (which
            # stay at v = 1: w is padded with 1), then the same max, bus by bus, as before.
            for j in range(n_pqp):
                dr_ = nr[j] - vr[j]
                di_ = ni[j] - vi[j]
                ca[j] = dr_ * dr_ + di_ * di_
                vr[j] = nr[j]
                vi[j] = ni[j]
            biggest = 0.0
            for j in range(n_pq):
                biggest = max(biggest, ca[j])
            if not math.isfinite(biggest):
                break
            if biggest < tol2:
                ok = True
                break
        for j in range(n_pq):
            v[j] = complex(vr[j], vi[j])
        # Currents through every branch end and out of the slack.
        if ok:
            o_re = rs[6]
            o_im = rs[7]
            for col in range(mp):
                o_re[col] = i_ref[col].real
                o_im[col] = i_ref[col].imag
            for j in range(n_pq):
                a = vr[j]
                b = vi[j]
                for col in range(mp):
                    o_re[col] += y_re[j, col] * a - y_im[j, col] * b
                    o_im[col] += y_re[j, col] * b + y_im[j, col] * a
            s_ref = 0.0j
            for j in range(v_ref.shape[0]):
                s_ref += v_ref[j] * complex(o_re[n_br + j], o_im[n_br + j]).conjugate()
            p_slack = s_ref.real * base_mva
            s_sum = 0.0
            for j in range(n_pq):
                s_sum += s_pq[j].real
            losses_kw = (p_slack + s_sum * base_mva) * 1000.0
            p_import = p_slack * 1000.0
            line_max = 0.0
            trafo_max = 0.0
            th_viol = 0.0
            th_count = 0.0
            for k in range(n_line):
                ld = _end_loading(o_re, o_im, i_scale, k, n_line + k)
                line_max = max(line_max, ld)
                if ld > 1.0:
                    th_viol += ld - 1.0
                    th_count += 1.0
            base = 2 * n_line
            for k in range(n_trafo):
                ld = _end_loading(o_re, o_im, i_scale, base + k, base + n_trafo + k)
                trafo_max = max(trafo_max, ld)
                if ld > 1.0:
                    th_viol += ld - 1.0
                    th_count += 1.0
            # |v| (a hypot) only where it can matter: the extremes and buses near a limit.
            # Squared magnitudes carry a few ulps of error, far inside the margins, so the
            # figures are exactly those of taking |v| at every bus.
            sq_min = math.inf
            sq_max = -math.inf
            vsq = rs[4]
            for j in range(n_pq):
                sq = vr[j] * vr[j] + vi[j] * vi[j]
                vsq[j] = sq
                sq_min = min(sq_min, sq)
                sq_max = max(sq_max, sq)
            vmin = math.inf
            vmax = -math.inf
            v_viol = 0.0
            v_count = 0.0
            for j in range(n_pq):
                sq = vsq[j]
                hi_ = v_lim[1, j]
                lo_ = v_lim[0, j]
                if (
                    sq > sq_min * _NEAR_ABOVE
                    and sq < sq_max * _NEAR_BELOW
                    and sq < hi_ * hi_ * _NEAR_BELOW
                    and sq > lo_ * lo_ * _NEAR_ABOVE
                ):
                    continue
                vm = math.hypot(vr[j], vi[j])
                vmin = min(vmin, vm)
                vmax = max(vmax, vm)
                over = vm - hi_
                under = lo_ - vm
                if over > 0.0:
                    v_viol += over
                    v_count += 1.0
                elif under > 0.0:
                    v_viol += under
                    v_count += 1.0
            grid[i, 0] = vmin
            grid[i, 1] = vmax
            grid[i, 2] = line_max
            grid[i, 3] = trafo_max
            for j in range(n_pq):
                v_pq[i, j] = v[j]
        else:
            losses_kw = 0.0
            p_import = served_sum + bg_load_prof[t] - pv_sum - bg_pv_prof[t]
            p_import += charge - discharge
            v_viol = 0.0
            v_count = 0.0
            th_viol = 0.0
            th_count = 0.0
            for j in range(n_pq):
                v_pq[i, j] = complex(w_re[j], w_im[j])
        sod = t % spd
        imp = max(p_import, 0.0)
        exp_ = max(-p_import, 0.0)
        cost = imp * dt * import_price[sod] - exp_ * dt * sc[6]
        new_step = step[i] + 1
        truncated = new_step >= episode_steps or not ok
        unserved = backlog_sum if truncated else 0.0
        discomfort = curt_sum * dt * sc[4] + unserved * sc[5]
        penalty = sc[11] * v_viol + sc[12] * th_viol + sc[13] * deg_cost + sc[14] * discomfort
        reward = -(sc[10] * cost + penalty)
        if not ok:
            reward = -sc[15]
            penalty = sc[15]
        demand = max(p_import / sc[9], DEMAND_FACTOR_FLOOR)
        stress = max(grid[i, 3] - sc[8], 0.0) / max(1.0 - sc[8], 1e-9)
        price = sc[7] * (demand + stress) * tod[sod] * price_mult[r]
        community_price[i] = price
        slot[i] = t + 1
        step[i] = new_step
        o = out[i]
        o[0] = reward
        o[1] = 1.0 if truncated else 0.0
        o[2] = 0.0 if ok else 1.0
        o[3] = cost
        o[4] = imp * dt
        o[5] = exp_ * dt
        o[6] = imp
        o[7] = (served_sum + bg_load_prof[t]) * dt
        o[8] = (pv_sum + bg_pv_prof[t]) * dt
        o[9] = pv_cut * dt
        o[10] = charge * dt
        o[11] = discharge * dt
        o[12] = losses_kw * dt
        o[13] = v_viol
        o[14] = v_count
        o[15] = th_viol
        o[16] = th_count
        o[17] = deg_cost
        o[18] = fade_sum
        o[19] = discomfort
        o[20] = curt_sum * dt
        o[21] = unserved
        o[22] = limited
        o[23] = price
        o[24] = penalty


def observe_kernel(
    c: CompiledParams,
    p: GridParams,
    s: GridState,
    starts: np.ndarray,
    scaling: np.ndarray,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """Encoded float32 observations (B, obs_dim) in the codec's field order and scaling.

    `starts` comes from `field_starts`, `scaling` from `Codec.scaling()` (rows: offset,
    1/scale, low, high), so the codec stays the one owner of layout and units. `out` (a
    C-contiguous (B, obs_dim) float32 array) receives them when given.
    """
    b = s.slot.shape[0]
    buf = np.empty((b, int(starts[-1])), dtype=np.float32) if out is None else out
    _observe_batch(
        c.sizes, c.lead_scale, c.forecast_mode, c.noise, c.stride, c.scalars,
        p.prosumer_load_kw, p.prosumer_pv_kw, p.background_load_pv_kw, p.import_price,
        p.batteries.capacity_kwh, float(max(p.n_days, 1)),
        s.slot, s.step, s.soc, s.capacity_kwh, s.backlog_kwh, s.grid, s.last_load_kw,
        s.last_pv_kw, s.community_price, s.noise_offset, starts, scaling, buf,
    )  # fmt: skip
    return buf


#: Field order the observation kernel writes; must equal the codec's (checked at env build).
OBS_ORDER = (
    "time_of_day",
    "day_of_year",
    "soc",
    "state_of_health",
    "load",
    "pv",
    "backlog",
    "load_forecast",
    "pv_forecast",
    "background_net_forecast",
    "import_price_forecast",
    "feed_in_price",
    "community_price",
    "grid",
)


@numba.njit(cache=True, nogil=True)
def forecast_value(truth, last, mode, scale, eps):
    if mode == 2:
        return last
    if mode == 0:
        return truth
    return max(truth * (1.0 + eps * scale), 0.0)


@numba.njit(cache=True, nogil=True)
def _observe_batch(
    sizes, lead, mode, noise, stride, sc, load_prof, pv_prof, bg_prof, import_price, cap0,
    n_days, slot, step, soc, cap, backlog, grid, last_load, last_pv, community_price,
    noise_offset, starts, scaling, buf,
):  # fmt: skip
    bscale, uniform = block_scaling(starts, scaling, last_load.shape[1], sizes[2])
    observe_rows(
        0, slot.shape[0], sizes, lead, mode, noise, stride, sc, load_prof, pv_prof, bg_prof,
        import_price, cap0, n_days, slot, step, soc, cap, backlog, grid, last_load, last_pv,
        community_price, noise_offset, starts, scaling, bscale, uniform, buf,
        np.empty((3, sizes[2]), dtype=np.float64), np.empty((1, 1), dtype=np.float64), False,
    )  # fmt: skip


@numba.njit(cache=True, nogil=True, inline="always")
def _encode(x, j, scaling):
    """One entry as `Codec.scale_raw` encodes it: (x - offset) / scale, clipped (float64)."""
    return min(max((x - scaling[0, j]) * scaling[1, j], scaling[2, j]), scaling[3, j])


@numba.njit(cache=True, nogil=True)
def _encode_leads(dst, o, raw, scaling):
    """Encode one forecast block (`raw`, one value per lead) into `dst[o:o + h]`.

    Slices with loop indices from zero let LLVM vectorise this loop (AVX2: four leads a
    step); indexing `buf[i, o + q]` directly kept it scalar, with a negative-index check per
    access.
    """
    h = raw.shape[0]
    out = dst[o : o + h]
    off = scaling[0, o : o + h]
    inv = scaling[1, o : o + h]
    low = scaling[2, o : o + h]
    high = scaling[3, o : o + h]
    for q in range(h):
        out[q] = min(max((raw[q] - off[q]) * inv[q], low[q]), high[q])


@numba.njit(cache=True, nogil=True)
def block_scaling(starts, scaling, n_p, h):
    """Per prosumer forecast block: (offset, 1/scale, low, high) and whether all of its `h`
    entries share them (the codec scales a prosumer's forecasts by one figure per field).
    Computed once per kernel call, not per chunk of rows (~3,000 comparisons each)."""
    out = np.empty((4, 2 * n_p), dtype=np.float64)
    uniform = np.empty(2 * n_p, dtype=np.bool_)
    for blk in range(2 * n_p):
        o = starts[7] + blk * h if blk < n_p else starts[8] + (blk - n_p) * h
        same = True
        for r in range(4):
            v = scaling[r, o]
            out[r, blk] = v
            for q in range(1, h):
                if scaling[r, o + q] != v:
                    same = False
        uniform[blk] = same
    return out, uniform


@numba.njit(cache=True, nogil=True)
def prefetch_forecast_inputs(noise, stride, load_prof, pv_prof, bg_prof, t, off, h, n_p, n_bg):
    """Ask for the lines a row's forecasts read (`observe_rows`): its stretch of the noise
    table and its windows of the prosumer and background profiles from slot `t`. Issued a row
    ahead, they arrive while the row before computes (see `envs.prefetch`)."""
    for x in range(0, stride, 8):  # 8 float64 a 64-byte line
        prefetch(noise, off + x)
    for x in range(t * n_p, (t + h) * n_p, 8):
        prefetch(load_prof, x)
        prefetch(pv_prof, x)
    for x in range(t * n_bg, (t + h) * n_bg, 8):
        prefetch(bg_prof, x)


@numba.njit(cache=True, nogil=True)
def observe_rows(
    lo, hi, sizes, lead, mode, noise, stride, sc, load_prof, pv_prof, bg_prof, import_price,
    cap0, n_days, slot, step, soc, cap, backlog, grid, last_load, last_pv, community_price,
    noise_offset, starts, scaling, bscale, uniform, buf, work, fc, keep,
):  # fmt: skip
    """Encode rows [lo, hi) of the state into the same rows of `buf` (float32); `bscale`,
    `uniform` from `block_scaling`; `work` a (3, h) float64 scratch (written before it is
    read, so a thread of the fused step allocates it once for all its chunks).

    With `keep`, row i's prosumer forecasts (float64, before encoding) at lead 0 and at the
    lead `announce_range` reads (1, or 0 for a one-step horizon) also go to `fc[i - lo]`:
    columns [0, 2 n_p) lead 0 of the load then PV blocks, [2 n_p, 4 n_p) the other lead. They
    are `forecast_value` of the same truth, noise entry and lead scale, the same operations,
    so the fused step's gate and announcement read them instead of the scattered noise and
    profile entries (`market_kernel.fused_chunk`).

    A row's forecasts are 2 n_p + 2 blocks of `h` leads (prosumer loads, prosumer PV,
    background load and PV). Each block's truth is gathered from the row's window of the
    profiles (`prof[t:t + h]`, one contiguous stretch of memory per profile, which the hardware
    prefetcher streams; a time-major copy of the profiles was faster with warm caches but
    slower on this shared machine, where the 28 short windows per row missed cache). A
    prosumer block whose entries share one scaling (the codec's layout) then runs noise and
    encoding in one loop over contiguous leads with the scaling held in registers, which LLVM
    vectorises; other blocks take a forecast row, then an encoding pass. Each entry goes
    straight into `buf` (no float64 row, no second pass over the observation), with the same
    float64 operations in the same order as `forecast_value` then `Codec.scale_raw` (a scalar
    equal to the entry's own scaling gives the same result): the values are bit for bit those
    of `Codec.encode(dynamics.observe(...))` (the phase features up to libm's last bit), which
    tests/envs/test_kernel.py holds.
    """
    h = sizes[2]
    n_p = last_load.shape[1]
    n_b = soc.shape[1]
    spd = int(sc[17])
    two_pi = 2.0 * math.pi
    # One block's truth, forecast and (background) net forecast, reused: they stay in L1.
    raw = work[0]
    net = work[1]
    truth = work[2]
    leads = lead[:h]
    n_blk = 2 * n_p + 2
    q1 = 1 if h > 1 else 0
    n2 = 2 * n_p
    n_bg = bg_prof.shape[1]
    for i in range(lo, hi):
        if i + 1 < slot.shape[0]:
            prefetch_forecast_inputs(
                noise, stride, load_prof, pv_prof, bg_prof, slot[i + 1],
                (noise_offset[i + 1] + step[i + 1] * stride) % NOISE_TABLE_SIZE, h, n_p, n_bg,
            )  # fmt: skip
        dst = buf[i]
        t = slot[i]
        sod = t % spd
        o = starts[0]
        dst[o] = _encode(math.sin(two_pi * sod / spd), o, scaling)
        dst[o + 1] = _encode(math.cos(two_pi * sod / spd), o + 1, scaling)
        o = starts[1]
        yp = two_pi * (t // spd) / n_days
        dst[o] = _encode(math.sin(yp), o, scaling)
        dst[o + 1] = _encode(math.cos(yp), o + 1, scaling)
        for k in range(n_b):
            dst[starts[2] + k] = _encode(soc[i, k], starts[2] + k, scaling)
            health = cap[i, k] / cap0[k] if cap0[k] > 0.0 else 1.0
            dst[starts[3] + k] = _encode(health, starts[3] + k, scaling)
        for k in range(n_p):
            dst[starts[4] + k] = _encode(last_load[i, k], starts[4] + k, scaling)
            dst[starts[5] + k] = _encode(last_pv[i, k], starts[5] + k, scaling)
            dst[starts[6] + k] = _encode(backlog[i, k], starts[6] + k, scaling)
        # The noise table is padded by one step's worth, so positions need one modulo per row.
        off = (noise_offset[i] + step[i] * stride) % NOISE_TABLE_SIZE
        prev = t - 1 if t > 0 else 0
        # Blocks 0 .. 2 n_p - 1: prosumer load then PV forecasts; 2 n_p, 2 n_p + 1: background
        # load and PV, whose difference is observed.
        lw = load_prof[t : t + h]
        pw = pv_prof[t : t + h]
        bw = bg_prof[t : t + h]
        for blk in range(n_blk):
            if blk < n_p:
                for q in range(h):
                    truth[q] = lw[q, blk]
            elif blk < 2 * n_p:
                for q in range(h):
                    truth[q] = pw[q, blk - n_p]
            else:
                for q in range(h):
                    truth[q] = bw[q, blk - 2 * n_p]
            if blk < 2 * n_p and uniform[blk]:
                o = starts[7] + blk * h if blk < n_p else starts[8] + (blk - n_p) * h
                out = dst[o : o + h]
                s_off = bscale[0, blk]
                s_inv = bscale[1, blk]
                s_low = bscale[2, blk]
                s_high = bscale[3, blk]
                if mode == 1:
                    eps = noise[off + blk * h : off + (blk + 1) * h]
                    for q in range(h):
                        x = max(truth[q] * (1.0 + eps[q] * leads[q]), 0.0)
                        out[q] = min(max((x - s_off) * s_inv, s_low), s_high)
                elif mode == 0:
                    for q in range(h):
                        out[q] = min(max((truth[q] - s_off) * s_inv, s_low), s_high)
                else:  # persistence: the last measured value at every lead
                    last = last_load[i, blk] if blk < n_p else last_pv[i, blk - n_p]
                    y = min(max((last - s_off) * s_inv, s_low), s_high)
                    for q in range(h):
                        out[q] = y
                if keep:
                    # Recomputed, not stored from the loop above: a store there kept LLVM
                    # from vectorising it. The same expression gives the same bits.
                    r = i - lo
                    if mode == 1:
                        eps = noise[off + blk * h : off + (blk + 1) * h]
                        fc[r, blk] = max(truth[0] * (1.0 + eps[0] * leads[0]), 0.0)
                        fc[r, n2 + blk] = max(truth[q1] * (1.0 + eps[q1] * leads[q1]), 0.0)
                    elif mode == 0:
                        fc[r, blk] = truth[0]
                        fc[r, n2 + blk] = truth[q1]
                    else:
                        fc[r, blk] = last
                        fc[r, n2 + blk] = last
                continue
            if mode == 2:  # persistence: the last measured value at every lead
                if blk < n_p:
                    last = last_load[i, blk]
                elif blk < 2 * n_p:
                    last = last_pv[i, blk - n_p]
                else:
                    last = bg_prof[prev, blk - 2 * n_p]
                for q in range(h):
                    raw[q] = last
            elif mode == 0:
                for q in range(h):
                    raw[q] = truth[q]
            else:
                eps = noise[off + blk * h : off + (blk + 1) * h]
                for q in range(h):
                    raw[q] = max(truth[q] * (1.0 + eps[q] * leads[q]), 0.0)
            if keep and blk < n2:
                fc[i - lo, blk] = raw[0]
                fc[i - lo, n2 + blk] = raw[q1]
            if blk < n_p:
                _encode_leads(dst, starts[7] + blk * h, raw, scaling)
            elif blk < 2 * n_p:
                _encode_leads(dst, starts[8] + (blk - n_p) * h, raw, scaling)
            elif blk == 2 * n_p:
                for q in range(h):
                    net[q] = raw[q]
            else:
                for q in range(h):
                    net[q] = net[q] - raw[q]
                _encode_leads(dst, starts[9], net, scaling)
        for q in range(h):
            j = sod + q  # (sod + q) % spd without a division per lead
            while j >= spd:
                j -= spd
            raw[q] = import_price[j]
        _encode_leads(dst, starts[10], raw, scaling)
        dst[starts[11]] = _encode(sc[6], starts[11], scaling)
        dst[starts[12]] = _encode(community_price[i], starts[12], scaling)
        for k in range(4):
            dst[starts[13] + k] = _encode(grid[i, k], starts[13] + k, scaling)


def field_starts(names_and_sizes: list[tuple[str, int]]) -> np.ndarray:
    """Start offsets of the codec's fields (plus the total) in the kernel's order."""
    names = [n for n, _ in names_and_sizes]
    if tuple(names) != OBS_ORDER:
        raise ValueError(f"codec field order {names} differs from the kernel's {OBS_ORDER}")
    starts = np.zeros(len(names_and_sizes) + 1, dtype=np.int64)
    starts[1:] = np.cumsum([s for _, s in names_and_sizes])
    return starts


__all__ = [
    "NOISE_TABLE_SIZE",
    "OUTCOME_FIELDS",
    "CompiledParams",
    "field_starts",
    "observe_kernel",
    "outcome_from_matrix",
    "step_kernel",
]
