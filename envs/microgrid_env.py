"""`MicrogridEnv`: the community microgrid as a Gymnasium environment (`Microgrid-v0`)."""

from __future__ import annotations

import operator
from pathlib import Path
from typing import Any, SupportsFloat

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from envs.dynamics import GridState, Solver, StepOutcome
from envs.engine import Engine
from envs.exchange import Exchange
from envs.kpis import (
    MARKET_INFO,
    OUTCOME_FIELDS,
    STEP_INFO,
    EpisodeKpis,
    MarketKpis,
    outcome_matrix,
)
from envs.scenario import Scenario


def outcome_info(o: StepOutcome, i: int) -> dict[str, Any]:
    """Row `i` of a step outcome as the plain-float `info` dict."""
    return row_info(outcome_matrix(o)[i].tolist())


_INFO_GET = operator.itemgetter(*(OUTCOME_FIELDS.index(k) for k in STEP_INFO))
_COST = OUTCOME_FIELDS.index("cost")
_PENALTY = OUTCOME_FIELDS.index("penalty_cost")
_DIVERGED = OUTCOME_FIELDS.index("diverged")
_TRUNCATED = OUTCOME_FIELDS.index("truncated")
_REWARD = OUTCOME_FIELDS.index("reward")


def row_info(row: list[float]) -> dict[str, Any]:
    """One row of the outcome matrix (as a list) as the plain-float `info` dict."""
    info: dict[str, Any] = dict(zip(STEP_INFO, _INFO_GET(row), strict=True))
    info["reward_terms"] = {"energy_cost": -row[_COST], "penalties": -row[_PENALTY]}
    diverged = row[_DIVERGED] > 0.5
    info["power_flow_converged"] = not diverged
    if diverged:
        info["truncation_reason"] = "power_flow_diverged"
    return info


class MicrogridEnv(gym.Env[np.ndarray, np.ndarray]):
    """A low-voltage feeder with prosumers, PV, batteries and flexible loads, over real data.

    ## Description

    A simbench LV grid (default `1-LV-rural1--2-sw`: 15 buses, 13 prosumers, 5 home
    batteries plus a community battery) with a year of real 15-minute load and PV profiles.
    Each step the community operator sets battery set-points, PV curtailment, a
    demand-response share per prosumer and a price signal; an exact AC power flow of the
    feeder follows, and the community pays the upstream grid for what crosses the
    transformer. Everything not controlled follows its simbench profile.

    ## Action Space

    `Box(-1, 1, (2 * n_prosumer + n_battery + 1,), float32)`; layout and meaning in
    `envs.codec` (`env.codec.action_names()`):

    | block | size | unit | meaning |
    |---|---|---|---|
    | battery | n_battery | fraction of rated kW | set-point, charging > 0 |
    | pv_curtailment | n_prosumer | fraction | share of available PV curtailed, max(a, 0) |
    | demand_response | n_prosumer | fraction | share of flexible load called, max(a, 0) |
    | price_signal | 1 | log multiplier | community price x signal_range ** a |

    Values outside [-1, 1] are clipped; `info["action_clipped"]` counts them. A NaN or
    wrongly shaped action raises `ActionError`.

    ## Observation Space

    `Box(low, high, (obs_dim,), float32)`, every entry scaled and clipped to its bounds;
    `env.codec.obs_names()` names each entry. H is the forecast horizon.

    | block | size | unit | scaling | bounds |
    |---|---|---|---|---|
    | time_of_day | 2 | sin/cos | - | [-1, 1] |
    | day_of_year | 2 | sin/cos | - | [-1, 1] |
    | soc | n_battery | fraction | - | [0, 1] |
    | state_of_health | n_battery | fraction | capacity / nominal | [0, 1] |
    | load | n_prosumer | kW | / year peak | [0, 10] |
    | pv | n_prosumer | kW | / year peak | [0, 10] |
    | backlog | n_prosumer | kWh | / year peak load | [0, 50] |
    | load_forecast | n_prosumer x H | kW | / year peak | [0, 10] |
    | pv_forecast | n_prosumer x H | kW | / year peak | [0, 10] |
    | background_net_forecast | H | kW | / peak net load | [-10, 10] |
    | import_price_forecast | H | currency/kWh | / peak price | [0, 10] |
    | feed_in_price | 1 | currency/kWh | / peak price | [0, 10] |
    | community_price | 1 | currency/kWh | / peak price | [0, 50] |
    | grid | 4 | pu, fraction | (v - 1) / 0.1; loading | [-10, 10] |

    ## Rewards

    `reward = -(w_cost * energy_cost + w_v * voltage_violation_pu + w_th * overload
    + w_deg * degradation_cost + w_dr * discomfort)` where energy cost = import kWh x
    time-of-use price - export kWh x feed-in price. Each term and the KPIs are in `info`.
    A diverged power flow gives `-divergence_penalty` (bounded) and truncates.

    ## Market

    Each step also runs the community's peer-to-peer market (docs/market.md): every prosumer
    orders its expected position by the default bidding rule, the book clears at one uniform
    price, and the ledger the scenario names (`mirror`, `evm`, `rpc`) settles fills and then
    metered imbalances. Its figures are in `info` (`market_price`, `market_traded_kwh`,
    `market_gas_used`, ...); the reward stays the community's bill with the upstream grid.

    ## Starting State

    A day drawn from the env's split (`train`, `validation` or `test`; test days never
    appear in training), batteries at `soc_initial`, the grid state of the slot before.
    `reset(options={"day": d, "soc": x})` chooses the day (of this split) and initial SoC.

    ## Episode End

    Never terminates: the end of the episode's data (one day by default) is truncation, and
    so is a diverged power flow (`info["truncation_reason"]`). The last step's info holds
    `episode_kpis` (cost, import/export kWh, peak kW, violations, self-sufficiency, losses).

    ## Arguments

    `gymnasium.make("Microgrid-v0", scenario=None | path | Scenario, split="train")`.

    ## Version History

    * v0: initial version; the market (`info["market_*"]`, `dr_event`, `emergency`) added
      without changing spaces or reward.
    """

    metadata = {"render_modes": [], "render_fps": 4}  # noqa: RUF012 - gymnasium's convention

    def __init__(
        self,
        scenario: Scenario | str | Path | None = None,
        split: str = "train",
        solver: Solver | None = None,
        render_mode: str | None = None,
    ) -> None:
        if render_mode is not None:
            raise ValueError(f"render_mode: {render_mode!r} is not supported; allowed: None")
        self.engine = Engine(scenario, split, solver)
        self.scenario = self.engine.scenario
        self.params = self.engine.params
        self.codec = self.engine.codec
        self.split = split
        low, high = self.codec.bounds()
        self.observation_space = spaces.Box(low, high, dtype=np.float32)
        self.action_space = spaces.Box(-1.0, 1.0, (self.codec.act_dim,), dtype=np.float32)
        market = self.scenario.market
        self.exchange = (
            Exchange(self.params, market, 1, self.engine.compiled) if market.enabled else None
        )
        self._state: GridState | None = None
        self._kpis = EpisodeKpis(1)
        self._market_kpis = MarketKpis(1)
        self._nominal_kwh = np.maximum(self.params.batteries.capacity_kwh, 1e-12)

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[np.ndarray, dict[str, Any]]:
        super().reset(seed=seed)
        day, soc = self.engine.parse_options(options)
        day, offset = self.engine.draw_start(self.np_random, day)
        self._state = self.engine.reset(
            np.array([day]), None if soc is None else soc[None, :], np.array([offset])
        )
        self._kpis = EpisodeKpis(1)
        self._market_kpis = MarketKpis(1)
        if self.exchange is not None:
            self.exchange.reset(np.array([0]))
        return self.engine.observe(self._state)[0], {"day": day, "split": self.split}

    def step(
        self, action: np.ndarray
    ) -> tuple[np.ndarray, SupportsFloat, bool, bool, dict[str, Any]]:
        if self._state is None:
            raise gym.error.ResetNeeded("call reset() before step()")
        actions = np.asarray(action)[None, :]
        a = self.engine.advance(self._state, actions, self._kpis, self._market_kpis, self.exchange)
        self._state, obs, matrix, market = a.state, a.obs[0], a.outcome, a.market
        n_clipped, clip_amount = float(a.clipped[0]), float(a.clip_amount[0])
        row = matrix[0].tolist()
        info = row_info(row)
        info["action_clipped"] = int(n_clipped)
        info["action_clip_amount"] = clip_amount
        info["soc"] = self._state.soc[0].copy()
        info["state_of_health"] = self._state.capacity_kwh[0] / self._nominal_kwh
        if market is not None:
            info.update(zip(MARKET_INFO, market[0].tolist(), strict=True))
        truncated = row[_TRUNCATED] > 0.5
        if truncated:
            info["episode_kpis"] = self._kpis.row(0)
            if self.exchange is not None:
                info["episode_kpis"].update(self._market_kpis.row(0))
        return obs, row[_REWARD], False, truncated, info

    @property
    def state(self) -> GridState:
        """The current batched (B = 1) state, for tests and baselines that plan ahead."""
        if self._state is None:
            raise gym.error.ResetNeeded("call reset() first")
        return self._state
