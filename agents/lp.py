"""The dispatch linear program that the perfect-foresight optimum and MPC both solve.

One builder serves both controllers so that "MPC vs optimum" compares information (forecasts
over a short horizon vs the true profiles over the whole episode), never two models.

The model, per slot t and battery b (kW, kWh; dt in hours):

    minimise  sum_t dt * (import_price[t] * imp[t] - feed_in * exp[t])
            + degradation_weight * sum_{t,b} k_b * (eta_c * ch[t,b] + dis[t,b] / eta_d) * dt
            - sum_b terminal_value[b] * e[T-1,b] - sum_k ladder_value[k] * s[k]
    s.t.      e[t,b] = e[t-1,b] + (eta_c * ch[t,b] - dis[t,b] / eta_d) * dt        (e[-1] = e0)
              imp[t] - exp[t] = sum_p (load[t,p] - pv_used[t,p]) + background[t] + loss[t]
                                + sum_b (ch[t,b] - dis[t,b])
              0 <= ch, dis <= P_b;  soc_min * E_b <= e <= soc_max * E_b;
              0 <= pv_used <= pv;   imp, exp >= 0
              0 <= s[k] <= ladder_width[k];  sum_k s[k] <= sum_b (e[T-1,b] - soc_min * E_b)

with k_b = fade_per_full_cycle * replacement_cost / 2: the environment's cycle-ageing cost
(fade = fade_per_full_cycle * cell throughput / (2 E_nominal) * E_nominal) is already linear in
throughput, so the LP prices degradation exactly as the env charges it. Network losses are not
modelled by the physics here: the caller may pass a fixed per-slot loss estimate (`loss_kw`),
which only shifts the balance; by default it is zero. Voltage and thermal limits are left out
(the env still reports them: the optimum's replay had none on the default scenario's first
five test days) and demand response stays at zero: the env's rebound, (1 - share) * rate *
backlog, is bilinear in the decision and the state. So this is the optimum of battery dispatch
and PV curtailment; a controller that also calls demand response can lower the energy `cost`
below it, paying discomfort that `cost` does not include.

Charge and discharge are separate non-negative variables; with an import price above the
feed-in price and a positive degradation cost, doing both at once never lowers the objective,
so the applied set-point is simply `charge - discharge`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import sparse
from scipy.optimize import linprog

from envs.errors import MicrogridError
from envs.params import BatteryParams, FloatArray

#: Cost per kWh of curtailed PV: breaks ties towards using the sun when exporting is worth
#: nothing, so the plan never curtails unless it strictly pays; too small to change a decision.
CURTAILMENT_TIE_BREAK = 1e-6

#: SoC readings within this distance (fraction of capacity) outside the window are treated as
#: rounding (observations are float32) and clipped instead of making the LP infeasible.
SOC_TOLERANCE = 1e-5


class PlanInfeasible(MicrogridError, ValueError):
    """The dispatch LP has no solution; the message names the battery and the bound at fault."""


@dataclass(frozen=True)
class DispatchInputs:
    """What the LP plans over: T slots of profiles (true or forecast) and prices."""

    load_kw: FloatArray
    """(T, n_prosumer) prosumer load."""
    pv_kw: FloatArray
    """(T, n_prosumer) available prosumer PV (the LP may curtail it)."""
    background_net_kw: FloatArray
    """(T,) uncontrolled load - PV + storage: the part of the balance nobody steers."""
    import_price: FloatArray
    """(T,) time-of-use import price per kWh."""
    feed_in_price: float
    dt_h: float
    loss_kw: FloatArray | None = None
    """(T,) fixed network-loss estimate added to the balance; None means lossless."""

    @property
    def steps(self) -> int:
        return int(self.import_price.shape[0])


@dataclass(frozen=True)
class TerminalLadder:
    """A concave value of the usable energy left in all cells together after the last slot.

    Step k values up to `width_kwh[k]` kWh at `value_per_kwh[k]`; values must not rise, so the
    LP fills the dearest step first. A receding-horizon controller uses it to say "the evening
    peak can absorb this much stored energy at the peak price, the rest is worth less".
    """

    width_kwh: FloatArray
    value_per_kwh: FloatArray

    def __post_init__(self) -> None:
        w, v = np.asarray(self.width_kwh), np.asarray(self.value_per_kwh)
        if w.shape != v.shape or w.ndim != 1:
            raise ValueError(f"terminal ladder: widths {w.shape} and values {v.shape} differ")
        if np.any(w < 0) or np.any(np.diff(v) > 0):
            raise ValueError("terminal ladder: widths must be >= 0 and values must not rise")


@dataclass(frozen=True)
class Plan:
    """A solved dispatch: set-points per slot and what the LP expects them to cost."""

    charge_kw: FloatArray
    """(T, n_battery) grid-side charging power."""
    discharge_kw: FloatArray
    """(T, n_battery) grid-side discharging power."""
    soc: FloatArray
    """(T + 1, n_battery) state of charge at the start of each slot and after the last one."""
    pv_curtailment: FloatArray
    """(T, n_prosumer) share of available PV curtailed, in [0, 1]."""
    import_kw: FloatArray
    export_kw: FloatArray
    energy_cost: float
    """Import cost minus feed-in revenue over the plan (the env's `cost`, up to losses)."""
    degradation_cost: float
    """Cycle-ageing cost of the planned throughput (the env's `degradation_cost`)."""
    objective: float
    """What the LP minimised (energy + weighted degradation - terminal value of stored energy)."""

    @property
    def battery_kw(self) -> FloatArray:
        """Net set-point per slot and battery, charging > 0: what the codec encodes."""
        return self.charge_kw - self.discharge_kw

    @property
    def steps(self) -> int:
        return int(self.charge_kw.shape[0])


def _check_inputs(
    batteries: BatteryParams, soc0: FloatArray, cap: FloatArray, x: DispatchInputs
) -> None:
    t = x.steps
    n_p = x.load_kw.shape[1] if x.load_kw.ndim == 2 else -1
    shapes = {
        "load_kw": (x.load_kw.shape, (t, n_p)),
        "pv_kw": (x.pv_kw.shape, (t, n_p)),
        "background_net_kw": (x.background_net_kw.shape, (t,)),
        "soc0": (soc0.shape, (batteries.n,)),
        "capacity_kwh": (cap.shape, (batteries.n,)),
    }
    if x.loss_kw is not None:
        shapes["loss_kw"] = (x.loss_kw.shape, (t,))
    for name, (got, want) in shapes.items():
        if got != want:
            raise ValueError(f"dispatch LP: {name} has shape {got}, expected {want}")
    arrays = {
        "load_kw": x.load_kw,
        "pv_kw": x.pv_kw,
        "background_net_kw": x.background_net_kw,
        "import_price": x.import_price,
        "soc0": soc0,
        "capacity_kwh": cap,
    }
    for name, a in arrays.items():
        if not np.isfinite(a).all():
            raise ValueError(f"dispatch LP: {name} holds non-finite values")
    if t < 1 or not x.dt_h > 0:
        raise ValueError(f"dispatch LP: need at least one slot and dt_h > 0 (T={t}, dt={x.dt_h})")


def _check_reachable(
    batteries: BatteryParams,
    names: tuple[str, ...],
    cap: FloatArray,
    e0: FloatArray,
    e_min: FloatArray,
    e_max: FloatArray,
    e_final_min: FloatArray,
    steps: int,
    dt_h: float,
) -> None:
    """Name the battery whose SoC bounds cannot be met: HiGHS alone would only say 'infeasible'.

    The balance never binds (import and export are unbounded), so the battery bounds are the
    only source of infeasibility and can be checked one battery at a time.
    """
    up = batteries.power_kw * batteries.efficiency_charge * dt_h
    down = batteries.power_kw / batteries.efficiency_discharge * dt_h
    for b in range(batteries.n):
        cap_b = max(float(cap[b]), 1e-12)
        soc = e0[b] / cap_b
        if e0[b] > e_max[b] and e0[b] - down[b] > e_max[b] + 1e-9:
            raise PlanInfeasible(
                f"dispatch LP infeasible: battery {names[b]} starts at soc {soc:.4f} above "
                f"soc_max {batteries.soc_max[b]:.4f} and cannot discharge back into the window "
                f"in one slot at {batteries.power_kw[b]:.3g} kW"
            )
        if e0[b] < e_min[b] and e0[b] + up[b] < e_min[b] - 1e-9:
            raise PlanInfeasible(
                f"dispatch LP infeasible: battery {names[b]} starts at soc {soc:.4f} below "
                f"soc_min {batteries.soc_min[b]:.4f} and cannot charge back into the window "
                f"in one slot at {batteries.power_kw[b]:.3g} kW"
            )
        reachable = min(e0[b] + steps * up[b], e_max[b])
        if e_final_min[b] > reachable + 1e-9:
            raise PlanInfeasible(
                f"dispatch LP infeasible: battery {names[b]} must end at soc >= "
                f"{e_final_min[b] / cap_b:.4f}, but from soc {soc:.4f} at "
                f"{batteries.power_kw[b]:.3g} kW over {steps} slots it reaches at most "
                f"{reachable / cap_b:.4f} (allowed final soc: [{batteries.soc_min[b]:.4f}, "
                f"{batteries.soc_max[b]:.4f}])"
            )


def solve_dispatch(
    batteries: BatteryParams,
    soc0: FloatArray,
    inputs: DispatchInputs,
    *,
    capacity_kwh: FloatArray | None = None,
    degradation_weight: float = 1.0,
    terminal_value_per_kwh: FloatArray | float = 0.0,
    soc_final_min: FloatArray | None = None,
    terminal_ladder: TerminalLadder | None = None,
    battery_names: tuple[str, ...] | None = None,
) -> Plan:
    """Solve the dispatch LP with HiGHS.

    `soc0` is each battery's state of charge at the start of the first slot, `capacity_kwh`
    its current (faded) capacity (nominal by default). `terminal_value_per_kwh` credits energy
    left in the cells after the last slot: zero suits a whole episode (the env does not pay for
    it), a receding-horizon controller needs a positive one or it empties the batteries at every
    horizon's end; `terminal_ladder` adds a concave value of the energy left in all batteries
    together (above soc_min). `soc_final_min` forces a final SoC. Raises `PlanInfeasible` naming the
    battery when the SoC bounds cannot be met.
    """
    soc0 = np.asarray(soc0, dtype=np.float64)
    cap = np.asarray(
        batteries.capacity_kwh if capacity_kwh is None else capacity_kwh, dtype=np.float64
    )
    _check_inputs(batteries, soc0, cap, inputs)
    names = battery_names or tuple(f"#{b}" for b in range(batteries.n))
    t_n, n_b, n_p = inputs.steps, batteries.n, inputs.load_kw.shape[1]
    dt = inputs.dt_h
    eta_c, eta_d = batteries.efficiency_charge, batteries.efficiency_discharge
    e_min, e_max = batteries.soc_min * cap, batteries.soc_max * cap
    # float32 observations round the SoC: snap readings just outside the window back into it.
    tol = SOC_TOLERANCE * cap
    e0 = soc0 * cap
    e0 = np.where((e0 < e_min) & (e0 >= e_min - tol), e_min, e0)
    e0 = np.where((e0 > e_max) & (e0 <= e_max + tol), e_max, e0)
    e_final = (
        e_min.copy()
        if soc_final_min is None
        else np.maximum(np.asarray(soc_final_min, dtype=np.float64) * cap, e_min)
    )
    _check_reachable(batteries, names, cap, e0, e_min, e_max, e_final, t_n, dt)

    # Variable blocks, each slot-major: ch, dis, e (T*n_b each), pv_used (T*n_p), imp, exp (T),
    # then one variable per step of the terminal ladder.
    nb_t, np_t = t_n * n_b, t_n * n_p
    o_ch, o_dis, o_e, o_pv = 0, nb_t, 2 * nb_t, 3 * nb_t
    o_imp = o_pv + np_t
    o_exp = o_imp + t_n
    o_lad = o_exp + t_n
    n_lad = 0 if terminal_ladder is None else int(np.asarray(terminal_ladder.width_kwh).size)
    n_var = o_lad + n_lad

    k_deg = batteries.fade_per_full_cycle * batteries.replacement_cost_per_kwh / 2.0
    term = np.broadcast_to(np.asarray(terminal_value_per_kwh, dtype=np.float64), (n_b,))
    c = np.zeros(n_var)
    c[o_ch : o_ch + nb_t] = np.tile(degradation_weight * k_deg * eta_c * dt, t_n)
    c[o_dis : o_dis + nb_t] = np.tile(degradation_weight * k_deg / eta_d * dt, t_n)
    c[o_e + (t_n - 1) * n_b : o_e + nb_t] = -term
    c[o_pv : o_pv + np_t] = -CURTAILMENT_TIE_BREAK * dt
    c[o_imp : o_imp + t_n] = inputs.import_price * dt
    c[o_exp : o_exp + t_n] = -inputs.feed_in_price * dt
    a_ub, b_ub = None, None
    if terminal_ladder is not None and n_lad:
        # The ladder holds at most the usable energy left: sum s - sum e_T <= -sum e_min.
        c[o_lad:] = -np.asarray(terminal_ladder.value_per_kwh, dtype=np.float64)
        ub_cols = np.concatenate([o_lad + np.arange(n_lad), o_e + (t_n - 1) * n_b + np.arange(n_b)])
        ub_vals = np.concatenate([np.ones(n_lad), -np.ones(n_b)])
        a_ub = sparse.csr_array(
            (ub_vals, (np.zeros(ub_cols.size, dtype=np.int64), ub_cols)), shape=(1, n_var)
        )
        b_ub = np.array([-float(e_min.sum())])

    # SoC dynamics: e[t] - e[t-1] - eta_c dt ch[t] + dt/eta_d dis[t] = (e0 if t == 0 else 0).
    idx = np.arange(nb_t)
    rows = [idx, idx, idx]
    cols = [o_e + idx, o_ch + idx, o_dis + idx]
    vals = [np.ones(nb_t), np.tile(-eta_c * dt, t_n), np.tile(dt / eta_d, t_n)]
    prev = idx[n_b:]
    rows.append(prev)
    cols.append(o_e + prev - n_b)
    vals.append(-np.ones(prev.shape[0]))
    # Balance: imp - exp + sum pv_used - sum ch + sum dis = load + background + loss.
    slot_b = np.repeat(np.arange(t_n), n_b)
    slot_p = np.repeat(np.arange(t_n), n_p)
    slots = np.arange(t_n)
    rows += [nb_t + slots, nb_t + slots, nb_t + slot_p, nb_t + slot_b, nb_t + slot_b]
    cols += [o_imp + slots, o_exp + slots, o_pv + np.arange(np_t), o_ch + idx, o_dis + idx]
    vals += [np.ones(t_n), -np.ones(t_n), np.ones(np_t), -np.ones(nb_t), np.ones(nb_t)]
    a_eq = sparse.csr_array(
        (np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))),
        shape=(nb_t + t_n, n_var),
    )
    loss = np.zeros(t_n) if inputs.loss_kw is None else inputs.loss_kw
    b_eq = np.concatenate(
        [
            np.concatenate([e0, np.zeros(nb_t - n_b)]),
            inputs.load_kw.sum(axis=1) + inputs.background_net_kw + loss,
        ]
    )

    lo = np.zeros(n_var)
    hi = np.full(n_var, np.inf)
    power = np.maximum(batteries.power_kw, 0.0)
    hi[o_ch : o_ch + nb_t] = np.tile(power, t_n)
    hi[o_dis : o_dis + nb_t] = np.tile(power, t_n)
    e_lo = np.tile(e_min, (t_n, 1))
    e_lo[-1] = e_final
    lo[o_e : o_e + nb_t] = e_lo.ravel()
    hi[o_e : o_e + nb_t] = np.tile(e_max, t_n)
    hi[o_pv : o_pv + np_t] = np.maximum(inputs.pv_kw, 0.0).ravel()
    if terminal_ladder is not None and n_lad:
        hi[o_lad:] = np.asarray(terminal_ladder.width_kwh, dtype=np.float64)

    res = linprog(
        c,
        A_ub=a_ub,
        b_ub=b_ub,
        A_eq=a_eq,
        b_eq=b_eq,
        bounds=np.stack([lo, hi], axis=1),
        method="highs",
    )
    if res.status == 2:
        raise PlanInfeasible(f"dispatch LP infeasible over {t_n} slots: {res.message}")
    if res.status != 0:
        raise MicrogridError(f"dispatch LP failed (HiGHS status {res.status}): {res.message}")

    x = res.x
    ch = np.maximum(x[o_ch : o_ch + nb_t].reshape(t_n, n_b), 0.0)
    dis = np.maximum(x[o_dis : o_dis + nb_t].reshape(t_n, n_b), 0.0)
    e = x[o_e : o_e + nb_t].reshape(t_n, n_b)
    pv_used = x[o_pv : o_pv + np_t].reshape(t_n, n_p)
    imp = x[o_imp : o_imp + t_n]
    exp = x[o_exp : o_exp + t_n]
    with np.errstate(divide="ignore", invalid="ignore"):
        curtail = np.where(inputs.pv_kw > 1e-9, 1.0 - pv_used / inputs.pv_kw, 0.0)
    safe_cap = np.where(cap > 0, cap, 1.0)
    soc = np.vstack([e0[None, :], e]) / safe_cap
    throughput = (ch * eta_c + dis / eta_d) * dt
    return Plan(
        charge_kw=ch,
        discharge_kw=dis,
        soc=np.where(cap > 0, soc, soc0),
        pv_curtailment=np.clip(curtail, 0.0, 1.0),
        import_kw=imp,
        export_kw=exp,
        energy_cost=float((imp * inputs.import_price - exp * inputs.feed_in_price).sum() * dt),
        degradation_cost=float((throughput * k_deg).sum()),
        objective=float(res.fun),
    )
