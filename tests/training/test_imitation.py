"""DAgger warm start at a tiny budget: the clone moves towards the optimum on training states."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient
from stable_baselines3 import PPO
from stable_baselines3.common.vec_env import VecNormalize

from envs import MicrogridEnv
from envs.sb3_vec_env import SB3VecEnv
from training.config import PretrainConfig, TrainConfig, load_train_config
from training.imitation import (
    DO_NOTHING_TARGET,
    clone_target,
    learner_of,
    pretrain,
    warm_up_critic,
)
from training.train import train


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


def test_critic_warm_up_moves_the_critic_only() -> None:
    model, _ = _model()
    actor = {k: v.clone() for k, v in model.policy.state_dict().items() if "value" not in k}
    critic = {k: v.clone() for k, v in model.policy.state_dict().items() if "value" in k}
    optimiser = model.policy.optimizer
    warm_up_critic(model, 64, 1e-3)
    after = model.policy.state_dict()
    for k, v in actor.items():
        torch.testing.assert_close(after[k], v, msg=k)
    assert any(not torch.equal(after[k], v) for k, v in critic.items())
    assert model.policy.optimizer is optimiser  # RL goes on with the full optimiser


def test_train_with_pretrain_only_exports_the_imitated_policy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.chdir(tmp_path)
    config = TrainConfig(
        timesteps=0,
        n_envs=1,
        pretrain=PretrainConfig(method="bc", expert_days=2, epochs=5, batch_size=64),
        policy_kwargs={"net_arch": [32, 32]},
        eval={"days": 1},
        registered_model="smoke-dagger",
        output_dir=str(tmp_path / "runs"),
    )
    result = train(config)
    run = MlflowClient().get_run(result.run_id)
    assert run.data.metrics["pretrain_samples"] == 2 * 96
    assert run.data.metrics["onnx_parity_max_abs"] <= 1e-5
    assert run.data.params["pretrain.method"] == "bc"
    assert result.val_cost == pytest.approx(run.data.metrics["pretrain_val_cost"], rel=1e-6)


def test_shipped_imitation_config_validates() -> None:
    config = load_train_config(
        Path(__file__).resolve().parents[2] / "configs/train/ppo_imitation.yaml"
    )
    assert config.pretrain is not None and config.pretrain.pooled
    assert config.algorithm == "ppo"
