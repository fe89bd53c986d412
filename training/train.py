"""`microgrid train`: SB3 on the batched env, tracked in MLflow, exported to ONNX, registered.

Reads top to bottom like a CleanRL script: config -> seeding -> env -> algorithm -> learn ->
validate -> export -> log -> register -> move the `champion` alias if the run beats it.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import onnx
import torch
from mlflow.tracking import MlflowClient
from rich.progress import Progress
from stable_baselines3 import PPO, SAC, TD3
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.callbacks import BaseCallback, CallbackList, CheckpointCallback
from stable_baselines3.common.on_policy_algorithm import OnPolicyAlgorithm
from stable_baselines3.common.vec_env import VecNormalize

from agents.frozen import OnnxPolicy
from envs.sb3_vec_env import SB3VecEnv
from training import plots
from training.callbacks import EpisodeMetricsCallback, ValidationCallback
from training.config import TrainConfig
from training.evaluation import Predict, mean_kpis, run_day
from training.export import export_onnx, frozen_actions
from training.imitation import pretrain, warm_up_critic

ALGORITHMS: dict[str, type[BaseAlgorithm]] = {"ppo": PPO, "sac": SAC, "td3": TD3}
DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
CHAMPION = "champion"


def tracking_uri() -> str:
    """`MLFLOW_TRACKING_URI` (a team server) or the local sqlite store."""
    return os.environ.get("MLFLOW_TRACKING_URI", DEFAULT_TRACKING_URI)


@dataclass
class TrainResult:
    run_id: str
    model_uri: str
    model_version: str
    val_cost: float
    champion: bool
    onnx_path: Path


class _ProgressCallback(BaseCallback):
    def __init__(self, progress: Progress | None, total: int) -> None:
        super().__init__()
        self.progress = progress
        self.task = progress.add_task("training", total=total) if progress else None

    def _on_step(self) -> bool:
        if self.progress is not None and self.task is not None:
            self.progress.update(self.task, completed=self.num_timesteps)
        return True


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, f"{key}."))
        else:
            out[key] = json.dumps(v) if isinstance(v, list) else v
    return out


def train(config: TrainConfig, progress: Progress | None = None) -> TrainResult:
    """Train, validate, export and register one policy; returns where everything went."""
    # Seeding and threads (SB3 seeds numpy, random and the env from config.seed).
    torch.set_num_threads(config.torch_threads)
    torch.manual_seed(config.seed)

    # Environment: the natively batched env through the SB3 adapter, normalised.
    venv = SB3VecEnv(config.n_envs, config.scenario, split="train", seed=config.seed)
    gamma = float(config.hyperparameters.get("gamma", 0.99))
    norm = VecNormalize(
        venv, norm_obs=config.normalize_obs, norm_reward=config.normalize_reward, gamma=gamma
    )

    algo = ALGORITHMS[config.algorithm]
    model = algo(
        "MlpPolicy",
        norm,
        seed=config.seed,
        device="cpu",
        verbose=0,
        policy_kwargs=config.policy_kwargs or None,
        **config.hyperparameters,
    )

    mlflow.set_tracking_uri(tracking_uri())
    mlflow.set_experiment(config.experiment)
    out_dir = Path(config.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with mlflow.start_run() as run:
        mlflow.log_dict(config.model_dump(), "config.json")
        mlflow.log_params(_flatten(config.model_dump()))
        run_dir = out_dir / run.info.run_id
        run_dir.mkdir(parents=True, exist_ok=True)
        validation = ValidationCallback(
            config.scenario, config.eval.every_steps, config.eval.days, norm, run_dir / "best"
        )
        hooks: list[BaseCallback] = [
            EpisodeMetricsCallback(),
            validation,
            _ProgressCallback(progress, config.timesteps + _warmup_steps(config)),
        ]
        if config.checkpoint_every_steps:
            # SB3 counts calls (one per vector step), the config counts environment steps.
            hooks.append(
                CheckpointCallback(
                    save_freq=max(config.checkpoint_every_steps // config.n_envs, 1),
                    save_path=str(run_dir / "checkpoints"),
                    save_vecnormalize=True,
                )
            )
        if config.pretrain is not None:
            _pretrain(model, norm, config, validation)
        if config.timesteps > 0:
            if config.pretrain is not None and _warmup_steps(config):
                warm_up_critic(
                    model,
                    _warmup_steps(config),
                    config.pretrain.critic_warmup_learning_rate,
                    EpisodeMetricsCallback(),
                )
            model.learn(
                total_timesteps=config.timesteps,
                callback=CallbackList(hooks),
                reset_num_timesteps=False,
            )
        validation.evaluate()
        # Export the best policy seen on validation days (the last one if it is the best).
        best = run_dir / "best"
        model = algo.load(best / "model.zip", device="cpu")
        if (best / "vecnormalize.pkl").is_file():
            norm = VecNormalize.load(str(best / "vecnormalize.pkl"), venv)
            norm.training = False
        mlflow.log_metric("best_val_step", validation.best_step)
        final = {"cost": validation.best_cost}

        # Artifacts: SB3 zip + normalisation statistics, and the frozen ONNX graph.
        model.save(run_dir / "model.zip")
        norm.save(str(run_dir / "vecnormalize.pkl"))
        onnx_bytes = export_onnx(model, norm)
        onnx_path = run_dir / "policy.onnx"
        onnx_path.write_bytes(onnx_bytes)
        (run_dir / "codec.json").write_text(json.dumps(venv.codec.to_dict()))
        mlflow.log_artifact(str(run_dir / "model.zip"), "sb3")
        mlflow.log_artifact(str(run_dir / "vecnormalize.pkl"), "sb3")
        mlflow.log_artifact(str(run_dir / "codec.json"))

        # Parity: the ONNX graph must act like the in-memory policy before it is registered.
        sample = np.stack([venv.venv.single_observation_space.sample() for _ in range(16)])
        expected = frozen_actions(model, norm, sample)
        got = OnnxPolicy(onnx_bytes).predict(sample)
        parity = float(np.abs(expected - got).max())
        mlflow.log_metric("onnx_parity_max_abs", parity)
        if parity > 1e-5:
            raise RuntimeError(f"ONNX export differs from the policy by {parity:.2e}")

        # Plots: learning curve and one validation day's flows, SoC and prices.
        steps = [s for s, _ in validation.history]
        costs = [k["cost"] for _, k in validation.history]
        mlflow.log_figure(
            plots.learning_curve(steps, costs, "validation cost per day"), "learning_curve.png"
        )
        trace = run_day(validation.env, OnnxPolicy(onnx_bytes).predict, validation.days[0], True)
        mlflow.log_figure(plots.day_profile(trace, "agent"), "validation_day.png")

        mlflow.log_metric("best_val_cost", final["cost"])
        info = mlflow.onnx.log_model(
            onnx.load_from_string(onnx_bytes),
            name="policy",
            registered_model_name=config.registered_model,
            input_example=sample[:2].astype(np.float32),
            onnx_execution_providers=["CPUExecutionProvider"],
            save_as_external_data=False,
        )
        version = str(info.registered_model_version)
        champion = _maybe_promote(config.registered_model, version, final["cost"])
    return TrainResult(
        run_id=run.info.run_id,
        model_uri=f"models:/{config.registered_model}/{version}",
        model_version=version,
        val_cost=final["cost"],
        champion=champion,
        onnx_path=onnx_path,
    )


def _warmup_steps(config: TrainConfig) -> int:
    """Critic warm-up steps that run before RL (only after imitation, only if RL follows)."""
    if config.pretrain is None or config.timesteps == 0:
        return 0
    return config.pretrain.critic_warmup_steps


def _pretrain(
    model: BaseAlgorithm, norm: VecNormalize, config: TrainConfig, validation: ValidationCallback
) -> None:
    """Imitate the optimum (training days), log each round, and count the result as step 0.

    Validating the imitated policy before RL starts makes it the best policy so far, so a
    fine-tuning run that only makes it worse still exports the imitated one.
    """
    assert config.pretrain is not None and isinstance(model, OnPolicyAlgorithm)

    def validate(predict: Predict) -> float:
        return mean_kpis([run_day(validation.env, predict, d) for d in validation.days])["cost"]

    def log_round(r: int, metrics: dict[str, float]) -> None:
        mlflow.log_metrics(metrics, step=r)

    report = pretrain(
        model, norm, config.pretrain, config.scenario, config.seed, validate, log_round
    )
    mlflow.log_metric("pretrain_best_round", report.best_round)
    validation.init_callback(model)
    validation.evaluate()


def _maybe_promote(name: str, version: str, val_cost: float) -> bool:
    """Move `champion` to this version if it has no holder or a worse validation cost."""
    client = MlflowClient()
    try:
        current = client.get_model_version_by_alias(name, CHAMPION)
    except mlflow.exceptions.MlflowException:
        current = None
    if current is not None and current.run_id:
        best = client.get_run(current.run_id).data.metrics.get("best_val_cost", float("inf"))
        if best <= val_cost:
            return False
    client.set_registered_model_alias(name, CHAMPION, version)
    return True


def load_registered_onnx(uri: str) -> OnnxPolicy:
    """`models:/NAME@ALIAS`, `models:/NAME/VERSION` or a path to an .onnx file."""
    if not uri.startswith("models:/"):
        return OnnxPolicy(Path(uri))
    mlflow.set_tracking_uri(tracking_uri())
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=tmp))
        files = list(local.rglob("*.onnx")) if local.is_dir() else [local]
        if not files:
            raise FileNotFoundError(f"{uri}: no .onnx file in the model artifact")
        # onnx.load resolves external tensor files next to the model, whatever the writer chose.
        return OnnxPolicy(onnx.load(str(files[0])).SerializeToString())
