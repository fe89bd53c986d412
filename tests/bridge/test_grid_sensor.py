"""The simulator's grid sensor reads what the env's step leaves: the same voltages and loadings
(`envs.dynamics.step`'s grid state) from the same injections, slot after slot (its warm start
carried over), with demand response, curtailment and batteries at work."""

from __future__ import annotations

import numpy as np

from bridge.grid_sensor import Feeder, GridSensor
from envs.codec import DecodedAction
from envs.devices import battery_step, flexible_load_step, pv_output
from envs.dynamics import reset_state, step
from envs.grid import build_grid
from envs.scenario import Scenario


def test_sensor_reads_the_envs_grid_state() -> None:
    p = build_grid(Scenario())
    n, n_b = p.n_prosumer, p.batteries.n
    s = reset_state(p, np.array([148]), None, np.zeros(1, dtype=np.int64))
    sensor = GridSensor(Feeder.of(p))
    rng = np.random.default_rng(0)
    for _ in range(12):
        a = DecodedAction(
            battery_kw=rng.uniform(-1.0, 1.0, (1, n_b)) * p.batteries.power_kw,
            pv_curtailment=rng.uniform(0.0, 0.5, (1, n)),
            dr_share=rng.uniform(0.0, 1.0, (1, n)),
            price_multiplier=np.ones(1),
            clipped=np.zeros(1),
            clip_amount=np.zeros(1),
        )
        t = int(s.slot[0])
        load = p.prosumer_load_kw[t]
        fl = flexible_load_step(
            load[None], s.backlog_kwh, a.dr_share, p.curtailable_share, p.shiftable_share,
            p.rebound_per_step, p.dt_h,
        )  # fmt: skip
        pv = pv_output(p.prosumer_pv_kw[t], a.pv_curtailment[0])
        bs = battery_step(p.batteries, s.soc, s.capacity_kwh, a.battery_kw, p.dt_h)
        lossless = float((fl.served_kw[0] - pv).sum() + bs.power_kw[0].sum())
        reading = sensor.read(t, load, fl.served_kw[0], pv, bs.power_kw[0], lossless)
        s, outcome = step(p, s, a)
        assert not outcome.diverged[0]
        got = [reading[k] for k in ("v_min_pu", "v_max_pu", "line_loading", "trafo_loading")]
        np.testing.assert_allclose(got, s.grid[0], rtol=0, atol=1e-8)
        assert reading["trafo_net_kw"] == lossless
