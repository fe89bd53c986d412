"""`MicrogridVectorEnv`: N grids stepped as one batch (one kernel call, one power flow each).

A native gymnasium `VectorEnv`, not N environments in a loop: the batch is a leading axis of
the state and a step is a single pass of the compiled kernel. Sub-environment i, seeded with
`seed + i` (gymnasium's vector convention), follows exactly the trajectory of a
`MicrogridEnv` seeded with `seed + i`, including its automatic resets.

Autoreset mode is SAME_STEP: when a grid's episode ends, the step returns the first
observation of its next episode and puts the last one in `info["final_obs"]` (with
`info["final_info"]`, masks `_final_obs` / `_final_info`), which is what SB3-style
bootstrapping on truncation needs.
"""

from __future__ import annotations

import gc
from pathlib import Path
from typing import Any

import numpy as np
from gymnasium import spaces
from gymnasium.utils import seeding
from gymnasium.vector import AutoresetMode, VectorEnv
from gymnasium.vector.utils import batch_space

from envs.dynamics import GridState, Solver
from envs.engine import Engine
from envs.exchange import Exchange, market_columns
from envs.kpis import (
    MARKET_INFO,
    MARKET_KEYS,
    OUTCOME_FIELDS,
    ROW_KEYS,
    STEP_INFO,
    EpisodeKpis,
    MarketKpis,
    as_dicts,
)
from envs.scenario import Scenario

#: (info key, its mask's key, column): the step's `info` columns, the mask keys made once.
_INFO_COLUMNS = tuple((key, f"_{key}", OUTCOME_FIELDS.index(key)) for key in STEP_INFO)
_MASKS = {key: f"_{key}" for key in MARKET_INFO}
_REWARD = OUTCOME_FIELDS.index("reward")
_TRUNCATED = OUTCOME_FIELDS.index("truncated")
_DIVERGED = OUTCOME_FIELDS.index("diverged")
_REASONS = ("end_of_episode", "power_flow_diverged")


class MicrogridVectorEnv(VectorEnv[np.ndarray, np.ndarray, np.ndarray]):
    """A batch of `num_envs` microgrids of one scenario; see `MicrogridEnv` for the spaces."""

    metadata = {"autoreset_mode": AutoresetMode.SAME_STEP}  # noqa: RUF012 - gymnasium's convention

    def __init__(
        self,
        num_envs: int,
        scenario: Scenario | str | Path | None = None,
        split: str = "train",
        solver: Solver | None = None,
    ) -> None:
        if num_envs < 1:
            raise ValueError(f"num_envs must be >= 1, got {num_envs}")
        self.engine = Engine(scenario, split, solver)
        self.num_envs = num_envs
        self.scenario = self.engine.scenario
        self.params = self.engine.params
        self.codec = self.engine.codec
        self.split = split
        low, high = self.codec.bounds()
        self.single_observation_space = spaces.Box(low, high, dtype=np.float32)
        self.single_action_space = spaces.Box(-1.0, 1.0, (self.codec.act_dim,), dtype=np.float32)
        self.observation_space = batch_space(self.single_observation_space, num_envs)
        self.action_space = batch_space(self.single_action_space, num_envs)
        self._rngs = [seeding.np_random(None)[0] for _ in range(num_envs)]
        # Which generators may keep half a 64-bit output (`envs.start_draws`): none when fresh.
        self._buffered = np.zeros(num_envs, dtype=bool)
        market = self.scenario.market
        self.exchange = (
            Exchange(self.params, market, num_envs, self.engine.compiled)
            if market.enabled
            else None
        )
        self._state: GridState | None = None
        self._kpis = EpisodeKpis(num_envs)
        self._market_kpis = MarketKpis(num_envs)

    def reset(
        self,
        *,
        seed: int | list[int | None] | None = None,
        options: dict[str, Any] | None = None,
    ) -> tuple[np.ndarray, dict[str, Any]]:
        """Reset every grid; `options` (`day`, `soc`) apply to all of them."""
        if seed is not None:
            seeds = [seed + i for i in range(self.num_envs)] if isinstance(seed, int) else seed
            if len(seeds) != self.num_envs:
                raise ValueError(f"seed: expected {self.num_envs} seeds, got {len(seeds)}")
            self._rngs = [seeding.np_random(s)[0] for s in seeds]
            self._buffered = np.zeros(self.num_envs, dtype=bool)
        day, soc = self.engine.parse_options(options)
        rows = np.arange(self.num_envs)
        self._state = self._fresh(rows, day, soc)
        self._kpis = EpisodeKpis(self.num_envs)
        self._market_kpis = MarketKpis(self.num_envs)
        if self.exchange is not None:
            self.exchange.reset(rows)
        days = (self._state.slot // self.params.steps_per_day).copy()
        return self.engine.observe(self._state), {"day": days, "_day": np.ones_like(rows, bool)}

    def _fresh(self, rows: np.ndarray, day: int | None, soc: np.ndarray | None) -> GridState:
        buffered = self._buffered[rows]
        days, offsets = self.engine.draw_starts([self._rngs[i] for i in rows], day, buffered)
        self._buffered[rows] = buffered
        socs = None if soc is None else np.tile(soc, (rows.size, 1))
        return self.engine.reset(days, socs, offsets)

    def step(
        self, actions: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
        if self._state is None:
            raise RuntimeError("call reset() before step()")
        obs, matrix, market, clipped = self._advance(actions)
        every = np.ones(self.num_envs, dtype=bool)
        infos: dict[str, Any] = {}
        for key, mask, col in _INFO_COLUMNS:
            infos[key] = matrix[:, col]  # columns of a fresh matrix: no copy needed
            infos[mask] = every
        infos["action_clipped"] = clipped
        infos["_action_clipped"] = every
        if market is not None:
            for key, column in market_columns(market).items():
                infos[key] = column
                infos[_MASKS[key]] = every
        truncated = matrix[:, _TRUNCATED] > 0.5
        terminated = np.zeros(self.num_envs, dtype=bool)
        done_rows = np.flatnonzero(truncated)
        if done_rows.size:
            self._autoreset(done_rows, obs, matrix, infos)
        return obs, matrix[:, _REWARD].copy(), terminated, truncated, infos

    def _advance(
        self, actions: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray]:
        """Step every grid: (observations, outcome matrix, market matrix, components clipped)."""
        assert self._state is not None
        a = self.engine.advance(self._state, actions, self._kpis, self._market_kpis, self.exchange)
        self._state = a.state
        return a.obs, a.outcome, a.market, a.clipped

    def _autoreset(
        self, done_rows: np.ndarray, obs: np.ndarray, matrix: np.ndarray, infos: dict[str, Any]
    ) -> None:
        """Same-step autoreset of `done_rows`: final observation and info, then a new episode."""
        assert self._state is not None
        n = self.num_envs
        final_obs = np.full(n, None, dtype=object)
        final_info = np.full(n, None, dtype=object)
        keys: tuple[str, ...] = ROW_KEYS
        values = self._kpis.values(done_rows)
        if self.exchange is not None:
            keys = (*keys, *MARKET_KEYS)
            values = np.concatenate([values, self._market_kpis.values(done_rows)], axis=1)
        diverged = (matrix[done_rows, _DIVERGED] > 0.5).tolist()
        # One copy of the finished rows (the reset below overwrites `obs`), a view per row: a
        # batch of 1,024 ends its episodes together, and 1,024 small copies cost ~2 ms. The
        # collector waits while the rows' dicts are built (one tracked dict each, thousands
        # at once): collections in the middle of the burst moved them to the old generation
        # and set off a full collection of the heap every few resets of a large batch.
        finished = obs[done_rows]
        collecting = gc.isenabled()
        gc.disable()
        try:
            for j, (i, kpis) in enumerate(
                zip(done_rows.tolist(), as_dicts(keys, values), strict=True)
            ):
                final_obs[i] = finished[j]
                final_info[i] = {
                    "episode_kpis": kpis,
                    "truncation_reason": _REASONS[diverged[j]],
                }
        finally:
            if collecting:
                gc.enable()
        mask = np.zeros(n, dtype=bool)
        mask[done_rows] = True
        infos.update(final_obs=final_obs, _final_obs=mask, final_info=final_info, _final_info=mask)
        fresh = self._fresh(done_rows, None, None)
        # The kernels advance the state in place; a reset row is written in place too.
        for name in GridState.__dataclass_fields__:
            getattr(self._state, name)[done_rows] = getattr(fresh, name)
        self._kpis.reset_rows(done_rows)
        self._market_kpis.reset_rows(done_rows)
        if self.exchange is not None:
            self.exchange.reset(done_rows)
        obs[done_rows] = self.engine.observe(fresh)

    @property
    def state(self) -> GridState:
        if self._state is None:
            raise RuntimeError("call reset() first")
        return self._state
