"""MicrogridEnv: API checkers, determinism, physics invariants, bad input."""

from __future__ import annotations

import dataclasses

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env as gym_check_env
from stable_baselines3.common.env_checker import check_env as sb3_check_env

import envs  # noqa: F401 - registers Microgrid-v0
from envs import ActionError, MicrogridEnv, Scenario
from envs.dynamics import reset_state, step
from envs.kernel import CompiledParams, step_kernel
from envs.scenario import LV_GRID_CODES


def _rollout(env: MicrogridEnv, seed: int, steps: int, action_seed: int = 0):
    rng = np.random.default_rng(action_seed)
    obs, _ = env.reset(seed=seed)
    traj = [obs]
    rewards = []
    for _ in range(steps):
        obs, r, _, trunc, _ = env.step(rng.uniform(-1, 1, env.action_space.shape))
        traj.append(obs)
        rewards.append(r)
        if trunc:
            obs, _ = env.reset()
            traj.append(obs)
    return np.array(traj), np.array(rewards)


def test_gymnasium_checker_passes() -> None:
    env = gym.make("Microgrid-v0")
    gym_check_env(env.unwrapped, skip_render_check=True)


def test_sb3_checker_passes(env: MicrogridEnv) -> None:
    sb3_check_env(env, warn=True)


def test_same_seed_same_trajectory_different_seed_differs() -> None:
    a, ra = _rollout(MicrogridEnv(), seed=3, steps=120)
    b, rb = _rollout(MicrogridEnv(), seed=3, steps=120)
    c, _ = _rollout(MicrogridEnv(), seed=4, steps=120)
    assert np.array_equal(a, b) and np.array_equal(ra, rb)
    assert not np.array_equal(a, c)


def test_day_ends_in_truncation_not_termination_with_episode_kpis(env: MicrogridEnv) -> None:
    env.reset(seed=0)
    for k in range(96):
        _, reward, terminated, truncated, info = env.step(np.zeros(env.action_space.shape))
        assert not terminated
        assert np.isfinite(reward)
        assert truncated == (k == 95)
    kpis = info["episode_kpis"]
    for key in ("cost", "import_kwh", "export_kwh", "peak_kw", "violations", "self_sufficiency",
                "losses_kwh"):  # fmt: skip
        assert key in kpis and np.isfinite(kpis[key])
    assert kpis["steps"] == 96
    assert 0.0 <= kpis["self_sufficiency"] <= 1.0


def test_energy_balance_soc_limits_and_degradation_every_step(env: MicrogridEnv) -> None:
    rng = np.random.default_rng(7)
    env.reset(seed=1)
    bat = env.params.batteries
    capacity = env.state.capacity_kwh.copy()
    for _ in range(192):
        action = rng.uniform(-1, 1, env.action_space.shape)
        _, _, _, trunc, info = env.step(action)
        lhs = info["import_kwh"] - info["export_kwh"]
        rhs = (
            info["load_kwh"] - info["pv_kwh"] + info["charge_kwh"] - info["discharge_kwh"]
            + info["losses_kwh"]
        )  # fmt: skip
        assert abs(lhs - rhs) <= 1e-3, "energy balance off by more than 1e-6 MWh"
        soc = env.state.soc[0]
        assert np.all(soc >= bat.soc_min - 1e-12) and np.all(soc <= bat.soc_max + 1e-12)
        new_cap = env.state.capacity_kwh
        assert np.all(new_cap <= capacity)  # capacity only fades: degradation only grows
        capacity = new_cap.copy()
        assert info["losses_kwh"] >= 0.0
        if trunc:
            env.reset()
            capacity = env.state.capacity_kwh.copy()


def test_out_of_range_actions_are_clipped_and_reported(env: MicrogridEnv) -> None:
    env.reset(seed=0)
    action = np.zeros(env.action_space.shape)
    action[0] = 3.0
    action[-1] = -2.0
    _, _, _, _, info = env.step(action)
    assert info["action_clipped"] == 2
    assert info["action_clip_amount"] == pytest.approx(3.0)
    env.reset(seed=0)
    clipped = action.copy()
    clipped[0], clipped[-1] = 1.0, -1.0
    _, r1, _, _, _ = env.step(clipped)
    env.reset(seed=0)
    _, r2, _, _, _ = env.step(action)
    assert r1 == r2


def test_bad_actions_raise_errors_naming_the_component(env: MicrogridEnv) -> None:
    env.reset(seed=0)
    bad = np.zeros(env.action_space.shape)
    bad[1] = np.nan
    with pytest.raises(ActionError, match=r"battery\["):
        env.step(bad)
    with pytest.raises(ActionError, match="expected"):
        env.step(np.zeros(3))


def test_reset_options_choose_day_and_soc(env: MicrogridEnv) -> None:
    day = int(env.params.train_days[5])
    _, info = env.reset(seed=0, options={"day": day, "soc": 0.3})
    assert info["day"] == day
    assert np.allclose(env.state.soc, 0.3)
    assert env.state.slot[0] == day * 96
    with pytest.raises(ValueError, match="not a train day"):
        env.reset(options={"day": int(env.params.test_days[0])})
    with pytest.raises(ValueError, match="soc"):
        env.reset(options={"soc": 0.99})
    with pytest.raises(ValueError, match="unknown keys"):
        env.reset(options={"dya": 3})


def test_test_days_never_reach_training() -> None:
    env = MicrogridEnv(split="train")
    test_days = set(env.params.test_days.tolist())
    val_days = set(env.params.validation_days.tolist())
    assert not test_days & set(env.params.train_days.tolist())
    assert not val_days & test_days
    seen = {env.reset(seed=s)[1]["day"] for s in range(300)}
    assert not seen & test_days and not seen & val_days
    test_env = MicrogridEnv(split="test")
    assert {test_env.reset(seed=s)[1]["day"] for s in range(50)} <= test_days


def test_observations_stay_inside_the_space_and_are_finite(env: MicrogridEnv) -> None:
    traj, _ = _rollout(env, seed=5, steps=200)
    assert np.isfinite(traj).all()
    assert all(env.observation_space.contains(o) for o in traj)


@pytest.mark.parametrize("engine", ["kernel", "reference"])
def test_power_flow_divergence_truncates_with_bounded_penalty(engine: str, params) -> None:
    heavy = dataclasses.replace(params, background_s_pu=np.full_like(params.background_s_pu, -5.0))
    state = reset_state(params, np.array([int(params.train_days[0])]), None, np.array([0]))
    env = MicrogridEnv()
    decoded = env.codec.decode_action(np.zeros((1, env.codec.act_dim)))
    if engine == "kernel":
        matrix, diverged = step_kernel(
            CompiledParams(heavy), heavy, state, decoded.battery_kw, decoded.pv_curtailment,
            decoded.dr_share, decoded.price_multiplier,
        )  # fmt: skip
        assert diverged.all()
        out_reward, out_trunc = matrix[0, 0], matrix[0, 1]
        grid = state.grid
    else:
        new_state, out = step(heavy, state, decoded)
        assert out.diverged.all()
        out_reward, out_trunc = out.reward[0], out.truncated[0]
        grid = new_state.grid
    assert out_reward == -heavy.divergence_penalty
    assert out_trunc
    assert np.isfinite(grid).all()


def test_env_reports_divergence_in_info(monkeypatch: pytest.MonkeyPatch) -> None:
    env = MicrogridEnv()
    env.reset(seed=0)
    # Make the next slot's background absurdly heavy through the compiled params the env uses.
    compiled = env.engine.compiled
    assert compiled is not None
    heavy = dataclasses.replace(
        env.params, background_s_pu=np.full_like(env.params.background_s_pu, -5.0)
    )
    env.engine.params = heavy
    obs, reward, terminated, truncated, info = env.step(np.zeros(env.action_space.shape))
    assert truncated and not terminated
    assert info["truncation_reason"] == "power_flow_diverged"
    assert info["power_flow_converged"] is False
    assert reward == -heavy.divergence_penalty
    assert np.isfinite(obs).all()


def test_every_reward_term_and_kpi_is_in_info(env: MicrogridEnv) -> None:
    env.reset(seed=0)
    _, reward, _, _, info = env.step(np.zeros(env.action_space.shape))
    terms = info["reward_terms"]
    assert reward == pytest.approx(terms["energy_cost"] + terms["penalties"])
    keys = ("cost", "import_kwh", "export_kwh", "voltage_violation_pu", "thermal_violation")
    keys += ("degradation_cost", "discomfort_cost", "losses_kwh", "community_price")
    for key in keys:
        assert key in info


def test_other_grids_build_and_step() -> None:
    for code in ("1-LV-semiurb4--2-sw", "1-LV-rural1--0-sw"):
        env = MicrogridEnv(Scenario(grid=code, name=code))
        env.reset(seed=0)
        for _ in range(4):
            obs, r, _, _, _ = env.step(env.action_space.sample())
            assert np.isfinite(obs).all() and np.isfinite(r)


@pytest.mark.slow
@pytest.mark.parametrize("code", LV_GRID_CODES)
def test_every_simbench_lv_grid_builds_and_steps(code: str) -> None:
    env = MicrogridEnv(Scenario(grid=code, name=code))
    env.reset(seed=0)
    for _ in range(96):
        obs, reward, _, _, info = env.step(env.action_space.sample())
        assert np.isfinite(obs).all() and np.isfinite(reward)
    assert info["episode_kpis"]["steps"] == 96
