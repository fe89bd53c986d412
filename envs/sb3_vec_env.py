"""`SB3VecEnv`: the natively batched environment as a stable-baselines3 `VecEnv`.

SB3 expects same-step autoreset with the last observation in `info["terminal_observation"]`
and `info["TimeLimit.truncated"]` on time-limit ends, so that it bootstraps from the value of the
truncated state instead of treating the end of a day as the end of the world. It also expects an
`info["episode"]` record (what its `Monitor` wrapper would add) to log episode returns.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from stable_baselines3.common.vec_env import VecEnv
from stable_baselines3.common.vec_env.base_vec_env import VecEnvIndices, VecEnvStepReturn

from envs.scenario import Scenario
from envs.vector_env import MicrogridVectorEnv


class ForwardingVecEnv(VecEnv):
    """A VecEnv whose sub-environments are views of one object (`target`).

    SB3 calls these for wrappers and callbacks; with one object behind every index, attribute
    and method calls go to it once.
    """

    target: Any

    def close(self) -> None:
        self.target.close()

    def get_attr(self, attr_name: str, indices: VecEnvIndices = None) -> list[Any]:
        value = getattr(self.target, attr_name)
        return [value for _ in self._indices(indices)]

    def set_attr(self, attr_name: str, value: Any, indices: VecEnvIndices = None) -> None:
        setattr(self.target, attr_name, value)

    def env_method(
        self, method_name: str, *method_args: Any, indices: VecEnvIndices = None, **kwargs: Any
    ) -> list[Any]:
        result = getattr(self.target, method_name)(*method_args, **kwargs)
        return [result for _ in self._indices(indices)]

    def env_is_wrapped(self, wrapper_class: type, indices: VecEnvIndices = None) -> list[bool]:
        return [False for _ in self._indices(indices)]

    def _indices(self, indices: VecEnvIndices) -> Sequence[int] | Iterable[int]:
        if indices is None:
            return range(self.num_envs)
        if isinstance(indices, int):
            return [indices]
        return indices


class SB3VecEnv(ForwardingVecEnv):
    """Adapter over `MicrogridVectorEnv`; every sub-environment shares one kernel call."""

    def __init__(
        self,
        num_envs: int,
        scenario: Scenario | str | Path | None = None,
        split: str = "train",
        seed: int | None = None,
    ) -> None:
        self.venv = MicrogridVectorEnv(num_envs, scenario, split)
        self.target = self.venv
        super().__init__(
            num_envs, self.venv.single_observation_space, self.venv.single_action_space
        )
        self._actions: np.ndarray | None = None
        self._seed = seed
        self._ep_return = np.zeros(num_envs)
        self._ep_length = np.zeros(num_envs, dtype=np.int64)

    @property
    def codec(self) -> Any:
        return self.venv.codec

    def reset(self) -> np.ndarray:
        seeds = [s for s in self._seeds if s is not None]
        seed = seeds[0] if seeds else self._seed
        obs, _ = self.venv.reset(seed=seed)
        self._seeds = [None] * self.num_envs
        self._seed = None
        self._ep_return[:] = 0.0
        self._ep_length[:] = 0
        return obs

    def step_async(self, actions: np.ndarray) -> None:
        self._actions = np.asarray(actions, dtype=np.float32).reshape(self.num_envs, -1)

    def step_wait(self) -> VecEnvStepReturn:
        assert self._actions is not None, "step_async must come first"
        obs, reward, terminated, truncated, info = self.venv.step(self._actions)
        self._ep_return += reward
        self._ep_length += 1
        dones = terminated | truncated
        infos: list[dict[str, Any]] = [{} for _ in range(self.num_envs)]
        for i in np.flatnonzero(dones):
            final = info["final_info"][i]
            infos[i] = {
                "terminal_observation": info["final_obs"][i],
                "TimeLimit.truncated": bool(truncated[i] and not terminated[i]),
                "episode": {"r": float(self._ep_return[i]), "l": int(self._ep_length[i]), "t": 0.0},
                "episode_kpis": final["episode_kpis"],
            }
            self._ep_return[i] = 0.0
            self._ep_length[i] = 0
        return obs, reward.astype(np.float32), dones, infos
