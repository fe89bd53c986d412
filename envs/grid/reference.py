"""pandapower as a drop-in power-flow solver: the slow reference for tests and benchmarks.

`PandapowerSolver` takes the same per-unit pq-bus injections as `envs.powerflow.solve`, writes
them as one load per bus into a copy of the net stripped of its own loads, PV and storage, and
runs `pandapower.runpp`. An environment built with `solver=PandapowerSolver(grid_code)` is the
"same env stepped with runpp" that `microgrid bench env` measures the fast path against.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandapower as pp
from pandapower.pypower.idx_bus import PD, QD

from envs.grid.build import load_net, load_profiles
from envs.grid.network import compile_network, ppc_bus_of, run_reference
from envs.params import ComplexArray, NetworkParams
from envs.powerflow import PowerFlowResult


class PandapowerSolver:
    """Solve each row of a batch with `pandapower.runpp` on a net whose injections we set."""

    def __init__(self, grid_code: str) -> None:
        net = load_net(grid_code)
        self.network = compile_network(net)
        for table in ("load", "sgen", "storage"):
            net[table] = net[table].iloc[0:0]
        ppc_to_pp: dict[int, int] = {}
        lookup = np.asarray(net._pd2ppc_lookups["bus"])
        for pp_bus in net.bus.index:
            ppc_to_pp.setdefault(int(lookup[pp_bus]), int(pp_bus))
        self._bus_of_pq = [ppc_to_pp[int(b)] for b in self.network.pq]
        for b in self._bus_of_pq:
            pp.create_load(net, bus=b, p_mw=0.0, q_mvar=0.0)
        self.net: Any = copy.deepcopy(net)
        self._lookup = lookup

    def __call__(
        self, net_params: NetworkParams, s_pq: ComplexArray, v_start: ComplexArray | None
    ) -> PowerFlowResult:
        n = self.network
        b = s_pq.shape[0]
        v = np.empty((b, n.n_bus), dtype=np.complex128)
        ok = np.ones(b, dtype=bool)
        p_slack = np.zeros(b)
        q_slack = np.zeros(b)
        losses = np.zeros(b)
        line = np.zeros((b, n.n_line))
        trafo = np.zeros((b, n.n_trafo))
        for i in range(b):
            s_mw = -s_pq[i] * n.base_mva  # a load's p_mw is consumption
            self.net.load["p_mw"] = s_mw.real
            self.net.load["q_mvar"] = s_mw.imag
            try:
                run_reference(self.net)
            except pp.LoadflowNotConverged:
                ok[i] = False
                v[i, n.pq] = n.w_pq
                v[i, n.ref] = n.v_ref
                continue
            res = self.net.res_bus
            vm = np.zeros(n.n_bus)
            va = np.zeros(n.n_bus)
            vm[self._lookup[res.index]] = res.vm_pu.to_numpy()
            va[self._lookup[res.index]] = np.deg2rad(res.va_degree.to_numpy())
            v[i] = vm * np.exp(1j * va)
            p_slack[i] = float(self.net.res_ext_grid.p_mw.sum())
            q_slack[i] = float(self.net.res_ext_grid.q_mvar.sum())
            losses[i] = p_slack[i] - float(s_mw.real.sum())
            line[i] = self.net.res_line.loading_percent.to_numpy() / 100.0
            trafo[i] = self.net.res_trafo.loading_percent.to_numpy() / 100.0
        return PowerFlowResult(
            v=v,
            converged=ok,
            p_slack_mw=p_slack,
            q_slack_mvar=q_slack,
            losses_mw=losses,
            line_loading=line,
            trafo_loading=trafo,
            vm_pq=np.abs(v[:, n.pq]),
            iterations=0,
        )


@dataclass(frozen=True)
class ReferencePoints:
    """Random operating points of one grid, solved by `pandapower.runpp`: what the fast power
    flow is checked against (tests) and timed against (`microgrid bench powerflow`)."""

    network: NetworkParams
    s_pq: ComplexArray
    """(n, n_pq) injections as pandapower aggregated them (per unit, generation > 0)."""
    bus_rows: np.ndarray
    """Position of each pandapower bus (in `net.bus` order) among the solved buses."""
    vm_pu: np.ndarray
    va_degree: np.ndarray
    line_loading: np.ndarray
    trafo_loading: np.ndarray
    p_slack_mw: np.ndarray
    runpp_seconds: float
    """Time spent inside `runpp` alone, for speed ratios."""


def reference_points(
    grid_code: str, n: int, seed: int, progress: Callable[[], None] | None = None
) -> ReferencePoints:
    """Real profile rows at random slots, with random load scaling, PV and storage set-points."""
    net = load_net(grid_code)
    network = compile_network(net)
    profiles = load_profiles(net)
    load_p = profiles[("load", "p_mw")].to_numpy()
    load_q = profiles[("load", "q_mvar")].to_numpy()
    sgen_p = profiles[("sgen", "p_mw")].to_numpy()
    storage_sn = net.storage.sn_mva.fillna(0.0).to_numpy()
    rng = np.random.default_rng(seed)
    rows: dict[str, list[Any]] = {k: [] for k in ("s", "vm", "va", "line", "trafo", "slack")}
    seconds = 0.0
    for slot in rng.integers(0, load_p.shape[0], n):
        scale = rng.uniform(0.5, 1.5)
        net.load["p_mw"] = load_p[slot] * scale
        net.load["q_mvar"] = load_q[slot] * scale
        net.sgen["p_mw"] = sgen_p[slot] * rng.uniform(0.5, 1.2)
        net.storage["p_mw"] = rng.uniform(-1, 1, storage_sn.size) * storage_sn
        start = time.perf_counter()
        run_reference(net)
        seconds += time.perf_counter() - start
        bus = np.real(net._ppc["bus"])
        rows["s"].append((-(bus[:, PD] + 1j * bus[:, QD]) / network.base_mva)[network.pq])
        rows["vm"].append(net.res_bus.vm_pu.to_numpy().copy())
        rows["va"].append(net.res_bus.va_degree.to_numpy().copy())
        rows["line"].append(net.res_line.loading_percent.to_numpy() / 100.0)
        rows["trafo"].append(net.res_trafo.loading_percent.to_numpy() / 100.0)
        rows["slack"].append(float(net.res_ext_grid.p_mw.sum()))
        if progress is not None:
            progress()
    return ReferencePoints(
        network=network,
        s_pq=np.array(rows["s"]),
        bus_rows=ppc_bus_of(net, net.bus.index.to_numpy()),
        vm_pu=np.array(rows["vm"]),
        va_degree=np.array(rows["va"]),
        line_loading=np.array(rows["line"]),
        trafo_loading=np.array(rows["trafo"]),
        p_slack_mw=np.array(rows["slack"]),
        runpp_seconds=seconds,
    )
