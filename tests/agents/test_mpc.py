"""MPC over the observed forecasts: valid actions, batches, and what it reads from the obs."""

from __future__ import annotations

import numpy as np
import pytest

from agents import MPCPolicy
from envs import MicrogridEnv


def test_actions_are_valid_and_batches_match_rows(test_env: MicrogridEnv) -> None:
    policy = MPCPolicy(test_env.params, test_env.codec)
    obs, _ = test_env.reset(seed=3, options={"day": int(test_env.params.test_days[0])})
    seen = [obs]
    for _ in range(6):
        action = policy.predict(obs)
        assert test_env.action_space.contains(action)
        obs, *_ = test_env.step(action)
        seen.append(obs)
    batch = np.stack(seen)
    actions = policy.predict(batch)
    assert actions.shape == (len(seen), test_env.codec.act_dim)
    np.testing.assert_allclose(actions, np.stack([policy.predict(o) for o in seen]), atol=1e-6)


def test_reads_the_slot_of_day_from_the_observation(test_env: MicrogridEnv) -> None:
    policy = MPCPolicy(test_env.params, test_env.codec)
    tod = test_env.codec.obs_slice("time_of_day")
    obs, _ = test_env.reset(seed=0, options={"day": int(test_env.params.test_days[0])})
    for slot in range(test_env.params.steps_per_day):
        raw = test_env.codec.decode_observation(obs)["time_of_day"][0]
        assert policy.slot_of_day(raw) == slot
        obs = obs.copy()
        phase = 2 * np.pi * (slot + 1) / test_env.params.steps_per_day
        obs[tod] = np.array([np.sin(phase), np.cos(phase)], dtype=np.float32)


def test_stored_energy_is_valued_by_what_the_rest_of_the_day_can_absorb(
    test_env: MicrogridEnv,
) -> None:
    p = test_env.params
    policy = MPCPolicy(p, test_env.codec)
    last = policy.terminal_ladder(p.steps_per_day - policy.horizon, 30.0)
    assert last.width_kwh.size == 0  # nothing left to come today: the free final SoC
    ladder = policy.terminal_ladder(0, 30.0)
    peak = int((p.import_price == p.import_price.max()).sum())
    eta = p.batteries.efficiency_discharge.mean()
    assert ladder.width_kwh[0] == pytest.approx(peak * 30.0 * p.dt_h / eta)
    assert ladder.value_per_kwh[0] < eta * p.import_price.max()
    assert np.all(np.diff(ladder.value_per_kwh) <= 0)
