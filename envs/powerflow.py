"""Batched AC power flow over compiled network arrays, without pandapower.

Low-voltage feeders are radial, stiffly fed from one transformer and lightly loaded compared
with their nose point, which is exactly where the implicit Z-bus fixed point

    V_pq = W + Z_pq · conj(S_pq / V_pq)

converges in a handful of iterations, each one complex mat-vec for the whole batch. That is far
cheaper per step than Newton-Raphson's Jacobian factorisation, and it is what makes thousands of
environment steps per second possible. A fixed point of this map *is* the power-flow solution,
so a vanishing update is the convergence test. Rows that do not settle within the iteration
budget (very heavy loading) are handed to a batched dense Newton-Raphson; rows that still fail
are reported as not converged, never as NaN, so the environment can truncate with a bounded
penalty.

The results match `pandapower.runpp` to ~1e-10 pu because both solve the same admittance model
(`envs.grid` takes it from pandapower's own ppc) to tight tolerances; `tests/envs` checks it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from envs.params import ComplexArray, FloatArray, NetworkParams

BoolArray = NDArray[np.bool_]

#: Largest voltage update (pu) at which the fixed point counts as reached; the remaining error
#: is about the contraction ratio (~0.1 on LV feeders) times this.
STEP_TOLERANCE_PU = 1e-8
#: Power mismatch (pu) the Newton-Raphson fallback must reach; pandapower's default
#: `tolerance_mva` is 1e-8 on a 1 MVA base.
MISMATCH_TOLERANCE_PU = 1e-9


@dataclass(frozen=True)
class PowerFlowResult:
    """Solution for a batch of B grids; every array has the batch as its leading axis."""

    v: ComplexArray
    """Complex bus voltages (per unit), shape (B, n_bus); no-load voltages where not converged."""
    converged: BoolArray
    p_slack_mw: FloatArray
    """Active power drawn from the upstream grid (import > 0)."""
    q_slack_mvar: FloatArray
    losses_mw: FloatArray
    line_loading: FloatArray
    """Line current over its thermal limit (1.0 = 100 %), shape (B, n_line)."""
    trafo_loading: FloatArray
    """Transformer current over its rating (1.0 = 100 %), shape (B, n_trafo)."""
    vm_pq: FloatArray
    """Voltage magnitudes of the solved buses, shape (B, n_pq)."""
    iterations: int


def solve(
    net: NetworkParams,
    s_pq: ComplexArray,
    v_start: ComplexArray | None = None,
    *,
    max_iter: int = 30,
) -> PowerFlowResult:
    """Solve B power flows at once.

    `s_pq` holds the complex power injected at each pq bus in per unit (generation positive),
    shape (B, n_pq). `v_start` warm-starts the iteration from last step's pq voltages, which
    typically saves half the iterations in a time series.
    """
    if s_pq.ndim != 2 or s_pq.shape[1] != net.pq.shape[0]:
        raise ValueError(f"s_pq must have shape (B, {net.pq.shape[0]}), got {s_pq.shape}")
    v_pq, converged, iterations = _zbus_fixed_point(net, s_pq, v_start, max_iter)
    if not converged.all():
        bad = np.flatnonzero(~converged)
        v_nr, ok = _newton_raphson(net, s_pq[bad])
        v_pq[bad] = v_nr
        converged[bad] = ok
        if not ok.all():
            v_pq[bad[~ok]] = net.w_pq
    return _results(net, v_pq, s_pq, converged, iterations)


def _zbus_fixed_point(
    net: NetworkParams,
    s_pq: ComplexArray,
    v_start: ComplexArray | None,
    max_iter: int,
) -> tuple[ComplexArray, BoolArray, int]:
    """Iterate V = W + conj(S/V) @ Z^T until the largest update is below the step tolerance."""
    z_t = net.z_pq.T
    w = net.w_pq
    v = np.broadcast_to(w, s_pq.shape) if v_start is None else v_start
    s_conj = np.conj(s_pq)
    step = np.inf
    k = 0
    with np.errstate(all="ignore"):
        while k < max_iter:
            # The convergence check costs as much as an iteration on small grids: test every
            # second iteration only.
            v = w + (s_conj / np.conj(v)) @ z_t
            v_new = w + (s_conj / np.conj(v)) @ z_t
            k += 2
            step = float(np.abs(v_new - v).max())
            v = v_new
            if step < STEP_TOLERANCE_PU or not np.isfinite(step):
                break
    if step < STEP_TOLERANCE_PU:
        converged = np.ones(s_pq.shape[0], dtype=bool)
    else:
        # Judge each row on its own: one hard row must not fail the whole batch.
        with np.errstate(all="ignore"):
            v_next = w + (s_conj / np.conj(v)) @ z_t
            row_step = np.abs(v_next - v).max(axis=1)
        converged = np.isfinite(row_step) & (row_step < STEP_TOLERANCE_PU * 10)
    return np.array(v, dtype=np.complex128), converged, k


def _newton_raphson(
    net: NetworkParams, s_pq: ComplexArray, max_iter: int = 20
) -> tuple[ComplexArray, BoolArray]:
    """Batched dense polar Newton-Raphson: the robust fallback for rows Z-bus could not solve."""
    pq, ref = net.pq, net.ref
    y = net.ybus
    n_pq = pq.shape[0]
    b = s_pq.shape[0]
    y_pq = y[np.ix_(pq, pq)]
    i_ref_part = net.v_ref @ y[np.ix_(pq, ref)].T  # current injected into pq rows by the slack
    v0 = np.broadcast_to(net.w_pq, s_pq.shape)
    vm = np.abs(v0).copy()
    va = np.angle(v0).copy()
    ok = np.zeros(b, dtype=bool)
    idx = np.arange(n_pq)
    with np.errstate(all="ignore"):
        for _ in range(max_iter):
            v = vm * np.exp(1j * va)
            i_pq = v @ y_pq.T + i_ref_part
            mis = v * np.conj(i_pq) - s_pq
            f = np.concatenate([mis.real, mis.imag], axis=1)
            ok = np.isfinite(f).all(axis=1) & (np.abs(f).max(axis=1) < MISMATCH_TOLERANCE_PU)
            if ok.all():
                break
            v_norm = v / np.abs(v)
            ds_dvm = v[:, :, None] * np.conj(y_pq[None] * v_norm[:, None, :])
            ds_dvm[:, idx, idx] += np.conj(i_pq) * v_norm
            ds_dva = -1j * v[:, :, None] * np.conj(y_pq[None] * v[:, None, :])
            ds_dva[:, idx, idx] += 1j * v * np.conj(i_pq)
            jac = np.block([[ds_dva.real, ds_dvm.real], [ds_dva.imag, ds_dvm.imag]])
            jac[~np.isfinite(jac)] = 0.0
            try:
                dx = np.linalg.solve(jac, -np.nan_to_num(f)[:, :, None])[:, :, 0]
            except np.linalg.LinAlgError:
                break
            va += dx[:, :n_pq]
            vm += dx[:, n_pq:]
    return vm * np.exp(1j * va), ok


def _results(
    net: NetworkParams,
    v_pq: ComplexArray,
    s_pq: ComplexArray,
    converged: BoolArray,
    iterations: int,
) -> PowerFlowResult:
    b = v_pq.shape[0]
    v = np.empty((b, net.n_bus), dtype=np.complex128)
    v[:, net.ref] = net.v_ref
    v[:, net.pq] = v_pq
    if net.dead.size:
        v[:, net.dead] = 0.0
    currents = v @ net.y_out_t
    n_br = net.i_scale.shape[0]
    loading = np.abs(currents[:, :n_br]) * net.i_scale
    n_l, n_t = net.n_line, net.n_trafo
    line_loading = np.maximum(loading[:, :n_l], loading[:, n_l : 2 * n_l])
    trafo_loading = np.maximum(
        loading[:, 2 * n_l : 2 * n_l + n_t], loading[:, 2 * n_l + n_t : 2 * n_l + 2 * n_t]
    )
    s_ref = (net.v_ref * np.conj(currents[:, n_br:])).sum(axis=1) * net.base_mva
    # Total losses = net injection of all buses; at solved pq buses it equals the specified S.
    losses = s_ref.real + s_pq.real.sum(axis=1) * net.base_mva
    return PowerFlowResult(
        v=v,
        converged=converged,
        p_slack_mw=s_ref.real,
        q_slack_mvar=s_ref.imag,
        losses_mw=losses,
        line_loading=line_loading,
        trafo_loading=trafo_loading,
        vm_pq=np.abs(v_pq),
        iterations=iterations,
    )
