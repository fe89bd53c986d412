"""`microgrid sweep`: Optuna hyper-parameter search over training runs.

The study lives in a database: sqlite by default, any SQLAlchemy URL (PostgreSQL) lets many
machines join the same study by running the same command, which is the scale-out path. Each
trial is a full tracked training run (`training.train`), scored by its validation cost.
"""

from __future__ import annotations

from typing import Any

import optuna
from rich.progress import Progress

from training.config import TrainConfig
from training.train import train

DEFAULT_STORAGE = "sqlite:///optuna.db"


def suggest(trial: optuna.Trial, base: TrainConfig) -> TrainConfig:
    """The search space: the hyper-parameters that matter most for PPO/SAC/TD3 here."""
    hp: dict[str, Any] = dict(base.hyperparameters)
    hp["learning_rate"] = trial.suggest_float("learning_rate", 1e-5, 3e-3, log=True)
    hp["gamma"] = trial.suggest_float("gamma", 0.95, 0.999)
    if base.algorithm == "ppo":
        hp["n_epochs"] = trial.suggest_int("n_epochs", 1, 10)
        hp["clip_range"] = trial.suggest_float("clip_range", 0.1, 0.3)
        hp["ent_coef"] = trial.suggest_float("ent_coef", 1e-6, 1e-2, log=True)
    else:
        hp["tau"] = trial.suggest_float("tau", 0.001, 0.05, log=True)
    width = trial.suggest_categorical("width", [64, 128, 256])
    depth = trial.suggest_int("depth", 1, 3)
    return base.model_copy(
        update={
            "hyperparameters": hp,
            "policy_kwargs": {**base.policy_kwargs, "net_arch": [width] * depth},
            "seed": base.seed + trial.number,
        }
    )


def sweep(
    base: TrainConfig,
    trials: int,
    study_name: str = "microgrid",
    storage: str = DEFAULT_STORAGE,
    progress: Progress | None = None,
) -> optuna.Study:
    """Run `trials` more trials of the (possibly shared) study; returns it."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(
        study_name=study_name,
        storage=storage,
        direction="minimize",
        load_if_exists=True,
        sampler=optuna.samplers.TPESampler(seed=base.seed),
    )
    task = progress.add_task("trials", total=trials) if progress else None

    def objective(trial: optuna.Trial) -> float:
        config = suggest(trial, base)
        result = train(config)
        trial.set_user_attr("run_id", result.run_id)
        trial.set_user_attr("model_uri", result.model_uri)
        if progress is not None and task is not None:
            progress.advance(task)
        return result.val_cost

    study.optimize(objective, n_trials=trials)
    return study
