"""The fast power flow against pandapower.runpp on random operating points of real LV grids."""

from __future__ import annotations

import warnings
import zlib

import numpy as np
import pytest
from pandapower.pypower.idx_bus import PD, QD

from envs.grid.build import load_net
from envs.grid.network import compile_network, run_reference
from envs.grid.reference import reference_points
from envs.powerflow import solve

#: Three simbench LV grids: 15, 44 and 111 buses.
GRIDS = ["1-LV-rural1--2-sw", "1-LV-semiurb4--2-sw", "1-LV-semiurb5--2-sw"]
POINTS = 500


@pytest.mark.parametrize("code", GRIDS)
def test_matches_pandapower_on_random_operating_points(code: str) -> None:
    ref = reference_points(code, POINTS, seed=zlib.crc32(code.encode()))
    # One batched solve for all points: the batch path is what the vector env uses.
    result = solve(ref.network, ref.s_pq)
    assert result.converged.all()
    assert result.v.shape[0] == POINTS
    v = result.v[:, ref.bus_rows]
    dv_max = float(np.abs(np.abs(v) - ref.vm_pu).max())
    va_err = float(np.abs(np.rad2deg(np.angle(v)) - ref.va_degree).max())
    line_err = float(np.abs(result.line_loading - ref.line_loading).max())
    trafo_err = float(np.abs(result.trafo_loading - ref.trafo_loading).max())
    slack_err = float(np.abs(result.p_slack_mw - ref.p_slack_mw).max())
    assert dv_max <= 1e-6, f"max |dV| {dv_max:.2e} pu"
    assert va_err < 1e-4, f"max angle error {va_err:.2e} degrees"
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
