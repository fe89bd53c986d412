"""The fast power flow against pandapower.runpp on random operating points of real LV grids."""

from __future__ import annotations

import warnings
import zlib

import numpy as np
import pytest
from pandapower.pypower.idx_bus import PD, QD

from envs.grid.build import load_net, load_profiles
from envs.grid.network import compile_network, ppc_bus_of, run_reference
from envs.powerflow import solve

#: Three simbench LV grids: 15, 44 and 111 buses.
GRIDS = ["1-LV-rural1--2-sw", "1-LV-semiurb4--2-sw", "1-LV-semiurb5--2-sw"]
POINTS = 500


def _random_points(code: str, n: int, seed: int):
    """Real profile rows at random slots, with random storage set-points and load scaling."""
    net = load_net(code)
    network = compile_network(net)
    profiles = load_profiles(net)
    rng = np.random.default_rng(seed)
    load_p = profiles[("load", "p_mw")].to_numpy()
    load_q = profiles[("load", "q_mvar")].to_numpy()
    sgen_p = profiles[("sgen", "p_mw")].to_numpy()
    slots = rng.integers(0, load_p.shape[0], n)
    for slot in slots:
        scale = rng.uniform(0.5, 1.5)
        net.load["p_mw"] = load_p[slot] * scale
        net.load["q_mvar"] = load_q[slot] * scale
        net.sgen["p_mw"] = sgen_p[slot] * rng.uniform(0.5, 1.2)
        net.storage["p_mw"] = rng.uniform(-1, 1, len(net.storage)) * net.storage.sn_mva.fillna(0)
        yield net, network


@pytest.mark.parametrize("code", GRIDS)
def test_matches_pandapower_on_random_operating_points(code: str) -> None:
    dv_max = 0.0
    line_err = 0.0
    trafo_err = 0.0
    slack_err = 0.0
    checked = 0
    batch_s = []
    references = []
    for net, network in _random_points(code, POINTS, seed=zlib.crc32(code.encode())):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            run_reference(net)
        bus = np.real(net._ppc["bus"])
        s = -(bus[:, PD] + 1j * bus[:, QD]) / network.base_mva
        batch_s.append(s[network.pq])
        lookup = ppc_bus_of(net, net.bus.index.to_numpy())
        references.append(
            (
                lookup,
                net.res_bus.vm_pu.to_numpy().copy(),
                net.res_bus.va_degree.to_numpy().copy(),
                net.res_line.loading_percent.to_numpy() / 100.0,
                net.res_trafo.loading_percent.to_numpy() / 100.0,
                float(net.res_ext_grid.p_mw.sum()),
            )
        )
    # One batched solve for all points: the batch path is what the vector env uses.
    result = solve(network, np.array(batch_s))
    assert result.converged.all()
    for i, (lookup, vm, va, line, trafo, p_slack) in enumerate(references):
        v = result.v[i, lookup]
        dv_max = max(dv_max, float(np.abs(np.abs(v) - vm).max()))
        va_err = np.abs(np.rad2deg(np.angle(v)) - va)
        assert float(va_err.max()) < 1e-4
        line_err = max(line_err, float(np.abs(result.line_loading[i] - line).max()))
        trafo_err = max(trafo_err, float(np.abs(result.trafo_loading[i] - trafo).max()))
        slack_err = max(slack_err, abs(float(result.p_slack_mw[i]) - p_slack))
        checked += 1
    assert checked == POINTS
    assert dv_max <= 1e-6, f"max |dV| {dv_max:.2e} pu"
    assert line_err <= 1e-4, f"line loading error {line_err:.2e}"
    assert trafo_err <= 1e-4, f"transformer loading error {trafo_err:.2e}"
    assert slack_err <= 1e-6, f"slack power error {slack_err:.2e} MW"


@pytest.fixture(scope="module")
def rural():
    net = load_net(GRIDS[0])
    return net, compile_network(net)


def test_warm_start_gives_the_same_solution(rural) -> None:
    _, network = rural
    rng = np.random.default_rng(1)
    s = (rng.uniform(-0.01, 0.005, (8, network.pq.size))) + 0j
    cold = solve(network, s)
    warm = solve(network, s, cold.v[:, network.pq] * (1 + 1e-3))
    assert np.abs(cold.v - warm.v).max() < 1e-9


def test_overload_beyond_collapse_is_reported_not_nan(rural) -> None:
    _, network = rural
    s = np.full((3, network.pq.size), -5.0 + 0j)  # 5 MW per bus on a 160 kVA feeder
    s[0] = -0.001
    result = solve(network, s)
    assert result.converged.tolist() == [True, False, False]
    for arr in (result.v, result.line_loading, result.p_slack_mw, result.losses_mw):
        assert np.isfinite(arr).all()


def test_newton_raphson_fallback_solves_what_zbus_cannot_finish(rural) -> None:
    """With a one-iteration budget Z-bus cannot converge; the NR fallback must still solve it."""
    net, network = rural
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run_reference(net)
    bus = np.real(net._ppc["bus"])
    s = (-(bus[:, PD] + 1j * bus[:, QD]) / network.base_mva)[network.pq][None]
    full = solve(network, s)
    short = solve(network, s, max_iter=1)
    assert short.converged.all()
    assert np.abs(full.v - short.v).max() < 1e-8
