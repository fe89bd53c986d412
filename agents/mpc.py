"""Model predictive control: the dispatch LP re-solved every step on the observed forecasts.

This is the strongest controller here that sees only what a deployed agent sees (the
observation), so the gap between it and the perfect-foresight optimum is the price of forecast
error and of a short horizon. Everything it plans on is decoded from the observation through the
codec; the only extra knowledge is the published time-of-use tariff of the whole day, which
prices the energy still stored at the horizon's end (see `terminal_ladder`). Without such a
value a receding-horizon LP empties the batteries at every horizon's end and forgets the
evening peak just beyond it; with a flat value (every kWh worth the day's peak price) it buys
energy overnight that the evening cannot use.
"""

from __future__ import annotations

import numpy as np

from agents.lp import DispatchInputs, TerminalLadder, solve_dispatch
from agents.optimum import battery_names
from envs.codec import Codec
from envs.params import FloatArray, GridParams


class MPCPolicy:
    """Receding-horizon LP over the forecast horizon; applies the first slot's set-points."""

    name = "mpc"

    def __init__(
        self,
        params: GridParams,
        codec: Codec | None = None,
        degradation_weight: float = 1.0,
    ) -> None:
        self.params = params
        self.codec = codec or Codec.from_params(params)
        self.degradation_weight = degradation_weight
        sizes = dict(self.codec.field_sizes())
        self.n_prosumer = sizes["load"]
        self.horizon = sizes["import_price_forecast"]
        self._names = battery_names(params)

    def slot_of_day(self, time_of_day: FloatArray) -> int:
        """Recover the slot of the day from the observation's (sin, cos) phase."""
        phase = float(np.arctan2(time_of_day[0], time_of_day[1])) / (2.0 * np.pi)
        return round(phase * self.params.steps_per_day) % self.params.steps_per_day

    def terminal_ladder(self, slot_of_day: int, demand_kw: float) -> TerminalLadder:
        """Worth of the energy left in the cells when the horizon ends, as a falling ladder.

        Each tariff slot still to come today after the horizon can absorb about `demand_kw`
        (the community's forecast gross demand, assumed to persist: a cautious guess for the
        evening peak) at its import price; a stored kWh goes to the dearest slot not yet
        served, at efficiency eta_d and paying the cycle-ageing cost. Energy beyond all of
        that can only be exported. Nothing is left to come at the day's end, which matches the
        one-day episode's free final SoC.
        """
        p = self.params
        future = p.import_price[slot_of_day + self.horizon : p.steps_per_day]
        if future.size == 0:
            return TerminalLadder(np.zeros(0), np.zeros(0))
        b = p.batteries
        eta_d = float(b.efficiency_discharge.mean())
        k_deg = self.degradation_weight * float(
            (b.fade_per_full_cycle * b.replacement_cost_per_kwh).mean() / 2.0
        )
        prices, counts = np.unique(future, return_counts=True)
        order = np.argsort(prices)[::-1]
        cell_kwh_per_slot = max(demand_kw, 0.0) * p.dt_h / eta_d
        widths = counts[order] * cell_kwh_per_slot
        values = eta_d * prices[order] - k_deg
        tail = max(eta_d * p.feed_in_price - k_deg, 0.0)
        widths = np.append(widths, float(b.capacity_kwh.sum()))
        values = np.maximum(np.append(values, tail), 0.0)
        # A tariff below the feed-in price would make the ladder rise: flatten it.
        values = np.minimum.accumulate(values)
        return TerminalLadder(widths.astype(np.float64), values.astype(np.float64))

    def inputs(self, raw: dict[str, np.ndarray], row: int) -> DispatchInputs:
        """The LP inputs of one decoded observation row."""
        n, h = self.n_prosumer, self.horizon
        return DispatchInputs(
            load_kw=np.maximum(raw["load_forecast"][row].reshape(n, h).T, 0.0),
            pv_kw=np.maximum(raw["pv_forecast"][row].reshape(n, h).T, 0.0),
            background_net_kw=raw["background_net_forecast"][row],
            import_price=np.maximum(raw["import_price_forecast"][row], 0.0),
            feed_in_price=float(raw["feed_in_price"][row, 0]),
            dt_h=self.params.dt_h,
        )

    def predict(self, obs: np.ndarray) -> np.ndarray:
        o = np.asarray(obs, dtype=np.float64)
        single = o.ndim == 1
        raw = self.codec.decode_observation(o)
        bat = self.params.batteries
        kw = np.zeros((raw["soc"].shape[0], bat.n))
        curtail = np.zeros((raw["soc"].shape[0], self.n_prosumer))
        for i in range(kw.shape[0]):
            x = self.inputs(raw, i)
            demand = float(x.load_kw.sum(axis=1).mean() + max(x.background_net_kw.mean(), 0.0))
            plan = solve_dispatch(
                bat,
                raw["soc"][i],
                x,
                capacity_kwh=raw["state_of_health"][i] * bat.capacity_kwh,
                degradation_weight=self.degradation_weight,
                terminal_ladder=self.terminal_ladder(
                    self.slot_of_day(raw["time_of_day"][i]), demand
                ),
                battery_names=self._names,
            )
            kw[i] = plan.battery_kw[0]
            curtail[i] = plan.pv_curtailment[0]
        a = self.codec.encode_action(kw, curtail, np.zeros_like(curtail))
        return a[0] if single else a
