"""`SharedPolicyVecEnv`: train one SB3 policy for every prosumer of `MicrogridParallelEnv`.

Parameter sharing is the usual way to train many alike agents: each prosumer is one
sub-environment of an SB3 `VecEnv`, so a single policy sees every prosumer's experience. All
agents of the grid step together and end their day together, so the adapter resets the
parallel env when the day ends and hands SB3 the final observations the way it expects
(`terminal_observation`, `TimeLimit.truncated`, `episode`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from stable_baselines3.common.vec_env.base_vec_env import VecEnvStepReturn

from envs.parallel_env import MicrogridParallelEnv
from envs.sb3_vec_env import ForwardingVecEnv
from envs.scenario import Scenario


class SharedPolicyVecEnv(ForwardingVecEnv):
    """Every prosumer agent as one sub-environment of a VecEnv (agent order is fixed)."""

    def __init__(
        self,
        scenario: Scenario | str | Path | None = None,
        split: str = "train",
        seed: int | None = None,
    ) -> None:
        self.env = MicrogridParallelEnv(scenario, split)
        self.target = self.env
        self.names = list(self.env.possible_agents)
        first = self.names[0]
        super().__init__(
            len(self.names), self.env.observation_space(first), self.env.action_space(first)
        )
        self._seed = seed
        self._actions: np.ndarray | None = None
        self._ep_return = np.zeros(self.num_envs)
        self._ep_length = 0

    def _stack(self, obs: dict[str, np.ndarray]) -> np.ndarray:
        return np.stack([obs[a] for a in self.names])

    def reset(self) -> np.ndarray:
        seeds = [s for s in self._seeds if s is not None]
        obs, _ = self.env.reset(seed=seeds[0] if seeds else self._seed)
        self._seeds = [None] * self.num_envs
        self._seed = None
        self._ep_return[:] = 0.0
        self._ep_length = 0
        return self._stack(obs)

    def step_async(self, actions: np.ndarray) -> None:
        self._actions = np.asarray(actions, dtype=np.float32).reshape(self.num_envs, -1)

    def step_wait(self) -> VecEnvStepReturn:
        assert self._actions is not None, "step_async must come first"
        acts = {a: self._actions[k] for k, a in enumerate(self.names)}
        obs, rewards, terms, truncs, infos = self.env.step(acts)
        reward = np.array([rewards[a] for a in self.names], dtype=np.float32)
        self._ep_return += reward
        self._ep_length += 1
        stacked = self._stack(obs)
        done = truncs[self.names[0]] or terms[self.names[0]]
        out_infos: list[dict[str, Any]] = [dict(infos[a]) for a in self.names]
        if done:
            for k, a in enumerate(self.names):
                out_infos[k]["terminal_observation"] = stacked[k]
                out_infos[k]["TimeLimit.truncated"] = bool(truncs[a] and not terms[a])
                out_infos[k]["episode"] = {
                    "r": float(self._ep_return[k]),
                    "l": self._ep_length,
                    "t": 0.0,
                }
            stacked = self._stack(self.env.reset()[0])
            self._ep_return[:] = 0.0
            self._ep_length = 0
        dones = np.full(self.num_envs, done, dtype=bool)
        return stacked, reward, dones, out_infos
