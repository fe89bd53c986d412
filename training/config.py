"""Training configs: one YAML file per run recipe, validated, saved whole with every run.

Like rl-baselines3-zoo, the resolved config is logged to MLflow with the run, so any result can
be reproduced from its run page alone.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from envs import ScenarioError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class EvalConfig(_Strict):
    """Evaluation on validation days during training (never test days)."""

    every_steps: Annotated[int, Field(ge=1)] = 20_000
    """Environment steps between evaluations."""
    days: Annotated[int, Field(ge=1, le=64)] = 8
    """Validation days per evaluation (the first N of the split: the same days every time)."""


class PretrainConfig(_Strict):
    """Imitation of the perfect-foresight optimum before (or instead of) RL: `training.imitation`.

    Only training days are rolled out; validation days pick the best round.
    """

    method: Literal["bc", "dagger"] = "dagger"
    """`bc`: clone the optimum on its own trajectories; `dagger`: then add rounds where the
    learner drives and the optimum, re-solved from the states it reaches, labels them."""
    pooled: bool = True
    """Label with the optimum whose fleet power is shared in proportion to the batteries'
    ratings (`PerfectForesightPolicy(pooled=True)`): the same cost, one consistent split."""
    noise_draws: Annotated[int, Field(ge=1)] = 1
    """Round 0 demonstrates each day this many times, each with another forecast-noise draw."""
    expert_days: Annotated[int, Field(ge=1)] | None = None
    """Training days the optimum demonstrates in round 0; None is every training day."""
    iterations: Annotated[int, Field(ge=0)] = 4
    """DAgger rounds after round 0."""
    days_per_iteration: Annotated[int, Field(ge=1)] = 48
    """Training days the learner drives in each DAgger round."""
    relabel_every: Annotated[int, Field(ge=1)] = 2
    """Label every k-th step the learner drives (each label is one LP solve)."""
    beta: Annotated[float, Field(ge=0.0, le=1.0)] = 0.5
    """Round r lets the expert drive each step with probability beta ** r."""
    epochs: Annotated[int, Field(ge=1)] = 30
    """Passes over all demonstrations gathered so far, per round."""
    batch_size: Annotated[int, Field(ge=1)] = 256
    learning_rate: Annotated[float, Field(gt=0.0)] = 1e-3
    critic_warmup_steps: Annotated[int, Field(ge=0)] = 0
    """RL steps with the actor frozen before fine-tuning, so PPO starts from a fitted critic."""
    critic_warmup_learning_rate: Annotated[float, Field(gt=0.0)] = 1e-3
    log_std_after: float = -2.0
    """The policy's log standard deviation after cloning: the exploration RL fine-tuning starts
    from (small, so that it explores around the cloned behaviour)."""


class TrainConfig(_Strict):
    """One training recipe. Hyper-parameters go to the SB3 algorithm unchanged."""

    algorithm: Literal["ppo", "sac", "td3"] = "ppo"
    scenario: str | None = None
    """Scenario YAML path; None is the default scenario."""
    timesteps: Annotated[int, Field(ge=0)] = 200_000
    """RL environment steps; 0 with `pretrain` keeps the imitated policy as it is."""
    n_envs: Annotated[int, Field(ge=1, le=4096)] = 16
    seed: int = 0
    torch_threads: Annotated[int, Field(ge=1, le=64)] = 1
    """torch threads; 1 doubled SB3's throughput on a 2-core machine."""
    normalize_obs: bool = True
    normalize_reward: bool = True
    hyperparameters: dict[str, Any] = Field(default_factory=dict)
    policy_kwargs: dict[str, Any] = Field(default_factory=dict)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    pretrain: PretrainConfig | None = None
    """Warm start by imitating the optimum (PPO only); None starts RL from scratch."""
    checkpoint_every_steps: Annotated[int, Field(ge=0)] = 0
    """0 keeps only the final model."""
    experiment: str = "microgrid"
    registered_model: str = "microgrid-policy"
    """Name in the MLflow model registry; the alias `champion` marks the best on validation."""
    output_dir: str = "runs"

    @model_validator(mode="after")
    def _pretrain_fits_algorithm(self) -> TrainConfig:
        if self.pretrain is not None and self.algorithm != "ppo":
            raise ValueError(
                f"pretrain: supported with algorithm 'ppo' only, got {self.algorithm!r}"
            )
        if self.timesteps == 0 and self.pretrain is None:
            raise ValueError("timesteps: 0 is allowed only with pretrain (nothing would train)")
        return self


def load_train_config(path: str | Path, **overrides: Any) -> TrainConfig:
    """Read a training YAML and apply command-line overrides (None values are ignored)."""
    p = Path(path)
    if not p.is_file():
        raise ScenarioError(f"training config not found: {p}")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as err:
        raise ScenarioError(f"{p}: not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ScenarioError(f"{p}: expected a mapping of training fields")
    data.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return TrainConfig.model_validate(data)
    except ValidationError as err:
        details = "; ".join(
            f"{'.'.join(str(x) for x in e['loc'])}: {e['msg']} (got {e.get('input')!r})"
            for e in err.errors()
        )
        raise ScenarioError(f"{p}: {details}") from None
