"""Imitation of the perfect-foresight optimum (DAgger) as a warm start for the SB3 policy.

Why: from scratch, PPO on this env plateaus near 0.4 of the optimum's savings. The optimum's
set-points are cheap to compute on training days (one LP per state), so the policy can be taught
them directly: behaviour cloning on the optimum's own days, then DAgger rounds (Ross et al.,
2011) in which the learner drives, the optimum re-solved from each state the learner reaches
labels it, and the policy is refitted on everything gathered so far. The learner thereby also
learns what to do after its own mistakes, which plain cloning never shows it.

The expert sees the true profiles of the whole day; the learner sees only the observation (noisy
forecasts over a short horizon), so what it learns is the optimum's action expected under what
it can observe. Only training days are rolled out; validation days choose the best round; test
days are never touched.

The result is the SB3 policy itself, with the observation statistics set in `VecNormalize`, so
checkpointing, PPO fine-tuning and the ONNX export work on it unchanged.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.on_policy_algorithm import OnPolicyAlgorithm
from stable_baselines3.common.running_mean_std import RunningMeanStd
from stable_baselines3.common.vec_env import VecNormalize

from agents.optimum import PerfectForesightPolicy
from envs import MicrogridEnv
from envs.codec import Codec
from training.config import PretrainConfig
from training.export import FrozenPolicy

#: Where the cloned policy aims curtailment and demand-response components the expert leaves
#: at 0: the codec applies max(a, 0), so any negative value means "do nothing" and aiming
#: inside that region keeps regression error from turning into a small, costly call.
DO_NOTHING_TARGET = -0.5

#: Smallest standard deviation used to scale an observation entry: entries that barely vary on
#: the demonstrations (state of health within a day) must not be blown up to the clip value.
MIN_OBS_STD = 1e-2


@dataclass
class Demonstrations:
    """(observation, expert action) pairs gathered so far, in the codec's layout."""

    obs: list[np.ndarray] = field(default_factory=list)
    actions: list[np.ndarray] = field(default_factory=list)

    def add(self, obs: np.ndarray, action: np.ndarray) -> None:
        self.obs.append(np.asarray(obs, dtype=np.float32))
        self.actions.append(np.asarray(action, dtype=np.float32))

    def __len__(self) -> int:
        return len(self.obs)

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        return np.stack(self.obs), np.stack(self.actions)


@dataclass
class PretrainReport:
    """What pretraining did, round by round (round 0 is cloning the expert's own days)."""

    samples: list[int] = field(default_factory=list)
    """Demonstrations held after each round."""
    first_loss: list[float] = field(default_factory=list)
    """Regression loss over the first epoch of each round's fit."""
    last_loss: list[float] = field(default_factory=list)
    """Regression loss over the last epoch of each round's fit."""
    val_cost: list[float] = field(default_factory=list)
    """Mean validation-day cost of the policy after each round (if a validator was given)."""
    best_round: int = -1
    demonstrations: Demonstrations = field(default_factory=Demonstrations)
    """Everything gathered, as fitted (for inspection and tests)."""


def clone_target(codec: Codec, expert_action: np.ndarray) -> np.ndarray:
    """The action the learner is fitted to: the expert's, with 'do nothing' given a margin."""
    target = np.array(expert_action, dtype=np.float32)
    start = 0
    for f in codec.act_fields:
        block = target[..., start : start + f.size]
        if f.name in ("pv_curtailment", "demand_response"):
            block[block <= 0.0] = DO_NOTHING_TARGET
        start += f.size
    return target


def roll_out(
    env: MicrogridEnv,
    expert: PerfectForesightPolicy,
    day: int,
    seed: int,
    data: Demonstrations,
    learner: Callable[[np.ndarray], np.ndarray] | None = None,
    beta: float = 1.0,
    relabel_every: int = 1,
    rng: np.random.Generator | None = None,
) -> float:
    """Drive one training day and record expert labels; returns the day's energy cost.

    Without a learner the expert drives and labels every step (one LP for the whole day). With
    one, each step the expert drives with probability `beta`, otherwise the learner does, and
    the expert re-solved from the state reached labels every `relabel_every`-th step (and every
    step it drives itself).
    """
    rng = rng or np.random.default_rng(seed)
    obs, _ = env.reset(seed=seed, options={"day": day})
    step = 0
    while True:
        expert_drives = learner is None or rng.random() < beta
        if expert_drives or step % relabel_every == 0:
            label = expert.predict(obs)
            data.add(obs, clone_target(env.codec, label))
        action = label if expert_drives or learner is None else learner(obs)
        obs, _, terminated, truncated, info = env.step(action)
        step += 1
        if terminated or truncated:
            return float(info["episode_kpis"]["cost"])


def set_obs_statistics(norm: VecNormalize, obs: np.ndarray) -> None:
    """Fix VecNormalize's observation statistics to those of the demonstrations."""
    rms = norm.obs_rms
    if not isinstance(rms, RunningMeanStd):
        raise TypeError("pretrain: dict observation spaces are not supported")
    rms.mean = obs.mean(axis=0).astype(np.float64)
    rms.var = np.maximum(obs.var(axis=0).astype(np.float64), MIN_OBS_STD**2)
    rms.count = float(obs.shape[0])


def fit(
    model: OnPolicyAlgorithm,
    norm: VecNormalize,
    obs: np.ndarray,
    target: np.ndarray,
    config: PretrainConfig,
    rng: np.random.Generator,
) -> list[float]:
    """Regress the policy's mean action on the targets (MSE); returns the loss per epoch."""
    policy = model.policy
    x = torch.as_tensor(norm.normalize_obs(obs), dtype=torch.float32)
    y = torch.as_tensor(target, dtype=torch.float32)
    params = [
        p for name, p in policy.named_parameters() if "log_std" not in name and "value" not in name
    ]
    optimiser = torch.optim.Adam(params, lr=config.learning_rate)
    losses: list[float] = []
    policy.set_training_mode(True)
    for _ in range(config.epochs):
        order = rng.permutation(len(x))
        total = 0.0
        for i in range(0, len(order), config.batch_size):
            idx = torch.as_tensor(order[i : i + config.batch_size])
            mean = policy.get_distribution(x[idx]).mode()
            loss = torch.nn.functional.mse_loss(mean, y[idx])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            total += float(loss.detach()) * len(idx)
        losses.append(total / len(x))
    policy.set_training_mode(False)
    return losses


def learner_of(model: OnPolicyAlgorithm, norm: VecNormalize) -> Callable[[np.ndarray], np.ndarray]:
    """The policy as it will be exported (normalise, actor mean, clip), for driving rollouts."""
    frozen = FrozenPolicy(model, norm).eval()

    def predict(obs: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            o = torch.as_tensor(np.asarray(obs, dtype=np.float32))
            out: np.ndarray = frozen(o[None] if o.ndim == 1 else o).numpy()
        return out[0] if np.asarray(obs).ndim == 1 else out

    return predict


def pretrain(
    model: OnPolicyAlgorithm,
    norm: VecNormalize,
    config: PretrainConfig,
    scenario: Any,
    seed: int,
    validate: Callable[[Callable[[np.ndarray], np.ndarray]], float] | None = None,
    on_round: Callable[[int, dict[str, float]], None] | None = None,
) -> PretrainReport:
    """Clone the optimum into `model.policy` (and `norm`'s statistics); keep the best round.

    `validate` maps a predict function to its mean validation-day cost; it picks the round
    whose weights are kept. `on_round` receives each round's metrics (for MLflow).
    """
    env = MicrogridEnv(scenario, split="train")
    expert = PerfectForesightPolicy(env, pooled=config.pooled)
    rng = np.random.default_rng(seed)
    train_days = [int(d) for d in env.params.days("train")]
    n_expert = config.expert_days or len(train_days)
    expert_days = rng.permutation(train_days)[:n_expert]
    report = PretrainReport()
    data = report.demonstrations
    best: dict[str, torch.Tensor] | None = None
    best_cost = float("inf")
    rounds = config.iterations if config.method == "dagger" else 0
    for r in range(rounds + 1):
        costs = []
        if r == 0:
            for i, day in enumerate(np.tile(expert_days, config.noise_draws)):
                costs.append(roll_out(env, expert, int(day), seed * 100_003 + i, data))
            set_obs_statistics(norm, data.arrays()[0])
        else:
            learner = learner_of(model, norm)
            days = rng.choice(train_days, size=config.days_per_iteration, replace=False)
            for i, day in enumerate(days):
                costs.append(
                    roll_out(
                        env,
                        expert,
                        int(day),
                        seed * 100_003 + r * 10_007 + i,
                        data,
                        learner,
                        beta=config.beta**r,
                        relabel_every=config.relabel_every,
                        rng=rng,
                    )
                )
        obs, target = data.arrays()
        losses = fit(model, norm, obs, target, config, rng)
        report.samples.append(len(data))
        report.first_loss.append(losses[0])
        report.last_loss.append(losses[-1])
        metrics = {
            "pretrain_samples": float(len(data)),
            "pretrain_loss": losses[-1],
            "pretrain_rollout_cost": float(np.mean(costs)),
        }
        if validate is not None:
            cost = validate(learner_of(model, norm))
            report.val_cost.append(cost)
            metrics["pretrain_val_cost"] = cost
            if cost < best_cost:
                best_cost, report.best_round = cost, r
                best = {k: v.clone() for k, v in model.policy.state_dict().items()}
        if on_round is not None:
            on_round(r, metrics)
    if best is not None:
        model.policy.load_state_dict(best)
    else:
        report.best_round = rounds
    log_std = getattr(model.policy, "log_std", None)
    if isinstance(log_std, torch.nn.Parameter):
        with torch.no_grad():
            log_std.fill_(config.log_std_after)
    return report


def warm_up_critic(
    model: BaseAlgorithm, steps: int, learning_rate: float, callback: Any = None
) -> None:
    """Run `steps` of the RL algorithm with the actor frozen, so only the critic learns.

    After imitation the actor is good and the critic knows nothing: PPO's first updates would
    follow advantages of a random value function and undo the imitation. SB3 steps whatever
    `policy.optimizer` holds, so the optimiser is swapped for one over the value parameters.
    """
    policy = model.policy
    full, schedule = policy.optimizer, model.lr_schedule
    value = [p for name, p in policy.named_parameters() if "value" in name]
    policy.optimizer = torch.optim.Adam(value, lr=learning_rate)
    model.lr_schedule = lambda _: learning_rate
    try:
        model.learn(total_timesteps=steps, callback=callback, reset_num_timesteps=False)
    finally:
        policy.optimizer, model.lr_schedule = full, schedule
