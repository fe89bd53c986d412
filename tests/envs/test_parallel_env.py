"""The multi-agent env: PettingZoo's API test, ledger-true rewards, SB3 shared-policy training."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pettingzoo.test import parallel_api_test
from stable_baselines3 import PPO

from envs import Scenario
from envs.market import MONEY_UNITS
from envs.parallel_env import MicrogridParallelEnv
from envs.sb3_shared import SharedPolicyVecEnv


def test_passes_pettingzoo_parallel_api_test() -> None:
    parallel_api_test(MicrogridParallelEnv(), num_cycles=120)


def test_rewards_are_each_prosumers_ledger_money() -> None:
    """Summed over a day, reward + degradation = the change of the agent's credit."""
    env = MicrogridParallelEnv()
    env.reset(seed=3)
    start = env.exchange.ledger.credits()[0].copy()
    totals = dict.fromkeys(env.possible_agents, 0.0)
    rng = np.random.default_rng(0)
    steps = 0
    while env.agents:
        actions = {a: rng.uniform(-1, 1, 3).astype(np.float32) for a in env.agents}
        _, rewards, _, truncs, infos = env.step(actions)
        for a, r in rewards.items():
            totals[a] += r + infos[a]["degradation_cost"]
        steps += 1
    assert steps == 96 and all(truncs.values())
    moved = (env.exchange.ledger.credits()[0] - start) / MONEY_UNITS
    np.testing.assert_allclose([totals[a] for a in env.possible_agents], moved, atol=1e-9)


def test_buy_orders_above_every_ask_are_filled() -> None:
    """Agents that bid the band's top meet agents that ask its bottom: they trade."""
    env = MicrogridParallelEnv()
    env.reset(seed=1)
    agents = env.possible_agents
    buyers, sellers = agents[::2], agents[1::2]
    actions = {a: np.array([0.0, 1.0, 0.2], dtype=np.float32) for a in buyers}
    actions |= {a: np.array([0.0, -1.0, -0.2], dtype=np.float32) for a in sellers}
    _, _, _, _, infos = env.step(actions)
    bought = sum(infos[a]["fill_kwh"] for a in buyers)
    sold = sum(infos[a]["fill_kwh"] for a in sellers)
    assert bought > 0 and bought == pytest.approx(sold)
    assert infos[agents[0]]["market_traded_kwh"] == pytest.approx(bought)


def test_bad_actions_name_what_was_expected() -> None:
    env = MicrogridParallelEnv()
    env.reset(seed=0)
    with pytest.raises(ValueError, match="missing an action"):
        env.step({})
    nan = {a: np.array([np.nan, 0.0, 0.0]) for a in env.agents}
    with pytest.raises(ValueError, match="battery, bid_price, quantity"):
        env.step(nan)
    with pytest.raises(ValueError, match=r"market\.enabled"):
        MicrogridParallelEnv(Scenario(market={"enabled": False}))


def test_one_shared_sb3_policy_trains_over_all_prosumers() -> None:
    torch.set_num_threads(1)
    venv = SharedPolicyVecEnv(seed=0)
    assert venv.num_envs == len(venv.env.possible_agents)
    model = PPO("MlpPolicy", venv, n_steps=32, batch_size=104, n_epochs=1, seed=0, device="cpu")
    before = [p.detach().clone() for p in model.policy.parameters()]
    model.learn(total_timesteps=200 * venv.num_envs)
    changed = any(
        not torch.equal(a, b) for a, b in zip(before, model.policy.parameters(), strict=True)
    )
    assert changed
    obs = venv.reset()
    action, _ = model.predict(obs, deterministic=True)
    assert action.shape == (venv.num_envs, 3)
    _, reward, dones, infos = venv.step(action)
    assert reward.shape == (venv.num_envs,) and not dones.any()
    assert all("cash" in i for i in infos)
