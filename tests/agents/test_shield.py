"""The safety shield: whatever a policy asks, the batteries stay inside their limits."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from agents import Shield
from envs import MicrogridEnv


def test_random_actions_never_leave_the_soc_window(test_env: MicrogridEnv) -> None:
    """Wild actions (out of range, NaN) through the shield into the env for two days: the SoC
    stays in the shield's narrower window, the env never has to cut a set-point, and the ramp
    limit holds wherever the SoC window allows it."""
    p, codec = test_env.params, test_env.codec
    bat = p.batteries
    margin, ramp = 0.05, 0.5 * bat.power_kw
    shield = Shield.from_params(p, codec, ramp_kw_per_step=ramp, soc_margin=margin)
    rng = np.random.default_rng(7)
    for day in test_env.params.test_days[:2]:
        test_env.reset(seed=1, options={"day": int(day)})
        last = np.zeros(bat.n)
        for _ in range(p.episode_steps):
            wild = rng.uniform(-2.0, 2.0, codec.act_dim)
            wild[rng.random(codec.act_dim) < 0.05] = np.nan
            soc = test_env.state.soc[0]
            action, report = shield.project(wild, soc, last, test_env.state.capacity_kwh[0])
            assert test_env.action_space.contains(action)
            _, _, _, truncated, info = test_env.step(action)
            assert info["battery_limited_kw"] < 1e-6
            assert np.all(info["soc"] >= bat.soc_min + margin - 1e-9)
            assert np.all(info["soc"] <= bat.soc_max - margin + 1e-9)
            moved = np.abs(report.applied_kw - last)
            assert np.all((moved <= ramp + 1e-9) | report.ramp_overridden)
            last = report.applied_kw
            if truncated:
                break


def test_nan_and_out_of_range_are_reported(test_env: MicrogridEnv) -> None:
    shield = Shield.from_params(test_env.params, test_env.codec)
    n = test_env.params.n_battery
    wild = np.zeros(test_env.codec.act_dim)
    wild[0], wild[n] = np.nan, 3.0
    action, report = shield.project(wild, test_env.params.batteries.soc_initial)
    assert action[0] == 0.0 and action[n] == 1.0
    assert report.non_finite[0] and report.out_of_range[n]
    assert report.modified
    calm, quiet = shield.project(np.zeros(test_env.codec.act_dim), np.full(n, 0.5))
    assert not quiet.modified
    np.testing.assert_array_equal(calm, 0.0)


def test_soc_safety_wins_over_the_ramp_limit(test_env: MicrogridEnv) -> None:
    """A battery charging at full power that is now full must stop, whatever the ramp says."""
    p = test_env.params
    bat = p.batteries
    shield = Shield.from_params(p, test_env.codec, ramp_kw_per_step=0.1 * bat.power_kw)
    full = np.ones(test_env.codec.act_dim)
    _, report = shield.project(full, bat.soc_max, last_setpoint=bat.power_kw)
    np.testing.assert_allclose(report.applied_kw, 0.0)
    assert report.ramp_overridden.all() and report.soc_limited.all()


def test_batches_and_bad_inputs(test_env: MicrogridEnv) -> None:
    p, codec = test_env.params, test_env.codec
    shield = Shield.from_params(p, codec)
    soc = np.stack([p.batteries.soc_min, p.batteries.soc_max])
    actions, report = shield.project(np.stack([-np.ones(codec.act_dim)] * 2), soc)
    assert actions.shape == (2, codec.act_dim)
    np.testing.assert_allclose(report.applied_kw[0], 0.0)  # empty: cannot discharge
    assert np.all(report.applied_kw[1] < 0.0)  # full: may discharge
    with pytest.raises(ValueError, match="soc must be finite"):
        shield.project(np.zeros(codec.act_dim), np.full(p.n_battery, np.nan))
    with pytest.raises(ValueError, match="must end in"):
        shield.project(np.zeros(codec.act_dim + 1), p.batteries.soc_initial)
    with pytest.raises(ValueError, match="non-empty window"):
        Shield.from_params(p, codec, soc_margin=0.5)


def test_imports_neither_gymnasium_nor_pandapower() -> None:
    """The live bridge imports the shield: it must not drag the simulator in."""
    code = (
        "import sys, agents.shield; "
        "print(sorted(m for m in ('gymnasium', 'pandapower', 'scipy') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
