"""The simulated grid sensor: the env's own power flow over the site's feeder.

The device simulator's grid sensor reports what a sensor at the transformer would read: bus
voltages, line and transformer loadings and the transformer's flow. It solves the env's AC power
flow (`envs.powerflow.solve`, no pandapower: the feeder arrives as the compiled admittance
model, `envs.params.NetworkParams`) on the same injections the env builds in `envs.dynamics.step`:
each prosumer's served load (its reactive load scaled with it) less its PV output, the batteries'
power and the feeder's uncontrolled loads, PV and storage. So the bridge observes the env's grid
state (to the fixed point's tolerance, ~1e-9 pu) and its grid events (demand response,
emergencies, `envs.market_kernel.grid_events`) are the env's (tests/bridge/test_parity.py). A
slot whose flow does not converge keeps the last reading, as the env keeps its last grid state.

The transformer flow it reports (``trafo_net_kw``) is the slot's lossless balance (the meters,
the community battery and the uncontrolled load), not the power flow's slack with the feeder's
losses: the bridge's persistence forecast takes the feeder's uncontrolled load as that flow less
the meters and the community battery, and the env's persistence observes the uncontrolled load
itself, which a flow with losses would miss by the losses (~0.5 kW at dawn), moving the
rule-based policy's community battery. The price of that choice: the community price the bridge
computes from the flow differs from the env's by the losses where the community imports (where
it exports the seed formula's demand factor sits at its floor and they agree).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from envs.params import ComplexArray, FloatArray, GridParams, NetworkParams
from envs.powerflow import solve


@dataclass(frozen=True)
class Feeder:
    """The feeder as the env's power flow sees it, in the site's prosumer and battery order."""

    network: NetworkParams
    background_s_pu: ComplexArray
    """(T, n_pq) the uncontrolled loads', PV's and storage's injection (generation > 0)."""
    load_kvar: FloatArray
    """(T, n_prosumer) each household's reactive load before demand response."""
    injection_map: FloatArray
    """(n_prosumer + n_battery, n_pq) prosumer and battery injections to buses."""

    @classmethod
    def of(cls, params: GridParams) -> Feeder:
        return cls(
            params.network, params.background_s_pu, params.prosumer_load_kvar,
            params.injection_map,
        )  # fmt: skip


@dataclass
class GridSensor:
    """The sensor's readings slot by slot; keeps the last solution as the next warm start."""

    feeder: Feeder
    _v_pq: ComplexArray | None = None
    _last: FloatArray = field(default_factory=lambda: np.array([1.0, 1.0, 0.0, 0.0]))

    def read(
        self,
        t: int,
        load_kw: FloatArray,
        served_kw: FloatArray,
        pv_kw: FloatArray,
        battery_kw: FloatArray,
        lossless_kw: float,
    ) -> dict[str, float]:
        """The sensor's metrics for the slot of profile row `t`: households' demand `load_kw`
        and `served_kw` after demand response, PV output, battery power (charging > 0, codec
        order); `lossless_kw` is the slot's lossless balance, reported as the flow."""
        f = self.feeder
        net = f.network
        with np.errstate(divide="ignore", invalid="ignore"):
            q_ratio = np.where(load_kw > 0.0, served_kw / load_kw, 1.0)
        inj_p = np.concatenate([pv_kw - served_kw, -battery_kw])
        inj_q = np.concatenate([-f.load_kvar[t] * q_ratio, np.zeros_like(battery_kw)])
        s_pq = f.background_s_pu[t] + ((inj_p + 1j * inj_q) @ f.injection_map) / (
            net.base_mva * 1000.0
        )
        pf = solve(net, s_pq[None], self._v_pq)
        if not bool(pf.converged[0]):
            self._v_pq = None
            g = self._last
        else:
            self._v_pq = pf.v[:, net.pq]
            line = float(pf.line_loading[0].max()) if pf.line_loading.shape[1] else 0.0
            trafo = float(pf.trafo_loading[0].max()) if pf.trafo_loading.shape[1] else 0.0
            g = np.array([pf.vm_pq[0].min(), pf.vm_pq[0].max(), line, trafo])
            self._last = g
        return {
            "v_min_pu": float(g[0]),
            "v_max_pu": float(g[1]),
            "line_loading": float(g[2]),
            "trafo_loading": float(g[3]),
            "trafo_net_kw": lossless_kw,
        }
