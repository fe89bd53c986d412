"""Training configs: one YAML file per run recipe, validated, saved whole with every run.

Like rl-baselines3-zoo, the resolved config is logged to MLflow with the run, so any result can
be reproduced from its run page alone.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from envs import ScenarioError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class EvalConfig(_Strict):
    """Evaluation on validation days during training (never test days)."""

    every_steps: Annotated[int, Field(ge=1)] = 20_000
    """Environment steps between evaluations."""
    days: Annotated[int, Field(ge=1, le=64)] = 8
    """Validation days per evaluation (the first N of the split: the same days every time)."""


class TrainConfig(_Strict):
    """One training recipe. Hyper-parameters go to the SB3 algorithm unchanged."""

    algorithm: Literal["ppo", "sac", "td3"] = "ppo"
    scenario: str | None = None
    """Scenario YAML path; None is the default scenario."""
    timesteps: Annotated[int, Field(ge=1)] = 200_000
    n_envs: Annotated[int, Field(ge=1, le=4096)] = 16
    seed: int = 0
    torch_threads: Annotated[int, Field(ge=1, le=64)] = 1
    """torch threads; 1 doubled SB3's throughput on a 2-core machine."""
    normalize_obs: bool = True
    normalize_reward: bool = True
    hyperparameters: dict[str, Any] = Field(default_factory=dict)
    policy_kwargs: dict[str, Any] = Field(default_factory=dict)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    checkpoint_every_steps: Annotated[int, Field(ge=0)] = 0
    """0 keeps only the final model."""
    experiment: str = "microgrid"
    registered_model: str = "microgrid-policy"
    """Name in the MLflow model registry; the alias `champion` marks the best on validation."""
    output_dir: str = "runs"


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
