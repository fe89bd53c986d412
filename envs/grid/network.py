"""Admittance model of a pandapower net, taken from pandapower's own ppc once.

Taking Ybus from pandapower's ppc (rather than re-deriving line and transformer models) is what
makes the fast power flow agree with `pandapower.runpp` to solver precision: the transformer
T-model, tap position, phase shift and bus-bus switch fusion are all pandapower's.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import pandapower as pp
from pandapower.pypower.idx_brch import F_BUS, T_BUS
from pandapower.pypower.idx_bus import BASE_KV, BUS_TYPE, PQ, PV, REF, VA, VM, VMAX, VMIN
from pandapower.pypower.makeYbus import makeYbus

from envs.errors import ScenarioError
from envs.params import NetworkParams

SQRT3 = float(np.sqrt(3.0))


def run_reference(net: Any) -> None:
    """pandapower's AC power flow with the options the fast path reproduces."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pp.runpp(net, numba=False, calculate_voltage_angles=True, init="dc")


def compile_network(net: Any) -> NetworkParams:
    """Build the per-unit admittance arrays of `net` (a power-flow-ready topology)."""
    run_reference(net)  # builds net._ppc with every model option resolved
    ppc = net._ppc
    bus = np.real(ppc["bus"])
    branch = ppc["branch"]
    base_mva = float(ppc["baseMVA"])
    ybus_s, yf_s, yt_s = makeYbus(base_mva, ppc["bus"], branch)
    ybus = np.asarray(ybus_s.todense(), dtype=np.complex128)
    yf = np.asarray(yf_s.todense(), dtype=np.complex128)
    yt = np.asarray(yt_s.todense(), dtype=np.complex128)

    types = bus[:, BUS_TYPE].astype(int)
    if (types == PV).any():
        raise ScenarioError(
            "grid: voltage-controlled (PV) buses are not supported; expected an LV feeder fed "
            "by one external grid"
        )
    ref = np.flatnonzero(types == REF)
    pq = np.flatnonzero(types == PQ)
    if ref.size == 0:
        raise ScenarioError("grid: no external grid (slack bus) found")
    v_ref = bus[ref, VM] * np.exp(1j * np.deg2rad(bus[ref, VA]))
    y_pq = ybus[np.ix_(pq, pq)]
    z_pq = np.linalg.inv(y_pq).astype(np.complex128)
    w_pq = -z_pq @ (ybus[np.ix_(pq, ref)] @ v_ref)

    lookups = net._pd2ppc_lookups["branch"]
    f_line, t_line = lookups.get("line", (0, 0))
    f_tr, t_tr = lookups.get("trafo", (0, 0))
    line_rows = np.arange(f_line, t_line, dtype=np.int64)
    trafo_rows = np.arange(f_tr, t_tr, dtype=np.int64)
    from_bus = np.real(branch[:, F_BUS]).astype(np.int64)
    to_bus = np.real(branch[:, T_BUS]).astype(np.int64)
    # |I| in per unit -> kA on each end's voltage base.
    i_base_f = base_mva / (SQRT3 * bus[from_bus, BASE_KV])
    i_base_t = base_mva / (SQRT3 * bus[to_bus, BASE_KV])

    line = net.line
    i_max = (line["max_i_ka"] * line["df"] * line["parallel"]).to_numpy(dtype=float)
    trafo = net.trafo
    sn = trafo["sn_mva"].to_numpy(dtype=float) * (trafo["parallel"] * trafo["df"]).to_numpy(
        dtype=float
    )
    i_rated_hv = sn / (SQRT3 * trafo["vn_hv_kv"].to_numpy(dtype=float))
    i_rated_lv = sn / (SQRT3 * trafo["vn_lv_kv"].to_numpy(dtype=float))

    y_out = np.concatenate(
        [yf[line_rows], yt[line_rows], yf[trafo_rows], yt[trafo_rows], ybus[ref]], axis=0
    )
    i_scale = np.concatenate(
        [
            i_base_f[line_rows] / i_max,
            i_base_t[line_rows] / i_max,
            i_base_f[trafo_rows] / i_rated_hv,
            i_base_t[trafo_rows] / i_rated_lv,
        ]
    )
    dead = np.setdiff1d(np.arange(bus.shape[0]), np.concatenate([pq, ref])).astype(np.int64)
    vmin = np.nan_to_num(bus[pq, VMIN], nan=0.9)
    vmax = np.nan_to_num(bus[pq, VMAX], nan=1.1)
    vmin = np.where(vmin > 0, vmin, 0.9)
    vmax = np.where(vmax > 0, vmax, 1.1)
    return NetworkParams(
        base_mva=base_mva,
        n_bus=int(bus.shape[0]),
        pq=pq.astype(np.int64),
        ref=ref.astype(np.int64),
        v_ref=v_ref.astype(np.complex128),
        ybus=ybus,
        z_pq=z_pq,
        w_pq=w_pq,
        yf=yf,
        yt=yt,
        line_rows=line_rows,
        trafo_rows=trafo_rows,
        line_i_base_ka_f=i_base_f[line_rows],
        line_i_base_ka_t=i_base_t[line_rows],
        line_i_max_ka=i_max,
        trafo_i_base_ka_f=i_base_f[trafo_rows],
        trafo_i_base_ka_t=i_base_t[trafo_rows],
        trafo_i_rated_ka_f=i_rated_hv,
        trafo_i_rated_ka_t=i_rated_lv,
        dead=dead,
        y_out_t=np.ascontiguousarray(y_out.T),
        i_scale=i_scale,
        v_min_pu=vmin,
        v_max_pu=vmax,
    )


def ppc_bus_of(net: Any, pandapower_buses: np.ndarray) -> np.ndarray:
    """Map pandapower bus indices to the ppc buses `compile_network` solves."""
    lookup = np.asarray(net._pd2ppc_lookups["bus"])
    return lookup[np.asarray(pandapower_buses, dtype=np.int64)].astype(np.int64)
