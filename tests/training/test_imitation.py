"""DAgger warm start at a tiny budget: the clone moves towards the optimum on training states."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from stable_baselines3 import PPO
from stable_baselines3.common.vec_env import VecNormalize

from envs import MicrogridEnv
from envs.sb3_vec_env import SB3VecEnv
from training.config import PretrainConfig, TrainConfig
from training.imitation import (
    DO_NOTHING_TARGET,
    clone_target,
    learner_of,
    pretrain,
)


def _model() -> tuple[PPO, VecNormalize]:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    norm = VecNormalize(SB3VecEnv(1, seed=0), norm_reward=False)
    model = PPO(
        "MlpPolicy", norm, n_steps=64, seed=0, device="cpu", policy_kwargs={"net_arch": [64, 64]}
    )
    return model, norm


def test_dagger_loss_falls_and_clone_approaches_expert() -> None:
    model, norm = _model()
    config = PretrainConfig(
        method="dagger",
        expert_days=4,
        iterations=1,
        days_per_iteration=1,
        relabel_every=8,
        epochs=60,
        batch_size=64,
        learning_rate=3e-3,
        log_std_after=-2.5,
    )
    seen: list[tuple[int, dict[str, float]]] = []
    validated: list[float] = []

    def validate(predict: object) -> float:
        validated.append(1.0)
        return float(len(validated))  # round 0 "best": its weights must be the ones kept

    report = pretrain(model, norm, config, None, 0, validate, lambda r, m: seen.append((r, m)))

    # 4 expert days of 96 steps, then one learner day labelled every 8th step (plus the
    # steps where the expert drove, with probability beta = 0.5).
    assert report.samples[0] == 4 * 96
    assert 4 * 96 + 12 <= report.samples[1] < 5 * 96
    assert [r for r, _ in seen] == [0, 1] and "pretrain_loss" in seen[0][1]
    assert report.last_loss[0] < 0.5 * report.first_loss[0]
    assert report.best_round == 0
    # The normalisation statistics are the demonstrations' (not VecNormalize's fresh zeros).
    assert np.abs(norm.obs_rms.mean).max() > 0.1
    assert float(model.policy.log_std.detach().mean()) == pytest.approx(-2.5)

    # On the training states, the clone acts much closer to the optimum's labels than the
    # untrained network does (battery set-points: the part that costs money).
    obs, target = report.demonstrations.arrays()
    battery = slice(0, len(norm.venv.codec.battery_power_kw))
    untrained, untrained_norm = _model()
    untrained_norm.obs_rms = norm.obs_rms
    before = np.mean((learner_of(untrained, untrained_norm)(obs) - target)[:, battery] ** 2)
    after = np.mean((learner_of(model, norm)(obs) - target)[:, battery] ** 2)
    assert after < 0.5 * before


def test_clone_target_gives_do_nothing_a_margin() -> None:
    env = MicrogridEnv()
    n = env.params.n_prosumer
    kw = np.full(len(env.codec.battery_power_kw), 2.0)
    action = env.codec.encode_action(kw, np.zeros(n), np.zeros(n))
    action[len(kw)] = 0.3  # one prosumer's PV curtailed by 30 %
    target = clone_target(env.codec, action)
    np.testing.assert_array_equal(target[: len(kw)], action[: len(kw)])
    assert target[len(kw)] == pytest.approx(0.3)
    assert np.all(target[len(kw) + 1 : len(kw) + 2 * n] == DO_NOTHING_TARGET)
    assert target[-1] == 0.0  # the price signal keeps the neutral multiplier
    decoded = env.codec.decode_action(target)
    assert np.all(decoded.dr_share == 0.0)


def test_pretrain_is_ppo_only_and_zero_steps_needs_it() -> None:
    with pytest.raises(ValueError, match="pretrain"):
        TrainConfig(algorithm="sac", pretrain=PretrainConfig())
    with pytest.raises(ValueError, match="timesteps"):
        TrainConfig(timesteps=0)
    assert TrainConfig(timesteps=0, pretrain=PretrainConfig()).pretrain is not None
