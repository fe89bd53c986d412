"""`MicrogridParallelEnv`: every prosumer is an agent that dispatches its battery and bids.

A PettingZoo `ParallelEnv` over the same engine and market as `MicrogridEnv`. Where the single
agent is the community operator, here each prosumer decides for itself and is paid what the
ledger pays it: the market is where the agents meet. The community battery stays idle and no
demand response or curtailment is called, so what changes between prosumers' outcomes is their
own dispatch and bidding.

## Action Space (per agent)

`Box(-1, 1, (3,), float32)`:

| index | name | meaning |
|---|---|---|
| 0 | battery | own battery set-point, fraction of its rated kW (charging > 0) |
| 1 | bid_price | limit price across the slot's band: -1 = band low, 1 = band high |
| 2 | quantity | order energy, fraction of the prosumer's largest position: > 0 buy, < 0 sell |

## Observation Space (per agent)

The prosumer's own entries of the single-agent observation (`envs.codec`: time, own SoC, state
of health, load, PV, backlog and their forecasts, the shared price and grid entries), then
three market entries: own credit / initial credit, the last clearing price (scaled as the
community price) and the own last imbalance / largest position. Bounds are the codec's.

## Rewards

Each agent's reward is the change of its credit on the ledger in the slot (currency: market
payments and receipts, fees, imbalance settlement), less its battery's degradation cost.

## Episode End

All agents are truncated together at the end of the day's data or on a diverged power flow;
`infos[agent]["truncation_reason"]` says which. Nobody terminates.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import numpy as np
from gymnasium import spaces
from gymnasium.utils import seeding
from pettingzoo import ParallelEnv

from envs.dynamics import GridState
from envs.engine import Engine
from envs.exchange import Exchange, market_info
from envs.market import BUY, MONEY_UNITS, SELL, Book
from envs.scenario import Scenario

ACTION_NAMES = ("battery", "bid_price", "quantity")
MARKET_OBS = ("credit", "last_clearing_price", "last_imbalance")


class MicrogridParallelEnv(ParallelEnv[str, np.ndarray, np.ndarray]):
    """One agent per prosumer of the scenario; see the module docstring for spaces and reward."""

    metadata = {"name": "microgrid_parallel_v0", "render_modes": []}  # noqa: RUF012

    def __init__(self, scenario: Scenario | str | Path | None = None, split: str = "train") -> None:
        self.engine = Engine(scenario, split)
        self.scenario = self.engine.scenario
        if not self.scenario.market.enabled:
            raise ValueError("market.enabled: the multi-agent env needs the market; got false")
        self.params = self.engine.params
        self.codec = self.engine.codec
        p = self.params
        self.exchange = Exchange(p, self.scenario.market, 1, self.engine.compiled)
        self.render_mode = None
        self.possible_agents = [f"prosumer_{name}" for name in p.prosumer_names]
        self.agents: list[str] = []
        n = p.n_prosumer
        self._index = np.stack([self._own_indices(k) for k in range(n)])
        low, high = self.codec.bounds()
        extra_low = np.full(len(MARKET_OBS), -10.0, dtype=np.float32)
        extra_high = np.full(len(MARKET_OBS), 10.0, dtype=np.float32)
        self._obs_space = {
            a: spaces.Box(
                np.concatenate([low[self._index[k]], extra_low]),
                np.concatenate([high[self._index[k]], extra_high]),
                dtype=np.float32,
            )
            for k, a in enumerate(self.possible_agents)
        }
        self._act_space = {
            a: spaces.Box(-1.0, 1.0, (len(ACTION_NAMES),), dtype=np.float32)
            for a in self.possible_agents
        }
        bat = p.batteries
        # The largest position a prosumer can take in a slot (Wh): what quantity 1 means.
        peak = p.prosumer_load_kw.max(axis=0) + p.prosumer_pv_kw.max(axis=0) + bat.power_kw[:n]
        self._max_wh = np.maximum(peak * p.dt_h * 1000.0, 1.0)
        self._initial = float(self.scenario.market.initial_credit) * MONEY_UNITS
        sl = self.codec.obs_slice("community_price")
        self._price_scale = self.codec.scaling()[1, sl.start]
        self._rng = seeding.np_random(None)[0]
        self._state: GridState | None = None
        self._last_price = 0.0
        self._last_imbalance = np.zeros(n)

    def _own_indices(self, k: int) -> np.ndarray:
        """Positions of prosumer k's entries (and the shared ones) in the codec's observation."""
        h = self.params.horizon
        c = self.codec
        parts: list[np.ndarray] = []
        for f in c.obs_fields:
            sl = c.obs_slice(f.name)
            idx = np.arange(sl.start, sl.stop)
            if f.name in ("soc", "state_of_health", "load", "pv", "backlog"):
                parts.append(idx[k : k + 1])
            elif f.name in ("load_forecast", "pv_forecast"):
                parts.append(idx[k * h : (k + 1) * h])
            else:
                parts.append(idx)
        return np.concatenate(parts)

    # PettingZoo asks for the same space object on every call.
    @functools.cache  # noqa: B019 - one env, a handful of agents
    def observation_space(self, agent: str) -> spaces.Box:
        return self._obs_space[agent]

    @functools.cache  # noqa: B019
    def action_space(self, agent: str) -> spaces.Box:
        return self._act_space[agent]

    def reset(
        self, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[dict[str, np.ndarray], dict[str, dict[str, Any]]]:
        if seed is not None:
            self._rng = seeding.np_random(seed)[0]
        # PettingZoo's API test resets with options of its own: only `day` and `soc` are ours.
        ours = {k: v for k, v in (options or {}).items() if k in ("day", "soc")}
        day, soc = self.engine.parse_options(ours)
        day, offset = self.engine.draw_start(self._rng, day)
        self._state = self.engine.reset(
            np.array([day]), None if soc is None else soc[None, :], np.array([offset])
        )
        self.exchange.reset(np.array([0]))
        self.agents = list(self.possible_agents)
        self._last_price = 0.0
        self._last_imbalance[:] = 0.0
        infos = {a: {"day": day} for a in self.agents}
        return self._observations(), infos

    def _observations(self) -> dict[str, np.ndarray]:
        assert self._state is not None
        full = self.engine.observe(self._state)[0]
        credit = self.exchange.ledger.credits()[0] / self._initial
        extra = np.stack(
            [
                credit,
                np.full(len(credit), self._last_price * self._price_scale),
                self._last_imbalance,
            ],
            axis=1,
        )
        extra = np.clip(extra, -10.0, 10.0).astype(np.float32)
        return {
            a: np.concatenate([full[self._index[k]], extra[k]])
            for k, a in enumerate(self.possible_agents)
        }

    def step(
        self, actions: dict[str, np.ndarray]
    ) -> tuple[
        dict[str, np.ndarray],
        dict[str, float],
        dict[str, bool],
        dict[str, bool],
        dict[str, dict[str, Any]],
    ]:
        if self._state is None or not self.agents:
            raise RuntimeError("call reset() before step(), and again after the episode ends")
        missing = [a for a in self.agents if a not in actions]
        if missing:
            raise ValueError(f"actions: missing an action for agents {missing}")
        p = self.params
        n = p.n_prosumer
        a = np.stack([np.asarray(actions[ag], dtype=np.float64) for ag in self.possible_agents])
        if a.shape != (n, len(ACTION_NAMES)) or not np.isfinite(a).all():
            raise ValueError(
                f"actions: expected finite vectors of {len(ACTION_NAMES)} "
                f"({', '.join(ACTION_NAMES)}) per agent, got shape {a.shape[1:]}"
            )
        a = np.clip(a, -1.0, 1.0)
        full = np.zeros((1, self.codec.act_dim))
        full[0, :n] = a[:, 0]  # prosumer batteries come first; the community battery idles
        decoded = self.engine.decode(full)
        state = self._state
        ref = self.exchange.reference(state)
        low, high = self.exchange.band(ref)
        qty = np.rint(np.abs(a[:, 2]) * self._max_wh).astype(np.int64)
        side = np.where(a[:, 2] > 0.0, BUY, SELL).astype(np.int64)
        limit = np.rint(low + (a[:, 1] + 1.0) / 2.0 * (high - low)).astype(np.int64)
        book = Book(qty[None, :], limit[None, :], side[None, :])
        gate = self.exchange.open(state, decoded, book)
        capacity = state.capacity_kwh[0, :n].copy()
        self._state, out, _ = self.engine.step(state, decoded)
        settlement = self.exchange.close(gate, self._state)
        fade = capacity - self._state.capacity_kwh[0, :n]
        degradation = fade * p.batteries.replacement_cost_per_kwh[:n] * p.w_degradation
        reward = settlement.cash[0] / MONEY_UNITS - degradation
        self._last_price = float(settlement.price[0]) * 1000.0 / MONEY_UNITS
        self._last_imbalance = settlement.imbalance_wh[0] / self._max_wh
        truncated = bool(out.truncated[0])
        shared = market_info(settlement, gate, 0)
        shared["power_flow_converged"] = not bool(out.diverged[0])
        if truncated:
            shared["truncation_reason"] = (
                "power_flow_diverged" if out.diverged[0] else "end_of_episode"
            )
        obs = self._observations()
        rewards = {ag: float(reward[k]) for k, ag in enumerate(self.possible_agents)}
        infos = {
            ag: {
                **shared,
                "fill_kwh": float(settlement.fill_wh[0, k]) / 1000.0,
                "imbalance_kwh": float(settlement.imbalance_wh[0, k]) / 1000.0,
                "cash": float(settlement.cash[0, k]) / MONEY_UNITS,
                "degradation_cost": float(degradation[k]),
            }
            for k, ag in enumerate(self.possible_agents)
        }
        terminations = {ag: False for ag in self.possible_agents}
        truncations = {ag: truncated for ag in self.possible_agents}
        if truncated:
            self.agents = []
        return obs, rewards, terminations, truncations, infos
