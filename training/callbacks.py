"""SB3 callbacks: tracking and validation live here, not in the training loop."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlflow
import numpy as np
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.vec_env import VecNormalize

from envs import MicrogridEnv
from training.evaluation import mean_kpis, run_day


class EpisodeMetricsCallback(BaseCallback):
    """Log the mean return and KPIs of training episodes to MLflow as they finish."""

    def __init__(self, log_every_episodes: int = 16) -> None:
        super().__init__()
        self.log_every = log_every_episodes
        self._returns: list[float] = []
        self._costs: list[float] = []

    def _on_step(self) -> bool:
        for info in self.locals.get("infos", []):
            if "episode" in info:
                self._returns.append(float(info["episode"]["r"]))
                self._costs.append(float(info["episode_kpis"]["cost"]))
        if len(self._returns) >= self.log_every:
            mlflow.log_metrics(
                {
                    "train_episode_return": float(np.mean(self._returns)),
                    "train_episode_cost": float(np.mean(self._costs)),
                },
                step=self.num_timesteps,
            )
            self._returns.clear()
            self._costs.clear()
        return True


class ValidationCallback(BaseCallback):
    """Every `every_steps`, run the deterministic policy on fixed validation days.

    Validation days are disjoint from training and test days (the scenario's split), so model
    selection never looks at the test set.
    """

    def __init__(
        self,
        scenario: Any,
        every_steps: int,
        days: int,
        norm: VecNormalize | None,
        best_dir: Path | None = None,
    ) -> None:
        super().__init__()
        self.best_dir = best_dir
        self.best_cost = float("inf")
        self.best_step = -1
        self.env = MicrogridEnv(scenario, split="validation")
        self.days = [int(d) for d in self.env.params.validation_days[:days]]
        self.every = every_steps
        self.norm = norm
        self._last = 0
        self.history: list[tuple[int, dict[str, float]]] = []

    def predict(self, obs: np.ndarray) -> np.ndarray:
        x = self.norm.normalize_obs(obs) if self.norm is not None else obs
        action, _ = self.model.predict(x, deterministic=True)
        return np.asarray(action)

    def evaluate(self) -> dict[str, float]:
        kpis = mean_kpis([run_day(self.env, self.predict, d) for d in self.days])
        self.history.append((self.num_timesteps, kpis))
        if kpis["cost"] < self.best_cost:
            # RL returns are noisy: keep the best policy seen, not merely the last one.
            self.best_cost = kpis["cost"]
            self.best_step = self.num_timesteps
            if self.best_dir is not None:
                self.best_dir.mkdir(parents=True, exist_ok=True)
                self.model.save(self.best_dir / "model.zip")
                if self.norm is not None:
                    self.norm.save(str(self.best_dir / "vecnormalize.pkl"))
        mlflow.log_metrics(
            {f"val_{k}": v for k, v in kpis.items() if k in ("cost", "reward", "peak_kw",
                                                              "violations", "self_sufficiency")},
            step=self.num_timesteps,
        )  # fmt: skip
        return kpis

    def _on_step(self) -> bool:
        if self.num_timesteps - self._last >= self.every:
            self._last = self.num_timesteps
            self.evaluate()
        return True
