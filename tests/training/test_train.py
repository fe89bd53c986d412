"""Smoke training: an MLflow run with the model, a registered ONNX policy that acts like SB3's."""

from __future__ import annotations

from pathlib import Path

import mlflow
import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from envs import MicrogridEnv, ScenarioError
from training.config import TrainConfig, load_train_config
from training.export import frozen_actions
from training.train import CHAMPION, load_registered_onnx, train

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture()
def tracking(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)  # artifacts land under the temporary directory
    return uri


def test_smoke_training_logs_run_registers_onnx_with_parity(tracking: str, tmp_path: Path) -> None:
    config = TrainConfig(
        algorithm="ppo",
        timesteps=512,
        n_envs=4,
        hyperparameters={"n_steps": 64, "batch_size": 128, "n_epochs": 1},
        eval={"every_steps": 256, "days": 1},
        registered_model="smoke-ppo",
        output_dir=str(tmp_path / "runs"),
        checkpoint_every_steps=256,
    )
    result = train(config)
    client = MlflowClient(tracking)
    run = client.get_run(result.run_id)
    assert run.data.params["algorithm"] == "ppo"
    assert "best_val_cost" in run.data.metrics
    assert run.data.metrics["onnx_parity_max_abs"] <= 1e-5
    artifacts = {a.path for a in client.list_artifacts(result.run_id)}
    assert {"config.json", "codec.json", "sb3", "learning_curve.png"} <= artifacts
    assert result.champion
    champion = client.get_model_version_by_alias("smoke-ppo", CHAMPION)
    assert str(champion.version) == result.model_version

    # The registered model, loaded back through the registry, acts like the in-memory policy.
    from stable_baselines3 import PPO
    from stable_baselines3.common.vec_env import VecNormalize

    from envs.sb3_vec_env import SB3VecEnv

    policy = load_registered_onnx(f"models:/smoke-ppo@{CHAMPION}")
    model = PPO.load(result.onnx_path.parent / "model.zip", device="cpu")
    norm = VecNormalize.load(str(result.onnx_path.parent / "vecnormalize.pkl"), SB3VecEnv(1))
    env = MicrogridEnv()
    obs = np.stack([env.reset(seed=s)[0] for s in range(8)])
    np.testing.assert_allclose(policy.predict(obs), frozen_actions(model, norm, obs), atol=1e-5)
    assert list((result.onnx_path.parent / "checkpoints").glob("*.zip"))
    from agents import Sb3Policy

    zipped = Sb3Policy(
        result.onnx_path.parent / "model.zip", result.onnx_path.parent / "vecnormalize.pkl"
    )
    np.testing.assert_allclose(policy.predict(obs), zipped.predict(obs), atol=1e-5)
    # ...and equals SB3's own deterministic prediction on the normalised observation.
    sb3_action, _ = model.predict(norm.normalize_obs(obs), deterministic=True)
    np.testing.assert_allclose(policy.predict(obs), np.clip(sb3_action, -1, 1), atol=1e-5)
    mlflow.end_run()


def test_shipped_train_configs_validate() -> None:
    for name in ("ppo", "sac", "td3"):
        cfg = load_train_config(ROOT / "configs" / "train" / f"{name}.yaml")
        assert cfg.algorithm == name


def test_bad_train_config_names_the_field(tmp_path: Path) -> None:
    f = tmp_path / "bad.yaml"
    f.write_text("algorithm: dqn\n")
    with pytest.raises(ScenarioError, match=r"algorithm: .*'ppo', 'sac' or 'td3'"):
        load_train_config(f)
    with pytest.raises(ScenarioError, match="not found"):
        load_train_config(tmp_path / "missing.yaml")


def test_evaluation_uses_only_test_days_and_the_optimum_is_best() -> None:
    from envs.grid import build_grid
    from envs.scenario import Scenario
    from training.evaluate import evaluate

    summary = evaluate(None, n_days=2, include_mpc=False)
    params = build_grid(Scenario())
    days = set(summary["days"])
    assert days <= set(params.test_days.tolist())
    assert not days & set(params.train_days.tolist())
    assert not days & set(params.validation_days.tolist())
    rows = summary["controllers"]
    assert rows["optimum"]["fraction_of_optimum"] == pytest.approx(1.0)
    for name, row in rows.items():
        assert rows["optimum"]["cost"] <= row["cost"] + 1e-6, name


def test_sweep_runs_trials_into_a_shared_study(tracking: str, tmp_path: Path) -> None:
    from training.sweep import sweep

    base = TrainConfig(
        timesteps=128,
        n_envs=2,
        hyperparameters={"n_steps": 64, "batch_size": 64, "n_epochs": 1},
        eval={"every_steps": 10_000, "days": 1},
        registered_model="smoke-sweep",
        output_dir=str(tmp_path / "runs"),
    )
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    first = len(sweep(base, trials=2, study_name="s", storage=storage).trials)
    again = sweep(base, trials=1, study_name="s", storage=storage)  # a second "machine" joins
    assert first == 2 and len(again.trials) == 3
    assert all(t.user_attrs["model_uri"].startswith("models:/smoke-sweep/") for t in again.trials)
