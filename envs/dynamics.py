"""The pure, batched step of the microgrid: `step(params, state, action) -> (state, outcome)`.

State lives in `GridState` with a leading batch axis; frozen data lives in `GridParams`. Both
environments (single and vector) are thin shells over `reset_state`, `step` and `observe`, so
a batch of N grids is by construction N single grids stepped side by side; the tests check it.

Order within a step, for the slot about to be simulated:
decode action -> demand response -> PV curtailment -> batteries -> bus injections ->
AC power flow -> KPIs, penalties, reward -> community price -> next observation.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
from numpy.typing import NDArray

from envs.codec import DecodedAction
from envs.devices import battery_step, flexible_load_step, pv_output
from envs.forecast import NOISE_TABLE_SIZE, forecast, lead_scale
from envs.params import ComplexArray, FloatArray, GridParams, IntArray, NetworkParams
from envs.powerflow import PowerFlowResult, solve
from envs.pricing import seed_price

BoolArray = NDArray[np.bool_]
Solver = Callable[[NetworkParams, ComplexArray, ComplexArray | None], PowerFlowResult]


def _default_solver(
    net: NetworkParams, s_pq: ComplexArray, v_start: ComplexArray | None
) -> PowerFlowResult:
    return solve(net, s_pq, v_start)


@dataclass(frozen=True)
class GridState:
    """Everything that changes during an episode, batch axis first."""

    slot: IntArray
    """Absolute 15-minute slot of the year that the next step simulates."""
    step: IntArray
    """Steps taken in the current episode."""
    soc: FloatArray
    capacity_kwh: FloatArray
    backlog_kwh: FloatArray
    v_pq: ComplexArray
    """Last solved pq voltages: the warm start of the next power flow."""
    grid: FloatArray
    """(B, 4) last valid v_min, v_max (pu), max line loading, transformer loading (fractions)."""
    last_load_kw: FloatArray
    last_pv_kw: FloatArray
    last_net_kw: FloatArray
    """(B, n_prosumer) each prosumer's metered net consumption in the slot just simulated:
    served load - PV output + own battery power (charging > 0). The market settles on it."""
    community_price: FloatArray
    noise_offset: IntArray
    """Where this episode's forecast errors start in the shared noise table."""


@dataclass(frozen=True)
class StepOutcome:
    """Per-step figures for a batch; every array has shape (B,). Energies in kWh."""

    reward: FloatArray
    truncated: BoolArray
    diverged: BoolArray
    cost: FloatArray
    import_kwh: FloatArray
    export_kwh: FloatArray
    import_kw: FloatArray
    load_kwh: FloatArray
    pv_kwh: FloatArray
    pv_curtailed_kwh: FloatArray
    charge_kwh: FloatArray
    discharge_kwh: FloatArray
    losses_kwh: FloatArray
    voltage_violation_pu: FloatArray
    voltage_violations: FloatArray
    """Number of buses outside their voltage band."""
    thermal_violation: FloatArray
    thermal_violations: FloatArray
    """Number of lines and transformers above 100 % loading."""
    degradation_cost: FloatArray
    fade_kwh: FloatArray
    discomfort_cost: FloatArray
    dr_curtailed_kwh: FloatArray
    unserved_kwh: FloatArray
    battery_limited_kw: FloatArray
    community_price: FloatArray
    penalty_cost: FloatArray
    """Weighted sum of every penalty term (what the reward subtracts besides energy cost)."""


def noise_stride(p: GridParams) -> int:
    """Noise-table entries each step consumes: prosumer load and PV, background load and PV."""
    return (2 * p.n_prosumer + 2) * p.horizon


def reset_state(
    p: GridParams,
    days: IntArray,
    soc: FloatArray | None,
    noise_offset: IntArray,
    solver: Solver = _default_solver,
) -> GridState:
    """Fresh state at the start of `days` (B,), with a power flow of the slot before it.

    Solving the previous slot (batteries idle) gives a real grid state for the first
    observation instead of made-up zeros.
    """
    b = days.shape[0]
    slot = days.astype(np.int64) * p.steps_per_day
    prev = np.maximum(slot - 1, 0)
    bat = p.batteries
    soc0 = np.broadcast_to(bat.soc_initial, (b, bat.n)).copy() if soc is None else soc.copy()
    load = p.prosumer_load_kw[prev]
    kvar = p.prosumer_load_kvar[prev]
    pv = p.prosumer_pv_kw[prev]
    inj = np.concatenate([pv - load, np.zeros((b, bat.n))], axis=1)
    inj_q = np.concatenate([-kvar, np.zeros((b, bat.n))], axis=1)
    s_pq = p.background_s_pu[prev] + ((inj + 1j * inj_q) @ p.injection_map) / (
        p.network.base_mva * 1000.0
    )
    pf = solver(p.network, s_pq, None)
    grid = _grid_summary(pf)
    grid = np.where(pf.converged[:, None], grid, _nominal_grid(b))
    net_kw = np.where(pf.converged, pf.p_slack_mw * 1000.0, -inj.sum(axis=1))
    price = seed_price(p, prev % p.steps_per_day, net_kw, grid[:, 3], np.ones(b, dtype=np.float64))
    return GridState(
        slot=slot,
        step=np.zeros(b, dtype=np.int64),
        soc=soc0,
        capacity_kwh=np.broadcast_to(bat.capacity_kwh, (b, bat.n)).copy(),
        backlog_kwh=np.zeros((b, p.n_prosumer)),
        v_pq=np.where(pf.converged[:, None], pf.v[:, p.network.pq], p.network.w_pq),
        grid=grid,
        last_load_kw=load,
        last_pv_kw=pv,
        last_net_kw=load - pv,
        community_price=price,
        noise_offset=noise_offset.astype(np.int64) % NOISE_TABLE_SIZE,
    )


def _nominal_grid(b: int) -> FloatArray:
    return np.tile(np.array([1.0, 1.0, 0.0, 0.0]), (b, 1))


def _grid_summary(pf: PowerFlowResult) -> FloatArray:
    b = pf.vm_pq.shape[0]
    line = pf.line_loading.max(axis=1) if pf.line_loading.shape[1] else np.zeros(b)
    trafo = pf.trafo_loading.max(axis=1) if pf.trafo_loading.shape[1] else np.zeros(b)
    return np.stack([pf.vm_pq.min(axis=1), pf.vm_pq.max(axis=1), line, trafo], axis=1)


def step(
    p: GridParams,
    s: GridState,
    a: DecodedAction,
    solver: Solver = _default_solver,
) -> tuple[GridState, StepOutcome]:
    """Simulate one slot for the whole batch."""
    t = s.slot
    dt = p.dt_h
    net = p.network
    load = p.prosumer_load_kw[t]
    kvar = p.prosumer_load_kvar[t]
    pv_avail = p.prosumer_pv_kw[t]

    fl = flexible_load_step(
        load,
        s.backlog_kwh,
        a.dr_share,
        p.curtailable_share,
        p.shiftable_share,
        p.rebound_per_step,
        dt,
    )
    pv = pv_output(pv_avail, a.pv_curtailment)
    bs = battery_step(p.batteries, s.soc, s.capacity_kwh, a.battery_kw, dt)
    with np.errstate(divide="ignore", invalid="ignore"):
        q_ratio = np.where(load > 0.0, fl.served_kw / load, 1.0)
    inj_p = np.concatenate([pv - fl.served_kw, -bs.power_kw], axis=1)
    inj_q = np.concatenate([-kvar * q_ratio, np.zeros_like(bs.power_kw)], axis=1)
    base_kw = net.base_mva * 1000.0
    s_pq = p.background_s_pu[t] + ((inj_p + 1j * inj_q) @ p.injection_map) / base_kw
    pf = solver(net, s_pq, s.v_pq)
    ok = pf.converged
    diverged = ~ok

    # Energy figures. Where the flow diverged, losses are unknown: report the lossless balance.
    p_import_kw = pf.p_slack_mw * 1000.0
    bg_load = p.background_load_kw[t]
    bg_pv = p.background_pv_kw[t]
    bg_sto = p.background_storage_kw[t]
    if not ok.all():
        lossless = fl.served_kw.sum(axis=1) + bg_load - pv.sum(axis=1) - bg_pv
        lossless += bs.power_kw.sum(axis=1) + bg_sto
        p_import_kw = np.where(ok, p_import_kw, lossless)
    losses_kw = np.where(ok, pf.losses_mw * 1000.0, 0.0)
    import_kw = np.maximum(p_import_kw, 0.0)
    export_kw = np.maximum(-p_import_kw, 0.0)
    slot_of_day = t % p.steps_per_day
    import_kwh = import_kw * dt
    export_kwh = export_kw * dt
    cost = import_kwh * p.import_price[slot_of_day] - export_kwh * p.feed_in_price

    vm = pf.vm_pq
    over = np.maximum(vm - net.v_max_pu, 0.0)
    under = np.maximum(net.v_min_pu - vm, 0.0)
    v_viol = np.where(ok, (over + under).sum(axis=1), 0.0)
    v_count = np.where(ok, ((over > 0) | (under > 0)).sum(axis=1), 0)
    line_over = np.maximum(pf.line_loading - 1.0, 0.0)
    trafo_over = np.maximum(pf.trafo_loading - 1.0, 0.0)
    th_viol = np.where(ok, line_over.sum(axis=1) + trafo_over.sum(axis=1), 0.0)
    th_count = np.where(ok, (line_over > 0).sum(axis=1) + (trafo_over > 0).sum(axis=1), 0)

    deg_cost = (bs.fade_kwh * p.batteries.replacement_cost_per_kwh).sum(axis=1)
    dr_curt_kwh = fl.curtailed_kw.sum(axis=1) * dt
    discomfort = dr_curt_kwh * p.discomfort_cost_per_kwh
    new_step = s.step + 1
    truncated = (new_step >= p.episode_steps) | diverged
    unserved = np.where(truncated, fl.backlog_kwh.sum(axis=1), 0.0)
    discomfort = discomfort + unserved * p.unserved_penalty_per_kwh
    penalty = (
        p.w_voltage * v_viol
        + p.w_thermal * th_viol
        + p.w_degradation * deg_cost
        + p.w_discomfort * discomfort
    )
    reward = -(p.w_cost * cost + penalty)
    reward = np.where(ok, reward, -p.divergence_penalty)
    penalty = np.where(ok, penalty, p.divergence_penalty)

    grid = np.where(ok[:, None], _grid_summary(pf), s.grid)
    price = seed_price(p, slot_of_day, p_import_kw, grid[:, 3], a.price_multiplier)
    charge = np.maximum(bs.power_kw, 0.0).sum(axis=1) + np.maximum(bg_sto, 0.0)
    discharge = np.maximum(-bs.power_kw, 0.0).sum(axis=1) + np.maximum(-bg_sto, 0.0)
    outcome = StepOutcome(
        reward=reward,
        truncated=truncated,
        diverged=diverged,
        cost=cost,
        import_kwh=import_kwh,
        export_kwh=export_kwh,
        import_kw=import_kw,
        load_kwh=(fl.served_kw.sum(axis=1) + bg_load) * dt,
        pv_kwh=(pv.sum(axis=1) + bg_pv) * dt,
        pv_curtailed_kwh=(pv_avail - pv).sum(axis=1) * dt,
        charge_kwh=charge * dt,
        discharge_kwh=discharge * dt,
        losses_kwh=losses_kw * dt,
        voltage_violation_pu=v_viol,
        voltage_violations=v_count.astype(np.float64),
        thermal_violation=th_viol,
        thermal_violations=th_count.astype(np.float64),
        degradation_cost=deg_cost,
        fade_kwh=bs.fade_kwh.sum(axis=1),
        discomfort_cost=discomfort,
        dr_curtailed_kwh=dr_curt_kwh,
        unserved_kwh=unserved,
        battery_limited_kw=bs.limited_kw.sum(axis=1),
        community_price=price,
        penalty_cost=penalty,
    )
    new_state = replace(
        s,
        slot=t + 1,
        step=new_step,
        soc=bs.soc,
        capacity_kwh=bs.capacity_kwh,
        backlog_kwh=fl.backlog_kwh,
        v_pq=np.where(ok[:, None], pf.v[:, net.pq], net.w_pq),
        grid=grid,
        last_load_kw=load,
        last_pv_kw=pv_avail,
        last_net_kw=fl.served_kw - pv + bs.power_kw[:, : p.n_prosumer],
        community_price=price,
    )
    return new_state, outcome


def observe(p: GridParams, s: GridState) -> dict[str, np.ndarray]:
    """Raw physical observation parts for the codec, each (B, size)."""
    b = s.slot.shape[0]
    t = s.slot
    h = p.horizon
    slot_of_day = t % p.steps_per_day
    day_phase = 2.0 * np.pi * slot_of_day / p.steps_per_day
    year_phase = 2.0 * np.pi * (t // p.steps_per_day) / max(p.n_days, 1)
    scale = lead_scale(h, p.forecast_noise_std)
    n_p = p.n_prosumer
    off = s.noise_offset + s.step * noise_stride(p)
    mode = p.forecast_mode
    load_f = forecast(p.prosumer_load_kw, t, s.last_load_kw, h, mode, scale, off)
    pv_f = forecast(p.prosumer_pv_kw, t, s.last_pv_kw, h, mode, scale, off + n_p * h)
    last_bg = p.background_load_pv_kw[np.maximum(t - 1, 0)]
    bg_f = forecast(p.background_load_pv_kw, t, last_bg, h, mode, scale, off + 2 * n_p * h)
    cap0 = np.where(p.batteries.capacity_kwh > 0, p.batteries.capacity_kwh, 1.0)
    lead_slots = (slot_of_day[:, None] + np.arange(h)[None, :]) % p.steps_per_day
    return {
        "time_of_day": np.stack([np.sin(day_phase), np.cos(day_phase)], axis=1),
        "day_of_year": np.stack([np.sin(year_phase), np.cos(year_phase)], axis=1),
        "soc": s.soc,
        "state_of_health": np.where(p.batteries.capacity_kwh > 0, s.capacity_kwh / cap0, 1.0),
        "load": s.last_load_kw,
        "pv": s.last_pv_kw,
        "backlog": s.backlog_kwh,
        "load_forecast": load_f.reshape(b, n_p * h),
        "pv_forecast": pv_f.reshape(b, n_p * h),
        "background_net_forecast": bg_f[:, 0, :] - bg_f[:, 1, :],
        "import_price_forecast": p.import_price[lead_slots],
        "feed_in_price": np.full((b, 1), p.feed_in_price),
        "community_price": s.community_price[:, None],
        "grid": s.grid,
    }


def with_rows(current: GridState, rows: IntArray, fresh: GridState) -> GridState:
    """`current` with rows `rows` replaced by `fresh` (one row each): the vector env's autoreset.

    Arrays are copied, not written in place, so a state handed out earlier stays as it was.
    """
    fields = {}
    for name in GridState.__dataclass_fields__:
        arr = getattr(current, name).copy()
        arr[rows] = getattr(fresh, name)
        fields[name] = arr
    return GridState(**fields)
